"""The data formats people already have: each one read from a file, converted, and masked as documented."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.data.formats import FORMATS, example_records
from finetune.data.pipeline import IGNORE_INDEX, tokenize_conversation
from finetune.data.readers import DataError, read_records
from finetune.data.templates import install_template, load_template

HI = [{"role": "user", "content": "Hi"}]
HELLO = [{"role": "assistant", "content": "Hello!"}]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


# One case per format: a record as users have it, and what the method reads from it.
CASES = [
    ("sft", "messages", {"messages": HI + HELLO, "id": 7}, {"messages": HI + HELLO}),
    ("sft", "sharegpt",
     {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
     {"messages": [{"role": "system", "content": "Be brief."}, *HI, *HELLO]}),
    ("sft", "alpaca", {"instruction": "Translate to French", "input": "cat", "output": "chat"},
     {"messages": [{"role": "user", "content": "Translate to French\n\ncat"}, {"role": "assistant", "content": "chat"}]}),
    ("sft", "prompt_completion", {"prompt": "2+2=", "completion": "4"},
     {"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]}),
    ("sft", "prompt_completion", {"prompt": HI, "completion": HELLO}, {"messages": HI + HELLO}),
    ("dpo", "preference", {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
     {"prompt_messages": HI, "chosen_messages": HELLO, "rejected_messages": [{"role": "assistant", "content": "Go away."}]}),
    ("dpo", "preference", {"prompt": HI, "chosen": HELLO, "rejected": [{"role": "assistant", "content": "No."}]},
     {"prompt_messages": HI, "chosen_messages": HELLO, "rejected_messages": [{"role": "assistant", "content": "No."}]}),
    ("dpo", "preference", {"chosen": HI + HELLO + HI + HELLO, "rejected": HI + HELLO + HI + [{"role": "assistant", "content": "No."}]},
     {"prompt_messages": HI + HELLO + HI, "chosen_messages": HELLO, "rejected_messages": [{"role": "assistant", "content": "No."}]}),
    ("dpo", "preference_messages", {"prompt_messages": HI, "chosen_messages": HELLO, "rejected_messages": HELLO},
     {"prompt_messages": HI, "chosen_messages": HELLO, "rejected_messages": HELLO}),
    ("grpo", "prompt_only", {"prompt": "2+2=", "answer": "4"}, {"prompt_messages": [{"role": "user", "content": "2+2="}], "answer": "4"}),
    ("grpo", "prompt_only", {"prompt": HI, "answer": "Hello"}, {"prompt_messages": HI, "answer": "Hello"}),
    ("grpo", "prompt_messages", {"prompt_messages": HI, "answer": "Hello"}, {"prompt_messages": HI, "answer": "Hello"}),
]
IDS = [f"{case[1]}-{'implicit' if 'prompt' not in case[2] and case[1] == 'preference' else 'chat' if isinstance(next(iter(case[2].values())), list) else 'plain'}"
       for case in CASES]


@pytest.mark.parametrize("method,name,record,expected", CASES, ids=IDS)
def test_each_format_is_detected_and_converted(tmp_path, method, name, record, expected) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [record, record])
    assert read_records(path, method) == [expected, expected]
    assert read_records(path, method, name) == [expected, expected]


@pytest.mark.parametrize("method,name,record,expected", [CASES[2], CASES[5], CASES[9]], ids=["sft", "dpo", "grpo"])
@pytest.mark.parametrize("container", ["json", "parquet", "saved"])
def test_json_arrays_parquet_and_saved_datasets_read_the_same(tmp_path, method, name, record, expected, container) -> None:
    import datasets

    if container == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps([record, record], indent=2))
    elif container == "parquet":
        path = tmp_path / "data.parquet"
        datasets.Dataset.from_list([record, record]).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_list([record, record]).save_to_disk(str(path))
    assert read_records(path, method) == [expected, expected]


def test_parquet_messages_with_keys_other_rows_have_are_read(tmp_path) -> None:
    """Parquet gives every message the union of the keys (None where absent): those Nones are not keys."""
    import datasets

    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
            {"conversations": [{"from": "human", "value": "Hi", "weight": 0.5}, {"from": "gpt", "value": "Yo"}]}]
    datasets.Dataset.from_list(rows[:1] * 2).to_parquet(str(tmp_path / "ok.parquet"))
    assert len(read_records(tmp_path / "ok.parquet", "sft")) == 2
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "weights.parquet"))
    with pytest.raises(DataError, match=r"row 1: conversations\[0\] has unknown key\(s\) \['weight'\]"):
        read_records(tmp_path / "weights.parquet", "sft")


def test_a_json_array_error_names_the_line_of_the_record(tmp_path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a", "output": ""}\n]\n')
    with pytest.raises(DataError) as caught:
        read_records(path, "sft")
    assert caught.value.line == 3 and "'output' is empty" in str(caught.value) and "detected from its first record" in str(caught.value)
    path.write_text('[{"instruction": "a", "output": "b"} {"instruction": "a", "output": "b"}]')
    with pytest.raises(DataError, match="expected ',' or ']'"):
        read_records(path, "sft")


@pytest.mark.parametrize("container", ["json", "parquet", "saved", "saved-dict"])
def test_the_plan_counts_the_records_the_reader_reads(tmp_path, container) -> None:
    import datasets

    from finetune.data.mixing import count_jsonl_records

    records = [CASES[2][2]] * 3
    path = tmp_path / {"json": "data.json", "parquet": "data.parquet"}.get(container, "saved")
    if container == "json":
        path.write_text(json.dumps(records, indent=2))
    elif container == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    elif container == "saved":
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    else:
        datasets.DatasetDict({"test": datasets.Dataset.from_list(records[:1]), "train": datasets.Dataset.from_list(records)}).save_to_disk(str(path))
    assert count_jsonl_records(path) == 3 == len(read_records(path, "sft"))


def test_a_file_the_plan_cannot_count_is_unknown_not_an_error(tmp_path) -> None:
    from finetune.data.mixing import count_jsonl_records

    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "folder").mkdir()
    assert count_jsonl_records(tmp_path / "bad.parquet") is None and count_jsonl_records(tmp_path / "folder") is None


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_an_unknown_shape_is_one_error_listing_the_accepted_shapes(tmp_path, method) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as caught:
        read_records(path, method)
    text = str(caught.value)
    assert caught.value.line == 1 and "'answer', 'question'" in text and f"matches no {method.upper()} data format" in text
    for data_format in FORMATS:
        assert (data_format.example in text) == (data_format.method == method)


def test_data_of_another_method_is_named_as_such(tmp_path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [CASES[5][2]])
    with pytest.raises(DataError, match="it looks like DPO data, format preference"):
        read_records(path, "sft")


def test_the_examples_of_the_docs_are_read(tmp_path) -> None:
    for method in ("sft", "dpo", "grpo"):
        for name, record in example_records(method).items():
            assert read_records(write_jsonl(tmp_path / f"{name}.jsonl", [record]), method, name)


@pytest.mark.parametrize("method,name,record,words", [
    ("sft", "alpaca", {"messages": HI + HELLO}, "missing key 'instruction'"),
    ("sft", "sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "from is 'bot'; allowed: system, human"),
    ("sft", "sharegpt", {"conversations": [{"from": "human", "value": "Hi"}]}, "no 'gpt' turn"),
    ("sft", "sharegpt", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, "conversations[0]: missing key 'value'"),
    ("sft", "prompt_completion", {"prompt": "q", "completion": HELLO + HI}, "completion[1].role is 'user'"),
    ("sft", "prompt_completion", {"prompt": 3, "completion": "a"}, "'prompt' must be a string or a list of messages"),
    ("sft", "alpaca", {"instruction": "q", "input": 5, "output": "a"}, "'input' must be a string"),
    ("dpo", "preference", {"prompt": "q", "chosen": "a", "rejected": ""}, "'rejected' is empty"),
    ("dpo", "preference", {"prompt": HELLO, "chosen": "a", "rejected": "b"}, "must be from the user"),
    ("dpo", "preference", {"chosen": HI + HELLO, "rejected": [{"role": "user", "content": "Yo"}] + HELLO}, "TRL's implicit prompt"),
    ("dpo", "preference", {"chosen": "a", "rejected": "b"}, "'chosen' must be a non-empty list of messages"),
    ("grpo", "prompt_only", {"prompt": "q", "completion": "a"}, "'completion': reserved for the trainer"),
    ("grpo", "prompt_only", {"prompt": "q", "prompt_messages": HI}, "'prompt_messages': reserved"),
    ("dpo", "alpaca", {"instruction": "q", "output": "a"}, "format alpaca is SFT data; method dpo reads"),
])
def test_bad_records_of_a_named_format_say_what_is_wrong(tmp_path, method, name, record, words) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    with pytest.raises(DataError) as caught:
        read_records(path, method, name)
    assert words in str(caught.value)


def test_a_format_the_method_cannot_read_is_a_config_error(base_config) -> None:
    from tests.helpers import issues_of

    base_config["data_conf"]["training_data"]["datasets"][0]["format"] = "preference"
    messages = [str(issue) for issue in issues_of(base_config)]
    assert len(messages) == 1 and "datasets[0].format: format preference is DPO data; method sft reads" in messages[0]
    base_config["data_conf"]["training_data"]["datasets"][0]["format"] = "sharegpt"
    assert issues_of(base_config) == []


# ---------------------------------------------------------------- what carries loss


def _loss_text(tokenizer, record) -> str:
    example = tokenize_conversation(tokenizer, record["messages"], True, record.get("completion_start"))
    return tokenizer.decode([token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


@pytest.mark.parametrize("name,record,loss", [
    ("alpaca", {"instruction": "Say hi", "input": "politely", "output": "Hello there"}, "Hello there<|im_end|>"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"},
                                    {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]}, "Hey<|im_end|>Ciao<|im_end|>"),
    ("prompt_completion", {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                                      {"role": "user", "content": "Bye"}], "completion": [{"role": "assistant", "content": "Ciao"}]},
     "Ciao<|im_end|>"),
    ("prompt_completion", {"prompt": "2+2=", "completion": "4"}, "4<|im_end|>"),
])
def test_only_the_completion_carries_loss(tmp_path, demo_tokenizer, name, record, loss) -> None:
    install_template(load_template("chat-ml", demo_tokenizer), demo_tokenizer)
    converted = read_records(write_jsonl(tmp_path / "d.jsonl", [record]), "sft", name)[0]
    assert _loss_text(demo_tokenizer, converted).replace(" ", "") == loss.replace(" ", "")


def test_the_pipeline_reads_each_dataset_in_its_named_format(tmp_path) -> None:
    from types import SimpleNamespace

    from finetune.data.pipeline import DataStats, gather_records

    both = {"messages": HI + HELLO, "instruction": "Say hi", "output": "Hi!"}  # auto-detection picks messages
    named = SimpleNamespace(path=write_jsonl(tmp_path / "a.jsonl", [both]), format="alpaca")
    auto = SimpleNamespace(path=write_jsonl(tmp_path / "b.jsonl", [both]), format="auto")
    data_conf = SimpleNamespace(training_data=SimpleNamespace(type="CONCATENATION", datasets=[named, auto]),
                                validation_data=SimpleNamespace(type="NONE"))
    train, _ = gather_records(data_conf, "sft", DataStats())
    assert [record["messages"][0]["content"] for record in train] == ["Say hi", "Hi"]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet='[]{},:" \nab1', max_size=80))
def test_any_json_array_text_is_records_or_a_data_error_with_a_line(tmp_path_factory, text) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "data.json"
    path.write_text("[" + text)
    try:
        read_records(path, "sft")
    except DataError as error:
        assert error.line is None or 1 <= error.line <= text.count("\n") + 1
