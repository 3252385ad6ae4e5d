"""Rich views of an experiment's runs, read from its state store (live while it trains)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from finetune.schedule.folder import shown_state
from finetune.schedule.store import StateStore

STATE_STYLES = {"completed": "green", "running": "yellow", "failed": "red", "stopped": "magenta", "deleted": "dim",
                "interrupted": "red"}
SHOWN_METRICS = ("eval_loss", "loss", "reward")


def runs_table(store: StateStore, title: str, evaluated: tuple[str, ...] = (), controller_alive: bool = True) -> Table:
    """`evaluated`: metrics shown after the usual ones (the ranking metric, when it is another).
    `controller_alive`: whether a controller trains the experiment now (else running runs are interrupted)."""
    shown = tuple(dict.fromkeys([*SHOWN_METRICS, *evaluated]))
    table = Table(title=Text(title), title_justify="left")
    for column in ("run", "label", "chunks", "state", *shown):
        # ids and numbers are never cut or broken across lines (at 80 columns the label folds instead)
        table.add_column(column, justify="right" if column in shown or column == "chunks" else "left",
                         no_wrap=column != "label", overflow="fold" if column == "label" else "ellipsis",
                         min_width=10 if column == "run" else None)
    latest = _latest_train_metrics(store, shown)
    for row in store.runs():
        metrics = {**latest.get(row.run_id, {}), **row.latest_metrics}
        state = shown_state(row.state, controller_alive)
        style = STATE_STYLES.get(state, "")
        table.add_row(
            row.run_id,
            Text(row.label.replace(",", ", ")),  # a user's value, never markup; knob=value pairs wrap between pairs
            f"{row.chunks_done}/{row.total_chunks}",
            f"[{style}]{state}[/]" if style else state,
            *(f"{metrics[name]:.4f}" if name in metrics else "" for name in shown),
        )
    return table


def _latest_train_metrics(store: StateStore, shown: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The latest logged value of each shown metric but eval_loss (which every evaluated chunk holds)."""
    latest: dict[str, dict[str, float]] = {}
    for name in shown:
        if name == "eval_loss":
            continue
        for run_id, value in store.latest_metric(name).items():
            latest.setdefault(run_id, {})[name] = value
    return latest
