"""One run's training, resident on a worker from its first chunk to its last.

A `RunSession` is built once per run on a worker: the run's adapter (or its own copy of the
weights), its TRL trainer, optimizer and LR schedule, its RNG state and its position in the data.
Training a chunk continues that state for some optimizer steps; nothing is rebuilt or read from
disk at a chunk boundary, and switching runs swaps only the active adapter and the RNG state.

Each micro-batch is TRL's own training step (the method's loss, backward and metrics; set up once
per chunk rather than per micro-batch: `micro_step.MicroStep`); around it this module does what
`Trainer._inner_training_loop` does for a step, in its order: the trainer's callbacks
(`on_step_begin`, `on_substep_end`, `on_pre_optimizer_step`, `on_optimizer_step`, `on_step_end`,
`on_epoch_begin`/`on_epoch_end`, `on_log`; so TRL's own callbacks, such as the reference-model sync of
`sync_ref_model`, act as under `train()`), gradient accumulation, clipping, the optimizer and scheduler
steps, `logging_nan_inf_filter`, `include_num_input_tokens_seen` and logging when the callbacks ask for
it, without the per-`train()` set-up. Evaluation and saving are finetune's, at chunk boundaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from finetune.train.data_order import BatchStream, DataPosition, trainer_epoch_order
from finetune.train.distributed import gather_to_first
from finetune.train.micro_step import MicroStep
from finetune.train.seams.transformers import checkpointing_requested, enable_activation_checkpointing
from finetune.train.seams.trl import generation_counter, set_generation_counter

# RunState and the helpers are imported from here by the modules that train with a session.
from finetune.train.run_state import (  # noqa: F401
    RunState,
    _moved,
    _synchronize,
    capture_rng,
    restore_rng,
    to_cpu,
    with_own_hyperparameters,
)

MetricsSink = Callable[[str, int, dict[str, float]], None]


class RunSession:
    """A run's trainer and training state, kept between chunks."""

    def __init__(self, run_id: str, trainer: Any, adapter_name: str | None, device: str, total_steps: int) -> None:
        import torch

        self.run_id, self.trainer, self.adapter_name, self.device = run_id, trainer, adapter_name, device
        self.total_steps = total_steps
        prepare_model_as_train_does(trainer)
        trainer.model_wrapped = self._wrap(trainer)
        self.model = trainer.model
        # In a gang, `wrapped` is the DDP (or FSDP) module whose backward synchronises the ranks.
        self.wrapped = trainer.model_wrapped
        self.micro_step = MicroStep(trainer, self.wrapped)
        self.rank, self.world = trainer.accelerator.process_index, trainer.accelerator.num_processes
        self.params = [param for param in self.model.parameters() if param.requires_grad]
        args = trainer.args
        # TRL's SyncRefModelCallback mixes the policy into its own reference model: part of the run's state then.
        self.reference = getattr(trainer, "ref_model", None) if getattr(args, "sync_ref_model", False) else None
        trainer.is_in_train = True  # as train() sets it: evaluation must not cast the model for bf16/fp16_full_eval
        trainer.create_optimizer()
        trainer.optimizer = trainer.accelerator.prepare(trainer.optimizer)
        trainer.create_scheduler(num_training_steps=total_steps, optimizer=trainer.optimizer)
        trainer.state.max_steps = total_steps
        trainer.state.compute_steps(args, total_steps)  # logging_steps below 1: a ratio of the run's steps
        loader = trainer.get_train_dataloader()
        total = getattr(loader, "total_batch_size", None)  # accelerate's loader: over all the gang's ranks
        batch_size = total // self.world if total else loader.batch_size or args.per_device_train_batch_size
        self.stream = BatchStream(
            loader.dataset, loader.collate_fn, batch_size, args.dataloader_drop_last,
            trainer_epoch_order(trainer, loader.dataset, _order_seed(args)), num_workers=args.dataloader_num_workers,
            shard=(self.rank, self.world),
        )
        self.tr_loss = torch.zeros((), device=args.device)
        self.last_logged = 0
        self.rng = capture_rng(device)
        # What the callbacks are handed as keyword arguments (HF sets these at the start of train()).
        handler = trainer.callback_handler
        handler.model, handler.optimizer, handler.lr_scheduler = trainer.model, trainer.optimizer, trainer.lr_scheduler
        handler.train_dataloader = loader
        trainer.control = handler.on_train_begin(args, trainer.state, trainer.control)
        self.on_step: Callable[[int, list[Any]], None] | None = None  # (step, its micro-batches): progress
        self._step_batches: list[Any] = []  # the micro-batches of the step under way (`begin_step`)

    def _wrap(self, trainer: Any) -> Any:
        """As Trainer.train does: mixed-precision autocast around the forward (and DDP in a gang).
        Accelerate marks the model, so a base shared by several runs is wrapped once and only
        registered by the others."""
        return trainer.accelerator.prepare_model(trainer.model)

    @property
    def step(self) -> int:
        return int(self.trainer.state.global_step)

    # ------------------------------------------------------------ training

    def activate(self) -> None:
        """Make this run's adapter the one the shared model trains and evaluates (and its NEFTune alpha)."""
        if self.adapter_name is not None and self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name)
        alpha = self.trainer.args.neftune_noise_alpha
        if alpha is not None:
            _input_embeddings(self.model).neftune_noise_alpha = alpha

    def train_until(self, stop_step: int) -> float:
        """Optimizer steps up to `stop_step`; returns their wall time (device work included)."""
        self.activate()
        restore_rng(self.rng, self.device)
        started = time.perf_counter()
        self.micro_step.enter_training()
        while self.step < stop_step:
            self._optimizer_step()
            if self.trainer.control.should_training_stop and self.step < self.total_steps:
                raise RuntimeError(
                    f"run {self.run_id}: a trainer callback stopped training at step {self.step} of {self.total_steps} "
                    "(control.should_training_stop); finetune ends runs early through the sweep's policy or `finetune ctl stop`"
                )
        _synchronize(self.device)
        seconds = time.perf_counter() - started
        self.rng = capture_rng(self.device)
        self.end_if_done()
        return seconds

    def end_if_done(self) -> None:
        """HF's `on_train_end` once the run's last step is trained (after its last chunk's steps)."""
        if self.step >= self.total_steps:
            self.trainer.control = self._handler.on_train_end(self.trainer.args, self.trainer.state, self.trainer.control)

    @property
    def _handler(self) -> Any:
        return self.trainer.callback_handler

    def _event(self, name: str) -> None:
        trainer = self.trainer
        trainer.control = getattr(self._handler, name)(trainer.args, trainer.state, trainer.control)

    def _optimizer_step(self) -> None:
        """One optimizer step, as an iteration of `Trainer._run_epoch` (callbacks included, in its order).
        A fused group (`fused.FusedGroup`) calls the same three parts around its shared micro-steps."""
        batches, items = self.begin_step()
        self.train_micro_batches(batches, items)
        self.finish_step()

    def train_micro_batches(self, batches: list[Any], items: Any, start: int = 0) -> None:
        """Forward and backward of a step's micro-batches from `start` on (a fused group's member that leaves it
        mid-step trains the rest of its step here)."""
        for index in range(start, len(batches)):
            inputs, last = batches[index], index == len(batches) - 1
            # As HF's loop: only a step's last micro-batch syncs (GRPO's adaptive entropy reads it too).
            self.trainer.accelerator.sync_gradients = last
            with self._gradient_sync(last):
                loss = self.micro_step(inputs, items)
            self.end_micro_step(loss, inputs, last)

    def begin_step(self) -> tuple[list[Any], Any]:
        """An optimizer step's micro-batches and their item count (the loss's denominator), in data order."""
        trainer, args = self.trainer, self.trainer.args
        if self.stream.at_epoch_start():
            self._event("on_epoch_begin")
        batches, items = trainer.get_batch_samples(iter(self.stream.next_step(args.gradient_accumulation_steps)),
                                                   args.gradient_accumulation_steps, args.device)
        trainer.current_gradient_accumulation_steps = len(batches)
        self._event("on_step_begin")
        self._step_batches = batches
        return batches, items

    def end_micro_step(self, loss: Any, inputs: dict[str, Any], last: bool) -> None:
        """A micro-batch's loss into the logged mean (`logging_nan_inf_filter` as HF), its tokens counted."""
        import torch

        if self.trainer.args.logging_nan_inf_filter and not torch.isfinite(loss):
            self.tr_loss += self.tr_loss / (1 + self.step - self.last_logged)  # HF: the mean of the losses since the last log
        else:
            self.tr_loss += loss
        self._count_tokens(inputs)
        if not last:
            self._event("on_substep_end")

    def finish_step(self) -> None:
        """After a step's backward passes: clipping, the optimizer and LR schedule steps, logging."""
        trainer, args, accelerator = self.trainer, self.trainer.args, self.trainer.accelerator
        # The optimizer and scheduler step only while gradients are synced. The flag lives in accelerate's
        # GradientState, shared by every Accelerator of the process: a fused group's other members may
        # have cleared it since this step's last micro-batch set it.
        accelerator.sync_gradients = True
        grad_norm = self._clip(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        self._event("on_pre_optimizer_step")
        trainer.optimizer.step()
        self._event("on_optimizer_step")
        learning_rate = trainer.lr_scheduler.get_last_lr()[0]
        if not accelerator.optimizer_step_was_skipped:
            trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        trainer.state.epoch = self.stream.epoch_progress()
        self._event("on_step_end")
        self._maybe_log(grad_norm, learning_rate)
        if self.stream.at_epoch_end() or self.step >= self.total_steps:  # HF's loop ends its epoch at its last step too
            self._event("on_epoch_end")
            self._maybe_log(grad_norm, learning_rate)
        if self.on_step is not None:  # progress (a worker's StepMeter): the step and its micro-batches
            self.on_step(self.step, self._step_batches)
        self._step_batches = []  # not kept alive while the session waits for its next chunk

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        """`include_num_input_tokens_seen`, counted as HF's loop counts it (every rank's tokens)."""
        import torch

        how, trainer = self.trainer.args.include_num_input_tokens_seen, self.trainer
        name = getattr(self.model, "main_input_name", "input_ids")
        if how in ("no", False, None) or name not in inputs:
            return
        if how == "non_padding" and "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif how == "non_padding" and getattr(trainer.processing_class, "pad_token_id", None) is not None:
            count = (inputs[name] != trainer.processing_class.pad_token_id).sum()
        else:
            count = inputs[name].numel()
        count = torch.as_tensor(count, device=trainer.args.device, dtype=torch.int64)
        trainer.state.num_input_tokens_seen += int(trainer.accelerator.gather(count).sum().item())

    def _clip(self, max_norm: float) -> Any:
        return self.trainer.accelerator.clip_grad_norm_(self.params, max_norm)

    def _gradient_sync(self, last: bool) -> Any:
        """As HF's loop: ranks exchange gradients on a step's last micro-batch only (DeepSpeed: always)."""
        accelerator = self.trainer.accelerator
        if self.world == 1 or last or accelerator.distributed_type == "DEEPSPEED":
            return contextlib.nullcontext()
        return accelerator.no_sync(self.wrapped)

    def _maybe_log(self, grad_norm: Any, learning_rate: float) -> None:
        """As `Trainer._maybe_log_save_evaluate` logs: when a callback (HF's flow callback: logging_steps,
        logging_first_step, logging_strategy) asks for it."""
        from transformers.trainer_pt_utils import nested_gather

        if not self.trainer.control.should_log or self.step <= self.last_logged:
            return
        loss = nested_gather(self.tr_loss, self.trainer.args.parallel_mode).mean().item()  # every rank's mean
        logs = {"loss": loss / (self.step - self.last_logged), "learning_rate": learning_rate}
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        self.tr_loss.zero_()
        self.last_logged = self.step
        self.trainer.log(logs)

    def evaluate(self) -> dict[str, float]:
        self.activate()
        metrics = self.trainer.evaluate()
        return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}

    # ------------------------------------------------------------ state

    def trainable_state(self) -> dict[str, Any]:
        """The weights this run trains, as live tensors (PEFT's names for an adapter)."""
        if self.adapter_name is None:
            return self.model.state_dict()
        from peft import get_peft_model_state_dict

        # The grown embeddings live in the base written once per experiment, not in every adapter.
        return get_peft_model_state_dict(self.model, adapter_name=self.adapter_name, save_embedding_layers=False)

    def snapshot(self, target: Path, final: bool) -> Any:
        """A CPU copy of the run's state, to be written to `target`; the device goes on training while
        it is written. In a gang every rank sends its RNG state to rank 0, which alone gets the copy
        (DDP ranks hold the same weights); the others get None. (A sharded run writes its shards
        here, every rank its own: `sharded.ShardedSession`.)"""
        rng = self.rng if self.world == 1 else {"ranks": gather_to_first(self.rng)}
        if self.rank != 0:
            return None
        position = DataPosition(self.stream.position.epoch, self.stream.position.batch)
        state = RunState(
            self.step, position, to_cpu(self.trainable_state()), to_cpu(self.trainer.optimizer.state_dict()),
            self.trainer.lr_scheduler.state_dict(), rng, self.counters(),
            to_cpu(self.reference.state_dict()) if self.reference is not None else None,
        )
        _synchronize(self.device)
        return state

    def counters(self) -> dict[str, float]:
        return {"tr_loss": float(self.tr_loss.item()), "last_logged": self.last_logged,
                "grpo_step": generation_counter(self.trainer), "epoch": float(self.trainer.state.epoch or 0.0),
                "num_input_tokens_seen": float(self.trainer.state.num_input_tokens_seen)}

    def restore(self, state: RunState) -> None:
        """Continue from a durable checkpoint (after a crash, on another worker, or a PBT exploit's donor's).
        The optimizer's moments and the schedule's position come from the checkpoint; its hyperparameters
        (learning rate, weight decay, betas...) stay this run's own: identical for the run's own checkpoint, the
        perturbed ones for a clone that continues its donor (as Ray Tune's PBT does)."""
        if self.adapter_name is None:
            self.model.load_state_dict(state.trainable)
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, state.trainable, adapter_name=self.adapter_name)
        configured = [{key: value for key, value in group.items() if key != "params"}
                      for group in self.trainer.optimizer.param_groups]
        optimizer, scheduler = with_own_hyperparameters(state.optimizer, state.scheduler, configured)
        self.trainer.optimizer.load_state_dict(optimizer)
        if self.reference is not None and state.reference is not None:
            self.reference.load_state_dict(state.reference)
        self.rng = self._own_rng(state.rng)
        self.continue_at(dataclasses.replace(state, scheduler=scheduler))

    def continue_at(self, state: RunState) -> None:
        """The schedule, data position, step and counters of a checkpoint."""
        self.trainer.lr_scheduler.load_state_dict(state.scheduler)
        self.stream.seek(state.position)
        self.trainer.state.global_step = state.step
        self.trainer.state.epoch = state.counters.get("epoch", 0.0)
        self.tr_loss.fill_(state.counters.get("tr_loss", 0.0))
        self.last_logged = int(state.counters.get("last_logged", state.step))
        self.trainer.state.num_input_tokens_seen = int(state.counters.get("num_input_tokens_seen", 0))
        set_generation_counter(self.trainer, int(state.counters.get("grpo_step", 0)))

    def _own_rng(self, saved: dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG state from a checkpoint (a gang's holds one per rank)."""
        ranks = saved.get("ranks")
        if ranks is None and self.world == 1:
            return saved
        if ranks is None or len(ranks) != self.world:
            saved_on = len(ranks) if ranks else 1
            raise RuntimeError(
                f"run {self.run_id}: its checkpoint was written by {saved_on} process(es) and is resumed by {self.world}; "
                f"resume it with experiment.devices_per_run: {saved_on}"
            )
        return ranks[self.rank]

    # ------------------------------------------------------------ memory placement

    def state_tensors(self) -> list[Any]:
        """The run's own tensors: trainable parameters and optimizer moments."""
        import torch

        tensors = list(self.params)
        for per_param in self.trainer.optimizer.state.values():
            tensors.extend(value for value in per_param.values() if isinstance(value, torch.Tensor) and value.dim() > 0)
        return tensors

    def resident_bytes(self, device_type: str) -> int:
        """Bytes of the run's own state now on `device_type` ('cuda' or 'cpu')."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors() if t.device.type == device_type)

    def move_state(self, target: str) -> None:
        """Move the run's own tensors to `target`: pinned CPU memory to free the GPU, or back."""
        import torch

        pin = target == "cpu" and torch.cuda.is_available()
        for param in self.params:
            param.data = _moved(param.data, target, pin)
        for per_param in self.trainer.optimizer.state.values():
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    per_param[key] = _moved(value, target, pin)
        _synchronize(self.device)


def prepare_model_as_train_does(trainer: Any) -> None:
    """What `Trainer.train()` does to the model before its loop, which finetune never calls: Liger's
    kernels (`use_liger_kernel`), activation checkpointing (`gradient_checkpointing`) and NEFTune's
    embedding noise (`neftune_noise_alpha`). A base shared by several runs is prepared once (runs that
    differ in these settings never share one: `bases.base_key`)."""
    args, model = trainer.args, trainer.model
    if args.use_liger_kernel and not getattr(model, "finetune_liger_applied", False):
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, args.liger_kernel_config)
        model.finetune_liger_applied = True
    if checkpointing_requested(args):
        enable_activation_checkpointing(model, args)
    embeddings = _input_embeddings(model)
    if args.neftune_noise_alpha is not None and not hasattr(embeddings, "neftune_noise_alpha"):
        from transformers.integrations.neftune import activate_neftune

        activate_neftune(model, args.neftune_noise_alpha)


def _input_embeddings(model: Any) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_input_embeddings()


def _order_seed(args: Any) -> int:
    """The seed of the epoch order: `data_seed`, else `seed` (as accelerate's seedable sampler under train())."""
    return int(args.data_seed if args.data_seed is not None else args.seed)
