"""Every constraint the models enforce on a leaf value is also in the generated JSON Schemas.

Walks the whole model tree (every section, every TRL training-argument model and PEFT kwargs
model): bounds, lengths, patterns and enums of each field, and each name a field accepts (its
aliases), must appear in that field's schema, so an editor or `helm lint` rejects what
`finetune validate` rejects.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Iterator

import annotated_types
import pytest
from pydantic import AliasChoices, BaseModel

from finetune.config.models import AnyFinetuneConfig

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = {
    "concrete": REPO / "schemas" / "finetune.schema.json",
    "sweep": REPO / "schemas" / "finetune-sweep.schema.json",
    "helm": REPO / "charts" / "finetune" / "values.schema.json",
}
KEYWORDS = {annotated_types.Gt: ("exclusiveMinimum", "gt"), annotated_types.Ge: ("minimum", "ge"),
            annotated_types.Lt: ("exclusiveMaximum", "lt"), annotated_types.Le: ("maximum", "le")}


def models_in(annotation: Any, seen: set[type]) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation not in seen:
            seen.add(annotation)
            yield annotation
            for field in annotation.model_fields.values():
                yield from models_in(field.annotation, seen)
                for item in field.metadata:
                    yield from models_in(item, seen)
        return
    for arg in typing.get_args(annotation):
        yield from models_in(arg, seen)


def constraints(annotation: Any, metadata: list[Any]) -> Iterator[tuple[str, Any]]:
    """(JSON Schema keyword, value) pairs a field's type and metadata impose."""
    for item in metadata:
        for kind, (keyword, attribute) in KEYWORDS.items():
            if isinstance(item, kind):
                yield keyword, getattr(item, attribute)
        if isinstance(item, annotated_types.MinLen):
            yield "min", item.min_length
        if getattr(item, "pattern", None):
            yield "pattern", item.pattern
        if hasattr(item, "metadata"):  # a nested FieldInfo
            yield from constraints(None, list(item.metadata))
    if annotation is None:
        return
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        yield "enum", tuple(typing.get_args(annotation))
    elif origin is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        yield from constraints(inner, extra)
    elif not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        for arg in typing.get_args(annotation):
            yield from constraints(arg, [])


def found(node: Any, keyword: str, value: Any) -> bool:
    if isinstance(node, dict):
        if keyword == "enum" and set(value) <= set(node.get("enum", [])) | ({node["const"]} if "const" in node else set()):
            return True
        if keyword == "min" and value in (node.get("minItems"), node.get("minLength")):
            return True
        if node.get(keyword) == value:
            return True
        return any(found(child, keyword, value) for child in node.values())
    if isinstance(node, list):
        return any(found(child, keyword, value) for child in node)
    return False


def enum_found(node: Any, values: tuple) -> bool:
    """Literal values may be split over several branches of a union: collect them all."""
    seen: set[Any] = set()

    def collect(item: Any) -> None:
        if isinstance(item, dict):
            seen.update(item.get("enum", []))
            if "const" in item:
                seen.add(item["const"])
            for child in item.values():
                collect(child)
        elif isinstance(item, list):
            for child in item:
                collect(child)

    collect(node)
    return set(values) <= seen


def definitions(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema.get("$defs", {}), **schema.get("definitions", {})}


ALL_MODELS = sorted(models_in(AnyFinetuneConfig, set()), key=lambda model: model.__name__)


def test_the_walk_covers_the_whole_tree() -> None:
    names = {model.__name__ for model in ALL_MODELS}
    assert {"SFTTrainingArguments", "DPOTrainingArguments", "GRPOTrainingArguments", "ModelArguments", "ExperimentConfig"} <= names
    assert any(name.startswith("LoraConfig") for name in names) and len(names) > 60


@pytest.mark.parametrize("which", sorted(SCHEMAS))
def test_every_leaf_constraint_and_alias_is_in_the_schema(which: str) -> None:
    defs = definitions(json.loads(SCHEMAS[which].read_text()))
    missing = []
    for model in ALL_MODELS:
        schema = defs.get(model.__name__)
        if schema is None:
            continue  # a model the schema inlines under another name is checked through its parent
        properties = schema.get("properties", {})
        for name, field in model.model_fields.items():
            if field.exclude:
                continue  # keys owned by another section: rejected, and absent from the schema
            aliases = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else [field.alias or name]
            for alias in aliases:
                if alias not in properties:
                    missing.append(f"{model.__name__}.{alias}: not in the schema")
                    continue
                for keyword, value in constraints(field.annotation, list(field.metadata)):
                    ok = enum_found(properties[alias], value) if keyword == "enum" else found(properties[alias], keyword, value)
                    if not ok:
                        missing.append(f"{model.__name__}.{alias}: {keyword} {value!r}")
    assert not missing, "\n".join(missing[:40])


def test_values_the_models_reject_the_schemas_reject_too() -> None:
    from tests.conftest import BASE_SFT
    from tests.helpers import issues_of, schema_errors

    for path, value in [("run_conf.model_args.torch_dtype", "float128"), ("training_args.num_train_epochs", -3),
                        ("training_args.learning_rate", -1e-4), ("training_args.max_steps", 0), ("sft_args.max_seq_length", 0),
                        ("peft_conf.peft_kwargs.lora_dropout", 1.5), ("peft_conf.peft_kwargs.r", 0), ("experiment.devices", [0, 0]),
                        ("run_conf.final_checkpoint_name", "../x"), ("experiment.name", "n" * 101), ("sft_args.save_name_if_new_basemodel", ""),
                        ("batchsize_conf.total_train_batch_size", 10**12), ("training_args.max_steps", 10**9),
                        ("training_args.num_train_epochs", 1e5), ("experiment.num_chunks", 10**9), ("sweep.max_runs", 10**9)]:
        tree = json.loads(json.dumps(BASE_SFT))
        *parents, last = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        assert [issue.path for issue in issues_of(tree)] == [path], path
        assert schema_errors(tree), path
