"""Loading: positions, tags, Helm values keys, --set, unusable input; the validate command's exits."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config.loading import ConfigLoadError, load_document, parse_yaml_text
from tests.conftest import BASE_SFT, EXAMPLES

runner = CliRunner()


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_tags_become_plain_knobs_with_positions() -> None:
    doc = parse_yaml_text("a:\n  r: !list [8, 16]\n  lr: !range {start: 1.0e-5, end: 1.0e-3, log: true}\n", "f.yaml")
    assert doc.tree == {"a": {"r": {"$list": [8, 16]}, "lr": {"$range": {"start": 1e-5, "end": 1e-3, "log": True}}}}
    assert str(doc.locate(("a", "r", "$list", 1))) == "f.yaml:2:16"
    assert str(doc.locate(("a", "missing", "deeper"))) == "f.yaml:1:1"


def test_yaml_11_style_floats_read_as_numbers() -> None:
    assert parse_yaml_text("lr: 5e-05\n", "f").tree == {"lr": 5e-05}


def test_unknown_tag_and_duplicate_key_are_unusable() -> None:
    with pytest.raises(ConfigLoadError, match="f:1:4: a: unknown YAML tag !choice"):
        parse_yaml_text("a: !choice [1]\n", "f")
    with pytest.raises(ConfigLoadError, match="duplicate key 'a'"):
        parse_yaml_text("a: 1\na: 2\n", "f")


def test_values_key_and_set(tmp_path) -> None:
    path = write(tmp_path, "image: x\nfinetuning:\n  training_args:\n    learning_rate: 1.0\n")
    doc = load_document(path, values_key="finetuning", overrides=["training_args.learning_rate=!list [1, 2]"])
    assert doc.tree == {"training_args": {"learning_rate": {"$list": [1, 2]}}}
    assert str(doc.locate(("training_args",))) == f"{path}:3:3"
    assert str(doc.locate(("training_args", "learning_rate"))) == "--set training_args.learning_rate"
    with pytest.raises(ConfigLoadError, match="no key 'finetunin'"):
        load_document(path, values_key="finetunin")


def test_validate_exit_codes(tmp_path) -> None:
    assert runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")]).exit_code == 2
    assert runner.invoke(app, ["validate", str(write(tmp_path, "a: [1, 2\n"))]).exit_code == 2
    assert runner.invoke(app, ["validate", str(write(tmp_path, "- 1\n- 2\n"))]).exit_code == 2
    bad = dict(BASE_SFT, training_args={"lerning_rate": 1})
    result = runner.invoke(app, ["validate", str(write(tmp_path, json.dumps(bad), "bad.json")), "--json"])
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["valid"] is False
    assert payload["errors"][0]["path"] == "training_args.lerning_rate"
    assert "did you mean 'learning_rate'" in payload["errors"][0]["message"]


def test_validate_with_set_override_fixes_config(tmp_path) -> None:
    bad = dict(BASE_SFT, method="ppo")
    path = write(tmp_path, json.dumps(bad), "c.json")
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 1
    assert runner.invoke(app, ["validate", str(path), "--set", "method=sft"]).exit_code == 0


# ---------------------------------------------------------------- hypothesis: mutated configs never crash

def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))


SEED_TREES = [BASE_SFT, load_document(EXAMPLES / "sft-lora-grid.yaml").tree, load_document(EXAMPLES / "dpo.yaml").tree]
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False), st.text(string.printable, max_size=8),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=5), st.integers(), max_size=2),
    st.just({"$list": []}), st.just({"$range": {"start": 1, "end": 0}}), st.just({"$list": [1, "a"]}),
)


@st.composite
def mutated(draw):
    import copy

    tree = copy.deepcopy(draw(st.sampled_from(SEED_TREES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(tree))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = tree
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["drop", "rename", "retype"]))
        key = path[-1]
        if action == "drop" and isinstance(parent, dict):
            del parent[key]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))] = parent.pop(key)
        else:
            parent[key] = copy.deepcopy(draw(junk))
    return tree


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=mutated())
def test_mutated_configs_exit_0_or_1_with_a_message(tmp_path, tree) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(tree))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 1), result.output
    assert result.output.strip()


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path) -> None:
    import time

    levels = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    levels += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    path = _write(tmp_path, "bomb.yaml", "\n".join(levels) + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigLoadError, match="expands to more than"):
        load_document(path)
    assert time.perf_counter() - started < 5  # generous: the point is that it ends at all


@pytest.mark.parametrize("name,text", [
    ("deep-flow.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n"),
    ("deep.json", '{"a": ' + "[" * 100 + "]" * 100 + "}"),
    ("deep-block.yaml", "\n".join(" " * i + "k:" for i in range(100)) + " v\n"),
])
def test_deep_nesting_is_refused_naming_the_limit(tmp_path, name, text) -> None:
    with pytest.raises(ConfigLoadError, match="nested more than 64 levels"):
        load_document(_write(tmp_path, name, text))


def test_an_oversized_config_is_refused_unread(tmp_path, monkeypatch) -> None:
    from finetune.config import loading

    monkeypatch.setattr(loading, "MAX_DOCUMENT_BYTES", 1000)
    with pytest.raises(ConfigLoadError, match="over the limit of 1000"):
        load_document(_write(tmp_path, "big.yaml", "a: " + "x" * 2000 + "\n"))


def test_brackets_inside_strings_and_comments_do_not_count_as_nesting(tmp_path) -> None:
    text = "a: '" + "[" * 200 + "'\nb: \"" + "{" * 200 + "\"  # " + "[" * 200 + "\n"
    assert load_document(_write(tmp_path, "fine.yaml", text)).tree["a"] == "[" * 200
