"""Field types for config strings that become file or folder names, and for data paths.

A name (experiment.name, run_conf.final_checkpoint_name, save_name_if_new_basemodel) is joined to a
folder the tool owns; it must stay inside it, so it is one plain path component of bounded length.
A data path may point anywhere, but at a regular file or a directory: a device or a FIFO would make
reading or hashing the data hang.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from finetune.data.files import DATA_PATH_FORM, special_kind

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MAX_NAME_LENGTH = 100
NAME_FORM = (f"1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', the first a letter or digit "
             f"(pattern {NAME_PATTERN}): one file or folder name, no '/', '\\', '..' or absolute path")


def name_problem(value: str) -> str | None:
    """Why `value` cannot be a file or folder name inside a folder, or None when it can."""
    if not value:
        return "an empty name"
    if "\0" in value:
        return "the name holds a NUL character"
    if "/" in value or "\\" in value:
        return "the name holds a path separator, so it would leave its folder"
    if value.startswith("."):
        return "'..' leaves its folder" if value.startswith("..") else "the name starts with '.' (a hidden or relative name)"
    if len(value) > MAX_NAME_LENGTH:
        return f"the name has {len(value)} characters, more than {MAX_NAME_LENGTH}"
    bad = next((char for char in value if not re.fullmatch(r"[A-Za-z0-9._-]", char)), None)
    return f"the name holds {bad!r}" if bad is not None else None


def _check_name(value: str) -> str:
    problem = name_problem(value)
    if problem:
        raise PydanticCustomError("file_name", "{problem}; the value is used as a file or folder name",
                                  {"problem": problem, "allowed": NAME_FORM})
    return value


def _check_data_path(value: str) -> str:
    if not value or "\0" in value:
        problem = "an empty path" if not value else "the path holds a NUL character"
        raise PydanticCustomError("data_path", "{problem}", {"problem": problem, "allowed": DATA_PATH_FORM})
    kind = special_kind(value)
    if kind is not None:
        raise PydanticCustomError("data_path", "{path} is {kind}, which is never read (it could block or never end)",
                                  {"path": value, "kind": kind, "allowed": DATA_PATH_FORM})
    return value


FileName = Annotated[
    str,
    AfterValidator(_check_name),
    Field(json_schema_extra={"pattern": NAME_PATTERN, "minLength": 1, "maxLength": MAX_NAME_LENGTH}),
]
DataPath = Annotated[str, AfterValidator(_check_data_path), Field(json_schema_extra={"minLength": 1})]

# What finetune itself writes in a run's folder: a final checkpoint by one of these names would replace it.
RESERVED_CHECKPOINT_NAMES = re.compile(r"chunk-[0-9]+|checkpoint-merged|\.[^/]*")


def _check_checkpoint_name(value: str) -> str:
    if RESERVED_CHECKPOINT_NAMES.fullmatch(value):
        raise PydanticCustomError("file_name", "{value} is a name finetune writes in the run's folder (its chunks are "
                                  "chunk-K, an export checkpoint-merged); the final checkpoint would overwrite it",
                                  {"value": value, "allowed": f"{NAME_FORM}, other than chunk-K and checkpoint-merged"})
    return value


CheckpointName = Annotated[FileName, AfterValidator(_check_checkpoint_name)]
