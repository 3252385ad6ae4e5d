"""Any control request, however wrong, ends `applied` or `rejected` and never stops the controller.

Requests are written straight into the state store (as an older `ctl`, a hand edit or a script
could), so that the controller's own checks are what is tested, not those made on submission.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.schedule.control import RequestKind
from finetune.schedule.messages import RunFailed
from tests.conftest import BASE_SFT
from tests.test_controller import make_controller, planned


def leaf_paths(tree: Any, prefix: tuple = ()) -> list[str]:
    if isinstance(tree, dict):
        return [path for key, value in tree.items() for path in leaf_paths(value, (*prefix, key))] + [".".join(map(str, prefix))]
    if isinstance(tree, list):
        return [path for index, value in enumerate(tree) for path in leaf_paths(value, (*prefix, index))]
    return [".".join(map(str, prefix))]


KEYS = [path for path in leaf_paths(BASE_SFT) if path] + [
    "experiment.runs_per_device", "experiment.devices", "data_conf.training_data.datasets.99.path", "method.x",
    "training_args.num_train_epochs", "batchsize_conf.total_train_batch_size", "peft_conf.peft_type", "sweep.num_runs",
    "groups", "run_conf.final_checkpoint_name", "nonsense.key", "training_args",
]
SCALARS = st.one_of(
    st.integers(min_value=-(10**15), max_value=10**15), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(["!list [1, 2]", "!range {low: 1, high: 2}", "../../x", "/abs", ".inf", "1e400", "[", "{a: "]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def as_yaml(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)


CHANGES = st.builds(lambda key, value: f"{key}={as_yaml(value)}", st.sampled_from(KEYS), VALUES) | st.text(max_size=20)
PAYLOADS = st.one_of(
    st.fixed_dictionaries({"set": st.lists(CHANGES, max_size=3), "warm_start": st.booleans()}),
    VALUES,
    st.fixed_dictionaries({"set": VALUES, "warm_start": VALUES}),
)
INTERNAL = re.compile(r"rejected: [A-Za-z]+(Error|Exception): ")  # what the controller's last-resort catch writes
REQUESTS = st.lists(
    st.tuples(st.sampled_from([*(kind.value for kind in RequestKind), "pause", ""]), st.sampled_from(["a", "a", "b", "zzz", ""]), PAYLOADS),
    min_size=1, max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(requests=REQUESTS, failed=st.booleans())
def test_no_request_stops_the_controller_and_each_ends_applied_or_rejected(requests, failed) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        controller, pool, _ = make_controller(Path(tmp), [planned("a"), planned("b", learning_rate=3e-4)])
        if failed:
            send_failure(controller, pool)
        for kind, run_id, payload in requests:
            controller.store._db.execute(
                "INSERT INTO requests (kind, run_id, payload, created_at) VALUES (?, ?, ?, 0)", (kind, run_id, json.dumps(payload)))
        for _ in range(3):
            finish_chunks_in_training(controller, pool)
            controller.step()
        statuses = [request["status"] for request in controller.store.requests()]
        assert all(status == "applied" or status.startswith(("applied: new run", "rejected: ")) for status in statuses), statuses
        assert not any(INTERNAL.match(status) for status in statuses), "every rejection gives a reason, not an exception"
        for record in controller.runs.values():  # every run is still in a state the controller can move on from
            assert record.status.value in ("pending", "running", "stopped", "failed", "deleted", "completed")
        controller.store.close()


def send_failure(controller, pool) -> None:
    controller.step()
    busy = next(worker for worker in pool.workers if worker.busy_with)
    pool.results.put(RunFailed(busy.worker_id, busy.busy_with, "RuntimeError: boom", "", busy.ticket))
    controller.step()


def finish_chunks_in_training(controller, pool) -> None:
    """Each worker's chunk is trained and written, so that requests that wait for a boundary meet one."""
    from tests.test_controller import done, durable

    for worker in pool.workers:
        if worker.busy_with:
            run_id = worker.busy_with
            chunk = max(key[1] for key in controller.chunks if key[0] == run_id)
            pool.results.put(done(controller, worker.worker_id, run_id, chunk))
            pool.results.put(durable(controller, worker.worker_id, run_id, chunk))


@settings(max_examples=150, deadline=None)
@given(changes=st.lists(st.lists(CHANGES, min_size=1, max_size=3), min_size=1, max_size=4), warm=st.booleans())
def test_random_clone_changes_end_applied_or_rejected_with_a_reason(changes, warm) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        controller, pool, _ = make_controller(Path(tmp), [planned("a")])
        for change in changes:
            controller.store.request("clone", "a", {"set": change, "warm_start": warm})
        controller.step()
        for request in controller.store.requests():
            status = request["status"]
            assert status.startswith("applied: new run") or status.startswith("rejected: ") and len(status) > 12, status
            assert not INTERNAL.match(status), status
        clones = [record for record in controller.runs.values() if record.planned.parent_run_id == "a"]
        assert all(record.total_chunks > 0 for record in clones), "an accepted clone has work to do"
        controller.store.close()
