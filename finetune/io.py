"""Small file helpers: nothing is half-written on failure."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename over `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def identity(path: str | Path) -> tuple[int, int]:
    """A directory's (device, inode): the same after a rename, different for a new directory at the old path."""
    stat_ = os.stat(path)
    return stat_.st_dev, stat_.st_ino


def mkdir_under(root: Path, path: Path) -> Path:
    """Create `path` and its missing parents below `root`, which must exist: a folder that was moved or deleted
    while something writes into it is not created again, empty, at its old path (each `mkdir` is of one level,
    so none of them can create `root`)."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            current.mkdir()
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise FileNotFoundError(f"the experiment folder {root} is gone (moved or deleted while it trains)") from None
    return path


def remove_ghost(root: Path, known: tuple[int, int], path: Path) -> None:
    """Undo what a library's `os.makedirs(path)` created at the old place of `root` after `root` was moved (it is
    no longer the directory `known`): the empty directories in and from `path` up to `root`, and no others."""
    try:
        if identity(root) == known:
            return
    except OSError:
        return
    for inner, _, _ in os.walk(path, topdown=False):  # TRL's GRPO trainer makes output_dir/completions, say
        if inner != str(path):
            try:
                os.rmdir(inner)
            except OSError:
                return
    directory = path
    while True:
        try:
            directory.rmdir()
        except OSError:  # not empty (or already gone): not a ghost of ours
            return
        if directory == root:
            return
        directory = directory.parent
