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
(`requires_grad_`), and a forward hook adds to each member's rows what `lora.Linear.forward` adds for
that member's adapter alone, `lora_B(lora_A(dropout(x))) * scaling`: all members in two products
(their `lora_A` weights stacked, their `lora_B` weights side by side, a mask keeping each row's own
block), each member's dropout drawn on its own rows and length from its own RNG state. Leaving
restores the layers (`enable_adapters(True)` makes the active adapter alone trainable again).
Written against PEFT 0.21 (bounded in pyproject) and checked by `tests/test_fused.py`, whose seam
test compares a hooked forward with PEFT's own forward of each adapter alone.
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
    if getattr(config, "lora_bias", False):
        problems.append("its adapter trains a bias on lora_B (lora_bias)")
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
        self.layouts: dict[Any, tuple[Any, Any]] = {}  # masks and scalings by layout (`_layout`)
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
        """`output + delta`, where `delta` holds, on each member's rows, what `lora.Linear.forward` adds for that
        member's adapter alone: `lora_B(lora_A(dropout(x))) * scaling`; zero on the rows of members without an
        adapter on this layer.

        All members in one product each: `A` stacks the members' `lora_A` weights (rank r1 + r2 + ...), `B` puts
        their `lora_B` weights side by side, each column times its member's scaling, and a 0/1 mask keeps each
        row's own block of `x @ A.T`: `(x @ A.T * mask) @ B.T` is each member's own path, and its gradients reach
        its weights only. One product instead of K small ones is what makes the group faster (on the CPU each
        small bf16 product costs ~35 us whatever its size; on a GPU, one kernel launch instead of K). The other
        members' zeros change the order of the sums, and the scaling is applied to `lora_B` (in its own dtype,
        float32 for PEFT's adapters) rather than to the product: a member is within a stated bound of training
        alone, not bitwise (tests/test_fused.py). A member with non-finite weights would reach the other rows
        through the zeros (0 x NaN is NaN): the group leaves it out (`fused.FusedGroup`).

        A member's dropout is drawn on its rows cut back to its own sequence length, from its own RNG stream,
        so its masks are those it draws alone. Positions past a member's length are padding that no real token
        attends to and that carries no loss: what the path adds there changes nothing."""
        import torch

        present = [rows for rows in self.rows if rows.adapter in layer.lora_A]
        if not present:
            return None
        x = args[0]
        weights = [layer.lora_A[rows.adapter].weight for rows in present]
        if x.dtype != weights[0].dtype:
            x = x.to(weights[0].dtype)
        if any(dropout_of(layer, rows.adapter) is not None for rows in present):
            x = self._dropped(layer, x)
        stacked_a = weights[0] if len(weights) == 1 else torch.cat(weights)
        stacked_b = torch.cat([layer.lora_B[rows.adapter].weight for rows in present], dim=1) if len(present) > 1 else \
            layer.lora_B[present[0].adapter].weight
        low = torch.nn.functional.linear(x, stacked_a)
        mask, scaling = self._layout(layer, present, low.dtype)
        delta = torch.nn.functional.linear(low * mask, (stacked_b * scaling).to(stacked_b.dtype))
        return (output + delta).to(output.dtype)  # as lora.Linear.forward: promoted, then back to the base's dtype

    def _layout(self, layer: Any, present: list[Rows], dtype: Any) -> tuple[Any, Any]:
        """The 0/1 mask (rows x 1 x ranks, in `dtype`) of each row's own columns of `x @ A.T`, and each column's
        scaling (float32), for the members this layer holds: the same for every layer and micro-step with those
        adapters, ranks, scalings and rows, so made once for the group (not at every micro-step, which on a GPU
        would copy from the host each time)."""
        import torch

        ranks = tuple(int(layer.lora_A[rows.adapter].weight.shape[0]) for rows in present)
        scaling = tuple(float(layer.scaling[rows.adapter]) for rows in present)
        spans = tuple((rows.start, rows.stop) for rows in present)
        key = (tuple(rows.adapter for rows in present), ranks, scaling, spans, self.rows[-1].stop, dtype)
        if key not in self.layouts:
            device = layer.lora_A[present[0].adapter].weight.device
            mask = torch.zeros(self.rows[-1].stop, 1, sum(ranks), dtype=dtype, device=device)
            column = 0
            for rows, rank in zip(present, ranks):
                mask[rows.start:rows.stop, :, column:column + rank] = 1
                column += rank
            columns = torch.tensor([factor for rank, factor in zip(ranks, scaling) for _ in range(rank)], dtype=torch.float32,
                                   device=device)
            self.layouts[key] = (mask, columns)
        return self.layouts[key]

    def finite(self, adapter: str) -> bool:
        """Whether every weight of `adapter` is finite (one device sync)."""
        import torch

        checks = [torch.isfinite(module[adapter].weight).all() for layer in self.layers
                  for module in (layer.lora_A, layer.lora_B) if adapter in module]
        return bool(torch.stack(checks).all()) if checks else True

    def _dropped(self, layer: Any, x: Any) -> Any:
        """`x` with each member's dropout applied to its rows, cut back to its own length (its masks are then
        drawn on a tensor of the shape it has alone), padded back with zeros."""
        import torch

        longest = x.shape[1]
        parts = []
        # One split of the batch into the members' rows (its backward is one concatenation), rather than a slice
        # per member (each slice's backward fills a zero tensor of the whole batch).
        for rows, piece in zip(self.rows, x.split([rows.stop - rows.start for rows in self.rows])):
            dropout = dropout_of(layer, rows.adapter) if rows.adapter in layer.lora_A else None
            if dropout is None:
                parts.append(piece)
                continue
            own = self._with_rng(rows, dropout, layer, piece[:, :rows.length])
            parts.append(torch.nn.functional.pad(own, (0, 0, 0, longest - rows.length)) if rows.length < longest else own)
        return torch.cat(parts)

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
