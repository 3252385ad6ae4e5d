"""The experiment folder without training: its lock, paths kept relative to it, damaged files, metric
rows written once, and requests checked on submission exactly as the controller checks them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.plan.build import build_plan
from finetune.schedule.control import RequestRejected
from finetune.schedule.folder import ExperimentLock, ExperimentLocked, controller_alive, open_store, read_plan
from finetune.schedule.requests import submit_request
from finetune.schedule.store import ExperimentDamaged, StateStore
from tests.conftest import BASE_SFT
from tests.helpers import doc_of, state_db

FINETUNE = [sys.executable, "-m", "finetune.cli"]


def make_experiment(tmp_path: Path, learning_rates: tuple[float, ...] = (1e-4, 3e-4)) -> Path:
    """A planned experiment whose runs each have one durable chunk (no training)."""
    tree = json.loads(json.dumps(BASE_SFT))
    tree["training_args"]["learning_rate"] = {"$list": list(learning_rates)}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" for _ in range(8)))
    tree["data_conf"]["training_data"]["datasets"][0]["path"] = str(tmp_path / "train.jsonl")
    plan = build_plan(doc_of(tree))
    root = tmp_path / "exp"
    root.mkdir()
    (root / "plan.json").write_text(plan.model_dump_json())
    store = StateStore(root / "state.db")
    for run in plan.runs:
        store.add_run(run.run_id, run.label, 4)
        checkpoint = root / "runs" / run.run_id / "chunk-0"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
        store.record_chunk(run.run_id, 0, 2, str(checkpoint), {"eval_loss": 1.0}, 1.0, 0.5)
    store.close()
    return root


def run_ids(root: Path) -> list[str]:
    return [run.run_id for run in read_plan(root).runs]


def set_state(root: Path, run_id: str, state: str) -> None:
    with state_db(root) as db:
        db.execute("UPDATE runs SET state = ? WHERE run_id = ?", (state, run_id))


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FINETUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- one controller per folder


def test_a_second_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from finetune.schedule.folder import ExperimentLock;"
         "ExperimentLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert controller_alive(tmp_path)
    with pytest.raises(ExperimentLocked, match=rf"pid {holder.pid} on .*, since \d{{4}}-") as locked:
        ExperimentLock(tmp_path).acquire()
    assert locked.value.holder.pid == holder.pid
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert not controller_alive(tmp_path)
    with ExperimentLock(tmp_path):  # the kernel dropped the dead process's lock
        assert controller_alive(tmp_path)
    assert not controller_alive(tmp_path)


def test_run_on_a_folder_another_controller_holds_exits_2_saying_who(tmp_path) -> None:
    root = make_experiment(tmp_path)
    with ExperimentLock(root):
        result = cli(tmp_path, "run", "--resume", str(root))
    assert result.returncode == 2, result.stderr
    assert f"pid {os.getpid()}" in result.stderr and "another controller" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- paths relative to the folder


def test_checkpoint_paths_follow_a_moved_or_copied_folder(tmp_path) -> None:
    root = make_experiment(tmp_path)
    with state_db(root) as db:
        stored = {row[0] for row in db.execute("SELECT checkpoint FROM chunks")}
    assert stored == {f"runs/{run_id}/chunk-0" for run_id in run_ids(root)}, "kept relative to the folder"
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, copy)
    moved = tmp_path / "moved"
    root.rename(moved)
    for folder in (copy, moved):
        store = open_store(folder)
        assert {Path(row.last_checkpoint).parent.parent.parent for row in store.runs()} == {folder.resolve()}
        assert all(Path(row["checkpoint"]).is_dir() for row in store.chunk_rows())
        store.close()


def test_a_path_outside_the_folder_and_one_of_an_older_store_are_kept_as_they_are(tmp_path) -> None:
    store = StateStore(tmp_path / "exp" / "state.db")
    outside = tmp_path / "elsewhere" / "chunk-0"
    store.add_run("a", "a", 2)
    store.record_chunk("a", 0, 1, str(outside), {}, 1.0, 0.5)
    assert store.run("a").last_checkpoint == str(outside)
    store.close()


# ---------------------------------------------------------------- damaged files


STATE_DAMAGE = {
    "empty": (lambda root: (root / "state.db").write_bytes(b""), "state.db is damaged (empty"),
    "garbage": (lambda root: (root / "state.db").write_bytes(b"garbage" * 100), "not an SQLite database"),
    "truncated": (lambda root: (root / "state.db").write_bytes((root / "state.db").read_bytes()[:200]), "is damaged"),
}
PLAN_DAMAGE = {
    "missing": (lambda root: (root / "plan.json").unlink(), "plan.json is missing"),
    "not json": (lambda root: (root / "plan.json").write_text("{not json"), "plan.json is damaged"),
    "wrong shape": (lambda root: (root / "plan.json").write_text('{"experiment": 3}'), "plan.json is damaged"),
}
READERS = {"status": ["status"], "report": ["report"], "ctl": ["ctl", "stop", "{root}", "x"], "requests": ["ctl", "requests"],
           "resume": ["run", "--resume"], "export": ["export", "{root}", "x"]}


@pytest.mark.parametrize("damage", [*STATE_DAMAGE, *PLAN_DAMAGE])
@pytest.mark.parametrize("command", READERS)
def test_damaged_files_are_one_line_naming_the_file_never_a_traceback(tmp_path, damage, command) -> None:
    if command == "export" and damage in STATE_DAMAGE or command in ("status", "requests") and damage in PLAN_DAMAGE:
        pytest.skip(f"{command} does not read that file")
    root = make_experiment(tmp_path)
    spoil, what = {**STATE_DAMAGE, **PLAN_DAMAGE}[damage]
    spoil(root)
    args = [arg.format(root=root) for arg in READERS[command]]
    result = cli(tmp_path, *(args if "{root}" in " ".join(READERS[command]) else [*args, str(root)]))
    assert result.returncode == 2, result.stdout + result.stderr
    assert what in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "restore it from a backup" in result.stderr


def test_an_empty_store_is_new_only_where_no_run_left_anything(tmp_path) -> None:
    (tmp_path / "state.db").write_bytes(b"")
    StateStore(tmp_path / "state.db").close()  # a new experiment: nothing was trained here
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "state.db").write_bytes(b"")
    with pytest.raises(ExperimentDamaged, match="empty, but the experiment has run directories"):
        StateStore(tmp_path / "state.db")
    with pytest.raises(ExperimentDamaged, match="missing"):
        open_store(tmp_path / "nowhere")


# ---------------------------------------------------------------- metrics once per step


def test_a_step_logged_again_after_a_resume_replaces_its_row(tmp_path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.log_metrics("a", 1, {"loss": 2.0})
    store.log_metrics("a", 2, {"loss": 1.5})
    store.log_metrics("a", 2, {"loss": 1.4})  # retrained after the controller was killed
    assert store.metric_series("loss") == {"a": [(1, 2.0), (2, 1.4)]}
    store.close()


def test_duplicate_rows_of_an_older_store_are_dropped_when_it_is_opened(tmp_path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.close()
    with state_db(tmp_path) as db:
        db.execute("DROP INDEX metrics_once")
        db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)", [("a", 1, "loss", 2.0), ("a", 1, "loss", 2.5), ("a", 2, "loss", 1.0)])
    store = StateStore(tmp_path / "state.db")
    assert store.metric_series("loss") == {"a": [(1, 2.5), (2, 1.0)]}
    store.close()


# ---------------------------------------------------------------- requests checked on submission


@pytest.mark.parametrize("kind, state, accepted, says", [
    ("stop", "pending", True, ""),
    ("stop", "completed", False, "is completed; stop acts on a pending or running run"),
    ("resume", "stopped", True, ""),
    ("resume", "failed", False, "`retry` continues a failed run"),
    ("resume", "completed", False, "resume acts on a stopped run"),
    ("retry", "failed", True, ""),
    ("retry", "stopped", False, "`resume` continues a stopped run"),
    ("delete", "deleted", False, "is deleted"),
    ("delete", "completed", True, ""),
    ("clone", "deleted", True, ""),
    ("pause", "pending", False, "unknown request 'pause'"),
])
def test_a_request_is_checked_against_the_runs_state_when_it_is_submitted(tmp_path, kind, state, accepted, says) -> None:
    root = make_experiment(tmp_path)
    run_id = run_ids(root)[0]
    set_state(root, run_id, state)
    payload = {"set": ["training_args.learning_rate=0.002"], "warm_start": False} if kind == "clone" else None
    if accepted:
        submitted = submit_request(root, kind, run_id, payload)
        assert not submitted.live and open_store(root).request_status(submitted.request_id) == "pending"
    else:
        with pytest.raises(RequestRejected, match=says.replace("(", r"\(").replace("`", "`")):
            submit_request(root, kind, run_id, payload)


@pytest.mark.parametrize("change, says", [
    ("training_args.num_train_epochs=.inf", "num_train_epochs"),
    ("data_conf.training_data.datasets.99.path=x", r"index 99 is outside the list data_conf.training_data.datasets \(1 item"),
    ("method.x=y", "method is .sft., not a mapping"),
    ("batchsize_conf.total_train_batch_size=0", "batchsize_conf.total_train_batch_size"),
    ("experiment.runs_per_device=4", "experiment.runs_per_device: belongs to the whole experiment"),
    ("training_args.learning_rate=!list [1, 2]", "a clone is one run"),
    ("noequals", "expected KEY=VALUE"),
    ("training_args.learning_rate=0.0001", "an identical run exists"),
    ("groups=1", "groups must be a non-empty list of mappings"),
    ("run_conf.model=0000-00-00", "cannot read this value: year 0 is out of range"),
    ("training_args.²=1", "ASCII digits"),
])
def test_a_bad_clone_is_rejected_on_submission_with_its_reason_and_nothing_is_queued(tmp_path, change, says) -> None:
    root = make_experiment(tmp_path)
    with pytest.raises(RequestRejected, match=says):
        submit_request(root, "clone", run_ids(root)[0], {"set": [change], "warm_start": False})
    assert open_store(root).requests() == []


def test_ctl_says_why_a_request_is_rejected_and_exits_1(tmp_path) -> None:
    root = make_experiment(tmp_path)
    first = run_ids(root)[0]
    set_state(root, first, "completed")
    result = cli(tmp_path, "ctl", "stop", str(root), first)
    assert result.returncode == 1 and f"run {first} is completed; stop acts on a pending or running run" in result.stderr
    result = cli(tmp_path, "ctl", "clone", str(root), first, "--set", "noequals")
    assert result.returncode == 1 and "expected KEY=VALUE" in result.stderr
    accepted = cli(tmp_path, "ctl", "clone", str(root), first, "--set", "training_args.learning_rate=0.002")
    assert accepted.returncode == 0 and "accepted" in accepted.stdout and "finetune run --resume" in accepted.stdout
    listing = cli(tmp_path, "ctl", "requests", str(root))
    assert "clone" in listing.stdout and "pending" in listing.stdout


def test_a_clone_of_a_warm_clone_keeps_its_adapter_path_relative(tmp_path) -> None:
    from finetune.schedule.control import CloneParent, CloneRequest, plan_clone
    from finetune.schedule.records import RunStatus

    root = make_experiment(tmp_path)
    parent = read_plan(root).runs[0]
    row = open_store(root).run(parent.run_id)
    warm = plan_clone(CloneParent(parent, RunStatus.PENDING, 1, row.last_checkpoint), CloneRequest((), True), set())
    assert warm.warm_start == f"warm-starts/{parent.run_id}-chunk1" == warm.config["peft_conf"]["name_or_path"]
    again = plan_clone(CloneParent(warm, RunStatus.PENDING, 0, None), CloneRequest(("training_args.learning_rate=0.003",), False), set())
    assert again.warm_start == warm.warm_start
    assert again.located(Path("/moved")).config["peft_conf"]["name_or_path"] == f"/moved/warm-starts/{parent.run_id}-chunk1"


def test_export_to_an_existing_folder_is_refused_and_text_in_brackets_is_printed_as_written(tmp_path) -> None:
    root = make_experiment(tmp_path)
    first = run_ids(root)[0]
    (root / "runs" / first / "checkpoint-final").mkdir()
    (tmp_path / "taken").mkdir()
    result = cli(tmp_path, "export", str(root), first, "--output", str(tmp_path / "taken"))
    assert result.returncode == 2 and "taken exists; give --output a path that does not exist yet" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli(tmp_path, "ctl", "stop", str(root), "[bold]x[/bold]")
    assert result.returncode == 1 and "has no run '[bold]x[/bold]'; its runs: " in result.stderr and "[red]" not in result.stderr


def test_wait_gives_the_controllers_answer_once_it_is_there(tmp_path) -> None:
    import threading

    from finetune.schedule.requests import wait_for

    root = make_experiment(tmp_path)
    submitted = submit_request(root, "stop", run_ids(root)[0])

    def controller_answers() -> None:
        store = open_store(root)
        store.finish_request(submitted.request_id, "applied")
        store.close()

    answer = threading.Timer(0.3, controller_answers)
    answer.start()
    assert wait_for(root, submitted.request_id, seconds=30, poll=0.05) == "applied"
    answer.join()
    assert wait_for(root, submit_request(root, "stop", run_ids(root)[1]).request_id, seconds=0.2, poll=0.05) == "pending"


# ---------------------------------------------------------------- found by trying it as a hostile user


def test_a_deeply_nested_payload_written_by_hand_is_read_as_no_payload(tmp_path) -> None:
    store = StateStore(tmp_path / "state.db")
    store._db.execute("INSERT INTO requests (kind, run_id, payload, created_at) VALUES ('stop', 'a', ?, 0)", ("[" * 5000 + "]" * 5000,))
    assert store.pending_requests()[0][3] is None and store.requests()[0]["payload"] is None
    store.close()


def test_a_diverged_runs_nan_metric_is_not_stored_and_breaks_nothing(tmp_path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.log_metrics("a", 1, {"loss": float("nan"), "grad_norm": float("inf"), "learning_rate": 1.0})
    assert store.metric_series("loss") == {} and store.metric_series("grad_norm") == {"a": [(1, float("inf"))]}
    store.close()


@pytest.mark.parametrize("plan_text", ['{"runs": 5}', '{"runs": "abc"}', '{"runs": [5]}', '{"runs": [{"config": 3}]}'])
def test_a_plan_of_the_wrong_shape_is_damage(tmp_path, plan_text) -> None:
    (tmp_path / "plan.json").write_text(plan_text)
    with pytest.raises(ExperimentDamaged, match="plan.json is damaged"):
        read_plan(tmp_path)


@pytest.mark.parametrize("make", ["link", "folder"])
def test_a_lock_file_that_is_a_link_or_a_folder_is_refused_and_nothing_is_written_through_it(tmp_path, make) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    root = tmp_path / "exp"
    root.mkdir()
    (root / "controller.lock").symlink_to(victim) if make == "link" else (root / "controller.lock").mkdir()
    with pytest.raises(ExperimentDamaged, match="controller.lock"):
        ExperimentLock(root).acquire()
    if make == "link":
        with pytest.raises(ExperimentDamaged, match="controller.lock"):
            controller_alive(root)
    assert victim.read_text() == "precious"


def test_an_archived_experiment_on_a_read_only_folder_can_be_read(tmp_path, monkeypatch) -> None:
    root = make_experiment(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == root.resolve() and mode == os.W_OK else real_access(path, mode))
    store = open_store(root)
    assert store.read_only and len(store.runs()) == 2
    store.close()


def test_a_missing_store_beside_a_plan_is_damage_not_a_strange_folder(tmp_path) -> None:
    root = make_experiment(tmp_path)
    (root / "state.db").unlink()
    result = cli(tmp_path, "status", str(root))
    assert result.returncode == 2 and "state.db is missing" in result.stderr and "restore it from a backup" in result.stderr


def test_a_warm_start_that_changes_the_adapter_and_a_clone_of_missing_data_are_rejected(tmp_path) -> None:
    root = make_experiment(tmp_path)
    first = run_ids(root)[0]
    with pytest.raises(RequestRejected, match="a warm start trains the parent's adapter as it is"):
        submit_request(root, "clone", first, {"set": ["peft_conf.peft_kwargs.r=4"], "warm_start": True})
    with pytest.raises(RequestRejected, match="/nonexistent.jsonl does not exist"):
        submit_request(root, "clone", first, {"set": ["data_conf.training_data.datasets.0.path=/nonexistent.jsonl"]})
