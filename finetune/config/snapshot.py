"""Snapshots of the argument names and types of TRL's configs and PEFT's adapter configs.

Importing trl's config classes costs seconds, so validation reads these JSON
snapshots instead. `python -m finetune.config.snapshot` (`make snapshot docs`)
regenerates them from the installed packages. A test compares what validation
depends on (names, kinds, choices, defaults) with the installed packages; the
help texts only feed the generated docs, so a reworded help string upstream
is not a failure.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

SNAPSHOT_DIR = Path(__file__).parent / "snapshots"
TRL_SNAPSHOT = SNAPSHOT_DIR / "trl.json"
PEFT_SNAPSHOT = SNAPSHOT_DIR / "peft.json"

TRL_CLASSES = {"sft": "SFTConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig"}
# Fields of every PEFT config that the `peft_conf` section sets itself.
PEFT_FIELDS_SET_BY_SECTION = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"}


def describe_type(annotation: Any) -> dict[str, Any]:
    """Reduce a Python annotation to JSON-schema-like kinds: {"kinds": [...], "choices": [...]}."""
    kinds: list[str] = []
    choices: list[Any] = []
    for part in _union_parts(annotation):
        origin = typing.get_origin(part)
        if part is type(None):
            kinds.append("null")
        elif part is bool:
            kinds.append("boolean")
        elif part is int:
            kinds.append("integer")
        elif part is float:
            kinds.append("number")
        elif part is str:
            kinds.append("string")
        elif origin is typing.Literal:
            for value in typing.get_args(part):
                if isinstance(value, bool):
                    kinds.append("boolean")
                else:
                    choices.append(value)
                    kinds.append("string" if isinstance(value, str) else "integer")
        elif isinstance(part, type) and issubclass(part, enum.Enum):
            choices.extend(member.value for member in part)
            kinds.append("string")
        elif part in (list, tuple, set) or origin in (list, tuple, set, typing.Sequence):
            kinds.append("array")
        elif part is dict or origin is dict:
            kinds.append("object")
        else:
            kinds.append("any")
    kinds = sorted(set(kinds))
    if "any" in kinds:
        return {"kinds": ["any"], "choices": []}
    # An enum united with plain `str` still only accepts the enum's values in HF.
    return {"kinds": kinds, "choices": list(dict.fromkeys(choices))}


def _union_parts(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        parts: list[Any] = []
        for arg in typing.get_args(annotation):
            parts.extend(_union_parts(arg))
        return parts
    if origin is typing.Annotated:
        return _union_parts(typing.get_args(annotation)[0])
    return [annotation]


def _json_default(field: dataclasses.Field) -> tuple[bool, Any]:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return False, None
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value)
    except TypeError:
        return False, None
    return True, value


def describe_dataclass(cls: type, skip: set[str] = frozenset()) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if not field.init or field.name.startswith("_") or field.name in skip:
            continue
        entry = describe_type(hints[field.name])
        has_default, default = _json_default(field)
        if has_default:
            entry["default"] = default
        help_text = field.metadata.get("help") if field.metadata else None
        if help_text:
            entry["help"] = " ".join(str(help_text).split())[:300]
        fields[field.name] = entry
    return fields


def build_trl_snapshot() -> dict[str, Any]:
    import trl

    methods = {}
    for method, class_name in TRL_CLASSES.items():
        methods[method] = {"class": class_name, "fields": describe_dataclass(getattr(trl, class_name))}
    import transformers

    return {"trl_version": trl.__version__, "transformers_version": transformers.__version__, "methods": methods}


def build_peft_snapshot() -> dict[str, Any]:
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    adapters = {}
    for peft_type in peft.PeftType:
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
        if config_cls is None:
            continue
        adapters[peft_type.value] = {
            "class": config_cls.__name__,
            "fields": describe_dataclass(config_cls, skip=PEFT_FIELDS_SET_BY_SECTION),
        }
    return {
        "peft_version": peft.__version__,
        "task_types": [task.value for task in peft.TaskType],
        "adapters": adapters,
    }


# What validation reads from a snapshot entry; "help" only becomes documentation.
VALIDATED_PARTS = ("kinds", "choices", "default")
REFRESH_COMMAND = "make snapshot docs"


def _fields_by_section(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections = snapshot.get("methods") or snapshot.get("adapters") or {}
    return {name: section["fields"] for name, section in sections.items()}


def validation_drift(committed: dict[str, Any], installed: dict[str, Any]) -> list[str]:
    """The differences between two snapshots that change what validates, one readable line each."""
    lines: list[str] = []
    if committed.get("task_types", []) != installed.get("task_types", []):
        lines.append(f"task_types: {committed.get('task_types')} -> {installed.get('task_types')}")
    old_sections, new_sections = _fields_by_section(committed), _fields_by_section(installed)
    for section in sorted(set(old_sections) | set(new_sections)):
        old, new = old_sections.get(section), new_sections.get(section)
        if old is None or new is None:
            lines.append(f"{section}: {'added' if old is None else 'removed'}")
            continue
        for key in sorted(set(old) - set(new)):
            lines.append(f"{section}.{key}: removed")
        for key in sorted(set(new) - set(old)):
            lines.append(f"{section}.{key}: added ({new[key].get('kinds')})")
        for key in sorted(set(old) & set(new)):
            for part in VALIDATED_PARTS:
                if old[key].get(part) != new[key].get(part):
                    lines.append(f"{section}.{key}.{part}: {old[key].get(part)!r} -> {new[key].get(part)!r}")
    return lines


def version_note(committed: dict[str, Any], installed: dict[str, Any]) -> str | None:
    """One line when the installed packages are not the ones the snapshot was made from."""
    differing = [
        f"{key.removesuffix('_version')} {committed.get(key)} -> {installed[key]}"
        for key in sorted(installed)
        if key.endswith("_version") and committed.get(key) != installed[key]
    ]
    if not differing:
        return None
    return f"snapshot made from other versions ({', '.join(differing)}); refresh with `{REFRESH_COMMAND}`"


def main() -> int:
    from finetune.io import write_json_atomic

    write_json_atomic(TRL_SNAPSHOT, build_trl_snapshot())
    write_json_atomic(PEFT_SNAPSHOT, build_peft_snapshot())
    print(f"wrote {TRL_SNAPSHOT} and {PEFT_SNAPSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
