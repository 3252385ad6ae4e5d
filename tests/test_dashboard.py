"""The dashboard's JSON API: views, ranking, and the token on every change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from finetune.config.loading import load_document
from finetune.dashboard.server import MAX_BODY, create_app, host_name, is_loopback
from finetune.plan.build import build_plan
from finetune.schedule.folder import ExperimentLock
from finetune.schedule.store import StateStore
from finetune.track.ranking import ranked_runs, ranking_metric
from tests.conftest import BASE_SFT

TOKEN = "secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def experiment(tmp_path: Path, method: str = "sft", **sections) -> Path:
    tree = {**json.loads(json.dumps(BASE_SFT)), "method": method, **sections}
    tree["training_args"] = {**tree["training_args"], "learning_rate": {"$list": [1e-4, 3e-4, 1e-3]}}
    if method == "grpo":
        tree["grpo_args"] = {"reward_functions": ["format_chat"]}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tree))
    plan = build_plan(load_document(config))
    root = tmp_path / "exp"
    root.mkdir()
    (root / "plan.json").write_text(plan.model_dump_json())
    store = StateStore(root / "state.db")
    for index, run in enumerate(plan.runs):
        store.add_run(run.run_id, run.label, 4)
        store.record_chunk(run.run_id, 0, 2, str(root / "c"), {"eval_loss": 3.0 - index}, 1.0, 0.5, 0.1)
        store.log_metrics(run.run_id, 1, {"loss": 5.0 - index, "reward": float(index)})
        store.log_metrics(run.run_id, 2, {"loss": 4.0 - index, "reward": float(index) + 0.5})
    store.close()
    return root


def client(root: Path, host: str = "127.0.0.1", via: str | None = None) -> TestClient:
    """A client of the dashboard bound to `host`, asking for Host `via` (the bound address by default)."""
    shown = via or (f"[{host}]" if ":" in host else host)
    return TestClient(create_app(root, TOKEN, host), base_url=f"http://{shown}:8765", raise_server_exceptions=False)


def remote(root: Path) -> TestClient:
    """Bound to every address: reads need the token too."""
    return client(root, "0.0.0.0", via="192.0.2.7")


def requests_in(root: Path) -> list:
    store = StateStore(root / "state.db")
    try:
        return store.pending_requests()
    finally:
        store.close()


def test_runs_view_has_state_chunks_knobs_metrics_and_rank(tmp_path) -> None:
    root = experiment(tmp_path)
    body = client(root).get("/api/runs").json()
    assert body["metric"] == "eval_loss" and body["direction"] == "minimize"
    runs = body["runs"]
    assert [run["rank"] for run in runs] == [1, 2, 3]
    assert [run["latest"]["eval_loss"] for run in runs] == [1.0, 2.0, 3.0]  # best first
    assert all(run["chunks_done"] == 1 and run["total_chunks"] == 4 and run["state"] == "pending" for run in runs)
    assert all("training_args.learning_rate" in run["knobs"] for run in runs)
    assert runs[0]["latest"]["loss"] == 2.0


def test_curves_and_events_are_json_for_scripts(tmp_path) -> None:
    root = experiment(tmp_path)
    curves = client(root).get("/api/curves").json()
    assert set(curves) == {"loss", "reward"} and all(len(points) == 2 for points in curves["loss"].values())
    assert client(root).get("/api/events").json() == []


def test_grpo_runs_are_ranked_by_mean_reward(tmp_path) -> None:
    root = experiment(tmp_path, method="grpo")
    body = client(root).get("/api/runs").json()
    assert (body["metric"], body["direction"]) == ("reward", "maximize")
    assert [run["value"] for run in body["runs"]] == [2.5, 1.5, 0.5]


@pytest.mark.parametrize("headers,status", [({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": "Basic x"}, 401)])
def test_changes_without_the_token_are_refused_and_change_nothing(tmp_path, headers, status) -> None:
    root = experiment(tmp_path)
    run_id = client(root).get("/api/runs").json()["runs"][0]["run_id"]
    assert client(root).post(f"/api/runs/{run_id}/stop", headers=headers).status_code == status
    assert client(root).post(f"/api/runs/{run_id}/clone", headers=headers, json={"set": {}}).status_code == status
    assert client(root).post(f"/api/runs/{run_id}/stop?token={TOKEN}").status_code == 401  # a token in the URL is not enough to change
    assert requests_in(root) == []


def set_state(root: Path, run_id: str, state: str) -> None:
    store = StateStore(root / "state.db")
    store.set_state(run_id, state, "boom" if state == "failed" else None)
    store.close()


def test_control_requests_follow_the_runs_state(tmp_path) -> None:
    root = experiment(tmp_path)
    pending, failed, stopped = (run["run_id"] for run in client(root).get("/api/runs").json()["runs"])
    set_state(root, failed, "failed")
    set_state(root, stopped, "stopped")
    post = lambda run_id, action: client(root).post(f"/api/runs/{run_id}/{action}", headers=AUTH)  # noqa: E731
    assert post(pending, "stop").status_code == 202
    refused = post(pending, "resume")
    assert refused.status_code == 422 and "is pending" in refused.json()["problems"][0]["message"]
    assert "retry" in post(failed, "resume").json()["problems"][0]["message"]  # the hint names the request that does it
    assert post(stopped, "retry").status_code == 422
    accepted = post(failed, "retry")
    assert accepted.status_code == 202 and accepted.json() == {"request_id": accepted.json()["request_id"], "live": False}
    assert post(stopped, "resume").status_code == 202 and post(stopped, "delete").status_code == 202
    assert [(kind, run) for _, kind, run, _ in requests_in(root)] == [
        ("stop", pending), ("retry", failed), ("resume", stopped), ("delete", stopped)]
    assert post(pending, "explode").status_code == 422
    unknown = post("nope", "stop")
    assert unknown.status_code == 404 and unknown.json() == {"error": "no run nope"}


def test_the_answer_says_a_live_controller_applies_the_request(tmp_path) -> None:
    root = experiment(tmp_path)
    run_id = client(root).get("/api/runs").json()["runs"][0]["run_id"]
    lock = ExperimentLock(root)
    lock.acquire()
    try:
        assert client(root).post(f"/api/runs/{run_id}/stop", headers=AUTH).json()["live"] is True
    finally:
        lock.release()


def test_each_run_lists_the_requests_its_state_accepts(tmp_path) -> None:
    root = experiment(tmp_path)
    run_ids = [run["run_id"] for run in client(root).get("/api/runs").json()["runs"]]
    for run_id, state in zip(run_ids, ("failed", "stopped", "completed")):
        set_state(root, run_id, state)
    actions = {run["state"]: run["actions"] for run in client(root).get("/api/runs").json()["runs"]}
    assert actions == {"failed": ["retry", "delete", "clone"], "stopped": ["resume", "delete", "clone"],
                       "completed": ["delete", "clone"]}


def test_a_clone_is_validated_before_it_is_accepted(tmp_path) -> None:
    root = experiment(tmp_path)
    run_id = client(root).get("/api/runs").json()["runs"][0]["run_id"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = client(root).post(f"/api/runs/{run_id}/clone", headers=auth, json={"set": {"training_args.learning_rate": "-1", "peft_conf.peft_kwargs.r": "8"}})
    assert bad.status_code == 422
    assert [problem["path"] for problem in bad.json()["problems"]] == ["training_args.learning_rate"]
    assert requests_in(root) == []
    good = client(root).post(f"/api/runs/{run_id}/clone", headers=auth, json={"set": {"training_args.learning_rate": "2e-3"}, "warm_start": True})
    assert good.status_code == 202
    ((_, kind, parent, payload),) = requests_in(root)
    assert (kind, parent, payload) == ("clone", run_id, {"set": ["training_args.learning_rate=2e-3"], "warm_start": True})


def test_reads_need_the_token_when_bound_beyond_loopback(tmp_path) -> None:
    root = experiment(tmp_path)
    assert remote(root).get("/api/runs").status_code == 401
    assert remote(root).get(f"/api/runs?token={TOKEN}").status_code == 200
    assert remote(root).get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client(root).get("/api/runs").status_code == 200
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_the_page_and_its_script_are_served_with_no_outside_address(tmp_path) -> None:
    root = experiment(tmp_path)
    page = client(root).get("/").text
    script = client(root).get("/static/app.js").text
    assert "/static/app.js" in page and "fetch(" in script
    assert "http" not in page.replace('xmlns="http://www.w3.org', "") and "cdn" not in (page + script).lower()


def test_report_and_dashboard_rank_alike(tmp_path) -> None:
    from finetune.plan.model import RunPlan
    from finetune.track.report import report_markdown

    root = experiment(tmp_path, method="grpo")
    plan = RunPlan.model_validate_json((root / "plan.json").read_text())
    store = StateStore(root / "state.db")
    order = [entry.row.run_id for entry in ranked_runs(store, plan)]
    store.close()
    assert ranking_metric(plan) == ("reward", "maximize")
    report = report_markdown(root)
    assert "Ranked by `reward` (maximize)" in report
    assert [line.split("`")[1] for line in report.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ") or line.startswith("| 3 ")] == order


# ---------------------------------------------------------------- bad input is never a 500


def clone_of(root: Path, content: bytes | Iterator[bytes], headers: dict[str, str] | None = None):
    run_id = client(root).get("/api/runs").json()["runs"][0]["run_id"]
    return client(root).post(f"/api/runs/{run_id}/clone", content=content, headers={**AUTH, **(headers or {})})


@pytest.mark.parametrize("content,says", [
    (b"{not json", "not JSON"), (b"", "not JSON"), (b"\xff\xfe\x00", "not JSON"), (b"[1, 2]", "JSON array"),
    (b'"text"', "JSON string"), (b"null", "JSON null"), (b"[" * 50_000, "nested too deeply"),
    (b'{"set": ' + b"[" * 50_000, "nested too deeply"),
])
def test_a_body_that_is_not_a_json_object_is_400_with_a_message(tmp_path, content, says) -> None:
    root = experiment(tmp_path)
    answer = clone_of(root, content)
    assert answer.status_code == 400 and says in answer.json()["error"]
    assert requests_in(root) == []


@pytest.mark.parametrize("body,path", [
    ({"set": ["training_args.learning_rate=1"]}, "set"), ({"set": {}, "warm_start": "no"}, "warm_start"),
    ({"sett": {}}, "sett"), ({"set": {"training_args.learning_rate=2e-4": "x"}}, "training_args.learning_rate=2e-4"),
    ({"set": {"training_args.²": 1}}, "training_args.²"),
])
def test_a_clone_body_of_the_wrong_shape_is_422_naming_the_field(tmp_path, body, path) -> None:
    root = experiment(tmp_path)
    answer = clone_of(root, json.dumps(body).encode())
    assert answer.status_code == 422 and path in [problem["path"] for problem in answer.json()["problems"]]


def test_a_body_past_the_limit_is_413_declared_or_streamed(tmp_path) -> None:
    root = experiment(tmp_path)
    big = b'{"set": {"a": "' + b"x" * MAX_BODY + b'"}}'
    assert clone_of(root, big).status_code == 413
    streamed = clone_of(root, iter([big[:1000], big[1000:]]))  # chunked: no Content-Length
    assert streamed.status_code == 413 and "larger than" in streamed.json()["error"]
    assert client(root).post("/api/runs/x/stop", headers={**AUTH, "Content-Length": "999999999"}).status_code == 413


@pytest.mark.parametrize("token", ["sécret", "\udcff", "🙂"])
def test_a_non_ascii_token_is_wrong_not_an_error(tmp_path, token) -> None:
    root = experiment(tmp_path)
    raw = token.encode("utf-8", "surrogateescape")
    assert client(root).post("/api/runs/x/stop", headers={"Authorization": b"Bearer " + raw}).status_code == 403
    assert remote(root).get(f"/api/runs?token={quote_from_bytes(raw)}").status_code == 403


JSON = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4),
                    max_leaves=12)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries({}, optional={"set": st.dictionaries(st.sampled_from(["training_args.learning_rate", "peft_conf.peft_kwargs.r",
                                                                               "experiment.name", "a.0", ""]) | st.text(max_size=30), JSON,
                                                               max_size=3),
                                        "warm_start": JSON, "other": JSON}).map(lambda value: json.dumps(value).encode()),
)


def is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


def test_any_clone_body_is_answered_without_a_server_error(tmp_path) -> None:
    root = experiment(tmp_path)
    app = client(root)
    run_id = app.get("/api/runs").json()["runs"][0]["run_id"]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=BODIES)
    def answered(body: bytes) -> None:
        answer = app.post(f"/api/runs/{run_id}/clone", content=body, headers=AUTH)
        assert answer.status_code in ((202, 422) if is_json_object(body) else (400,)), (answer.status_code, answer.text)
        assert set(answer.json()) in ({"request_id", "live"}, {"error"}, {"problems"})

    answered()


def test_any_authorization_or_host_header_is_answered_without_a_server_error(tmp_path) -> None:
    root = experiment(tmp_path)
    app = client(root)
    header = st.binary(max_size=40).filter(lambda raw: not set(raw) & set(b"\r\n\x00"))
    scheme = st.sampled_from([b"", b"Bearer ", b"bearer ", b"Basic "])

    @settings(max_examples=150, deadline=None)
    @given(authorization=st.tuples(scheme, header).map(b"".join),
           host=header | st.sampled_from([b"localhost:8765", b"[::1]", b"127.0.0.1"]))
    def answered(authorization: bytes, host: bytes) -> None:
        for method, path in (("GET", "/api/runs"), ("POST", "/api/runs/x/stop")):
            answer = app.request(method, path, headers={"Authorization": authorization, "Host": host})
            assert answer.status_code in (200, 400, 401, 403, 404, 421), (answer.status_code, answer.text)

    answered()


# ---------------------------------------------------------------- the Host check


@pytest.mark.parametrize("host", ["localhost:8765", "127.0.0.1:8765", "[::1]:8765", "LocalHost", "127.0.0.1"])
def test_loopback_answers_to_its_own_names(tmp_path, host) -> None:
    root = experiment(tmp_path)
    assert client(root).get("/api/runs", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example:8765", "testserver", "127.0.0.1.evil.example", "localhost@evil", "[::1", ""])
def test_loopback_refuses_other_host_names_against_dns_rebinding(tmp_path, host) -> None:
    root = experiment(tmp_path)
    for path in ("/", "/api/runs", "/static/app.js"):
        answer = client(root).get(path, headers={"Host": host})
        assert answer.status_code == 421 and "finetune dashboard" in answer.json()["error"]
    assert client(root).post("/api/runs/x/stop", headers={**AUTH, "Host": host}).status_code == 421


def test_off_loopback_any_name_reaches_the_server_and_the_token_guards_it(tmp_path) -> None:
    root = experiment(tmp_path)
    assert client(root, "0.0.0.0", via="gpu-box.lan").get("/api/runs").status_code == 401
    assert client(root, "0.0.0.0", via="gpu-box.lan").get(f"/api/runs?token={TOKEN}").status_code == 200
    assert host_name("[::1]:80") == "::1" and host_name("Box:1") == "box" and host_name("a:b") is None


# ---------------------------------------------------------------- damaged experiments are 503, not 500


@pytest.mark.parametrize("damage", ["plan", "state-garbage", "state-truncated"])
def test_a_damaged_experiment_file_is_a_503_with_its_one_line_message(tmp_path, damage) -> None:
    root = experiment(tmp_path)
    run_id = client(root).get("/api/runs").json()["runs"][0]["run_id"]
    store = StateStore(root / "state.db")
    for step in range(3, 400):  # enough pages that a truncated file loses some
        store.log_metrics(run_id, step, {"loss": 1.0})
    store.close()
    if damage == "plan":
        (root / "plan.json").write_text("{")
    else:
        db = root / "state.db"
        db.write_bytes(b"garbage" * 100 if damage == "state-garbage" else db.read_bytes()[: db.stat().st_size // 2])
    for answer in (client(root).get("/api/runs"), client(root).get("/api/curves"), client(root).post(f"/api/runs/{run_id}/stop", headers=AUTH)):
        assert answer.status_code == 503, answer.text
        message = answer.json()["error"]
        assert ("plan.json" if damage == "plan" else "state.db") in message and "\n" not in message


def test_infinite_metrics_and_unreadable_tracking_are_shown_not_errors(tmp_path) -> None:
    root = experiment(tmp_path)
    run_id = client(root).get("/api/runs").json()["runs"][0]["run_id"]
    store = StateStore(root / "state.db")
    store.log_metrics(run_id, 3, {"loss": float("inf")})
    store.record_chunk(run_id, 1, 4, str(root / "c"), {"eval_loss": float("nan")}, 1.0, 0.5, 0.1)
    store.close()
    (root / "tracking.json").write_text("[not json")
    runs = client(root).get("/api/runs")
    assert runs.status_code == 200
    latest = next(run["latest"] for run in runs.json()["runs"] if run["run_id"] == run_id)
    assert latest["loss"] is None and latest["eval_loss"] is None and runs.json()["mlflow"]["uri"] == ""
    assert client(root).get("/api/curves").json()["loss"][run_id][-1] == [3, None]


def test_a_run_left_running_by_a_controller_that_is_gone_is_interrupted(tmp_path) -> None:
    """Issue 31: after a kill the page said "running", with a stop button that nothing would apply."""
    root = experiment(tmp_path)
    run_id = client(root).get("/api/runs").json()["runs"][0]["run_id"]
    set_state(root, run_id, "running")
    gone = next(run for run in client(root).get("/api/runs").json()["runs"] if run["run_id"] == run_id)
    assert gone["state"] == "interrupted" and gone["actions"] == ["stop", "delete", "clone"]  # as a pending run
    with ExperimentLock(root):
        live = next(run for run in client(root).get("/api/runs").json()["runs"] if run["run_id"] == run_id)
    assert live["state"] == "running"
