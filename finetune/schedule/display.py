"""Rich views of an experiment's runs, read from its state store (live while it trains)."""

from __future__ import annotations

from rich.table import Table

from finetune.schedule.store import StateStore

STATE_STYLES = {"completed": "green", "running": "yellow", "failed": "red", "stopped": "magenta", "deleted": "dim"}
SHOWN_METRICS = ("eval_loss", "loss", "reward")


def runs_table(store: StateStore, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("run", "label", "chunks", "state", *SHOWN_METRICS):
        table.add_column(column, justify="right" if column in SHOWN_METRICS or column == "chunks" else "left")
    latest = _latest_train_metrics(store)
    for row in store.runs():
        metrics = {**latest.get(row.run_id, {}), **row.latest_metrics}
        style = STATE_STYLES.get(row.state, "")
        table.add_row(
            row.run_id,
            row.label,
            f"{row.chunks_done}/{row.total_chunks}",
            f"[{style}]{row.state}[/]" if style else row.state,
            *(f"{metrics[name]:.4f}" if name in metrics else "" for name in SHOWN_METRICS),
        )
    return table


def _latest_train_metrics(store: StateStore) -> dict[str, dict[str, float]]:
    latest: dict[str, dict[str, float]] = {}
    for name in ("loss", "reward"):
        for run_id, value in store.latest_metric(name).items():
            latest.setdefault(run_id, {})[name] = value
    return latest
