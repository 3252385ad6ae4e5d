from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from finetune.config.loading import SourceDoc, parse_yaml_text
from finetune.config.validation import ConfigIssue, validate_document


def doc_of(tree: dict[str, Any], source: str = "test.yaml") -> SourceDoc:
    return parse_yaml_text(json.dumps(tree), source)


def issues_of(tree: dict[str, Any]) -> list[ConfigIssue]:
    return validate_document(doc_of(tree))


@cache
def sweep_validator():
    import jsonschema

    schema = json.loads((Path(__file__).resolve().parent.parent / "schemas/finetune-sweep.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def schema_errors(tree: dict[str, Any]) -> list[str]:
    return [error.message for error in sweep_validator().iter_errors(tree)]
