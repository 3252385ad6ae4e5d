"""Every example config is valid for the models, the CLI and the generated JSON Schema."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config.loading import load_document
from finetune.config.validation import validate_document
from tests.conftest import EXAMPLES
from tests.helpers import schema_errors

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def values_key(path) -> str | None:
    return "finetuning" if "helm" in path.name else None


def test_there_are_examples_for_every_kind() -> None:
    names = {path.stem for path in EXAMPLE_FILES}
    assert {"sft-lora-grid", "sft-random", "sft-successive-halving", "dpo", "grpo", "helm-values"} <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_validates_with_models_and_schema(path) -> None:
    doc = load_document(path, values_key=values_key(path))
    assert validate_document(doc) == []
    assert schema_errors(doc.tree) == []


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_validate_command_exits_zero(path) -> None:
    args = ["validate", str(path)] + (["--values-key", "finetuning"] if values_key(path) else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output
