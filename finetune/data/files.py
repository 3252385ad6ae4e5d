"""Opening data files safely: only regular files are read, and nothing blocks on a FIFO or a device.

`/dev/zero` or a named pipe given as a data path would make a reader or the hash of the data
wait (or read) for ever; they are refused, by `validate` (the config models call `special_kind`)
and again here, at the moment of opening, whatever changed in between.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

BLOCK_BYTES = 1 << 20

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISSOCK, "a socket"))
DATA_PATH_FORM = "a regular file (JSONL or parquet) or a directory saved with datasets.save_to_disk"


class NotRegularFile(OSError):
    """A data path that exists but is no regular file (a device, a FIFO, a socket)."""


def kind_of(mode: int) -> str:
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a directory" if stat.S_ISDIR(mode) else "not a regular file"


def special_kind(path: str | Path) -> str | None:
    """What an existing path is when it is neither a regular file nor a directory (symlinks followed), else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None  # missing or unreadable: the reader says so when it needs the file
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else kind_of(mode)


def open_regular(path: str | Path) -> BinaryIO:
    """Open `path` for reading in binary, refusing anything but a regular file without blocking on it.

    The file is opened non-blocking (a FIFO without a writer would block a plain open), checked
    with fstat on the open descriptor (so a swap after a check cannot slip through), then read normally.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    descriptor = os.open(path, flags)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path} is {kind_of(mode)}; a data path must be {DATA_PATH_FORM}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def count_nonblank_lines(stream: BinaryIO) -> int:
    """Lines with something besides whitespace, read in pieces of at most a block: memory stays bounded
    whatever the line lengths (a 200 MB file without a newline is read 1 MB at a time)."""
    count = 0
    filled = False  # the line read so far has something besides whitespace
    while piece := stream.readline(BLOCK_BYTES):
        filled = filled or bool(piece.strip())
        if piece.endswith(b"\n"):
            count += filled
            filled = False
    return count + filled


def data_paths(config: Any) -> list[tuple[str, str]]:
    """(key path, data path) of every dataset a validated config reads."""
    found = []
    for section in ("training_data", "validation_data"):
        datasets = getattr(getattr(config.data_conf, section, None), "datasets", None) or []
        found += [(f"data_conf.{section}.datasets[{index}].path", dataset.path) for index, dataset in enumerate(datasets)]
    return found
