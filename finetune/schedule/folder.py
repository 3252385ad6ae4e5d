"""The experiment folder: reading its plan and state store with errors that say what to do, and
the lock that lets one controller at a time train it.

The lock is an OS lock (`flock`) on `controller.lock`: the kernel drops it when its process ends,
however it ends, so a lock left by a dead controller is simply taken by the next one. The file
also says who holds it (pid, host, since), for the message a second controller prints.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from finetune.plan.model import RunPlan
from finetune.schedule.faults import full_disk_io_error
from finetune.schedule.store import (
    EnvironmentFault,
    ExperimentDamaged,
    StateStore,
    caused_by_full_disk,
    damaged,
    disk_full,
    is_disk_full,
    read_only,
)

PLAN_FILE = "plan.json"
STATE_FILE = "state.db"
LOCK_FILE = "controller.lock"
CACHE_DIR = "cache"  # the prepared data, per data setting (rebuilt when missing)


def read_plan(root: Path) -> RunPlan:
    path = root / PLAN_FILE
    if not path.is_file():
        raise ExperimentDamaged(
            f"{path} is missing; without it the runs of {root} are unknown: restore it from a backup, "
            "or train again in a new folder"
        )
    try:
        return RunPlan.model_validate_json(path.read_bytes())
    except ValidationError as error:
        first = error.errors()[0]
        raise damaged(path, f"{'.'.join(map(str, first['loc'])) or 'the document'}: {first['msg']}") from None
    except (OSError, ValueError, TypeError, AttributeError, RecursionError) as error:
        raise damaged(path, str(error) or type(error).__name__) from None


class FolderWatch:
    """The environment's faults, for the controller: the experiment folder moved or deleted while it trains
    (the path it was started with no longer leads to the same directory, device and inode; an open
    descriptor of the directory follows it, so the message can say where it went), and a full disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        stat_ = os.fstat(self._fd)
        self._identity = (stat_.st_dev, stat_.st_ino)
        self._closer = weakref.finalize(self, os.close, self._fd)  # closed with its controller, at the latest

    def check(self, error: BaseException | str | None = None) -> None:
        """Raise `EnvironmentFault` when the folder was moved or deleted, or when `error` (a worker's, or one
        raised while training) comes of a full disk: then the experiment stops, and no run fails for it."""
        self._check_place()
        if error is not None and not isinstance(error, EnvironmentFault) and (
                (is_disk_full(error) if isinstance(error, str) else caused_by_full_disk(error))
                or full_disk_io_error(error, self.root)):
            cause = error if isinstance(error, str) else type(error).__name__
            raise disk_full(self.root, f" ({cause})") from None

    def _check_place(self) -> None:
        try:
            here = os.stat(self.root)
            if (here.st_dev, here.st_ino) == self._identity:
                return
        except OSError:
            pass
        now = self.where_now()
        if now is None:
            raise EnvironmentFault(f"the experiment folder {self.root} was deleted while it trained; the controller stopped")
        raise EnvironmentFault(f"the experiment folder {self.root} was moved to {now} while it trained; the controller "
                               f"stopped, every durable chunk is kept: continue with `finetune run --resume {now}`")

    def where_now(self) -> Path | None:
        try:
            path = os.readlink(f"/proc/self/fd/{self._fd}")
        except OSError:
            return None
        return None if path.endswith(" (deleted)") else Path(path)

    def close(self) -> None:
        self._closer()


def remove_leftovers(root: Path) -> list[Path]:
    """Remove the directories a controller that stopped mid-write left half-written under runs/<run>/ (a chunk's
    `.chunk-N.tmp-*`, a final model's `.checkpoint-final.tmp-*`); called before any worker writes. Returns them."""
    import shutil

    removed = []
    for path in sorted((root / "runs").glob("*/.*.tmp-*")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def open_store(root: Path) -> StateStore:
    """The state store of an existing experiment (`ExperimentDamaged` if it is not whole)."""
    return StateStore(root / STATE_FILE, create=False)


@dataclass(frozen=True)
class LockHolder:
    pid: int | None
    host: str
    since: float | None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since)) if self.since else "an unknown time"
        return f"pid {self.pid if self.pid is not None else '?'} on {self.host or '?'}, since {since}"


class ExperimentLocked(RuntimeError):
    def __init__(self, root: Path, holder: LockHolder) -> None:
        super().__init__(
            f"{root} is being trained by another controller ({holder.describe()}); one controller at a time "
            "trains an experiment. Watch it with `finetune status`, change it with `finetune ctl`, "
            "or stop that process first"
        )
        self.holder = holder


class ExperimentLock:
    """Held by the controller for as long as it trains the experiment in `root`."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ExperimentLocked(self.path.parent, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> ExperimentLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def controller_alive(root: Path) -> bool:
    """Whether a controller holds `root`'s lock now (it applies requests at its next chunk boundary)."""
    path = root / LOCK_FILE
    if not path.is_file():
        return False
    fd = _open_lock(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def shown_state(state: str, controller_alive: bool) -> str:
    """A run's state as shown: a run left "running" by a controller that is gone (killed, interrupted while
    it trained) is "interrupted"; `finetune run --resume` continues it (as a pending run)."""
    return "interrupted" if state == "running" and not controller_alive else state


def _open_lock(path: Path, flags: int) -> int:
    """The lock file, never through a link (the lock would empty the file it points to) nor a folder."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and not os.access(path.parent, os.W_OK):
            raise read_only(path.parent, "training (`finetune run --resume`)") from None
        raise ExperimentDamaged(f"{path} cannot be the controller's lock ({error.strerror}); it must be a plain file: "
                                "remove it (a controller creates it anew)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ExperimentDamaged(f"{path} is not a plain file; remove it (a controller creates it anew)")
    return fd


def _read_holder(fd: int) -> LockHolder:
    try:
        known = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        known = {}
    known = known if isinstance(known, dict) else {}
    pid, since = known.get("pid"), known.get("since")
    return LockHolder(pid if isinstance(pid, int) else None, str(known.get("host", "")),
                      since if isinstance(since, (int, float)) and 0 < since < 1e11 else None)
