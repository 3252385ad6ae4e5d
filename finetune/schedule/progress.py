"""Progress while `finetune run` trains, wherever its output goes.

In a terminal: the runs table above one progress bar per run (step of its total, it/s and tokens/s
of its current chunk, device memory, time left), drawn by rich. Anywhere else (a CI log, nohup, a
Kubernetes Job): one plain line per finished chunk and per decision, read from the state store's
events, so that the log tells the experiment's story.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from finetune.schedule.display import runs_table
from finetune.schedule.store import StateStore
from finetune.train.progress import StepReport

# Events that are a decision of the search or the user, or an outcome: said in the plain log.
LOGGED_EVENTS = ("run_completed", "run_failed", "chunk_lost", "search_added", "search_rejected", "workers_started")
DECISION_PREFIXES = ("sha_", "pbt_", "optuna_", "ctl_", "search_")
QUIET_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_num_tokens", "eval_entropy", "epoch")


def number(value: object) -> str:
    """A metric as a person reads it: 4 significant digits, integers as integers, never 19 digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (value == int(value) and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.4g}"


def mebibytes(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


class PlainLog:
    """One line per finished chunk and per decision, for output that is not a terminal."""

    def __init__(self, console: Console, store: StateStore, title: str) -> None:
        self.console, self.store, self.title = console, store, title
        self.started = time.monotonic()
        earlier = store.events_after(0)
        self.last_event = earlier[-1][0] if earlier else 0  # an earlier start's events (a resume) were told then
        self.introduced = False

    def introduce(self) -> None:
        """The first line: how many runs, and how far they already are (a resume)."""
        runs = self.store.runs()
        done, total = sum(row.chunks_done for row in runs), sum(row.total_chunks for row in runs)
        self.say(f"{self.title}: {len(runs)} run(s), {total} chunk(s)" + (f", {done} already saved" if done else ""))
        self.introduced = True

    def say(self, text: str) -> None:
        self.console.print(f"[{time.monotonic() - self.started:7.1f}s] {text}", highlight=False, markup=False, soft_wrap=True)

    def on_progress(self, progress: StepReport) -> None:
        """Step progress is for the terminal's bars; a log gets a line per chunk."""

    def refresh(self) -> None:
        if not self.introduced:
            self.introduce()
        events = self.store.events_after(self.last_event)
        if not events:
            return
        runs = {row.run_id: row for row in self.store.runs()}
        for event_id, event in events:
            self.last_event = event_id
            line = self.describe(event, runs)
            if line:
                self.say(line)

    def describe(self, event: dict[str, Any], runs: dict[str, Any]) -> str | None:
        kind, run_id = event["kind"], event.get("run_id")
        detail = {key: value for key, value in event.items() if key not in ("at", "run_id", "kind")}
        if kind == "chunk_done":
            row = runs.get(run_id)
            chunks = row.total_chunks if row else "?"
            seconds = float(detail.get("step_seconds") or detail.get("seconds") or 0.0)
            tokens = int(detail.get("tokens") or 0)
            speed = f", {tokens / seconds:,.0f} tokens/s" if tokens and seconds > 0 else ""
            metrics = {name: value for name, value in (detail.get("metrics") or {}).items() if name not in QUIET_METRICS}
            loss = self.store.latest_metric("loss").get(run_id) if run_id else None
            shown = ({"loss": loss} if loss is not None else {}) | metrics
            values = " ".join(f"{name}={number(value)}" for name, value in shown.items())
            return (f"{run_id} chunk {int(detail.get('chunk', 0)) + 1}/{chunks}: step {detail.get('step')}, "
                    f"{float(detail.get('seconds') or 0):.1f}s{speed}" + (f"; {values}" if values else ""))
        if kind in LOGGED_EVENTS or kind.startswith(DECISION_PREFIXES):
            words = ", ".join(f"{key}={number(value)}" for key, value in detail.items()
                              if not isinstance(value, (dict, list)) and key != "traceback")
            return f"{run_id + ' ' if run_id else ''}{kind.replace('_', ' ')}" + (f": {words}" if words else "")
        return None

    def renderable(self) -> RenderableType | None:
        return None


class TerminalProgress:
    """The runs table and a rich progress bar per run, redrawn live."""

    def __init__(self, console: Console, store: StateStore, title: str, evaluated: tuple[str, ...] = ()) -> None:
        self.console, self.store, self.title, self.evaluated = console, store, title, evaluated
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"), TimeRemainingColumn(compact=True), console=console,
        )
        self.tasks: dict[str, TaskID] = {}
        self.table: RenderableType = runs_table(store, title, evaluated)

    def _task(self, run_id: str, total: int | None = None) -> TaskID:
        if run_id not in self.tasks:
            self.tasks[run_id] = self.progress.add_task(run_id, total=total, speed="")
        return self.tasks[run_id]

    def on_progress(self, progress: StepReport) -> None:
        steps = progress.step - progress.chunk_start
        rate = f"{steps / progress.seconds:.2f} it/s" if progress.seconds > 0 else ""
        tokens = f"{progress.tokens / progress.seconds:,.0f} tok/s" if progress.seconds > 0 and progress.tokens else ""
        memory = f"{mebibytes(progress.memory)}/{mebibytes(progress.total_memory)}" if progress.total_memory else ""
        task = self._task(progress.run_id, progress.total_steps)
        self.progress.update(task, completed=progress.step, total=progress.total_steps,
                             speed=" ".join(part for part in (rate, tokens, memory) if part))

    def refresh(self) -> None:
        self.table = runs_table(self.store, self.title, self.evaluated)
        for row in self.store.runs():
            if row.run_id in self.tasks and row.state == "completed":
                total = self.progress.tasks[self.tasks[row.run_id]].total
                self.progress.update(self.tasks[row.run_id], completed=total, speed="done")
            elif row.run_id in self.tasks and row.state in ("stopped", "failed", "deleted"):
                self.progress.update(self.tasks[row.run_id], speed=row.state)

    def renderable(self) -> RenderableType:
        return Group(self.table, self.progress) if self.tasks else self.table


View = PlainLog | TerminalProgress


def progress_view(console: Console, store: StateStore, title: str, evaluated: tuple[str, ...] = ()) -> View:
    return TerminalProgress(console, store, title, evaluated) if console.is_terminal else PlainLog(console, store, title)


class Throttled:
    """Calls `action` at most once every `seconds`; `flush` calls it now."""

    def __init__(self, action: Callable[[], None], seconds: float) -> None:
        self.action, self.seconds, self.last = action, seconds, 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            self.action()

    def flush(self) -> None:
        self.last = time.monotonic()
        self.action()
