"""Ctrl-C and SIGTERM while `finetune run` trains: stop dispatching, let the chunks being trained finish
(and become durable) for at most `GRACE_SECONDS`, then abandon them; a second signal abandons them at
once. The run ends with one line: what was saved and the exact command that resumes it.

Workers ignore SIGINT (a Ctrl-C reaches the terminal's whole process group): the controller stops them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

GRACE_SECONDS = 20.0  # below Kubernetes' default 30 s between SIGTERM and SIGKILL
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class Interrupted(Exception):
    """The experiment was stopped by a signal; `str()` is the one line to print."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 128 + self.signum)


class Interrupts:
    """What signals arrived. Before the controller's loop a signal raises `Interrupted` at once (nothing is
    being trained); within it, the first asks the loop to wind down, the second to abandon the chunks."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.abandon = False
        self.deadline = float("inf")
        self.winding_down = False  # the controller's loop is running: signals are flags

    def handle(self, signum: int, frame: Any) -> None:
        if not self.winding_down:
            if self.signum is None:  # a second signal while the first unwinds is not raised again
                self.signum = signum
                raise Interrupted(signum, "")
            return
        if self.signum is None:
            self.signum, self.deadline = signum, time.monotonic() + GRACE_SECONDS
        else:
            self.abandon = True

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def give_up(self) -> bool:
        """Whether the chunks still being trained are abandoned now."""
        return self.abandon or time.monotonic() > self.deadline


@contextmanager
def catching_signals(interrupts: Interrupts) -> Iterator[Interrupts]:
    """SIGINT and SIGTERM go to `interrupts` (in the main thread; elsewhere nothing changes). An `Interrupted`
    raised where Python cannot pass it on (a finalizer, a weakref callback) is swallowed there without a
    traceback; `interrupts.requested` still says it came, and the controller's loop winds down at its start."""
    try:
        previous = {signum: signal.signal(signum, interrupts.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield interrupts
        return
    unraisable = sys.unraisablehook

    def quiet(info: Any) -> None:
        if not isinstance(info.exc_value, Interrupted):
            unraisable(info)

    sys.unraisablehook = quiet
    try:
        yield interrupts
    finally:
        sys.unraisablehook = unraisable
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while starting a process: a spawned Python keeps ignoring it from its first line, so a
    Ctrl-C in the terminal never interrupts (and prints a traceback from) a worker."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def resume_command(root: Path) -> str:
    """`finetune run --resume DIR`, DIR relative to the working directory when it is under it."""
    try:
        shown = os.path.relpath(root)
        shown = shown if not shown.startswith("..") else str(root)
    except ValueError:
        shown = str(root)
    return f"finetune run --resume {shown}"


def saved_summary(runs: list[Any]) -> str:
    """'5 of 16 chunks saved (1 run completed)' from the state store's run rows."""
    live = [row for row in runs if row.state != "deleted"]
    done = sum(row.chunks_done for row in live)
    total = sum(row.total_chunks for row in live)
    completed = sum(row.state == "completed" for row in live)
    return f"{done} of {total} chunks saved" + (f" ({completed} run(s) completed)" if completed else "")


def interrupted_message(signum: int, root: Path, runs: list[Any] | None) -> str:
    name = NAMES.get(signal.Signals(signum), f"signal {signum}")
    if not runs or not any(row.chunks_done for row in runs):
        return f"stopped by {name} before any chunk was saved; run the same command again to start over"
    return f"stopped by {name}: {saved_summary(runs)} in {root}; resume with: {resume_command(root)}"


def resume_summary(runs: list[Any]) -> str:
    """What a resume picks up: chunks already durable, runs done, runs it continues."""
    states: dict[str, int] = {}
    for row in runs:
        states[row.state] = states.get(row.state, 0) + 1
    unfinished = sum(count for state, count in states.items() if state in ("pending", "running"))
    others = ", ".join(f"{count} {state}" for state, count in sorted(states.items()) if state not in ("pending", "running"))
    return f"{saved_summary(runs)}; continuing {unfinished} run(s)" + (f" ({others})" if others else "")
