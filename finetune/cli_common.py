"""What the command-line modules share: consoles, exit codes, argument types, the experiment check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

# Emoji codes off: user values (paths, labels, metric names) are shown as written (`a:x:c` is not `a❌c`);
# markup is escaped or off wherever a user value is printed.
console = Console(emoji=False)
errors = Console(stderr=True, emoji=False)

EXIT_INVALID = 1
EXIT_UNUSABLE = 2

ConfigArg = Annotated[Path, typer.Argument(help="Config file: YAML, JSON, or a Helm values file with --values-key")]
ValuesKeyOpt = Annotated[
    Optional[str], typer.Option("--values-key", help="Read the config from this dotted key of a Helm values file")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a value: key.path=value (YAML value; knobs allowed). Repeatable."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
CheckOpt = Annotated[bool, typer.Option("--check", help="Fail if the committed files differ from the generated ones")]

ExperimentArg = Annotated[Path, typer.Argument(help="The experiment directory (experiment.output_dir/experiment.name)")]


def say_error(message: str, label: str = "error") -> None:
    """One problem on stderr: the label in red, the message exactly as written (never read as markup)."""
    errors.print(f"[red]{escape(label)}:[/] {escape(message)}", highlight=False, soft_wrap=True)


def exit_with(message: str, code: int, label: str = "error") -> NoReturn:
    say_error(message, label)
    raise typer.Exit(code)


def experiment_or_exit(experiment: Path) -> Path:
    if (experiment / "state.db").exists():
        return experiment
    inside = sorted({path.parent for pattern in ("*/state.db", "*/*/state.db") for path in experiment.glob(pattern)})
    if inside:
        shown = ", ".join(map(str, inside[:5])) + (f" and {len(inside) - 5} more" if len(inside) > 5 else "")
        exit_with(f"{experiment} is not an experiment directory, but holds experiments: {shown}", EXIT_UNUSABLE)
    if (experiment / "plan.json").is_file() or any((experiment / "runs").glob("*/chunk-*")):
        exit_with(f"{experiment / 'state.db'} is missing, but {experiment} holds an experiment's plan or runs: "
                  "restore it from a backup, or train again in a new folder", EXIT_UNUSABLE)
    exit_with(f"{experiment} is not an experiment directory (no state.db)", EXIT_UNUSABLE)


class UnknownRun(KeyError):
    """A run id that names no run, or several; the message lists what it could be."""

    def __str__(self) -> str:
        return str(self.args[0])


def resolve_run_id(given: str, runs: dict[str, str], experiment: Path) -> str:
    """The run `given` names: its id, or (as git's commits) an unambiguous prefix of it. `runs`: id -> label."""
    if given in runs:
        return given
    matches = [run_id for run_id in runs if run_id.startswith(given)] if given else []
    if len(matches) == 1:
        return matches[0]
    listed = matches or list(runs)
    shown = ", ".join(f"{run_id} ({runs[run_id]})" if runs[run_id] else run_id for run_id in listed[:8])
    shown += f" and {len(listed) - 8} more" if len(listed) > 8 else ""
    if matches:
        raise UnknownRun(f"{given!r} is the start of {len(matches)} runs of {experiment}: {shown}; give more of the id")
    raise UnknownRun(f"{experiment} has no run {given!r}; its runs: {shown or 'none'} (see `finetune status {experiment}`)")


def run_id_or_exit(experiment: Path, given: str) -> str:
    """`resolve_run_id` over the runs of the experiment's plan (clones included); exit 1 with the list."""
    from finetune.schedule.folder import read_plan

    plan = read_plan(experiment)
    try:
        return resolve_run_id(given, {run.run_id: run.label for run in plan.runs}, experiment)
    except UnknownRun as unknown:
        exit_with(str(unknown), EXIT_INVALID)
