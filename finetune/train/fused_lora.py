"""The one seam on PEFT's LoRA layers for fused training: each member's adapter on its own rows.

A fused group (`fused.FusedGroup`) puts one micro-batch of each member through the shared base in
one forward. Every LoRA-wrapped `Linear` must then add adapter A's low-rank path to A's rows only,
B's to B's, and so on, with gradients for all of them.

Why PEFT's public API does not suffice: PEFT's mixed-adapter forward (`adapter_names=` in
`forward`, `LoraLayer._mixed_batch_forward`) does this for inference only: `LoraModel` refuses it in
training mode, it walks the adapters in set order, and it applies each adapter's dropout to the
rows padded to the whole batch's length, so a member's dropout masks (drawn from one shared RNG, on
a tensor of another shape) could never equal its masks when it trains alone. Several active
adapters (`set_adapter([...])`) add every adapter to every row.

What this module does instead, with PEFT's public layer methods and attributes only: for the
length of a fused chunk each LoRA layer's adapters are switched off (`enable_adapters(False)`, so the
layer's forward is its base layer's), the members' adapter weights are made trainable
(`requires_grad_`), and a forward hook adds, per member that the layer holds, exactly what
`lora.Linear.forward` adds for one active plain adapter: `lora_B(lora_A(dropout(x))) * scaling`,
computed on the member's rows cut back to its own sequence length (zero beyond it and on the rows
of members without an adapter there), with the member's own RNG state swapped in around its
dropout. Leaving restores the layers (`enable_adapters(True)` makes the
active adapter alone trainable again). Written against PEFT 0.21 (bounded in pyproject) and checked
by `tests/test_fused.py`, whose seam test compares a hooked forward with PEFT's own forward of each
adapter alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass
class Rows:
    """A member's place in the concatenated batch: rows `start:stop`, its first `length` positions;
    `rng`: its torch RNG state, swapped in around its dropout (None: its adapters have no dropout)."""

    adapter: str
    start: int
    stop: int
    length: int
    rng: Any = None


def lora_layers(model: Any, adapters: list[str]) -> list[Any]:
    """The LoRA `Linear` layers that hold any of `adapters`."""
    from peft.tuners.lora.layer import Linear

    return [module for module in model.modules() if isinstance(module, Linear) and set(adapters) & set(module.lora_A)]


def seam_problems(model: Any, adapter: str) -> list[str]:
    """Why `adapter` cannot train fused here (empty: it can): only plain LoRA on `Linear` layers."""
    from peft.tuners.lora.layer import Linear, LoraLayer

    problems = []
    config = model.peft_config[adapter]
    if str(getattr(config, "peft_type", "")).split(".")[-1] != "LORA":
        problems.append(f"its adapter is {config.peft_type}, not LORA")
    for key in ("modules_to_save", "trainable_token_indices"):
        if getattr(config, key, None):
            problems.append(f"its adapter trains whole modules or token rows ({key})")
    for name, module in model.named_modules():
        held = set(getattr(module, "lora_A", {})) | set(getattr(module, "lora_embedding_A", {}))
        if isinstance(module, LoraLayer) and adapter in held:
            if not isinstance(module, Linear):
                problems.append(f"its LoRA on {name} is a {type(module).__name__} layer (only Linear layers fuse)")
            elif adapter in module.lora_variant:
                problems.append(f"its LoRA on {name} is a variant (DoRA and the like do not fuse)")
            elif module.merged:
                problems.append(f"its LoRA on {name} is merged into the base")
    return sorted(set(problems))


def shared_model_problems(model: Any) -> list[str]:
    """Why no adapters on this shared model can fuse: another run's whole-module or token-row copies
    (PEFT's auxiliary wrappers apply their active adapter to every row), or LoRA layers other than Linear."""
    from peft.tuners.lora.layer import Linear, LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    problems = set()
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            problems.add(f"a resident run trains whole modules or token rows ({name})")
        elif isinstance(module, LoraLayer) and not isinstance(module, Linear):
            problems.add(f"a resident run's LoRA on {name} is a {type(module).__name__} layer")
    return sorted(problems)


def dropout_of(layer: Any, adapter: str) -> Any | None:
    """The adapter's dropout module in `layer` when it draws random numbers (training mode), else None."""
    import torch

    dropout = layer.lora_dropout[adapter]
    return dropout if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training else None


class FusedLora:
    """Hooks on a shared PeftModel's LoRA layers that apply each member's adapter to its rows."""

    def __init__(self, model: Any, adapters: list[str], device: str) -> None:
        from peft.tuners.lora.layer import LoraLayer

        self.model, self.adapters, self.device = model, list(adapters), device
        self.layers = lora_layers(model, self.adapters)
        # Every LoRA layer is switched off, also those holding only other resident runs' adapters, whose
        # active adapter would otherwise apply to every row.
        self.switched = [module for module in model.modules() if isinstance(module, LoraLayer)]
        self.rows: list[Rows] = []
        self.drawn: dict[tuple[int, str], dict[str, Any]] = {}  # the RNG state each (layer, adapter) drew from
        self.replaying = False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handles = []
        try:
            for layer in self.switched:
                layer.enable_adapters(False)
            for layer in self.layers:
                for adapter in self.adapters:
                    if adapter in layer.lora_A:
                        layer.lora_A[adapter].requires_grad_(True)
                        layer.lora_B[adapter].requires_grad_(True)
                handles.append(layer.register_forward_hook(self._add_adapters))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in self.switched:
                layer.enable_adapters(True)
            self.rows = []

    def _add_adapters(self, layer: Any, args: tuple[Any, ...], output: Any) -> Any:
        """`output + delta`, where a member's rows of `delta` hold its adapter's path (zero past its own length)
        and the rows of a member without an adapter on this layer are zero: for a member's positions this is
        the very addition `lora.Linear.forward` makes, and adding zero changes no other value. (Adding in
        place into slices of `output` would give the same values, but its backward through strided views is
        many times slower on the CPU.)"""
        import torch

        x = args[0]
        if not any(rows.adapter in layer.lora_A for rows in self.rows):
            return None
        longest = output.shape[1]
        paths: list[Any] = []
        for rows in self.rows:
            if rows.adapter not in layer.lora_A:
                paths.append(rows.stop - rows.start)  # no adapter here: zero rows, filled in below
                continue
            lora_A, lora_B = layer.lora_A[rows.adapter], layer.lora_B[rows.adapter]
            own = x[rows.start:rows.stop, :rows.length]
            if own.dtype != lora_A.weight.dtype:
                own = own.to(lora_A.weight.dtype)
            dropout = dropout_of(layer, rows.adapter)
            if dropout is not None:
                own = self._with_rng(rows, dropout, layer, own)
            path = lora_B(lora_A(own)) * layer.scaling[rows.adapter]
            if rows.length < longest:
                path = torch.nn.functional.pad(path, (0, 0, 0, longest - rows.length))
            paths.append(path)
        like = next(path for path in paths if not isinstance(path, int))
        delta = torch.cat([like.new_zeros((path, *like.shape[1:])) if isinstance(path, int) else path for path in paths])
        return (output + delta).to(output.dtype)  # as lora.Linear.forward: promoted, then back to the base's dtype

    def _with_rng(self, rows: Rows, dropout: Any, layer: Any, x: Any) -> Any:
        """The member's dropout, drawn from its own RNG stream (as when it trains alone). Under activation
        checkpointing the backward pass runs the forward again (`replaying`): it draws from the state
        this layer drew from in the forward, so the masks are the same, as checkpointing does alone."""
        import torch

        cuda = self.device.startswith("cuda")
        key = (id(layer), rows.adapter)
        if self.replaying and key in self.drawn:
            state = self.drawn[key]
        else:
            state = self.drawn[key] = dict(rows.rng)
        torch.set_rng_state(state["cpu"])
        if cuda:
            torch.cuda.set_rng_state(state["cuda"], self.device)
        dropped = dropout(x)
        if not self.replaying:
            rows.rng["cpu"] = torch.get_rng_state()
            if cuda:
                rows.rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return dropped

    def start_micro_step(self, rows: list[Rows]) -> None:
        self.rows, self.drawn, self.replaying = rows, {}, False

    def backward(self, loss: Any) -> None:
        """Backpropagate the group's loss (the layout stays set: checkpointed layers run again in it)."""
        self.replaying = True
        try:
            loss.backward()
        finally:
            self.rows, self.drawn, self.replaying = [], {}, False
