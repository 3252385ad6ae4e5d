"""Several LoRA runs in one forward pass: a fused group of resident runs on one shared base.

The runs' sessions (`session.RunSession`) hold their adapters on one shared PeftModel, as the
worker keeps them anyway (`sharing.SharedBaseStrategy`). A fused micro-step takes the next
micro-batch of every member, concatenates them (each right-padded to the group's longest row: the
extra positions come after every real token, so no real token attends to them, and carry no
loss), runs the frozen base once, and each LoRA layer adds a member's adapter to that member's rows
only (`fused_lora`, the seam on PEFT). Each member's loss is its own trainer's `compute_loss`
over its own rows (its own item count, accumulation and metrics, as when it trains alone); the
members' losses are summed and backpropagated once: a member's adapter touches its rows alone, so
its gradients are those of its own loss. Each member keeps its own data order (its `BatchStream`),
its optimizer and LR schedule (stepped when its own accumulation completes: `RunSession.finish_step`)
and its RNG stream (its dropout masks are drawn from it, on tensors of its own shape). A member
leaves the loop at its own stop step; the others go on.

What fuses: SFT runs with plain LoRA adapters (any rank, alpha, dropout, target modules) on one
frozen base, on one device, with the default loss (`fuse_problems` says why anything else does
not). The result equals training each member alone up to the order of the sums in the stacked
LoRA products (`fused_lora`) and, for a member padded to the group's longest row, in attention and
TRL's log-probability head (see `tests/test_fused.py` for the measured bounds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from finetune.train.fused_lora import FusedLora, Rows, dropout_of, seam_problems, shared_model_problems
from finetune.train.run_state import capture_rng, restore_rng
from finetune.train.seams.transformers import prepare_inputs
from finetune.train.session import RunSession, _synchronize

# How each input is extended to the group's longest row: padding that no real token attends to.
FILL = {"input_ids": None, "labels": -100, "attention_mask": 0, "position_ids": "restart"}
BASE_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                     "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout")


def member_problems(session: RunSession) -> list[str]:
    """Why this run cannot train in a fused group (empty: it can)."""
    trainer, args = session.trainer, session.trainer.args
    if session.adapter_name is None:
        return ["it trains whole weights (only adapters on a frozen base fuse)"]
    problems = []
    if type(trainer).__name__ != "SFTTrainer":
        problems.append(f"its method's trainer is {type(trainer).__name__} (only SFT fuses)")
    if not session.micro_step.fast:
        problems.append("its trainer's training_step is not Trainer's own")
    if session.world != 1:
        problems.append("it trains on several processes")
    if getattr(args, "loss_type", "nll") != "nll" or trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        problems.append("its loss is not the plain negative log-likelihood (loss_type, label smoothing or a custom loss)")
    if getattr(trainer, "aux_loss_enabled", False):
        problems.append("its model adds a router auxiliary loss")
    if args.fp16:
        problems.append("it trains in fp16 (each run's loss scaler would need its own backward)")
    if getattr(args, "activation_offloading", False) or args.n_gpu > 1:
        problems.append("it offloads activations or uses DataParallel")
    problems += seam_problems(session.model, session.adapter_name)
    return problems


def base_problems(model: Any) -> list[str]:
    """A base whose own dropout is on cannot fuse: its masks over the concatenated batch are no member's."""
    import torch

    problems = [f"the base model's {name} drops out (p={module.p})" for name, module in model.named_modules()
                if isinstance(module, torch.nn.Dropout) and module.p > 0 and ".lora_dropout." not in name]
    config = getattr(model, "config", None)
    for key in BASE_DROPOUT_KEYS:
        value = getattr(config, key, 0)
        if isinstance(value, (int, float)) and value > 0:
            problems.append(f"the base model's config sets {key}={value}")
    return problems


def fuse_problems(sessions: list[RunSession]) -> list[str]:
    """Why these runs cannot train as one fused group (empty: they can)."""
    if len(sessions) < 2:
        return ["a fused group needs at least two runs"]
    problems = [f"run {session.run_id}: {problem}" for session in sessions for problem in member_problems(session)]
    if len({id(session.model) for session in sessions}) != 1:
        problems.append("the runs do not share one loaded base model")
    if len({session.device for session in sessions}) != 1:
        problems.append("the runs are on different devices")
    if len({(bool(s.trainer.args.bf16), bool(s.trainer.args.fp16)) for s in sessions}) != 1:
        problems.append("the runs train in different precisions")
    if len({session.run_id for session in sessions}) != len(sessions):
        problems.append("a run is in the group twice")
    return problems + base_problems(sessions[0].model) + shared_model_problems(sessions[0].model)


def group_sessions(configs: dict[str, Any], out: Path, shared: bool = True,
                   callbacks: Callable[[str], list[Any]] = lambda name: []) -> list[RunSession]:
    """A session per config (one data setting, CPU), built outside a worker: all on one shared PeftModel, as a
    worker's `SharedBaseStrategy` holds them (`shared`), or each on a base of its own, to train it alone. For the
    fused benchmark and tests; `callbacks(name)`: the trainer callbacks of that run."""
    from finetune.data.pipeline import input_pad_token_id, prepare_data, prepare_tokenizer
    from finetune.plan.derive import derive
    from finetune.train.adapter import attach_adapter
    from finetune.train.model import load_base_model, load_tokenizer
    from finetune.train.trainer import build_trainer

    first = next(iter(configs.values()))
    tokenizer = load_tokenizer(first)
    prepare_tokenizer(tokenizer, first.data_conf)
    data = prepare_data(first, tokenizer)
    pad = input_pad_token_id(tokenizer, first.data_conf)
    model = None
    sessions = []
    for name, config in configs.items():
        base = load_base_model(config, len(tokenizer)) if model is None or not shared else model.get_base_model()
        model = attach_adapter(base, model if shared else None, config.peft_conf, [], name, seed=7)
        derived = derive(config, data.stats.train_rows)
        trainer = build_trainer(config, derived, model, tokenizer, data.train, None, out / name, "cpu", callbacks(name), pad)
        sessions.append(RunSession(name, trainer, name, "cpu", derived.total_steps))
    return sessions


@dataclass
class _Member:
    session: RunSession
    stop: int
    rng: dict[str, Any]
    batches: list[Any] = field(default_factory=list)
    items: Any = None
    taken: int = 0  # micro-batches of the current optimizer step done


class FusedGroup:
    """Resident runs on one shared base, trained together in fused micro-steps."""

    def __init__(self, sessions: list[RunSession]) -> None:
        problems = fuse_problems(sessions)
        if problems:
            raise ValueError("these runs cannot train fused: " + "; ".join(problems))
        self.sessions = list(sessions)
        self.model, self.device = sessions[0].model, sessions[0].device
        self.lora = FusedLora(self.model, [session.adapter_name for session in sessions], self.device)
        self.pad_id = getattr(sessions[0].trainer.data_collator, "input_pad_id", 0)

    @property
    def run_ids(self) -> list[str]:
        return [session.run_id for session in self.sessions]

    def train_until(self, stops: dict[str, int]) -> float:
        """Every member's optimizer steps up to its `stops[run_id]`; returns the group's wall time.

        A diverged member (inf or NaN in its weights) trains its chunk alone, as it would without fusing: in the
        stacked LoRA products its values would reach the other rows (0 x NaN is NaN), which training alone never
        does. One that diverges mid-chunk leaves the group at the micro-step where rows come out non-finite."""
        members = [_Member(session, stops[session.run_id], {key: session.rng[key] for key in ("cpu", "cuda") if key in session.rng})
                   for session in self.sessions if session.step < stops[session.run_id]]
        started = time.perf_counter()
        for member in members:
            member.session.micro_step.enter_training()
        done: list[_Member] = []
        alone = [member for member in members if not self.lora.finite(member.session.adapter_name)]
        members = [member for member in members if member not in alone]
        with self.lora.active():
            while members:
                for member in members:
                    if not member.batches:
                        member.batches, member.items = member.session.begin_step()
                        member.taken = 0
                diverged = self._micro_step(members)
                alone += diverged
                members = [member for member in members if member not in diverged]
                for member in members:
                    if member.taken == len(member.batches):
                        member.session.finish_step()
                        member.batches = []
                done += [member for member in members if not member.batches and member.session.step >= member.stop]
                members = [member for member in members if member.batches or member.session.step < member.stop]
        for member in alone:
            _finish_alone(member)
        _synchronize(self.device)
        for member in done:
            member.session.rng = {**member.session.rng, **member.rng}
            member.session.end_if_done()
        return time.perf_counter() - started

    def _micro_step(self, members: list[_Member]) -> list[_Member]:
        """One micro-batch of each member: one forward of the base, each member's loss, one backward. When rows come
        out non-finite, the members whose weights are not finite (else those whose rows are not) leave: the
        micro-step is done again without them (every RNG stream as before it), and they have not trained this
        micro-batch. Returns the members that left."""
        import torch

        raw = [member.batches[member.taken] for member in members]
        own = [prepare_inputs(member.session.trainer, inputs) for member, inputs in zip(members, raw)]
        streams = [dict(member.rng) for member in members]
        batch, rows = concatenate(own, [member.session.adapter_name for member in members],
                                  [member.rng if _draws(self.lora, member) else None for member in members], self.pad_id)
        self.lora.start_micro_step(rows)
        first = members[0].session
        with first.trainer.compute_loss_context_manager():
            outputs = first.wrapped(**batch, use_cache=False, fused_lm_head=True)
        finite = torch.isfinite(outputs.log_probs).flatten(1).all(dim=1).tolist()  # one bool a row
        if not all(all(finite[place.start:place.stop]) for place in rows):
            del outputs
            self.lora.start_micro_step([])
            for member, stream in zip(members, streams):
                member.rng.clear()
                member.rng.update(stream)
            diverged = [member for member in members if not self.lora.finite(member.session.adapter_name)] or \
                [member for member, place in zip(members, rows) if not all(finite[place.start:place.stop])]
            rest = [member for member in members if member not in diverged]
            return diverged + (self._micro_step(rest) if rest else [])
        total = None
        for member, inputs, place, original in zip(members, own, rows, raw):
            trainer = member.session.trainer
            last = member.taken == len(member.batches) - 1
            trainer.accelerator.sync_gradients = last  # as RunSession's loop: the step's last micro-batch syncs
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(_Answer(member_outputs(outputs, place)), inputs, num_items_in_batch=member.items)
            if not member.session.micro_step._scaled(member.items):
                loss = loss / trainer.current_gradient_accumulation_steps
            member.session.end_micro_step(loss.detach(), original, last)
            member.taken += 1
            scaled = loss / trainer.accelerator.gradient_accumulation_steps  # as accelerator.backward scales it
            total = scaled if total is None else total + scaled
        assert total is not None
        self.lora.backward(total)
        return []


def _finish_alone(member: _Member) -> None:
    """A member out of its group: the rest of the step it began in the group (if any) alone, then its chunk's steps
    (`RunSession.train_until`), from its own RNG stream as the group left it."""
    session = member.session
    if member.batches:
        session.activate()
        restore_rng({**session.rng, **member.rng}, session.device)
        session.train_micro_batches(member.batches, member.items, start=member.taken)
        session.finish_step()
        member.rng = {key: value for key, value in capture_rng(session.device).items() if key in member.rng}
    session.rng = {**session.rng, **member.rng}
    session.train_until(member.stop)


def _draws(lora: FusedLora, member: _Member) -> bool:
    name = member.session.adapter_name
    return any(name in layer.lora_A and dropout_of(layer, name) is not None for layer in lora.layers)


def concatenate(inputs: list[dict[str, Any]], adapters: list[str], rngs: list[Any], pad_id: int) -> tuple[dict[str, Any], list[Rows]]:
    """One batch of the members' micro-batches, each right-padded to the longest row, and each member's rows."""
    import torch

    keys = set(inputs[0])
    if any(set(own) != keys for own in inputs) or not keys <= set(FILL):
        raise ValueError(f"the members' micro-batches hold different inputs: {[sorted(own) for own in inputs]}")
    longest = max(int(own["input_ids"].shape[1]) for own in inputs)
    batch = {key: torch.cat([_extend(own[key], longest, key, pad_id) for own in inputs]) for key in sorted(keys)}
    rows, start = [], 0
    for own, adapter, rng in zip(inputs, adapters, rngs):
        size, length = own["input_ids"].shape
        rows.append(Rows(adapter, start, start + int(size), int(length), rng))
        start += int(size)
    return batch, rows


def _extend(tensor: Any, longest: int, key: str, pad_id: int) -> Any:
    import torch

    gap = longest - tensor.shape[1]
    if gap == 0:
        return tensor
    if FILL[key] == "restart":  # padding-free rows: the padding is a sequence of its own
        tail = torch.arange(gap, dtype=tensor.dtype, device=tensor.device).expand(tensor.shape[0], gap)
    else:
        fill = pad_id if FILL[key] is None else FILL[key]
        tail = torch.full((tensor.shape[0], gap), fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, tail], dim=1)


def member_outputs(outputs: Any, rows: Rows) -> Any:
    """The member's part of the group's fused-head output: its rows, its own shifted length."""
    fields = {key: value[rows.start:rows.stop, : rows.length - 1] for key, value in outputs.items()
              if key not in ("loss", "aux_loss") and getattr(value, "dim", lambda: 0)() >= 2}
    return type(outputs)(**fields)


class _Answer:
    """Stands for the model in a member's `compute_loss`: answers with the member's rows of the group's forward."""

    def __init__(self, outputs: Any) -> None:
        self.outputs = outputs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs
