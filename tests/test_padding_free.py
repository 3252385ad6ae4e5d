"""Padding-free rows and packing: the loss is the padded batch's, examples never see each other,
and a model or attention that would let them is refused before any work."""

from __future__ import annotations

import copy
from collections import Counter
from types import SimpleNamespace

import pytest

from finetune.data.collator import ChatCollator, PaddingFreeCollator
from finetune.data.pipeline import IGNORE_INDEX
from tests.helpers import issues_of

EXAMPLES = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
    {"input_ids": [10, 11], "labels": [10, 11]},
    {"input_ids": [12, 13, 14], "labels": [-100, 13, 14]},
]


def test_flattened_rows_restart_positions_and_never_train_across_examples() -> None:
    batch = PaddingFreeCollator(0, flatten=True)(EXAMPLES)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: the restarts are the mask
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2]]
    # Each example's first label is dropped: the previous example's last token would predict it.
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9, -100, 11, -100, 13, 14]]


def test_unflattened_rows_end_in_a_padding_segment_of_their_own() -> None:
    batch = PaddingFreeCollator(0)(EXAMPLES)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 0, 0, 0], [12, 13, 14, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9], [-100, 11, -100, -100, -100], [-100, 13, 14, -100, -100]]


@pytest.mark.parametrize("flatten", [True, False])
def test_target_count_equals_the_padded_batch(flatten: bool) -> None:
    padded = ChatCollator(0, "right")(EXAMPLES)
    free = PaddingFreeCollator(0, flatten)(EXAMPLES)
    assert padded["labels"][..., 1:].ne(IGNORE_INDEX).sum() == free["labels"][..., 1:].ne(IGNORE_INDEX).sum()


def test_a_packed_row_restarts_at_each_of_its_sequences() -> None:
    row = {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "seq_lengths": [3, 2]}
    batch = PaddingFreeCollator(0)([row, {"input_ids": [6, 7], "labels": [6, 7]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, -100, -100, -100]]


def test_a_packed_row_whose_lengths_disagree_is_refused() -> None:
    with pytest.raises(ValueError, match="add up to 4"):
        PaddingFreeCollator(0)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "seq_lengths": [2, 2]}])


def _per_token_losses(model, batch) -> list[float]:
    """Cross-entropy of every target token, in the order the examples come."""
    import torch

    with torch.no_grad():  # no KV cache, as in training (TRL's compute_loss): a cache turns the restarts' mask off
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return losses[targets.flatten() != IGNORE_INDEX].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("flatten", [True, False])
def test_per_token_losses_of_padding_free_rows_equal_the_padded_batch(demo_dir, flatten: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model", attn_implementation="sdpa").eval()
    texts = ["What is 3 plus 4? 3 plus 4 is 7.", "Add 10 and 12.", "Write 9 as a word. 9 is nine, and nine is 9."]
    examples = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    padded = _per_token_losses(model, ChatCollator(tokenizer.eos_token_id, "right")(examples))
    flat = _per_token_losses(model, PaddingFreeCollator(tokenizer.eos_token_id, flatten)(examples))
    assert len(flat) == len(padded) > 10
    assert torch.allclose(torch.tensor(flat), torch.tensor(padded), atol=1e-5, rtol=1e-5)
    first, second, third = examples  # the first two packed in one row, as packing leaves them
    packed_row = {key: first[key] + second[key] for key in ("input_ids", "labels")}
    packed_row["seq_lengths"] = [len(first["input_ids"]), len(second["input_ids"])]
    packed = _per_token_losses(model, PaddingFreeCollator(tokenizer.eos_token_id, flatten)([packed_row, third]))
    assert torch.allclose(torch.tensor(packed), torch.tensor(padded), atol=1e-5, rtol=1e-5)
    # The control: the same row with one position sequence (examples attending to each other) differs.
    joined = PaddingFreeCollator(tokenizer.eos_token_id, flatten=True)(examples)
    joined["position_ids"] = torch.arange(joined["input_ids"].shape[1])[None]
    assert not torch.allclose(torch.tensor(_per_token_losses(model, joined)), torch.tensor(padded), atol=1e-3)


@pytest.mark.slow
def test_packing_keeps_every_example_whole_within_the_row_length(demo_dir, demo_tokenizer) -> None:
    import datasets

    from finetune.data.pipeline import pack_rows

    rows = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (5, 9, 3, 7, 2, 8, 4)]
    packed = pack_rows(datasets.Dataset.from_list(rows), 10)
    assert len(packed) < len(rows)
    pieces = []
    for row in packed:
        assert len(row["input_ids"]) <= 10 and sum(row["seq_lengths"]) == len(row["input_ids"])
        start = 0
        for length in row["seq_lengths"]:
            pieces.append(tuple(row["input_ids"][start:start + length]))
            start += length
    assert Counter(pieces) == Counter(tuple(row["input_ids"]) for row in rows)


# ------------------------------------------------------------------ config and pre-checks


def test_trl_packing_keys_point_to_sft_args(base_config) -> None:
    for key, owner in (("packing", "sft_args.packing"), ("padding_free", "sft_args.padding_free"),
                       ("packing_strategy", "sft_args.packing")):
        config = copy.deepcopy(base_config)
        config["training_args"][key] = True if key != "packing_strategy" else "bfd"
        messages = [issue.message for issue in issues_of(config)]
        assert any(owner in message for message in messages), messages


def _config(packing: bool = False, padding_free: bool = False, attention: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        method="sft", sft_args=SimpleNamespace(packing=packing, padding_free=padding_free),
        run_conf=SimpleNamespace(model="m", model_args=SimpleNamespace(attn_implementation=attention)),
        training_args=SimpleNamespace(),
    )


def test_padded_batches_need_no_check() -> None:
    from finetune.train.attention import check_padding_free

    assert check_padding_free(_config(), lambda c: pytest.fail("nothing to check")) == []


def test_an_attention_that_ignores_position_restarts_is_a_config_error() -> None:
    from finetune.train.attention import check_padding_free

    problems = check_padding_free(_config(padding_free=True, attention="paged|sdpa"), lambda c: None)
    assert problems and problems[0][0] == "sft_args.padding_free" and "paged|sdpa" in problems[0][1]


def test_a_model_that_builds_no_masks_from_positions_is_refused() -> None:
    from transformers import LlamaConfig, MambaConfig

    from finetune.train.attention import check_padding_free

    assert check_padding_free(_config(packing=True), lambda c: LlamaConfig()) == []
    problems = check_padding_free(_config(packing=True), lambda c: MambaConfig())
    assert problems[0][0] == "sft_args.packing" and "MambaForCausalLM" in problems[0][1]
    remote = LlamaConfig()
    remote.auto_map = {"AutoModelForCausalLM": "modeling.Custom"}
    assert "custom modeling code" in check_padding_free(_config(padding_free=True), lambda c: remote)[0][1]


def test_dpo_padding_free_is_refused_by_validate_rather_than_ignored(base_config) -> None:
    tree = copy.deepcopy(base_config)
    tree.update(method="dpo", data_conf={**tree["data_conf"], "chat_template_name": "chat-ml"})
    tree["training_args"]["padding_free"] = True
    [issue] = issues_of(tree)
    assert issue.path.startswith("training_args") and "falls back to padding" in issue.message


def test_packing_with_padding_free_false_is_a_contradiction(base_config) -> None:
    tree = copy.deepcopy(base_config)
    tree["sft_args"] = {"packing": True, "padding_free": False}
    [issue] = issues_of(tree)
    assert "always padding-free" in issue.message
    tree["sft_args"] = {"packing": True}
    assert issues_of(tree) == []


def test_flex_attention_cannot_train_on_the_cpu() -> None:
    from finetune.train.preflight import check_attention

    config = SimpleNamespace(run_conf=SimpleNamespace(model_args=SimpleNamespace(attn_implementation="flex_attention")))
    [(key, message)] = check_attention(config, ["cpu"])
    assert key == "run_conf.model_args.attn_implementation" and "no backward pass on the CPU" in message


def test_liger_is_refused_on_the_cpu() -> None:
    from finetune.train.attention import check_liger

    config = SimpleNamespace(training_args=SimpleNamespace(use_liger_kernel=True))
    [(key, message)] = check_liger(config, ["cpu"])
    assert key == "training_args.use_liger_kernel" and "CUDA devices only" in message
    assert check_liger(SimpleNamespace(training_args=SimpleNamespace(use_liger_kernel=False)), ["cpu"]) == []


@pytest.mark.slow
def test_preflight_checks_the_real_model(demo_dir, base_config) -> None:
    from finetune.config.models import CONFIG_ADAPTER
    from finetune.train.preflight import preflight

    tree = copy.deepcopy(base_config)
    tree["run_conf"]["model"] = str(demo_dir / "model")
    tree["sft_args"] = {"padding_free": True}
    tree["training_args"]["use_liger_kernel"] = True
    config = CONFIG_ADAPTER.validate_python(tree)
    problems = dict(preflight(config, ["cpu"], lambda c: None))
    assert "sft_args.padding_free" not in problems  # a Llama with sdpa keeps its examples apart
    assert "CUDA devices only" in problems["training_args.use_liger_kernel"]


@pytest.mark.slow
def test_a_packed_run_derives_its_steps_from_the_rows_and_trains(tmp_path, demo_dir) -> None:
    import json
    import math
    import subprocess
    import sys

    from tests.conftest import EXAMPLES
    from tests.helpers import state_db

    config = tmp_path / "packed.yaml"
    config.write_text((EXAMPLES / "sft-lora-grid.yaml").read_text().replace("demo/", f"{demo_dir}/"))
    settings = ["experiment.name=packed", "sft_args.packing=true", "training_args.learning_rate=1.0e-3",
                "peft_conf.peft_kwargs.r=4", "training_args.num_train_epochs=1", "experiment.num_chunks=2"]
    command = [sys.executable, "-m", "finetune.cli"]
    planned = subprocess.run([*command, "plan", str(config), *[f"--set={s}" for s in settings]], capture_output=True, text=True, cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert "tokenised, when packed" in planned.stdout  # the row count is not known from the files
    result = subprocess.run([*command, "run", str(config), *[f"--set={s}" for s in settings]], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    root = tmp_path / "runs" / "packed"
    [run] = json.loads((root / "plan.json").read_text())["runs"]
    examples = sum(1 for _ in open(demo_dir / "data" / "sft_train.jsonl"))
    rows = run["derived"]["train_examples"]
    assert rows < examples / 4  # ~20-token examples in rows of up to 256 tokens
    assert run["derived"]["total_steps"] == math.ceil(rows / 8)
    with state_db(root) as db:
        assert db.execute("SELECT state FROM runs").fetchall() == [("completed",)]


def test_runs_with_and_without_liger_never_share_a_loaded_base(base_config) -> None:
    from finetune.config.models import CONFIG_ADAPTER
    from finetune.train.bases import base_key

    plain = CONFIG_ADAPTER.validate_python(base_config)
    fused = copy.deepcopy(base_config)
    fused["training_args"]["use_liger_kernel"] = True
    assert base_key(plain) != base_key(CONFIG_ADAPTER.validate_python(fused))


@pytest.mark.slow
@pytest.mark.parametrize("row_length,expected", [("256", r"\(packed into \d+ rows\)"), ("40", "packing packed nothing")])
def test_data_preview_shows_the_packed_rows(tmp_path, demo_dir, row_length, expected) -> None:
    import re

    from typer.testing import CliRunner

    from finetune.cli import app
    from tests.conftest import EXAMPLES

    config = tmp_path / "c.yaml"
    config.write_text((EXAMPLES / "sft-lora-grid.yaml").read_text().replace("demo/", f"{demo_dir}/"))
    settings = ["--set", "sft_args.packing=true", "--set", f"sft_args.max_seq_length={row_length}"]
    result = CliRunner().invoke(app, ["data", "preview", str(config), "--n", "1", *settings])
    assert result.exit_code == 0, result.output
    assert re.search(expected, " ".join(result.output.split())), result.output
