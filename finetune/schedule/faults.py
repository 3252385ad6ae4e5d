"""What can be wrong with an experiment's folder, as errors that say what to do: damage (`ExperimentDamaged`)
and the environment's faults (`EnvironmentFault`: a full disk, a read-only folder, a state store another
process holds), and the state store's connection that waits out a held lock (`PatientConnection`)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_S = 5.0  # SQLite's own wait for a lock, per statement
BUSY_PATIENCE_S = 600.0  # then tries again, waiting longer each time, this long in all
logger = logging.getLogger(__name__)


class ExperimentDamaged(RuntimeError):
    """A file of an experiment folder that cannot be read; the message names it and what to do."""


class EnvironmentFault(ExperimentDamaged):
    """Not damage: the experiment's folder cannot be used as it is now (its disk is full, it is read-only,
    another process holds its state store, it was moved while it trained); the message says what to do."""


def disk_full(root: Path, what: str = "") -> EnvironmentFault:
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return EnvironmentFault(f"the disk of {root} is full ({free}){what}; every durable chunk is kept: free some space, "
                           f"then `finetune run --resume {root}`")


def read_only(root: Path, what: str) -> EnvironmentFault:
    return EnvironmentFault(f"{root} is read-only: {what} needs to write there; copy the folder somewhere writable "
                            "(or make it writable) and run it there")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (an OSError, SQLite's, or a message of one) says the disk is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "database or disk is full" in text or "[Errno 28]" in text


NEARLY_FULL_BYTES = 2**20  # less room than this, and SQLite's "disk I/O error" is the full disk


def full_disk_io_error(error: BaseException | str, root: Path) -> bool:
    """Whether SQLite's `error` (or a message of one) is its "disk I/O error" on a disk with no room left:
    opening a WAL database makes its shared-memory index (32 KiB), and a full disk fails that as an I/O error,
    not as SQLITE_FULL."""
    if "disk I/O error" not in str(error):
        return False
    try:
        return shutil.disk_usage(root).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def caused_by_full_disk(error: BaseException) -> bool:
    """Whether `error`, or what it was raised from or while handling, says the disk is full."""
    seen: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in seen and len(seen) < 20:
        if is_disk_full(cause):
            return True
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return False


def lock_holders(path: Path) -> list[str]:
    """Other processes with `path` (or its -wal, -journal) open, as 'pid N (command)'; empty when none is known."""
    names = {str(path.resolve()) + suffix for suffix in ("", "-wal", "-journal", "-shm")}
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if not any(os.readlink(fd) in names for fd in (entry / "fd").iterdir()):
                continue
            command = " ".join((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split())
        except OSError:
            continue
        found.append(f"pid {entry.name} ({command[:120] or '?'})")
    return found


class PatientConnection:
    """The store's connection: a statement that finds the database locked by another process is tried again,
    waiting longer each time, for `patience_s` in all; then `EnvironmentFault` names the holder if it is known.
    A full disk, or a read-only folder, is an `EnvironmentFault` at once."""

    def __init__(self, db: sqlite3.Connection, path: Path, patience_s: float) -> None:
        self._db, self.path, self.patience_s = db, path, patience_s

    def execute(self, *args: Any) -> sqlite3.Cursor:
        return self._patiently(self._db.execute, *args)

    def executemany(self, *args: Any) -> sqlite3.Cursor:
        return self._patiently(self._db.executemany, *args)

    def executescript(self, *args: Any) -> sqlite3.Cursor:
        return self._patiently(self._db.executescript, *args)

    def close(self) -> None:
        self._db.close()

    def _patiently(self, call: Any, *args: Any) -> sqlite3.Cursor:
        started, delay = time.monotonic(), 0.1
        while True:
            try:
                return call(*args)
            except UnicodeDecodeError:  # SQLite's text (or its message about it) is not UTF-8: overwritten bytes
                raise damaged(self.path, "text that is not UTF-8") from None
            except sqlite3.OperationalError as error:
                if is_disk_full(error) or full_disk_io_error(error, self.path.parent):
                    raise disk_full(self.path.parent, f" (writing {self.path.name})") from None
                if "readonly" in str(error) and os.access(self.path.parent, os.W_OK):  # the file, not its folder
                    raise damaged(self.path, f"SQLite will only read it: {error}") from None
                if "readonly" in str(error):
                    raise read_only(self.path.parent, "this command") from None
                if "locked" not in str(error) and "busy" not in str(error):
                    raise
                waited = time.monotonic() - started
                if waited >= self.patience_s:
                    holders = ", ".join(lock_holders(self.path)) or "another process (not found on this machine)"
                    raise EnvironmentFault(f"{self.path} has been locked by {holders} for {waited:.0f} s; stop "
                                           "that process, then try again") from None
                if delay == 0.1:
                    logger.warning("%s is locked by %s; waiting (up to %.0f s)", self.path,
                                   ", ".join(lock_holders(self.path)) or "another process", self.patience_s)
                time.sleep(min(delay, max(0.0, self.patience_s - waited)))
                delay = min(delay * 2, 30.0)


def damaged(path: Path, what: str) -> ExperimentDamaged:
    return ExperimentDamaged(
        f"{path} is damaged ({what}); restore it from a backup, or train again in a new folder "
        "(the checkpoints under runs/ are intact and can be exported by hand)"
    )
