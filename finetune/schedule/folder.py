"""The experiment folder: reading its plan and state store with errors that say what to do, and
the lock that lets one controller at a time train it.

The lock is an OS lock (`flock`) on `controller.lock`: the kernel drops it when its process ends,
however it ends, so a lock left by a dead controller is simply taken by the next one. The file
also says who holds it (pid, host, since), for the message a second controller prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from finetune.plan.model import RunPlan
from finetune.schedule.store import ExperimentDamaged, StateStore, damaged

PLAN_FILE = "plan.json"
STATE_FILE = "state.db"
LOCK_FILE = "controller.lock"


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


def _open_lock(path: Path, flags: int) -> int:
    """The lock file, never through a link (the lock would empty the file it points to) nor a folder."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as error:
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
