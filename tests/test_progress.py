"""Issue 31, items 2 and 3 without training: step reports, the plain log, the terminal bars, the
state of runs whose controller is gone, and what an interrupt says."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import pytest
from rich.console import Console

from finetune.train.progress import StepReport
from finetune.schedule.progress import PlainLog, TerminalProgress, number, progress_view
from finetune.schedule.store import StateStore
from finetune.train.progress import StepMeter, batch_tokens


def store_with_runs(root: Path, *runs: tuple[str, int]) -> StateStore:
    store = StateStore(root / "state.db", create=True)
    for run_id, chunks in runs:
        store.add_run(run_id, f"label-{run_id}", chunks)
    return store


def test_a_step_meter_counts_tokens_and_reports_at_most_once_a_second(monkeypatch) -> None:
    import torch

    clock = iter([0.0, 0.1, 0.5, 0.9, 1.2, 1.3, 1.4])
    monkeypatch.setattr("finetune.train.progress.time.perf_counter", lambda: next(clock))
    reports = []
    meter = StepMeter(reports.append, "r", chunk=1, chunk_start=10, chunk_end=15, total_steps=20, device="cpu")
    batch = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])}
    for step in range(11, 16):
        meter(step, [batch, batch])
    assert meter.tokens == 5 * 2 * 13
    # the first step at once, then a second later, and the chunk's last step always
    assert [report.step for report in reports] == [11, 14, 15]
    assert reports[-1].tokens == meter.tokens and reports[-1].chunk_start == 10 and reports[-1].total_steps == 20


def test_batch_tokens_counts_each_sequence_of_a_preference_batch_and_padding_free_rows() -> None:
    import torch

    assert batch_tokens({"chosen_input_ids": torch.ones(2, 4), "chosen_attention_mask": torch.ones(2, 4),
                         "rejected_input_ids": torch.ones(2, 3), "rejected_attention_mask": torch.ones(2, 3)}) == 14
    assert batch_tokens({"input_ids": torch.ones(1, 30), "position_ids": torch.arange(30)[None]}) == 30
    assert batch_tokens([{"prompt": "no ids"}]) == 0


def test_the_plain_log_says_each_finished_chunk_and_each_decision_once(tmp_path) -> None:
    store = store_with_runs(tmp_path, ("aaaa", 4), ("bbbb", 4))
    out = io.StringIO()
    log = PlainLog(Console(file=out, width=80), store, "exp on cpu")
    store.log_metrics("aaaa", 16, {"loss": 2.3456789})
    store.event("chunk_started", "aaaa", chunk=0)
    store.event("chunk_done", "aaaa", chunk=0, step=16, metrics={"eval_loss": 2.1234567, "eval_runtime": 3.0},
                seconds=10.0, step_seconds=8.0, eval_seconds=2.0, tokens=4000)
    store.event("sha_stop", "bbbb", rung=1, metric="eval_loss", value=3.2500000000000004, cutoff=2.2)
    log.refresh()
    log.refresh()  # nothing new: nothing said twice
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].endswith("exp on cpu: 2 run(s), 8 chunk(s)")
    assert lines[1].endswith("aaaa chunk 1/4: step 16, 10.0s, 500 tokens/s; loss=2.346 eval_loss=2.123")
    assert lines[2].endswith("bbbb sha stop: rung=1, metric=eval_loss, value=3.25, cutoff=2.2")
    assert "chunk_started" not in out.getvalue() and "eval_runtime" not in out.getvalue()


def test_a_plain_log_of_a_resume_tells_only_what_happens_now(tmp_path) -> None:
    store = store_with_runs(tmp_path, ("aaaa", 2))
    store.event("chunk_done", "aaaa", chunk=0, step=4, metrics={}, seconds=1.0, step_seconds=1.0, tokens=0)
    store.record_chunk("aaaa", 0, 4, str(tmp_path / "c0"), {}, 1.0, 1.0, 0.0, 0.0, 1.0)
    out = io.StringIO()
    log = PlainLog(Console(file=out, width=200), store, "exp")
    log.refresh()
    assert out.getvalue().count("\n") == 1 and "2 chunk(s), 1 already saved" in out.getvalue()


def test_a_terminal_shows_a_bar_per_run_with_speed_memory_and_time_left(tmp_path) -> None:
    store = store_with_runs(tmp_path, ("aaaa", 4))
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    view = progress_view(console, store, "exp")
    assert isinstance(view, TerminalProgress)
    assert isinstance(progress_view(Console(file=io.StringIO()), store, "exp"), PlainLog)
    view.on_progress(StepReport("aaaa", 1, 24, 16, 32, 64, tokens=12000, seconds=4.0, memory=3 * 2**30, total_memory=80 * 2**30))
    console.print(view.renderable())
    shown = console.file.getvalue()
    assert "aaaa" in shown and "24/64" in shown and "2.00 it/s" in shown and "3,000 tok/s" in shown
    assert "3.0 GiB/80.0 GiB" in shown


def test_numbers_are_short() -> None:
    assert number(0.30000000000000004) == "0.3" and number(1.0) == "1" and number(3) == "3"
    assert number(1.234567e-05) == "1.235e-05" and number("x") == "x"


def test_a_running_run_whose_controller_is_gone_is_shown_interrupted(tmp_path) -> None:
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.schedule.folder import ExperimentLock

    store = store_with_runs(tmp_path, ("aaaa", 4), ("bbbb", 4))
    store.set_state("aaaa", "running")
    store.close()
    (tmp_path / "plan.json").write_text(
        '{"experiment": "e", "output_dir": ".", "source": "x.yaml", "num_chunks": 4, "sweeps": [], "runs": []}')
    runner = CliRunner()
    gone = runner.invoke(app, ["status", str(tmp_path), "--json"])
    states = {row["run_id"]: row["shown_state"] for row in __import__("json").loads(gone.stdout)}
    assert states == {"aaaa": "interrupted", "bbbb": "pending"}
    with ExperimentLock(tmp_path):  # a live controller: it is running
        live = runner.invoke(app, ["status", str(tmp_path), "--json"])
    assert {row["run_id"]: row["shown_state"] for row in __import__("json").loads(live.stdout)}["aaaa"] == "running"


def test_what_an_interrupt_and_a_resume_say() -> None:
    from finetune.schedule.interrupts import Interrupted, interrupted_message, resume_command, resume_summary
    from finetune.schedule.store import RunRow

    def row(run_id, state, done):
        return RunRow(run_id, "", 0, state, 4, done, None, {}, None, None, None)

    runs = [row("a", "completed", 4), row("b", "pending", 1), row("c", "running", 0), row("d", "failed", 0)]
    message = interrupted_message(signal.SIGINT, Path.cwd() / "runs" / "x", runs)
    assert message == ("stopped by Ctrl-C (SIGINT): 5 of 16 chunks saved (1 run(s) completed) in "
                       f"{Path.cwd() / 'runs' / 'x'}; resume with: finetune run --resume runs/x")
    assert "before any chunk was saved" in interrupted_message(signal.SIGTERM, Path("/x"), [row("a", "pending", 0)])
    assert resume_command(Path("/elsewhere/exp")) == "finetune run --resume /elsewhere/exp"
    assert resume_summary(runs) == "5 of 16 chunks saved (1 run(s) completed); continuing 2 run(s) (1 completed, 1 failed)"
    assert Interrupted(signal.SIGINT, "").exit_code == 130 and Interrupted(signal.SIGTERM, "").exit_code == 143


def test_the_controller_winding_down_dispatches_nothing_and_ends_when_idle() -> None:
    from finetune.schedule.interrupts import Interrupts

    interrupts = Interrupts()
    with pytest.raises(Exception) as raised:  # before the loop: at once
        interrupts.handle(signal.SIGINT, None)
    assert type(raised.value).__name__ == "Interrupted"
    interrupts.handle(signal.SIGINT, None)  # a second one while the first unwinds: not raised again
    interrupts = Interrupts()
    interrupts.winding_down = True
    interrupts.handle(signal.SIGTERM, None)
    assert interrupts.requested and not interrupts.give_up()
    interrupts.handle(signal.SIGTERM, None)  # a second signal: abandon now
    assert interrupts.give_up()
