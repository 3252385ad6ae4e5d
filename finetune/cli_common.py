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
    if (experiment / "plan.json").is_file() or (experiment / "runs").is_dir():
        exit_with(f"{experiment / 'state.db'} is missing, but {experiment} holds an experiment's plan or runs: "
                  "restore it from a backup, or train again in a new folder", EXIT_UNUSABLE)
    exit_with(f"{experiment} is not an experiment directory (no state.db)", EXIT_UNUSABLE)
