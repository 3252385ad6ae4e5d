"""Sharded runs: a gang's run trained with PyTorch's FSDP2, its checkpoints in DCP's sharded format.

`fsdp` (ZeRO-3 like) shards weights, gradients and optimizer moments over the gang's ranks;
`fsdp_grad_op` (ZeRO-2 like) keeps each layer's gathered weights from its forward to its backward
(`reshard_after_forward=False`). Each decoder layer is one FSDP unit, then the root; the mixed
precision policy follows the run's `bf16`/`fp16`; `experiment.fsdp_cpu_offload` keeps the shards in
CPU memory. Built on torch's API (`fully_shard`, `torch.distributed.checkpoint`), not accelerate's.

A durable chunk is written by every rank at once, each its own shard, in the background
(`dcp.async_save`: a CPU copy is taken at the chunk boundary, and the shards are written while the
ranks train on); rank 0 then adds `state.pt` (schedule, every rank's RNG, data position) and renames
the directory into place. Only
the final model is gathered whole, on rank 0, and saved as transformers and PEFT save it. A shard
checkpoint loads into a gang of any size: DCP reshards what it reads (`restore_shards` for the run
that wrote it, `start_from_shards` for a new run that `run_conf.resume_from_checkpoint` names it for).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.io import mkdir_under
from finetune.train.checkpoint import own_hyperparameters, publish
from finetune.train.data_order import DataPosition
from finetune.train.distributed import gather_to_first
from finetune.train.run_state import with_own_hyperparameters
from finetune.train.session import RunSession, RunState

# strategy -> reshard_after_forward
SHARDED_STRATEGIES = {"fsdp": True, "fsdp_grad_op": False}
SHARD_METADATA = ".metadata"  # DCP's index of a sharded checkpoint


class ShardedCheckpointError(RuntimeError):
    """A sharded checkpoint that cannot be read or written; the message names its directory and the cause.
    (torch's own `CheckpointException` is a BaseException, which a worker must not let end it.)"""


def checkpoint_failure(directory: Path, doing: str, error: BaseException) -> ShardedCheckpointError:
    """`error` (torch's CheckpointException, or another) said in one line: the first rank's cause."""
    cause: BaseException = error
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (cause, _) = sorted(failures.items())[0]
        where = f" (rank {rank}{' and others' if len(failures) > 1 else ''})"
    else:
        where = ""
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    return ShardedCheckpointError(f"the sharded checkpoint {directory} cannot be {doing}{where}: "
                                  f"{type(cause).__name__}{': ' + first if first else ''}")


def _is_checkpoint_exception(error: BaseException) -> bool:
    return type(error).__name__ == "CheckpointException" or isinstance(error, Exception)


def is_sharded(strategy: str) -> bool:
    return strategy in SHARDED_STRATEGIES


def is_shard_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / SHARD_METADATA).is_file()


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks: the modules of the classes HF names in `_no_split_modules`."""
    from finetune.train.seams.transformers import no_split_module_classes

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = no_split_module_classes(inner)
    layers = [module for module in inner.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(inner).__name__} names no decoder layer class (_no_split_modules): FSDP cannot shard it by layer")
    return layers


def shard_model(model: Any, strategy: str, training_args: Any, cpu_offload: bool) -> Any:
    """`fully_shard` on each decoder layer, then on the root; the model is changed in place."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    compute = torch.bfloat16 if getattr(training_args, "bf16", False) else torch.float16 if getattr(training_args, "fp16", False) else None
    # Gradients are reduced in fp32 whatever the compute dtype: a sum over ranks in bf16 loses bits.
    precision = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    options = {"reshard_after_forward": SHARDED_STRATEGIES[strategy], "mp_policy": precision, "offload_policy": offload}
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    if hasattr(model, "generate"):  # GRPO generates with the model being trained: gather its root weights then too
        register_fsdp_forward_method(model, "generate")
    return model


@dataclass
class ShardedState:
    """A chunk's shards being written into `staging` (`written`: done once every rank's shard is on disk);
    rank 0 then finishes the checkpoint."""

    staging: Path
    written: Any  # the Future of dcp.async_save
    extra: dict[str, Any] | None  # written as state.pt, by rank 0
    final_weights: dict[str, Any] | None  # the whole trained weights, on rank 0 at the final chunk


class _Saves:
    """The checkpoints' own process group (gloo: DCP's collectives in a background thread must not
    interleave with training's), and the save in flight: one at a time, in the same order on every rank."""

    group: Any = None
    in_flight: Any = None

    @classmethod
    def start(cls, state: dict[str, Any], staging: Path) -> Any:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        if cls.group is None:
            cls.group = dist.new_group(backend="gloo")
        if cls.in_flight is not None:
            cls.in_flight.result()
        cls.in_flight = dcp.async_save(state, checkpoint_id=str(staging), process_group=cls.group)
        return cls.in_flight


def staging_dir(target: Path) -> Path:
    """The same on every rank (each writes its shard there); rank 0 renames it into place."""
    return target.with_name(f".{target.name}.tmp-shards")


def publish_shards(state: ShardedState, target: Path) -> None:
    """Once every rank's shard is written (DCP's index is written last, by rank 0): rank 0 adds the run's
    small state and renames the directory into place; the other ranks only wait."""
    import torch

    try:
        state.written.result()
    except BaseException as error:
        if not _is_checkpoint_exception(error):
            raise
        raise checkpoint_failure(state.staging, "written", error) from None
    if state.extra is None:
        return
    torch.save(state.extra, state.staging / "state.pt")
    publish(state.staging, target)


class ShardedSession(RunSession):
    """A run whose model is sharded with FSDP2 over the gang: once its trainer is built (TRL's DPO adds
    its reference adapter then) and before its optimizer is, which must hold the shards."""

    def __init__(self, *args: Any, strategy: str, cpu_offload: bool) -> None:
        self.strategy, self.cpu_offload = strategy, cpu_offload
        super().__init__(*args)

    def _wrap(self, trainer: Any) -> Any:
        # No DDP and no accelerate autocast: FSDP synchronises the ranks and casts as its policy says.
        return shard_model(trainer.model, self.strategy, trainer.args, self.cpu_offload)

    def _clip(self, max_norm: float) -> Any:
        import torch

        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # a DTensor: the norm over every shard
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _gradient_sync(self, last: bool) -> Any:
        """Gradients are reduce-scattered after every micro-batch: each rank keeps only its shard."""
        import contextlib

        return contextlib.nullcontext()

    def move_state(self, target: str) -> None:
        """FSDP places the shards (on the device, or in CPU memory with offload); alone on its devices."""

    def resident_bytes(self, device_type: str) -> int:
        return 0

    # ------------------------------------------------------------ checkpoints

    def _optimizer(self) -> Any:
        return getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)  # accelerate's wrapper

    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # An adapter run's frozen base is not its state: it is read again from the base model.
        options = StateDictOptions(ignore_frozen_params=True)
        model_state, optimizer_state = get_state_dict(self.model, self._optimizer(), options=options)
        return {"model": model_state, "optimizer": optimizer_state}

    def snapshot(self, target: Path, final: bool) -> ShardedState:
        """Every rank starts writing its shard (a collective); rank 0 also gets what is left to write."""
        import torch.distributed as dist

        rng = gather_to_first(self.rng)
        staging = staging_dir(target)
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # a try of this chunk that did not finish
            mkdir_under(target.parent.parent.parent, staging)  # DCP's writer makes it with makedirs: not at a moved folder's place
        dist.barrier()
        written = _Saves.start(self._sharded_state(), staging)
        final_weights = self.whole_weights() if final else None
        if self.rank != 0:
            return ShardedState(staging, written, None, None)
        position = self.stream.position
        extra = {"step": self.step, "position": [position.epoch, position.batch], "scheduler": self.trainer.lr_scheduler.state_dict(),
                 "rng": {"ranks": rng}, "counters": self.counters(),
                 "layout": {"world": self.world, "batches_per_epoch": self.stream.batches_per_epoch}}
        return ShardedState(staging, written, extra, final_weights)

    def whole_weights(self) -> dict[str, Any] | None:
        """The trained weights gathered whole on rank 0, named as the library saves them (every rank
        takes part; the others get None)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        whole = get_model_state_dict(self.model, options=options)
        if self.rank != 0:
            return None
        if self.adapter_name is None:
            return whole
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, state_dict=whole, adapter_name=self.adapter_name, save_embedding_layers=False)

    def _load_shards(self, directory: Path) -> None:
        """The weights and optimizer moments of a sharded checkpoint, written by a gang of this size or
        another: DCP reads each rank's part of every tensor wherever it was saved."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._sharded_state()
        try:
            dcp.load(state, checkpoint_id=str(directory))
            set_state_dict(self.model, self._optimizer(), model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(ignore_frozen_params=True, strict=False))
        except BaseException as error:  # a deleted or truncated shard, another shape: torch's CheckpointException
            if not _is_checkpoint_exception(error):
                raise
            raise checkpoint_failure(directory, "read", error) from None

    def start_from_shards(self, directory: str | Path) -> None:
        """A new run (`run_conf.resume_from_checkpoint`) starting from a sharded chunk of another run, on a
        gang of any size: its weights and optimizer moments; the step, learning-rate schedule, optimizer
        hyperparameters, data order and RNG stay this run's own, from its step 0."""
        damage = shard_problem(directory)
        if damage:
            raise ShardedCheckpointError(f"run_conf.resume_from_checkpoint {directory} cannot be read: {damage}")
        with own_hyperparameters(self._optimizer()):
            self._load_shards(Path(directory))

    def restore_shards(self, directory: str | Path) -> None:
        """Continue from this run's sharded checkpoint, written by a gang of this size or another."""
        import torch

        directory = Path(directory)
        damage = shard_problem(directory)
        if damage:
            raise ShardedCheckpointError(f"the run's durable chunk {directory} cannot be read: {damage}")
        try:
            extra = torch.load(directory / "state.pt", weights_only=False)  # written by this tool
        except Exception as error:
            raise checkpoint_failure(directory, "read", error) from None
        optimizer = self._optimizer()
        configured = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
        self._load_shards(directory)
        # As `RunSession.restore`: the moments and the schedule's position are the checkpoint's, the hyperparameters
        # this run's own (the same for its own chunk; the perturbed ones for a PBT clone continuing its donor).
        saved = {"param_groups": [{key: value for key, value in group.items() if key != "params"}
                                  for group in optimizer.param_groups]}
        own, scheduler = with_own_hyperparameters(saved, extra["scheduler"], configured)
        for group, settings in zip(optimizer.param_groups, own["param_groups"]):
            group.update(settings)
        ranks = extra["rng"]["ranks"]
        # Another gang size cannot replay the same random draws; each rank continues from one saved stream.
        self.rng = ranks[self.rank % len(ranks)]
        position = self._position(DataPosition(*extra["position"]), extra["layout"])
        self.continue_at(RunState(int(extra["step"]), position, {}, {}, scheduler, self.rng, extra["counters"]))

    def _position(self, saved: DataPosition, layout: dict[str, int]) -> DataPosition:
        if layout["world"] == self.world:
            return saved
        return resharded_position(saved, layout["batches_per_epoch"], self.stream.batches_per_epoch)


def shard_problem(directory: str | Path) -> str | None:
    """Why the sharded checkpoint `directory` cannot be read, found from DCP's index without reading a
    tensor (an unreadable index, a shard file missing or shorter than the index says), or None."""
    from torch.distributed.checkpoint import FileSystemReader

    directory = Path(directory)
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as error:
        return f"its index {directory / SHARD_METADATA} cannot be read ({type(error).__name__}: {error})"
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        path, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if isinstance(path, str):
            needed[path] = max(needed.get(path, 0), end)
    for name, end in sorted(needed.items()):
        shard = directory / name
        if not shard.is_file():
            return f"its shard {shard} is missing"
        if shard.stat().st_size < end:
            return f"its shard {shard} is truncated ({shard.stat().st_size} bytes, the index needs {end})"
    return None


def adapter_problem(directory: str | Path, config: Any) -> str | None:
    """Why the run of `config` cannot load the sharded chunk `directory`'s weights: an adapter of another
    rank or other target modules, or an adapter where the run trains the full model (and the reverse);
    read from DCP's index before any work."""
    from torch.distributed.checkpoint import FileSystemReader

    sizes = {key: tuple(getattr(value, "size", ()) or ()) for key, value in
             FileSystemReader(str(directory)).read_metadata().state_dict_metadata.items() if key.startswith("model.")}
    lora = {key: size for key, size in sizes.items() if ".lora_A." in key and key.endswith(".weight") and size}
    peft = config.peft_conf
    if peft.peft_type == "NO_PEFT":
        return f"{directory} holds a LoRA adapter; this run trains the full model" if lora else None
    if peft.peft_type != "LORA":
        return None
    if not lora:
        return f"{directory} holds a full model's weights, not a LoRA adapter; this run trains an adapter"
    kwargs = dict(getattr(peft, "peft_kwargs", None) or {})
    ranks = sorted({size[0] for size in lora.values()})
    wanted = kwargs.get("r", 8)
    if not kwargs.get("rank_pattern") and ranks != [wanted]:
        return (f"{directory} holds a LoRA adapter of r={'/'.join(map(str, ranks))}; this run has "
                f"peft_conf.peft_kwargs.r={wanted}: its weights have other shapes")
    targets = kwargs.get("target_modules")
    found = sorted({key.split(".lora_A.")[0].rsplit(".", 1)[-1] for key in lora})
    if isinstance(targets, list) and sorted(set(targets)) != found:
        return (f"{directory} holds a LoRA adapter on {', '.join(found)}; this run's peft_conf.peft_kwargs."
                f"target_modules is {', '.join(sorted(set(targets)))}")
    return None


def start_problem(directory: str | Path, strategy: str, config: Any = None) -> str | None:
    """Why a new run trained with `strategy` (and `config`, when given) cannot start from the checkpoint
    `directory`, or None. A sharded run starts from a whole, readable sharded chunk of the same adapter shapes
    (resharded to its gang by DCP); any other run from a whole checkpoint (HF's format, or a chunk of a ddp or
    one-device run)."""
    whole = any((Path(directory) / name).is_file() for name in ("adapter_model.safetensors", "model.safetensors"))
    if is_shard_checkpoint(directory):
        if is_sharded(strategy):
            damage = shard_problem(directory)
            if damage:
                return f"{directory} cannot be read: {damage}"
            return adapter_problem(directory, config) if config is not None else None
        return (f"{directory} is a sharded chunk (written by an fsdp run), which a {strategy} run does not load; "
                "start this run with experiment.distributed: fsdp or fsdp_grad_op (any devices_per_run, 1 included)")
    if not whole:
        return (f"{directory} is not a training checkpoint (no adapter_model.safetensors, model.safetensors "
                "or sharded chunk's .metadata in it)")
    if is_sharded(strategy):
        return (f"{directory} is a whole checkpoint; a sharded ({strategy}) run starts only from a sharded chunk-K "
                "of an fsdp or fsdp_grad_op run: train this run with ddp, or start it without "
                "run_conf.resume_from_checkpoint")
    return None


def resharded_position(saved: DataPosition, saved_batches: int, batches: int) -> DataPosition:
    """The same place in the epoch for a gang of another size. Positions count each rank's
    micro-batches (`saved_batches` of them per epoch in the gang that saved it, `batches` here); the
    total batch is the same, so a step is the same fraction of an epoch in both."""
    if saved.batch >= saved_batches:
        return DataPosition(saved.epoch + 1, 0)
    return DataPosition(saved.epoch, round(saved.batch * batches / saved_batches))
