"""`finetune report` beyond the ranking: each run's time, training speed and knob values, readable decisions."""

from __future__ import annotations

from finetune.schedule.store import StateStore
from finetune.track.report import report_markdown
from tests.test_dashboard_runs import rich_experiment, run_ids


def section(report: str, title: str) -> list[str]:
    lines = report.splitlines()
    start = lines.index(title)
    end = next((index for index in range(start + 1, len(lines)) if lines[index].startswith("## ")), len(lines))
    return [line for line in lines[start:end] if line.startswith("| `")]


def test_each_run_has_its_time_speed_and_every_knob_in_rank_order(tmp_path) -> None:
    root = rich_experiment(tmp_path)
    first, second = run_ids(root)[:2]
    store = StateStore(root / "state.db")
    store.record_chunk(first, 1, 4, str(root / "c"), {"eval_loss": 0.5}, 90.0, 60.0, 20.0)
    store.event("chunk_done", first, chunk=0, step=2, seconds=1.0, step_seconds=0.5, tokens=999)  # the chunk trained again below
    store.event("chunk_done", first, chunk=0, step=2, seconds=1.0, step_seconds=0.5, tokens=1000)
    store.event("chunk_done", first, chunk=1, step=4, seconds=90.0, step_seconds=60.0, tokens=59500)
    store.event("chunk_done", second, chunk=0, step=2, seconds=1.0, step_seconds=0.5)  # a worker that counted no tokens
    ranked = [row.run_id for row in store.runs()]
    store.close()
    report = report_markdown(root)
    header = next(line for line in report.splitlines() if line.startswith("| run | time |"))
    assert header == "| run | time | tokens/s | `peft_conf.peft_kwargs.r` | `training_args.learning_rate` |"
    rows = {line.split("`")[1]: line.split(" | ") for line in section(report, "## Runs: time, speed and knobs")}
    assert set(rows) == set(ranked)
    assert rows[first][1:3] == ["1 min 31 s", "1,000"]  # 1 + 90 s on workers; (1000 + 59500) tokens / 60.5 s of steps
    assert rows[second][1:3] == ["1.0 s", ""]
    planned = {run_id: line[3:] for run_id, line in rows.items()}
    assert len({tuple(values) for values in planned.values()}) == 6  # every run's knob values, all different
    order = [line.split("`")[1] for line in section(report, "## Runs: time, speed and knobs")]
    ranking = [line.split("`")[1] for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert order == ranking


def test_without_token_counts_the_speed_column_is_left_out_saying_why(tmp_path) -> None:
    report = report_markdown(rich_experiment(tmp_path))
    assert "| run | time | `peft_conf.peft_kwargs.r` | `training_args.learning_rate` |" in report
    assert "Tokens/s is not shown: the workers of this experiment did not count tokens." in report


def test_decisions_show_numbers_people_read(tmp_path) -> None:
    root = rich_experiment(tmp_path)
    store = StateStore(root / "state.db")
    store.event("sha_stop", run_ids(root)[3], rung=2, metric="eval_loss", value=0.10638758708611648, cutoff=0.1, seen=5)
    store.close()
    assert "rung=2, metric=eval_loss, value=0.1064, cutoff=0.1, seen=5" in report_markdown(root)
