"""The experiment's state store: SQLite in the experiment directory.

Everything that must survive a crash lives here: runs, durable chunks, metrics, control
requests and events. A chunk counts only once its checkpoint is on disk and its row is
committed here. Paths are stored relative to the experiment folder (and returned resolved
against it), so a folder that is moved or copied resumes from wherever it is.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from finetune.schedule.faults import (  # noqa: F401 (ExperimentDamaged and the faults are imported from here too)
    BUSY_PATIENCE_S,
    BUSY_TIMEOUT_S,
    EnvironmentFault,
    ExperimentDamaged,
    PatientConnection,
    caused_by_full_disk,
    damaged,
    disk_full,
    is_disk_full,
    read_only,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, label TEXT NOT NULL, position INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', total_chunks INTEGER NOT NULL,
    parent_run_id TEXT, error TEXT, mlflow_run_id TEXT
);
CREATE TABLE IF NOT EXISTS chunks (
    run_id TEXT NOT NULL, chunk INTEGER NOT NULL, global_step INTEGER NOT NULL,
    checkpoint TEXT NOT NULL, metrics TEXT NOT NULL, seconds REAL NOT NULL, step_seconds REAL NOT NULL,
    finished_at REAL NOT NULL, eval_seconds REAL NOT NULL DEFAULT 0,
    started_at REAL, trained_at REAL,
    PRIMARY KEY (run_id, chunk)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_by_name ON metrics (name, run_id);
CREATE UNIQUE INDEX IF NOT EXISTS metrics_once ON metrics (run_id, name, step);
CREATE TABLE IF NOT EXISTS samples (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, position INTEGER NOT NULL,
    prompt TEXT NOT NULL, completion TEXT NOT NULL, reference TEXT NOT NULL,
    PRIMARY KEY (run_id, step, position)
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, run_id TEXT NOT NULL,
    payload TEXT NOT NULL DEFAULT '{}', status TEXT NOT NULL DEFAULT 'pending', created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, run_id TEXT, kind TEXT NOT NULL, detail TEXT NOT NULL
);
"""

SQLITE_HEADER = b"SQLite format 3\x00"
TABLES = frozenset({"runs", "chunks", "metrics", "requests", "events"})
# Rows of metrics logged twice by a store written before `metrics_once` (a chunk in flight when the
# controller stopped was logged again when retrained): the later row wins.
DUPLICATE_METRICS = "DELETE FROM metrics WHERE rowid NOT IN (SELECT MAX(rowid) FROM metrics GROUP BY run_id, name, step)"
LATER_CHUNK_COLUMNS = {"eval_seconds": "REAL NOT NULL DEFAULT 0", "started_at": "REAL", "trained_at": "REAL"}
ACTIVE_STATES = ("pending", "running")

RUN_STATES = ("pending", "running", "stopped", "completed", "failed", "deleted")


@dataclass(frozen=True)
class RunRow:
    run_id: str
    label: str
    position: int
    state: str
    total_chunks: int
    chunks_done: int
    last_checkpoint: str | None
    latest_metrics: dict[str, float]
    parent_run_id: str | None
    error: str | None
    mlflow_run_id: str | None


class StateStore:
    """`create`: a new experiment may start here; otherwise the store must exist and be whole."""

    def __init__(self, path: str | Path, create: bool = True, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 busy_patience_s: float = BUSY_PATIENCE_S) -> None:
        self.path = Path(path)
        self.root = self.path.parent.resolve()
        self._check_file(create)
        self.read_only = not create and not os.access(self.root, os.W_OK)
        if self.read_only:  # an archived experiment on a read-only disk: SQLite cannot write its WAL index there
            connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?immutable=1", uri=True, isolation_level=None)
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise (disk_full(self.path.parent) if is_disk_full(error) else read_only(self.path.parent, "this command")
                       if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else error) from None
            connection = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
        connection.text_factory = self._text
        self._db: Any = PatientConnection(connection, self.path, busy_patience_s)
        try:
            self._open(create)
        except EnvironmentFault:
            self._db.close()
            raise
        except sqlite3.OperationalError as error:  # no permission, say: not damage
            self._db.close()
            raise ExperimentDamaged(f"{self.path} cannot be opened ({error}); check the disk and the folder's permissions") from None
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise damaged(self.path, str(error)) from None

    def _text(self, data: bytes) -> str:
        """SQLite's text as str; bytes that are not UTF-8 are damage (this tool writes UTF-8 only)."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise damaged(self.path, "text that is not UTF-8") from None

    def _check_file(self, create: bool) -> None:
        """A missing or empty file is a new store only for a new experiment: where runs have left
        directories behind, it is damage (taking it as new would silently train everything again)."""
        if self.path.exists() and not self.path.is_file():
            raise damaged(self.path, "not a regular file")
        if not self.path.exists() or self.path.stat().st_size == 0:
            what = "missing" if not self.path.exists() else "empty"
            runs = self.root / "runs"
            if not create:
                raise damaged(self.path, what)
            if runs.is_dir() and any(runs.iterdir()):
                raise damaged(self.path, f"{what}, but the experiment has run directories")
            return
        with self.path.open("rb") as stream:
            if stream.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise damaged(self.path, "not an SQLite database")

    def _open(self, create: bool) -> None:
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not create and not TABLES <= tables:
            raise damaged(self.path, f"no {', '.join(sorted(TABLES - tables))} table")
        if self.read_only:
            return
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        if "metrics" in tables and not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'metrics_once'").fetchone():
            self._db.execute(DUPLICATE_METRICS)
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(chunks)")}
        for column, kind in LATER_CHUNK_COLUMNS.items():  # a state store written by an earlier version
            if column not in columns:
                self._db.execute(f"ALTER TABLE chunks ADD COLUMN {column} {kind}")

    def stored_path(self, path: str | Path) -> str:
        """`path` as the store keeps it: relative to the experiment folder when inside it."""
        absolute = Path(path).resolve()
        return str(absolute.relative_to(self.root)) if absolute.is_relative_to(self.root) else str(absolute)

    def resolved_path(self, stored: str) -> str:
        """A stored path as this copy of the folder sees it (an absolute one, from an older store, as it is)."""
        return str(self.root / stored)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------ runs

    def add_run(self, run_id: str, label: str, total_chunks: int, parent_run_id: str | None = None) -> None:
        with self.transaction() as db:
            position = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM runs").fetchone()[0]
            db.execute(
                "INSERT OR IGNORE INTO runs (run_id, label, position, total_chunks, parent_run_id) VALUES (?, ?, ?, ?, ?)",
                (run_id, label, position, total_chunks, parent_run_id),
            )

    def set_state(self, run_id: str, state: str, error: str | None = None) -> None:
        assert state in RUN_STATES, state
        self._db.execute("UPDATE runs SET state = ?, error = COALESCE(?, error) WHERE run_id = ?", (state, error, run_id))

    def set_mlflow_run(self, run_id: str, mlflow_run_id: str) -> None:
        self._db.execute("UPDATE runs SET mlflow_run_id = ? WHERE run_id = ?", (mlflow_run_id, run_id))

    def runs(self) -> list[RunRow]:
        latest = "SELECT {} FROM chunks c WHERE c.run_id = r.run_id ORDER BY c.chunk DESC LIMIT 1"
        rows = self._db.execute(
            "SELECT r.run_id, r.label, r.position, r.state, r.total_chunks, "
            "(SELECT COUNT(*) FROM chunks c WHERE c.run_id = r.run_id), "
            f"({latest.format('checkpoint')}), ({latest.format('metrics')}), "
            "r.parent_run_id, r.error, r.mlflow_run_id FROM runs r ORDER BY r.position"
        ).fetchall()
        found = [RunRow(*row[:6], self.resolved_path(row[6]) if row[6] else None, self._json(row[7]) if row[7] else {}, *row[8:])
                 for row in rows]
        if any(row.state not in RUN_STATES or not isinstance(row.run_id, str) for row in found):
            raise damaged(self.path, "a run row that is not one this tool writes")
        return found

    def run(self, run_id: str) -> RunRow:
        for row in self.runs():
            if row.run_id == run_id:
                return row
        raise KeyError(run_id)

    # ------------------------------------------------------------ chunks and metrics

    def record_chunk(
        self, run_id: str, chunk: int, global_step: int, checkpoint: str, metrics: dict[str, float], seconds: float,
        step_seconds: float, eval_seconds: float = 0.0, started_at: float | None = None, trained_at: float | None = None,
    ) -> None:
        """Make a chunk durable; its checkpoint must already be complete on disk.

        `seconds` is the chunk's wall time on its worker, `step_seconds` the part spent in optimizer
        steps and `eval_seconds` in evaluation; the rest is switching and bookkeeping. `started_at` and
        `trained_at` (wall clock) bound the interval in which its worker trained it: the intervals of
        runs on several slots of one device overlap.
        """
        with self.transaction() as db:
            db.execute(
                "INSERT INTO chunks (run_id, chunk, global_step, checkpoint, metrics, seconds, step_seconds, finished_at, "
                "eval_seconds, started_at, trained_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, chunk, global_step, self.stored_path(checkpoint), json.dumps(metrics), seconds, step_seconds, time.time(), eval_seconds,
                 started_at, trained_at),
            )

    def chunk_rows(self, run_id: str | None = None) -> list[dict[str, Any]]:
        keys = ("run_id", "chunk", "global_step", "checkpoint", "metrics", "seconds", "step_seconds", "finished_at", "eval_seconds",
                "started_at", "trained_at")
        query = f"SELECT {', '.join(keys)} FROM chunks"
        rows = self._db.execute(query + (" WHERE run_id = ?" if run_id else "") + " ORDER BY finished_at", (run_id,) if run_id else ()).fetchall()
        return [dict(zip(keys, row)) | {"metrics": self._json(row[4]), "checkpoint": self.resolved_path(str(row[3]))} for row in rows]

    def log_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        """One row per (run, name, step): a step trained again after a resume replaces its row. A NaN
        (a diverged run) is not stored (SQLite reads it as NULL); the chunk's metrics and MLflow keep it."""
        rows = [(run_id, step, name, value) for name, value in metrics.items() if value == value]
        self._db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)", rows)

    def inherit_metrics(self, run_id: str, parent: str, up_to_step: int) -> None:
        """A clone that continues its parent (PBT's exploit) starts with the parent's curves up to where it
        continues from: its curves (dashboard, report) show the whole lineage's training."""
        self._db.execute("INSERT OR REPLACE INTO metrics SELECT ?, step, name, value FROM metrics WHERE run_id = ? AND step <= ?",
                         (run_id, parent, up_to_step))

    def log_answers(self, run_id: str, answers: Any) -> None:
        """Generated answers kept to be read (`evaluate.samples.KeptAnswer`); an evaluation done again
        (a chunk retrained after a crash) replaces its rows."""
        rows = [(run_id, a.step, a.position, a.prompt, a.completion, a.reference) for a in answers]
        self._db.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?, ?)", rows)

    def answers(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """The answers kept (`samples` table), by run, step and position: run_id, step, position, prompt (the
        conversation before the answer, a list of messages), completion, reference."""
        keys = ("run_id", "step", "position", "prompt", "completion", "reference")
        query = f"SELECT {', '.join(keys)} FROM samples" + (" WHERE run_id = ?" if run_id else "") + " ORDER BY run_id, step, position"
        try:
            rows = self._db.execute(query, (run_id,) if run_id else ()).fetchall()
        except sqlite3.OperationalError:  # a read-only store written before the samples table
            return []
        return [dict(zip(keys, row)) | {"prompt": _json_or_none(row[3])} for row in rows]

    def metrics_at(self, step: int) -> dict[str, dict[str, float]]:
        """Every run's metrics logged at `step` (step 0: the evaluation before training, eval_on_start)."""
        found: dict[str, dict[str, float]] = {}
        for run_id, name, value in self._db.execute("SELECT run_id, name, value FROM metrics WHERE step = ?", (step,)):
            found.setdefault(run_id, {})[name] = value
        return found

    def forget_metrics_after(self, run_id: str, step: int) -> None:
        """Drop metrics of steps that were lost with a worker; they are logged again when retrained."""
        self._db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, step))

    def latest_metric(self, name: str) -> dict[str, float]:
        rows = self._db.execute(
            "SELECT run_id, value FROM metrics WHERE rowid IN "
            "(SELECT MAX(rowid) FROM metrics WHERE name = ? GROUP BY run_id)",
            (name,),
        )
        return dict(rows.fetchall())

    def metric_series(self, name: str) -> dict[str, list[tuple[int, float]]]:
        series: dict[str, list[tuple[int, float]]] = {}
        for run_id, step, value in self._db.execute(
            "SELECT run_id, step, value FROM metrics WHERE name = ? ORDER BY step, rowid", (name,)
        ):
            series.setdefault(run_id, []).append((step, value))
        return series

    # ------------------------------------------------------------ control requests and events

    def request(self, kind: str, run_id: str, payload: dict[str, Any] | None = None) -> int:
        if self.read_only:
            raise read_only(self.root, "a request (it is queued in state.db)")
        cursor = self._db.execute(
            "INSERT INTO requests (kind, run_id, payload, created_at) VALUES (?, ?, ?, ?)",
            (kind, run_id, json.dumps(payload or {}), time.time()),
        )
        return int(cursor.lastrowid)

    def pending_requests(self) -> list[tuple[int, str, str, Any]]:
        """(id, kind, run id, payload) of each request not yet applied or rejected, oldest first (a
        payload that is not JSON comes as None, and the request is rejected like any bad one)."""
        rows = self._db.execute("SELECT id, kind, run_id, payload FROM requests WHERE status = 'pending' ORDER BY id")
        return [(row[0], row[1], row[2], _json_or_none(row[3])) for row in rows.fetchall()]

    def finish_request(self, request_id: int, status: str) -> None:
        self._db.execute("UPDATE requests SET status = ? WHERE id = ?", (status, request_id))

    def requests(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT id, kind, run_id, payload, status, created_at FROM requests ORDER BY id").fetchall()
        keys = ("id", "kind", "run_id", "payload", "status", "created_at")
        return [dict(zip(keys, row)) | {"payload": _json_or_none(row[3])} for row in rows]

    def request_status(self, request_id: int) -> str | None:
        row = self._db.execute("SELECT status FROM requests WHERE id = ?", (request_id,)).fetchone()
        return row[0] if row else None

    def event(self, kind: str, run_id: str | None = None, **detail: Any) -> None:
        self._db.execute(
            "INSERT INTO events (at, run_id, kind, detail) VALUES (?, ?, ?, ?)",
            (time.time(), run_id, kind, json.dumps(detail, default=str)),
        )

    def events(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT at, run_id, kind, detail FROM events ORDER BY id").fetchall()
        return [{"at": at, "run_id": run_id, "kind": kind, **self._json(detail)} for at, run_id, kind, detail in rows]

    def _json(self, text: Any) -> Any:
        """A JSON column as this tool wrote it; anything else is damage (a row overwritten on disk)."""
        try:
            value = json.loads(text)
        except (TypeError, ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise damaged(self.path, "a row whose JSON this tool did not write")
        return value

    def events_after(self, event_id: int) -> list[tuple[int, dict[str, Any]]]:
        """(id, event) of the events recorded after `event_id`, in order: a log follows them."""
        rows = self._db.execute("SELECT id, at, run_id, kind, detail FROM events WHERE id > ? ORDER BY id", (event_id,)).fetchall()
        return [(row_id, {"at": at, "run_id": run_id, "kind": kind, **json.loads(detail)}) for row_id, at, run_id, kind, detail in rows]


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):  # a row written by hand: its request is rejected
        return None
