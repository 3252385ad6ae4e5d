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


def annotation_for(entry: dict[str, Any]) -> Any:
    """The Python annotation for one snapshot field entry."""
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
        parts.append(_KIND_TYPES[kind])
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
        definitions[field_name] = (annotation_for(entry), Field(default=default, description=description))
    for field_name, owner in (owned or {}).items():
        rejected = SkipJsonSchema[Annotated[Optional[Any], _reject(owner)]]
        definitions[field_name] = (rejected, Field(default=None, exclude=True))
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid", validate_default=False, protected_namespaces=()),
        __doc__=doc,
        **definitions,
    )
