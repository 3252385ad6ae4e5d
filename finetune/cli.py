"""The `finetune` command line.

Commands that train nothing (validate, plan, schema, schema-docs, status) keep torch,
transformers, trl and mlflow out of their import path, so that they answer in about a
second: heavy modules are imported inside the commands that train.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, NoReturn, Optional

import typer
from rich.markup import escape

from finetune.cli_common import (
    EXIT_INVALID,
    EXIT_UNUSABLE,
    ConfigArg,
    ExperimentArg,
    JsonOpt,
    SetOpt,
    ValuesKeyOpt,
    console,
    errors,
    exit_with,
    experiment_or_exit,
    say_error,
)
from finetune.cli_experiment import chat, ctl_app, dashboard, export
from finetune.cli_tools import demo_app, schema, schema_docs
from finetune.config import ConfigLoadError, SourceDoc, load_document, validate_document

if TYPE_CHECKING:
    from finetune.plan.model import RunPlan

class _App(typer.Typer):
    """The installed `finetune` script calls the app itself (`finetune.cli:app`), not `main`: an experiment's
    damaged or unusable files are one line there too, whichever entry point runs."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        with unusable_files_said():
            return super().__call__(*args, **kwargs)


app = _App(
    help="Declarative fine-tuning sweeps (SFT, DPO, GRPO) trained concurrently with a chunk scheduler.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: flags without typer's "<bool>", and it reads the same in a log
)


def _print_version(wanted: bool) -> None:
    if wanted:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("finetune")
        except PackageNotFoundError:
            number = "unknown (not installed)"
        console.print(f"finetune {number}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit")] = False,
) -> None:
    """Declarative fine-tuning sweeps (SFT, DPO, GRPO) trained concurrently with a chunk scheduler."""


def load_or_exit(config: Path, values_key: str | None, overrides: list[str] | None, as_json: bool) -> SourceDoc:
    """The loaded config; legacy keys read under their new names are noted on stderr (not with --json)."""
    try:
        doc = load_document(config, values_key=values_key, overrides=overrides)
    except ConfigLoadError as error:
        if as_json:
            console.print_json(json.dumps({"valid": False, "usable": False, "error": str(error)}))
        else:
            say_error(str(error))
        raise typer.Exit(EXIT_UNUSABLE) from None
    if not as_json:
        for notice in doc.notices:
            errors.print(f"[yellow]note:[/] {escape(notice)}", highlight=False, soft_wrap=True)
    return doc


@app.command()
def validate(
    config: ConfigArg, values_key: ValuesKeyOpt = None, set_: SetOpt = None, as_json: JsonOpt = False
) -> None:
    """Check a config, knobs and all. Exit 0 valid, 1 invalid, 2 unusable call."""
    doc = load_or_exit(config, values_key, set_, as_json)
    issues = validate_document(doc)
    warnings = [] if issues else resource_warnings(doc)
    report_issues(config, issues, as_json, doc.notices, warnings)
    if not issues and not as_json:
        for warning in warnings:
            errors.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        some = f" ({len(warnings)} warning(s): `finetune plan` and `run` refuse them)" if warnings else ""
        console.print(f"[green]✓[/] {escape(str(config))} is valid{some}", highlight=False)
    if issues:
        raise typer.Exit(EXIT_INVALID)


def resource_warnings(doc: SourceDoc) -> list[str]:
    """Missing data files, a model path that does not exist: warnings for `validate` (which reads no data,
    and may run on another machine than the one that trains)."""
    from finetune.plan.build import build_plan
    from finetune.plan.resources import plan_resource_lines

    try:
        return plan_resource_lines(build_plan(doc, train_examples=lambda config: None))
    except Exception:  # what only planning finds is `plan`'s to say
        return []


def build_plan_or_exit(doc: SourceDoc, config: Path, as_json: bool) -> RunPlan:
    from finetune.config import ConfigInvalid
    from finetune.plan.build import PlanError, build_plan

    try:
        return build_plan(doc)
    except ConfigInvalid as invalid:
        report_issues(config, invalid.issues, as_json)
    except PlanError as error:
        if as_json:
            console.print_json(json.dumps({"valid": False, "errors": [{"message": str(error)}]}))
        else:
            say_error(str(error), f"✗ cannot plan {config}")
    raise typer.Exit(EXIT_INVALID)


def refuse_missing_resources(run_plan: RunPlan, config: Path, as_json: bool) -> None:
    """Missing data files, unreadable first records, a model that is neither here nor a hub id to be had: exit 1."""
    from finetune.plan.resources import plan_resource_lines

    lines = plan_resource_lines(run_plan)
    if not lines:
        return
    if as_json:
        console.print_json(json.dumps({"valid": False, "errors": [{"message": line} for line in lines]}))
    else:
        errors.print(f"[red]✗ {len(lines)} problem(s) in {escape(str(config))}, found before any work:[/]", highlight=False, soft_wrap=True)
        for line in lines:
            errors.print(line, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_INVALID)


def report_issues(config: Path, issues: list, as_json: bool, notices: list[str] | None = None,
                  warnings: list[str] | None = None) -> None:
    if as_json:
        console.print_json(json.dumps({"valid": not issues, "errors": [issue.as_dict() for issue in issues],
                                       "notices": notices or [], "warnings": warnings or []}))
    elif issues:
        errors.print(f"[red]✗ {len(issues)} problem(s) in {escape(str(config))}[/]", highlight=False, soft_wrap=True)
        for issue in issues:
            errors.print(str(issue), highlight=False, markup=False, soft_wrap=True)


@app.command()
def plan(config: ConfigArg, values_key: ValuesKeyOpt = None, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Expand the sweep into its runs and print them; trains nothing."""
    from finetune.plan.render import plan_summary, plan_table, search_space_lines

    doc = load_or_exit(config, values_key, set_, as_json)
    run_plan = build_plan_or_exit(doc, config, as_json)
    refuse_missing_resources(run_plan, config, as_json)
    if as_json:
        console.print_json(run_plan.model_dump_json())
        return
    if run_plan.runs:
        console.print(plan_table(run_plan, console.width))
    for line in search_space_lines(run_plan):
        console.print(line, highlight=False, markup=False)
    console.print(plan_summary(run_plan), highlight=False, markup=False)


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="Config file; omit with --resume EXP")] = None,
    values_key: ValuesKeyOpt = None,
    set_: SetOpt = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the experiment in this directory")] = None,
) -> None:
    """Train every run of the plan with the chunk scheduler (running it again resumes)."""
    from finetune.schedule.experiment import run_experiment
    from finetune.schedule.folder import ExperimentLocked, open_store, read_plan
    from finetune.schedule.interrupts import Interrupted
    from finetune.schedule.store import ExperimentDamaged
    from finetune.schedule.preparation import ExperimentError
    from finetune.track.mlflow_tracker import tracker_for
    from finetune.track.report import report_markdown

    if resume is not None and (config is not None or set_ or values_key):
        exit_with("--resume continues an experiment as planned: give CONFIG (with --set) or --resume, not both; "
                  "change a run with `finetune ctl clone`", EXIT_UNUSABLE)
    if resume is not None:
        run_plan = read_plan(experiment_or_exit(resume))
        open_store(resume).close()  # a damaged store is said now, before any work
    elif config is not None:
        run_plan = build_plan_or_exit(load_or_exit(config, values_key, set_, False), config, False)
    else:
        exit_with("give a CONFIG, or --resume EXPERIMENT_DIR", EXIT_UNUSABLE)
    try:
        root = run_experiment(run_plan, console, tracker_for, resume_dir=resume)
    except Interrupted as interrupted:
        exit_with(str(interrupted), interrupted.exit_code, "interrupted")
    except (ExperimentLocked, ExperimentDamaged) as unusable:
        exit_with(str(unusable), EXIT_UNUSABLE)
    except (ExperimentError, ValueError, RuntimeError) as error:
        exit_with(str(error), EXIT_INVALID)
    untrained = _why_nothing_ran(root)
    if untrained:
        exit_with(untrained, EXIT_INVALID)
    from rich.markdown import Markdown

    console.print(Markdown(report_markdown(root)))
    console.print(f"experiment: {root}\ncheckpoints: {root / 'runs'}/<run>/checkpoint-final", highlight=False, soft_wrap=True,
                  markup=False)
    console.print(f"MLflow: mlflow ui --backend-store-uri sqlite:///{(root / 'mlflow.db').resolve()}", highlight=False,
                  soft_wrap=True, markup=False)
    console.print(f"dashboard: finetune dashboard {root}", highlight=False, soft_wrap=True, markup=False)
    failed = _failed_runs(root)
    if failed:
        for run_id, error in failed:
            say_error(error, f"run {run_id} failed")
        raise typer.Exit(EXIT_INVALID)


def _why_nothing_ran(root: Path) -> str | None:
    """Where an experiment ended without a single run (a search whose every proposal was rejected): what it
    says, each reason once with how many proposals it refused. None when it has runs."""
    from finetune.schedule.folder import open_store

    store = open_store(root)
    try:
        if store.runs():
            return None
        reasons = Counter(str(event.get("reason")) for event in store.events() if event["kind"] == "search_rejected")
    finally:
        store.close()
    if not reasons:
        return "the experiment ended without a single run: the search proposed none"
    lines = [f"{reason} ({count} proposal{'s' if count > 1 else ''})" for reason, count in reasons.most_common()]
    return (f"the search proposed {sum(reasons.values())} run(s) and none could start, so nothing was trained:\n  "
            + "\n  ".join(lines))


def _failed_runs(root: Path) -> list[tuple[str, str]]:
    from finetune.schedule.folder import open_store

    store = open_store(root)
    failed = [(row.run_id, row.error or "unknown error") for row in store.runs() if row.state == "failed"]
    store.close()
    return failed


@app.command()
def status(experiment: ExperimentArg, as_json: JsonOpt = False, watch: Annotated[bool, typer.Option(help="Refresh until interrupted")] = False) -> None:
    """The runs of an experiment: chunk progress, latest metrics and state ("interrupted": its controller is gone)."""
    import time as _time

    from finetune.schedule.display import runs_table
    from finetune.schedule.folder import controller_alive, open_store, read_plan, shown_state
    from finetune.track.ranking import ranking_metric

    root = experiment_or_exit(experiment)
    store = open_store(root)
    if as_json:
        alive = controller_alive(root)
        console.print_json(json.dumps([{**row.__dict__, "shown_state": shown_state(row.state, alive)} for row in store.runs()]))
        return
    evaluated = (ranking_metric(read_plan(experiment))[0],)  # e.g. rouge_l; every metric: report, dashboard, --json

    def table() -> Any:
        return runs_table(store, str(experiment), evaluated, controller_alive(root))

    if not watch:
        console.print(table())
        return
    from rich.live import Live

    try:
        with Live(table(), console=console, refresh_per_second=1) as live:
            while True:
                _time.sleep(1)
                live.update(table())
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command()
def report(
    experiment: ExperimentArg,
    output: Annotated[Optional[Path], typer.Option(help="Write report.md and the PNGs here; default: the experiment folder")] = None,
) -> None:
    """A comparison of the runs: a ranked Markdown table, learning-curve PNGs and the decisions."""
    import os

    from rich.markdown import Markdown

    from finetune.track.report import report_markdown, write_report

    experiment_or_exit(experiment)
    text = report_markdown(experiment)
    widest = max((len(line) for line in text.splitlines() if line.startswith("|")), default=0)
    if console.is_terminal and widest <= console.width - 4:
        console.print(Markdown(text))
    else:  # a pipe, a file or a narrow terminal: the Markdown as written, no id or number cut to fit
        console.print(text, highlight=False, markup=False, soft_wrap=True)
    if output is None and not os.access(experiment, os.W_OK):  # an archived experiment: the report on stdout only
        say_error(f"{experiment} is read-only: report.md and the curves were not written; give --output DIR to write "
                  "them elsewhere", "note")
        return
    try:
        target, plots = write_report(experiment, output)
    except OSError as error:
        exit_with(f"cannot write the report to {output or experiment}: {error.strerror or error}", EXIT_UNUSABLE)
    console.print(f"wrote {target}" + "".join(f", {plot}" for plot in plots), highlight=False, markup=False)


app.add_typer(demo_app, name="demo")


data_app = typer.Typer(help="Look at the data as the model will see it.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")


@data_app.command("preview")
def data_preview(
    config: ConfigArg,
    n: Annotated[int, typer.Option("--n", help="How many examples to show")] = 3,
    values_key: ValuesKeyOpt = None,
    set_: SetOpt = None,
) -> None:
    """The first examples rendered with the chat template, loss-carrying tokens highlighted, and counts."""
    from finetune.train.preview import preview

    doc = load_or_exit(config, values_key, set_, False)
    run_plan = build_plan_or_exit(doc, config, False)
    try:
        preview(run_plan.first_config(), n, console)
    except ValueError as error:
        exit_with(str(error), EXIT_INVALID)


app.command()(schema)
app.command("schema-docs")(schema_docs)
app.add_typer(ctl_app, name="ctl")
app.command()(dashboard)
app.command()(export)
app.command()(chat)


def main() -> None:
    """The entry point (`python -m finetune.cli`); the app itself says unusable files in one line."""
    app()


@contextmanager
def unusable_files_said() -> Iterator[None]:
    """A damaged experiment file, or SQLite's own error on one (damaged, locked, a full disk), is one line
    naming it and what to do, and exit status 2, never a traceback."""
    import sqlite3

    from finetune.schedule.store import ExperimentDamaged

    try:
        yield
    except ExperimentDamaged as error:
        exit_unusable(str(error))
    except sqlite3.OperationalError as error:
        exit_unusable(f"an experiment's state store (state.db) cannot be used: {error}")
    except sqlite3.DatabaseError as error:
        if type(error) is not sqlite3.DatabaseError:  # a broken constraint or a misuse: a bug, with its traceback
            raise
        exit_unusable(f"an experiment's state store (state.db) is damaged: {error}")


def exit_unusable(message: str) -> NoReturn:
    """Outside typer's app (typer.Exit is not turned into an exit status there): the message, then exit 2."""
    say_error(message)
    raise SystemExit(EXIT_UNUSABLE)


if __name__ == "__main__":
    main()
