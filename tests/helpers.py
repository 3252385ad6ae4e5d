from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Iterator

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


@contextmanager
def state_db(root: Path) -> Iterator[sqlite3.Connection]:
    """The experiment's state.db, committed and closed on the way out (sqlite3's own context manager
    commits but leaves the connection open, and an open reader outlives SIGKILLs and folder moves)."""
    connection = sqlite3.connect(Path(root) / "state.db")
    try:
        yield connection
        connection.commit()
    finally:
        connection.close()
