"""Submitting a control request from outside the controller (`finetune ctl`, the dashboard).

A request is checked here exactly as the controller will check it (`schedule.control`): the run's
state, and for a clone its whole config, validated and planned as a new run. What passes is queued
in the state store; a controller that holds the experiment applies it at the run's next chunk
boundary, or the next `finetune run --resume` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.schedule.control import CloneParent, CloneRequest, RequestKind, check_state, plan_clone, request_kind
from finetune.schedule.folder import controller_alive, open_store, read_plan
from finetune.schedule.records import RunStatus

PENDING = "pending"


@dataclass(frozen=True)
class Submitted:
    request_id: int
    kind: RequestKind
    run_id: str
    live: bool  # a controller holds the experiment now


def submit_request(root: Path, kind: str, run_id: str, payload: Any = None) -> Submitted:
    """Check and queue a request; `RequestRejected` says why it cannot be done, `KeyError` names an
    unknown run."""
    checked = request_kind(kind)
    plan = read_plan(root)
    store = open_store(root)
    try:
        rows = {row.run_id: row for row in store.runs()}
        row, planned = rows.get(run_id), next((run for run in plan.runs if run.run_id == run_id), None)
        if row is None or planned is None:
            raise KeyError(run_id)
        check_state(checked, run_id, RunStatus(row.state))
        if checked is RequestKind.CLONE:
            parent = CloneParent(planned, RunStatus(row.state), row.chunks_done, row.last_checkpoint)
            plan_clone(parent, CloneRequest.parse(payload), set(rows))
        request_id = store.request(checked.value, run_id, payload)
    finally:
        store.close()
    return Submitted(request_id, checked, run_id, controller_alive(root))


def wait_for(root: Path, request_id: int, seconds: float, poll: float = 0.5) -> str:
    """The request's status once the controller has applied or rejected it, or `pending` after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        store = open_store(root)
        try:
            status = store.request_status(request_id) or PENDING
        finally:
            store.close()
        if status != PENDING or time.monotonic() >= deadline:
            return status
        time.sleep(poll)
