"""User code behind a fence (issue 30): configs are checked without importing the user's modules, and custom
metrics run in a child process of the worker, whatever they do (hang, exit, fork, leave threads, mutate)."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import issues_of
from tests.test_evaluation import CUSTOM, config_with

REPO = Path(__file__).resolve().parent.parent
SAMPLE = {"prompts": [[{"role": "user", "content": "Add 1 and 2."}]], "completions": ["3"], "references": ["3"]}


# ---------------------------------------------------------------- checking a config imports nothing


def test_validating_a_config_never_imports_its_metric_module(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "imported"
    monkeypatch.setenv("FINETUNE_TEST_IMPORT_MARKER", str(marker))
    sys.modules.pop("tests.hostile_import", None)
    tree = config_with(eval_conf={"custom": [{"name": "mine", "function": "tests.hostile_import:metric"}]})
    assert issues_of(tree) == []
    assert not marker.exists() and "tests.hostile_import" not in sys.modules


def test_validate_on_the_command_line_runs_no_main_module(tmp_path) -> None:
    """`venv.__main__:main` used to create a virtualenv named `validate` in the current folder."""
    import subprocess

    import yaml

    tree = config_with(eval_conf={"custom": [{"name": "mine", "function": "venv.__main__:main"}]})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", "c.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and "__main__ module" in result.stdout + result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.parametrize("name", ["rank", "state", "label", "chunks", "run", "Rank", "run_id"])
def test_a_custom_metric_may_not_take_a_report_column_s_name(name) -> None:
    (issue,) = issues_of(config_with(eval_conf={"custom": [{"name": name, "function": f"{CUSTOM}:reference_words"}]}))
    assert issue.path == "eval_conf.custom[0].name" and "column of the report" in issue.message


# ---------------------------------------------------------------- the sandbox by itself


@pytest.fixture
def sandbox():
    from finetune.evaluate.sandbox import UserCodeSandbox

    box = UserCodeSandbox(4 * 2**30)
    yield box
    box.close()


@pytest.mark.parametrize("function,words,value", [
    ("hangs", "did not return within 1 s; killed", None),
    ("exits_hard", "its process exited (exit code 7)", None),
    ("exits", "SystemExit: 3; its process was killed", None),
    ("interrupted", "KeyboardInterrupt; its process was killed", None),
    ("forks", "left 1 process(es) running", 2.0),
    ("leaves_a_thread", "left 1 thread(s) running (left-behind); killed", 3.0),
    ("too_much_memory", "MemoryError", None),
    ("raises", "RuntimeError: boom from user metric", None),
    ("a_numpy_bool", "returned bool, not a number", None),
])
def test_a_hostile_function_costs_its_value_and_the_sandbox_goes_on(sandbox, function, words, value) -> None:
    started = time.monotonic()
    outcome = sandbox.call(f"{CUSTOM}:{function}", 1.0, **SAMPLE)
    assert time.monotonic() - started < 15
    assert outcome.value == value and words in (outcome.problem or "")
    assert sandbox.call(f"{CUSTOM}:words_per_answer", 5.0, **SAMPLE).value == 1.0  # a fresh or the same process


def test_the_sandbox_stays_warm_between_calls_and_kills_what_a_function_started(sandbox, tmp_path, monkeypatch) -> None:
    assert [sandbox.call(f"{CUSTOM}:counts_calls", 5.0, **SAMPLE).value for _ in range(3)] == [1.0, 2.0, 3.0]
    monkeypatch.setenv("FINETUNE_TEST_PID_DIR", str(tmp_path))
    sandbox.close()  # the environment reaches the next process
    assert sandbox.call(f"{CUSTOM}:forks", 5.0, **SAMPLE).value == 2.0
    (pid,) = [int(path.name) for path in tmp_path.iterdir()]
    deadline = time.monotonic() + 10  # SIGKILL lands asynchronously: on a busy machine it can take a moment
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_a_metric_that_mutates_its_arguments_changes_nothing_of_the_caller_nor_the_next_metric(caplog) -> None:
    from finetune.config.evaluation import EvalConfig
    from finetune.evaluate.metrics import Scorer

    eval_conf = EvalConfig.model_validate({"custom": [{"name": "bad", "function": f"{CUSTOM}:mutates"},
                                                      {"name": "good", "function": f"{CUSTOM}:sees_the_sample_unchanged"}]})
    prompts, completions, references = json.loads(json.dumps(list(SAMPLE.values())))
    scorer = Scorer.of(eval_conf)
    try:
        assert scorer.score(prompts, completions, references) == {"bad": 4.0, "good": 1.0}
    finally:
        scorer.close()
    assert [prompts, completions, references] == list(SAMPLE.values()) and not caplog.records


def test_a_module_that_exits_when_imported_costs_the_metric_only(sandbox, monkeypatch) -> None:
    monkeypatch.setenv("FINETUNE_TEST_IMPORT_EXIT", "1")
    outcome = sandbox.call("tests.hostile_import:metric", 5.0, **SAMPLE)
    assert outcome.value is None and "SystemExit: 3" in (outcome.problem or "")


def test_the_sandbox_ends_when_its_worker_is_killed(tmp_path) -> None:
    import signal
    import subprocess

    script = ("import sys, time\nfrom finetune.evaluate.sandbox import UserCodeSandbox\nbox = UserCodeSandbox()\n"
              "box.call('tests.custom_metrics:words_per_answer', 5.0, prompts=[], completions=[], references=[])\n"
              "print(box.process.pid, flush=True)\ntime.sleep(60)\n")
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(worker.stdout.readline())
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


# ---------------------------------------------------------------- hostile metrics in a real experiment

HOSTILE = ["hangs", "exits_hard", "exits", "interrupted", "forks", "leaves_a_thread", "mutates", "raises",
           "import_exits"]
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def hostile_experiment(demo_dir, tmp_path_factory):
    """One run of two chunks whose eval_conf.custom holds every hostile metric, then one that checks the sample."""
    import yaml

    from tests.test_training import finetune

    tmp_path = tmp_path_factory.mktemp("hostile")
    custom = [{"name": f"m_{name}", "function": "tests.hostile_import:metric" if name == "import_exits"
               else f"{CUSTOM}:{name}"} for name in HOSTILE]
    custom.append({"name": "m_unchanged", "function": f"{CUSTOM}:sees_the_sample_unchanged"})
    tree = {
        "method": "sft",
        "experiment": {"name": "hostile", "num_chunks": 2},
        "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": f"{demo_dir}/data/sft_train.jsonl"}]},
                      "validation_data": {"type": "CONCATENATION", "datasets": [{"path": f"{demo_dir}/data/sft_valid.jsonl"}]},
                      "chat_template_name": "chat-ml"},
        "training_args": {"learning_rate": 1e-3, "max_steps": 2, "logging_steps": 1},
        "batchsize_conf": {"total_train_batch_size": 4, "max_per_device_train_batch_size": 4},
        "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}},
        "run_conf": {"model": f"{demo_dir}/model", "model_args": {"dtype": "float32"}},
        "eval_conf": {"metrics": ["eval_loss"], "custom": custom, "custom_timeout_s": TIMEOUT_S,
                      "generation": {"max_new_tokens": 2, "max_samples": 2}},
    }
    (tmp_path / "hostile.yaml").write_text(yaml.safe_dump(tree))
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {"PYTHONPATH": str(REPO), "FINETUNE_TEST_PID_DIR": str(pids), "FINETUNE_TEST_IMPORT_EXIT": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        started = time.monotonic()
        result = finetune(tmp_path, "run", "hostile.yaml")
        seconds = time.monotonic() - started
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    root = tmp_path / "runs" / "hostile"
    with sqlite3.connect(root / "state.db") as db:
        states = db.execute("SELECT state FROM runs").fetchall()
        chunks = [(chunk, json.loads(metrics)) for chunk, metrics in db.execute("SELECT chunk, metrics FROM chunks ORDER BY chunk")]
        warnings = [json.loads(detail) | {"run_id": run_id} for run_id, detail in
                    db.execute("SELECT run_id, detail FROM events WHERE kind = 'warning' ORDER BY id")]
    from finetune.track.report import report_markdown

    return {"states": states, "chunks": chunks, "warnings": warnings, "stderr": result.stderr, "seconds": seconds,
            "pids": [int(path.name) for path in pids.iterdir()], "report": report_markdown(root)}


WORDS = {
    "hangs": f"did not return within {TIMEOUT_S} s", "exits_hard": "exit code 7", "exits": "SystemExit: 3",
    "interrupted": "KeyboardInterrupt", "forks": "process(es) running", "leaves_a_thread": "thread(s) running",
    "mutates": None, "raises": "RuntimeError: boom", "import_exits": "SystemExit: 3",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_metric_costs_its_value_and_a_warning_never_the_run(hostile_experiment, name) -> None:
    experiment = hostile_experiment
    assert experiment["states"] == [("completed",)]
    assert [chunk for chunk, _ in experiment["chunks"]] == [0, 1]  # every chunk saved, training went on
    for _, metrics in experiment["chunks"]:
        assert metrics["m_unchanged"] == 1.0  # measured after every hostile one, on the sample as generated
    index = HOSTILE.index(name)
    mine = [warning for warning in experiment["warnings"] if warning["source"] == f"eval_conf.custom[{index}]"]
    if WORDS[name] is None:  # a metric that only mutates its copies: measured, no warning
        assert mine == [] and all(metrics[f"m_{name}"] == 4.0 for _, metrics in experiment["chunks"])
        return
    assert [warning["chunk"] for warning in mine] == [0, 1]
    assert f"| 1 | eval_conf.custom[{index}] (`{mine[0]['function']}`) | " in experiment["report"]  # the report says so
    assert all(WORDS[name] in warning["error"] and warning["metric"] == f"m_{name}" for warning in mine)
    kept = {"forks": 2.0, "leaves_a_thread": 3.0}.get(name)
    assert all(metrics.get(f"m_{name}") == kept for _, metrics in experiment["chunks"])
    if name == "forks":
        assert len(experiment["pids"]) == 2 and not any(_alive(pid) for pid in experiment["pids"])


@pytest.mark.parametrize("change", [
    "eval_conf.custom=[{name: mine, function: 'venv.__main__:main'}]",
    f"eval_conf.custom=[{{name: mine, function: '{CUSTOM}:words_per_answer'}}]",
    "eval_conf={metrics: [eval_loss], custom: [{name: mine, function: 'tests.hostile_import:metric'}]}",
])
def test_a_clone_cannot_add_or_change_custom_metrics(tmp_path, change, monkeypatch) -> None:
    from finetune.schedule.control import RequestRejected
    from finetune.schedule.requests import submit_request
    from tests.test_experiment_folder import make_experiment, run_ids

    root = make_experiment(tmp_path)
    monkeypatch.chdir(root)
    before = sorted(path.name for path in root.iterdir())
    with pytest.raises(RequestRejected, match="eval_conf.custom: .*cannot add or change them"):
        submit_request(root, "clone", run_ids(root)[0], {"set": [change], "warm_start": False})
    assert sorted(path.name for path in root.iterdir()) == before


@pytest.mark.parametrize("function,words", [
    (f"{CUSTOM}:a_reward", None),
    (f"{CUSTOM}:anything", None),
    (f"{CUSTOM}:words_per_answer", "it needs **kwargs"),
    ("venv.__main__:main", "__main__ module"),
    ("unittest.mock:MagicMock", "is a class"),
    ("no_such_package:reward", "no module named 'no_such_package'"),
])
def test_a_grpo_reward_function_is_checked_from_its_source(tmp_path, monkeypatch, function, words) -> None:
    marker = tmp_path / "imported"
    monkeypatch.setenv("FINETUNE_TEST_IMPORT_MARKER", str(marker))
    tree = config_with(method="grpo", grpo_args={"reward_functions": [function, "tests.hostile_import:reward"]})
    tree["data_conf"]["validation_data"] = {"type": "NONE"}
    issues = [issue for issue in issues_of(tree) if issue.path.startswith("grpo_args")]
    if words is None:
        assert issues == []
    else:
        assert issues[0].path == "grpo_args.reward_functions" and words in issues[0].message
    assert not marker.exists()


@pytest.mark.slow
def test_a_grpo_reward_function_runs_behind_the_fence(tmp_path, demo_dir) -> None:
    """A reward that hangs costs its rewards for those steps and a warning event; one that reads trainer_state
    gets it as an object; the run completes."""
    from tests.test_training import demo_config, finetune, small

    config = demo_config(tmp_path, demo_dir, "grpo.yaml", "rewards")
    rewards = f"grpo_args.reward_functions=[format_chat, '{CUSTOM}:reward_hangs', '{CUSTOM}:reward_of_the_step']"
    env = {"PYTHONPATH": str(REPO)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        finetune(tmp_path, "run", str(config), *small("rewards", steps=2, chunks=1), "--set", rewards,
                 "--set", "grpo_args.reward_timeout_s=2")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    with sqlite3.connect(tmp_path / "runs" / "rewards" / "state.db") as db:
        assert db.execute("SELECT state FROM runs").fetchall() == [("completed",)]
        warnings = [json.loads(detail) for (detail,) in db.execute("SELECT detail FROM events WHERE kind = 'warning'")]
        steps = dict(db.execute("SELECT step, value FROM metrics WHERE name = 'rewards/reward_of_the_step/mean'"))
    assert len(warnings) == 2 and all(warning["source"] == "grpo_args.reward_functions[1]" and "did not return within 2 s"
                                      in warning["error"] and warning["chunk"] == 0 for warning in warnings)
    assert steps == {1: 0.0, 2: 1.0}, steps  # computed before each optimizer step
