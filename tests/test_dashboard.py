"""The dashboard's JSON API: views, ranking, and the token on every change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from finetune.config.loading import load_document
from finetune.dashboard.server import create_app, is_loopback
from finetune.plan.build import build_plan
from finetune.schedule.store import StateStore
from finetune.track.ranking import ranked_runs, ranking_metric
from tests.conftest import BASE_SFT

TOKEN = "secret-token"


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


def client(root: Path, reads_need_token: bool = False) -> TestClient:
    return TestClient(create_app(root, TOKEN, reads_need_token))


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


def test_stop_resume_delete_become_control_requests(tmp_path) -> None:
    root = experiment(tmp_path)
    run_id = client(root).get("/api/runs").json()["runs"][0]["run_id"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for action in ("stop", "resume", "delete"):
        assert client(root).post(f"/api/runs/{run_id}/{action}", headers=auth).status_code == 202
    assert [(kind, run) for _, kind, run, _ in requests_in(root)] == [("stop", run_id), ("resume", run_id), ("delete", run_id)]
    assert client(root).post(f"/api/runs/{run_id}/explode", headers=auth).status_code == 422
    assert client(root).post("/api/runs/nope/stop", headers=auth).status_code == 404


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
    assert client(root, reads_need_token=True).get("/api/runs").status_code == 401
    assert client(root, reads_need_token=True).get(f"/api/runs?token={TOKEN}").status_code == 200
    assert client(root, reads_need_token=True).get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
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
