"""The data pipeline on a tokenizer built locally: templates, masks, pad strategies, mixing, errors."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.data.collator import ChatCollator
from finetune.data.mixing import auto_split_indices, weighted_mix_order
from finetune.data.pipeline import IGNORE_INDEX, input_pad_token_id, prepare_tokenizer, tokenize_conversation
from finetune.data.readers import DataError, read_records
from finetune.data.templates import TemplateError, install_template, load_template

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And 1 plus 1?"},
    {"role": "assistant", "content": "2."},
]

EXPECTED = {
    "chat-ml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 plus 3 is 5.<|im_end|>\n<|im_start|>user\nAnd 1 plus 1?<|im_end|>\n"
        "<|im_start|>assistant\n2.<|im_end|>\n",
        "2 plus 3 is 5.<|im_end|>2.<|im_end|>",
    ),
    "mistral-with-system": (
        "<s><<SYS>>\nBe brief.\n<</SYS>>\n[INST] What is 2 plus 3? [/INST]2 plus 3 is 5.</s> [INST] And 1 plus 1? [/INST]2.</s> ",
        "2 plus 3 is 5.</s>2.</s>",
    ),
    "poro": (
        "<|system|>\nBe brief.</s><|user|>\nWhat is 2 plus 3?</s><|assistant|>\n2 plus 3 is 5.</s>"
        "<|user|>\nAnd 1 plus 1?</s><|assistant|>\n2.</s>",
        "2 plus 3 is 5.</s>2.</s>",
    ),
    "simplified-llama31": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 plus 3 is 5.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 1 plus 1?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2.<|eot_id|>",
        "2 plus 3 is 5.<|eot_id|>2.<|eot_id|>",
    ),
}


def data_conf(**values):
    defaults = {"chat_template_name": "chat-ml", "missing_pad_token_strategy": "bos-repurpose", "padding_side": "right"}
    return SimpleNamespace(**{**defaults, **values})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_and_masks_exactly(demo_tokenizer, name) -> None:
    added = install_template(load_template(name, demo_tokenizer), demo_tokenizer)
    text, loss_text = EXPECTED[name]
    assert demo_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == text
    example = tokenize_conversation(demo_tokenizer, CONVERSATION, completions_only=True)
    kept = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert demo_tokenizer.decode(kept) == loss_text
    masked = [label for label in example["labels"] if label == IGNORE_INDEX]
    assert len(masked) + len(kept) == len(example["input_ids"])
    assert all(token in demo_tokenizer.get_vocab() for token in load_template(name, demo_tokenizer).special_tokens)
    assert added == len(load_template(name, demo_tokenizer).special_tokens)
    assert demo_tokenizer.convert_tokens_to_ids("<s>") not in example["input_ids"][1:], "no double BOS"


def test_without_completions_only_every_token_carries_loss(demo_tokenizer) -> None:
    install_template(load_template("chat-ml", demo_tokenizer), demo_tokenizer)
    example = tokenize_conversation(demo_tokenizer, CONVERSATION, completions_only=False)
    assert example["labels"] == example["input_ids"]


def test_keep_original_without_a_template_is_a_clear_error(demo_tokenizer) -> None:
    demo_tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template"):
        load_template("keep-original", demo_tokenizer)


@pytest.mark.parametrize(
    "strategy,token",
    [("eos-repurpose", "</s>"), ("bos-repurpose", "<s>"), ("unk-repurpose", "<unk>"), ("unk-convert-to-eos", "<unk>")],
)
def test_pad_strategies(demo_tokenizer, strategy, token) -> None:
    assert demo_tokenizer.pad_token is None
    prepare_tokenizer(demo_tokenizer, data_conf(missing_pad_token_strategy=strategy))
    assert demo_tokenizer.pad_token == token
    pad_in = input_pad_token_id(demo_tokenizer, data_conf(missing_pad_token_strategy=strategy))
    expected_in = demo_tokenizer.eos_token_id if strategy == "unk-convert-to-eos" else demo_tokenizer.convert_tokens_to_ids(token)
    assert pad_in == expected_in
    batch = ChatCollator(pad_in, "right")([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, expected_in, expected_in]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_left_padding(demo_tokenizer) -> None:
    batch = ChatCollator(0, "left")([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6], [0, 8]]
    assert batch["labels"].tolist() == [[5, 6], [-100, 8]]


def test_weighted_mix_draws_everything_and_follows_weights() -> None:
    sizes, weights = [50, 400], [1.0, 3.0]
    draws = weighted_mix_order(sizes, weights, seed=7)
    for dataset, size in enumerate(sizes):
        assert {index for d, index in draws if d == dataset} == set(range(size))
    counts = Counter(dataset for dataset, _ in draws)
    share = counts[1] / len(draws)
    assert 0.70 < share < 0.80  # 3:1 weights -> 0.75
    assert weighted_mix_order(sizes, weights, seed=7) == draws


def test_equal_weights_alternate_and_zero_weight_is_skipped() -> None:
    assert [d for d, _ in weighted_mix_order([2, 2], [1.0, 1.0], 1)] == [0, 1, 0, 1]
    assert {d for d, _ in weighted_mix_order([3, 5], [1.0, 0.0], 1)} == {0}


def test_auto_split_is_reproducible_and_disjoint() -> None:
    train, valid = auto_split_indices(100, 0.2, seed=5)
    assert (train, valid) == auto_split_indices(100, 0.2, seed=5)
    assert len(valid) == 20 and not set(train) & set(valid) and set(train) | set(valid) == set(range(100))
    assert auto_split_indices(100, 0.2, seed=6) != (train, valid)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
MALFORMED = [
    ("not json", "{not json", "not valid JSON"),
    ("a list", "[1, 2]", "must be a JSON object"),
    ("missing messages", json.dumps({"text": "x"}), "missing key 'messages'"),
    ("messages not a list", json.dumps({"messages": "hi"}), "non-empty list"),
    ("empty messages", json.dumps({"messages": []}), "non-empty list"),
    ("bad role", json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "role is 'bot'"),
    ("empty content", json.dumps({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}), "content is empty"),
    ("content not text", json.dumps({"messages": [{"role": "user", "content": 3}]}), "must be a string"),
    ("no assistant", json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
    ("unknown message key", json.dumps({"messages": [{"role": "user", "content": "x", "name": "a"}]}), "unknown key"),
    ("message not an object", json.dumps({"messages": ["hi"]}), "must be an object"),
]


@pytest.mark.parametrize("name,line,words", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_sft_line_names_file_and_line(tmp_path, name, line, words) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError) as caught:
        read_records(path, "sft")
    assert caught.value.line == 4
    assert str(caught.value).startswith(f"{path}:4:") and words in str(caught.value)


@pytest.mark.parametrize(
    "method,record,words",
    [
        ("dpo", {"prompt_messages": [{"role": "user", "content": "q"}], "chosen_messages": [{"role": "assistant", "content": "a"}]}, "rejected_messages"),
        ("dpo", {"prompt_messages": [{"role": "assistant", "content": "q"}], "chosen_messages": [{"role": "assistant", "content": "a"}], "rejected_messages": [{"role": "assistant", "content": "b"}]}, "must be from the user"),
        ("grpo", {"prompt_messages": [{"role": "user", "content": "q"}], "prompt": "x"}, "reserved"),
        ("grpo", {"question": "q"}, "matches no GRPO data format"),
    ],
)
def test_malformed_preference_and_prompt_records(tmp_path, method, record, words) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=words):
        read_records(path, method)


def test_empty_and_missing_files(tmp_path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_records(tmp_path / "empty.jsonl", "sft")
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.jsonl", "sft")


def test_save_to_disk_directory_is_read_and_checked(tmp_path) -> None:
    import datasets

    datasets.Dataset.from_list([GOOD, GOOD]).save_to_disk(str(tmp_path / "saved"))
    assert len(read_records(tmp_path / "saved", "sft")) == 2


def test_data_preview_shows_loss_tokens_and_counts(tmp_path, demo_dir) -> None:
    from typer.testing import CliRunner

    from finetune.cli import app
    from tests.conftest import EXAMPLES

    config = tmp_path / "c.yaml"
    config.write_text((EXAMPLES / "sft-lora-grid.yaml").read_text().replace("demo/", f"{demo_dir}/"))
    result = CliRunner().invoke(app, ["data", "preview", str(config), "--n", "2"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "example 1" in text and "carry loss" in text
    assert "training examples 256, validation 32" in text
    assert "special tokens added by the template 2" in text


def test_data_preview_names_a_bad_line(tmp_path, demo_dir) -> None:
    from typer.testing import CliRunner

    from finetune.cli import app
    from tests.conftest import EXAMPLES

    bad = tmp_path / "bad.jsonl"
    bad.write_text((demo_dir / "data" / "sft_train.jsonl").read_text() + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    config = tmp_path / "c.yaml"
    text = (EXAMPLES / "sft-lora-grid.yaml").read_text().replace("demo/data/sft_train.jsonl", str(bad))
    config.write_text(text.replace("demo/", f"{demo_dir}/"))
    result = CliRunner().invoke(app, ["data", "preview", str(config)])
    assert result.exit_code == 1
    assert f"{bad}:257:" in result.output.replace("\n", "") and "robot" in result.output


def test_completions_only_with_a_template_that_marks_no_turns_is_an_error(demo_tokenizer) -> None:
    from finetune.data.pipeline import DataStats, build_examples

    demo_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = SimpleNamespace(
        method="sft",
        data_conf=SimpleNamespace(chat_template_name="keep-original"),
        sft_args=SimpleNamespace(train_on_completions_only=True, max_seq_length=64),
    )
    with pytest.raises(ValueError, match="marks assistant turns"):
        build_examples(config, demo_tokenizer, DataStats())


def test_a_length_limit_that_leaves_no_example_names_its_key(demo_dir, base_config, demo_tokenizer) -> None:
    """Found late otherwise: every run fails at its data with a number and no key to change."""
    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.data.pipeline import DataStats, build_examples

    base_config["data_conf"]["training_data"]["datasets"] = [{"path": str(demo_dir / "data" / "sft_train.jsonl")}]
    base_config["run_conf"]["model"] = str(demo_dir / "model")
    base_config["sft_args"] = {"max_seq_length": 4}
    config = CONFIG_ADAPTER.validate_python(base_config)
    prepare_tokenizer(demo_tokenizer, config.data_conf)
    with pytest.raises(ValueError, match=r"longer than 4 tokens \(sft_args.max_seq_length\); raise sft_args.max_seq_length"):
        build_examples(config, demo_tokenizer, DataStats())


def test_a_line_that_is_not_utf8_names_its_line_and_byte(tmp_path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DataError) as caught:
        read_records(path, "sft")
    assert caught.value.line == 2 and "not UTF-8" in str(caught.value) and "0xe9" in str(caught.value)


def test_an_over_long_line_is_refused_without_reading_it_whole(tmp_path, monkeypatch) -> None:
    from finetune.data import readers

    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1024)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}) + "\n")
    with pytest.raises(DataError) as caught:
        read_records(path, "sft")
    assert caught.value.line == 2 and "longer than 1024 bytes" in str(caught.value)


def test_a_file_of_one_gigantic_line_is_a_clear_error(tmp_path, monkeypatch) -> None:
    from finetune.data import readers

    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 4096)
    path = tmp_path / "train.jsonl"
    path.write_text("[" * 100_000)  # no newline at all
    with pytest.raises(DataError) as caught:
        read_records(path, "sft")
    assert str(caught.value).startswith(f"{path}:1:") and "longer than" in str(caught.value)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_are_records_or_a_data_error_with_a_line(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "train.jsonl"
    path.write_bytes(data)
    try:
        read_records(path, "sft")
    except DataError as error:
        assert error.line is None or 1 <= error.line <= data.count(b"\n") + 1


# ---------------------------------------------------------------- hostile data: huge lines, tiny splits, exploding mixes


def test_counting_a_file_without_newlines_takes_bounded_memory(tmp_path) -> None:
    import tracemalloc

    from finetune.data.mixing import count_jsonl_records

    path = tmp_path / "one-line.jsonl"
    with path.open("wb") as stream:
        for _ in range(32):
            stream.write(b"x" * (1 << 20))  # 32 MB, no newline
    tracemalloc.start()
    try:
        assert count_jsonl_records(path) == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes"


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=60).map(lambda raw: raw.replace(b"a", b"\n").replace(b"b", b" ")))
def test_counting_in_blocks_counts_the_non_blank_lines(data) -> None:
    import io

    from finetune.data import files

    expected = sum(1 for line in io.BytesIO(data) if line.strip())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "BLOCK_BYTES", 3)
        assert files.count_nonblank_lines(io.BytesIO(data)) == expected


@pytest.mark.parametrize("sizes,kind,named", [
    ((1,), "CONCATENATION", "d0.jsonl"), ((1, 0), "CONCATENATION", "d0.jsonl, d1.jsonl"),
    ((1,), "PRECOMPUTE_WEIGHTED_MIX", "d0.jsonl"), ((5, 1), "PRECOMPUTE_WEIGHTED_MIX", "d1.jsonl"),
])
def test_auto_split_of_too_few_records_names_the_files(monkeypatch, sizes, kind, named) -> None:
    from finetune.data import pipeline

    datasets = [SimpleNamespace(path=f"d{index}.jsonl", sampling_weight=1.0, format="auto") for index in range(len(sizes))]
    data_conf = SimpleNamespace(training_data=SimpleNamespace(type=kind, datasets=datasets, seed=1),
                                validation_data=SimpleNamespace(type="AUTO_SPLIT", ratio=0.2, seed=1))
    records = {dataset.path: [GOOD] * size for dataset, size in zip(datasets, sizes)}
    monkeypatch.setattr(pipeline, "read_records", lambda path, method, data_format: records[path])
    with pytest.raises(DataError) as raised:
        pipeline.gather_records(data_conf, "sft", pipeline.DataStats())
    assert str(raised.value).startswith(f"{named}: AUTO_SPLIT") and "needs at least 2" in str(raised.value)


def test_a_weighted_mix_that_would_explode_is_refused_before_drawing() -> None:
    import time

    from finetune.data.mixing import MixError, check_mix_size

    started = time.perf_counter()
    with pytest.raises(MixError, match=r"big.jsonl.*the limit is 10,000,000"):
        check_mix_size([10, 10**6], [1000.0, 1.0], ["small.jsonl", "big.jsonl"])
    for weights in ([1.0, 1e-12], [1.0, float("inf")], [float("nan"), 1.0]):
        with pytest.raises(MixError):
            weighted_mix_order([5, 5], weights, 1)
    assert time.perf_counter() - started < 5


def test_preference_and_prompt_length_filters_count_tokens(demo_tokenizer) -> None:
    from finetune.data.pipeline import DataStats, preference_examples, prompt_examples

    install_template(load_template("chat-ml", demo_tokenizer), demo_tokenizer)
    prompt = [{"role": "user", "content": "What is 3 plus 4?"}]
    pair = {"prompt_messages": prompt, "chosen_messages": [{"role": "assistant", "content": "3 plus 4 is 7."}],
            "rejected_messages": [{"role": "assistant", "content": "3 plus 4 is 8, " * 10}]}
    length = len(demo_tokenizer.apply_chat_template(prompt + pair["rejected_messages"], tokenize=True, return_dict=True)["input_ids"])
    for limit, kept in ((length, 1), (length - 1, 0)):
        stats = DataStats()
        assert len(preference_examples([pair], demo_tokenizer, limit, stats)) == kept
        assert stats.filtered_too_long == 1 - kept
    stats = DataStats()
    assert prompt_examples([{"prompt_messages": prompt}], demo_tokenizer, 3, stats) == [] and stats.filtered_too_long == 1
