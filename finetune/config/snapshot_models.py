"""Pydantic models built from the TRL and PEFT snapshots (see `finetune.config.snapshot`)."""

from __future__ import annotations

import json
from functools import cache
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, ConfigDict, Field, create_model
from pydantic.json_schema import SkipJsonSchema

from finetune.config.snapshot import PEFT_SNAPSHOT, TRL_SNAPSHOT

_KIND_TYPES: dict[str, Any] = {
    "boolean": bool,
    "integer": int,
    "number": float,
    "string": str,
    "array": list[Any],
    "object": dict[str, Any],
    "null": type(None),
}


@cache
def load_snapshot(which: str) -> dict[str, Any]:
    path = {"trl": TRL_SNAPSHOT, "peft": PEFT_SNAPSHOT}[which]
    return json.loads(path.read_text())


MINUS_ONE_OR_POSITIVE = "-1 or >= 1"
# Upper bounds where a huge value is no training a machine could do, only a way to make derived values explode.
MAX_STEPS = 100_000_000
MAX_EPOCHS = 10_000

# Bounds on numeric values, by field name, for every snapshot model that has the field (TRL's
# training arguments, PEFT's adapter kwargs). They become pydantic constraints, and so also
# bounds in the generated JSON Schemas.
BOUNDS: dict[str, dict[str, float] | str] = {
    "learning_rate": {"gt": 0},
    "num_train_epochs": {"gt": 0, "le": MAX_EPOCHS},
    "max_steps": MINUS_ONE_OR_POSITIVE,
    "warmup_steps": {"ge": 0},
    "weight_decay": {"ge": 0},
    "max_grad_norm": {"ge": 0},
    "adam_beta1": {"ge": 0, "lt": 1},
    "adam_beta2": {"ge": 0, "lt": 1},
    "adam_epsilon": {"gt": 0},
    "logging_steps": {"gt": 0},
    "eval_steps": {"gt": 0},
    "save_steps": {"gt": 0},
    "eval_delay": {"ge": 0},
    "save_total_limit": {"ge": 1},
    "eval_accumulation_steps": {"ge": 1},
    "torch_empty_cache_steps": {"ge": 1},
    "seed": {"ge": 0},
    "data_seed": {"ge": 0},
    "dataloader_num_workers": {"ge": 0},
    "dataloader_prefetch_factor": {"ge": 1},
    "label_smoothing_factor": {"ge": 0, "lt": 1},
    "beta": {"ge": 0},
    "epsilon": {"ge": 0},
    "num_generations": {"ge": 2},
    "num_iterations": {"ge": 1},
    "steps_per_generation": {"ge": 1},
    "generation_batch_size": {"ge": 1},
    "max_completion_length": {"ge": 1},
    "temperature": {"gt": 0},
    "top_p": {"gt": 0, "le": 1},
    "top_k": {"ge": 0},
    "r": {"ge": 1},
    "lora_alpha": {"gt": 0},
    "lora_dropout": {"ge": 0, "lt": 1},
    "rank_dropout": {"ge": 0, "lt": 1},
    "module_dropout": {"ge": 0, "lt": 1},
}


def _bounded(kind: str, bounds: dict[str, float] | str | None) -> Any:
    base = _KIND_TYPES[kind]
    if bounds is None or kind not in ("integer", "number"):
        return base
    if bounds == MINUS_ONE_OR_POSITIVE:
        return Union[Literal[-1], Annotated[base, Field(ge=1, le=MAX_STEPS)]]
    return Annotated[base, Field(**bounds)]  # type: ignore[arg-type]


def annotation_for(entry: dict[str, Any], name: str | None = None) -> Any:
    """The Python annotation for one snapshot field entry, with the bounds of `BOUNDS[name]`."""
    kinds: list[str] = entry["kinds"]
    if kinds == ["any"]:
        return Any
    parts: list[Any] = []
    choices = entry.get("choices") or []
    if choices:
        parts.append(Literal[tuple(choices)])
    for kind in kinds:
        if choices and kind in ("string", "integer"):
            continue
        parts.append(_bounded(kind, BOUNDS.get(name or "")))
    return parts[0] if len(parts) == 1 else Union[tuple(parts)]


def _reject(owner: str) -> AfterValidator:
    def check(value: Any) -> Any:
        raise ValueError(f"this key is set by {owner}, not here")

    return AfterValidator(check)


def model_from_snapshot(
    name: str, fields: dict[str, dict[str, Any]], doc: str, owned: dict[str, str] | None = None
) -> type:
    """A strict model with one optional field per snapshot entry; `owned` keys fail and name their section."""
    definitions: dict[str, Any] = {}
    for field_name, entry in sorted(fields.items()):
        if field_name in (owned or {}):
            continue
        description = entry.get("help")
        default = entry.get("default")
        definitions[field_name] = (annotation_for(entry, field_name), Field(default=default, description=description))
    for field_name, owner in (owned or {}).items():
        rejected = SkipJsonSchema[Annotated[Optional[Any], _reject(owner)]]
        definitions[field_name] = (rejected, Field(default=None, exclude=True))
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid", validate_default=False, protected_namespaces=()),
        __doc__=doc,
        **definitions,
    )
