"""Reading data files (JSONL, JSON, parquet, a saved HF dataset folder); a bad record names its file and line.

Each record is converted by its file's format (finetune/data/formats.py) into the shape the method
reads. A file is read whole and checked before anything uses it: nothing trains on a partly read file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from finetune.data.files import DATA_PATH_FORM, NotRegularFile, open_regular, special_kind
from finetune.data.formats import AUTO, DataFormat, FormatProblem, converter

class DataError(ValueError):
    """A data problem, with the file and line (or row) where it is."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


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


MAX_JSON_BYTES = 1 << 30  # a JSON array is parsed whole; beyond this, JSONL (read line by line) is the format to use


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            hint = " (a .json file holds one JSON array of records, or one record per line)" if path.suffix == ".json" else ""
            raise DataError(path, number, f"not valid JSON: {error.msg} (column {error.colno}){hint}") from None
        except RecursionError:
            raise DataError(path, number, "not valid JSON for a record: nested too deeply") from None


def is_json_array(path: Path) -> bool:
    try:
        with open_regular(path) as stream:
            return stream.read(4096).lstrip()[:1] == b"["
    except (NotRegularFile, OSError):
        return False  # the JSONL reader says what is wrong with it


def _json_array_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line where the record starts, record) of a file holding one JSON array."""
    with open_regular(path) as stream:
        raw = stream.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise DataError(path, None, f"a JSON array file is parsed whole and this one is larger than {MAX_JSON_BYTES} bytes; "
                                    "write it as JSONL (one record per line)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(path, raw.count(b"\n", 0, error.start) + 1, f"not UTF-8 text: byte {raw[error.start]:#04x}") from None
    decoder, space = json.JSONDecoder(), json.decoder.WHITESPACE  # type: ignore[attr-defined]

    def line_at(position: int) -> int:
        return text.count("\n", 0, position) + 1

    index = space.match(text, 0).end() + 1  # past the '['
    while True:
        index = space.match(text, index).end()
        if text.startswith("]", index):
            break
        try:
            record, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            raise DataError(path, line_at(error.pos), f"not valid JSON: {error.msg} (column {error.colno})") from None
        except RecursionError:
            raise DataError(path, line_at(index), "not valid JSON for a record: nested too deeply") from None
        yield line_at(index), record
        index = space.match(text, end).end()
        if text.startswith(",", index):
            index += 1
        elif not text.startswith("]", index):
            raise DataError(path, line_at(index), "not valid JSON: expected ',' or ']' after a record of the array")
    if text[space.match(text, index + 1).end():]:
        raise DataError(path, line_at(index + 1), "not valid JSON: something follows the end of the array")


def _converted(path: Path, numbered: Iterator[tuple[int | None, Any]], method: str, data_format: str,
               where: str = "line") -> list[dict[str, Any]]:
    """Every record converted by the file's format (named, or detected from the first record)."""
    records: list[dict[str, Any]] = []
    chosen: DataFormat | None = None
    for position, record in numbered:
        line, prefix = (position, "") if where == "line" else (None, f"row {position}: ")
        if not isinstance(record, dict):
            raise DataError(path, line, f"{prefix}each record must be a JSON object, got {type(record).__name__}")
        try:
            chosen = chosen or converter(data_format, method, record)
            records.append(chosen.convert(record))
        except FormatProblem as problem:
            detected = (f" (the file's format, {chosen.name}, was detected from its first record)"
                        if chosen is not None and records and data_format == AUTO else "")
            raise DataError(path, line, f"{prefix}{problem}{detected}") from None
    if not records:
        raise DataError(path, None, "no records: the file is empty")
    return records


def read_with_datasets(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """A directory saved with `datasets.save_to_disk`, or a parquet file: (row, record)."""
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    else:
        loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    for row, record in enumerate(loaded):
        yield row, dict(record)


def read_records(path: str | Path, method: str, data_format: str = AUTO) -> list[dict[str, Any]]:
    """The records of one dataset, in the shape `method` reads (see finetune/data/formats.py)."""
    file_path = Path(path)
    if not file_path.exists():
        raise DataError(file_path, None, "no such file or directory")
    kind = special_kind(file_path)
    if kind is not None:
        raise DataError(file_path, None, f"is {kind}; a data path must be {DATA_PATH_FORM}")
    if file_path.is_dir() or file_path.suffix == ".parquet":
        return _converted(file_path, read_with_datasets(file_path), method, data_format, where="row")
    if file_path.suffix == ".json" and is_json_array(file_path):
        return _converted(file_path, _json_array_records(file_path), method, data_format)
    return _converted(file_path, _jsonl_records(file_path), method, data_format)


def count_json_array(path: Path) -> int:
    return sum(1 for _ in _json_array_records(path))
