"""Readers of the finetuning data formats; a bad record names its file and line.

SFT:  {"messages": [{"role": ..., "content": ...}, ...]}
DPO:  {"prompt_messages": [...], "chosen_messages": [...], "rejected_messages": [...]}
GRPO: {"prompt_messages": [...], ...other fields passed to reward functions}

A file is read whole and checked before anything uses it: nothing trains on a partly read file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from finetune.data.files import DATA_PATH_FORM, NotRegularFile, open_regular, special_kind

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data problem, with the file and line (or row) where it is."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


def _check_messages(value: Any, key: str, *, need_assistant: bool, last_role: str | None = None) -> str | None:
    if not isinstance(value, list) or not value:
        return f"'{key}' must be a non-empty list of messages"
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            return f"{key}[{index}] must be an object with 'role' and 'content'"
        unknown = set(message) - {"role", "content"}
        if unknown:
            return f"{key}[{index}] has unknown key(s) {sorted(unknown)}; messages take 'role' and 'content'"
        role = message.get("role")
        if role not in ROLES:
            return f"{key}[{index}].role is {role!r}; allowed: {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str):
            return f"{key}[{index}].content must be a string, got {type(content).__name__}"
        if not content.strip():
            return f"{key}[{index}].content is empty"
    if need_assistant and not any(message["role"] == "assistant" for message in value):
        return f"'{key}' has no assistant message to learn from"
    if last_role is not None and value[-1]["role"] != last_role:
        return f"the last message of '{key}' must be from the {last_role}, not the {value[-1]['role']}"
    return None


def check_sft(record: dict[str, Any]) -> str | None:
    if "messages" not in record:
        return "missing key 'messages'"
    return _check_messages(record["messages"], "messages", need_assistant=True)


def check_dpo(record: dict[str, Any]) -> str | None:
    for key in ("prompt_messages", "chosen_messages", "rejected_messages"):
        if key not in record:
            return f"missing key '{key}'"
    problem = _check_messages(record["prompt_messages"], "prompt_messages", need_assistant=False, last_role="user")
    for key in ("chosen_messages", "rejected_messages"):
        problem = problem or _check_messages(record[key], key, need_assistant=True)
    return problem


def check_grpo(record: dict[str, Any]) -> str | None:
    if "prompt_messages" not in record:
        return "missing key 'prompt_messages'"
    if "prompt" in record or "completion" in record:
        return "'prompt' and 'completion' are reserved for the trainer; rename these fields"
    return _check_messages(record["prompt_messages"], "prompt_messages", need_assistant=False, last_role="user")


CHECKS: dict[str, Callable[[dict[str, Any]], str | None]] = {"sft": check_sft, "dpo": check_dpo, "grpo": check_grpo}


MAX_LINE_BYTES = 8 * 1024 * 1024  # far above a 128k-token conversation; a line beyond it is refused unread


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a JSONL file, read in bounded pieces: an over-long line or one that is
    not UTF-8 is an error naming its line, and the rest of a gigantic line is never read."""
    try:
        opened = open_regular(path)
    except NotRegularFile as error:
        raise DataError(path, None, str(error).removeprefix(f"{path} ")) from None
    with opened as stream:
        number = 0
        while raw := stream.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(path, number, f"the line is longer than {MAX_LINE_BYTES} bytes (the limit for one record)")
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(path, number, f"not UTF-8 text: byte {error.start + 1} of the line is {raw[error.start]:#04x}") from None


def read_jsonl(path: Path, check: Callable[[dict[str, Any]], str | None]) -> list[dict[str, Any]]:
    records = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(path, number, f"not valid JSON: {error.msg} (column {error.colno})") from None
        except RecursionError:
            raise DataError(path, number, "not valid JSON for a record: nested too deeply") from None
        if not isinstance(record, dict):
            raise DataError(path, number, f"each line must be a JSON object, got {type(record).__name__}")
        problem = check(record)
        if problem:
            raise DataError(path, number, problem)
        records.append(record)
    if not records:
        raise DataError(path, None, "no records: the file is empty")
    return records


def read_with_datasets(path: Path, check: Callable[[dict[str, Any]], str | None]) -> list[dict[str, Any]]:
    """A directory saved with `datasets.save_to_disk`, or a parquet file; rows are checked like lines."""
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    else:
        loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    records = []
    for row, record in enumerate(loaded):
        problem = check(record)
        if problem:
            raise DataError(path, None, f"row {row}: {problem}")
        records.append(dict(record))
    return records


def read_records(path: str | Path, method: str) -> list[dict[str, Any]]:
    file_path = Path(path)
    if not file_path.exists():
        raise DataError(file_path, None, "no such file or directory")
    kind = special_kind(file_path)
    if kind is not None:
        raise DataError(file_path, None, f"is {kind}; a data path must be {DATA_PATH_FORM}")
    check = CHECKS[method]
    if file_path.is_dir() or file_path.suffix == ".parquet":
        return read_with_datasets(file_path, check)
    return read_jsonl(file_path, check)
