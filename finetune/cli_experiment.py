"""Commands on an experiment directory beyond run/status/report: interactive control, the
dashboard, and exports (registered on the app by `finetune.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from finetune.cli_common import (
    EXIT_INVALID,
    EXIT_UNUSABLE,
    ExperimentArg,
    SetOpt,
    console,
    errors,
    exit_with,
    experiment_or_exit,
    run_id_or_exit,
)

ctl_app = typer.Typer(help="Interactive control of a live (or stopped) experiment, applied at chunk boundaries.", no_args_is_help=True, rich_markup_mode=None)


WaitOpt = Annotated[float, typer.Option("--wait", help="Seconds to wait for a live controller to apply the request (0: do not wait)")]


def _control(experiment: Path, kind: str, run_id: str, payload: dict | None = None, wait: float = 0.0) -> None:
    """Check and queue a request; exit 1 with the reason if it cannot be done (the run's state, a bad clone)."""
    from finetune.schedule.control import RequestRejected
    from finetune.schedule.requests import submit_request, wait_for

    from finetune.schedule.folder import open_store

    root = experiment_or_exit(experiment)
    open_store(root).close()  # a damaged store is said before a run id is looked up
    run_id = run_id_or_exit(root, run_id)
    try:
        submitted = submit_request(root, kind, run_id, payload)
    except KeyError:
        exit_with(f"no run {run_id} in {experiment} (see `finetune status {experiment}`)", EXIT_INVALID)
    except RequestRejected as rejected:
        exit_with(str(rejected), EXIT_INVALID, label="rejected")
    where = "at the run's next chunk boundary" if submitted.live else "when the experiment next runs (`finetune run --resume`)"
    console.print(f"request {submitted.request_id} accepted: {kind} {run_id}, applied {where}", highlight=False, soft_wrap=True,
                  markup=False)
    if not (wait and submitted.live):
        return
    status = wait_for(root, submitted.request_id, wait)
    console.print(f"request {submitted.request_id}: {status}", highlight=False, soft_wrap=True, markup=False)
    if status.startswith("rejected"):
        raise typer.Exit(EXIT_INVALID)


RunIdArg = Annotated[str, typer.Argument(help="Run id, or an unambiguous start of it (see `finetune status`)")]


@ctl_app.command("stop")
def ctl_stop(experiment: ExperimentArg, run_id: RunIdArg, wait: WaitOpt = 0.0) -> None:
    """Stop a pending or running run after its current chunk (`resume` continues it)."""
    _control(experiment, "stop", run_id, wait=wait)


@ctl_app.command("resume")
def ctl_resume(experiment: ExperimentArg, run_id: RunIdArg, wait: WaitOpt = 0.0) -> None:
    """Resume a stopped run from its last durable chunk."""
    _control(experiment, "resume", run_id, wait=wait)


@ctl_app.command("retry")
def ctl_retry(experiment: ExperimentArg, run_id: RunIdArg, wait: WaitOpt = 0.0) -> None:
    """Try a failed run again from its last durable chunk, with fresh tries."""
    _control(experiment, "retry", run_id, wait=wait)


@ctl_app.command("delete")
def ctl_delete(experiment: ExperimentArg, run_id: RunIdArg, wait: WaitOpt = 0.0) -> None:
    """Delete a run and its checkpoints."""
    _control(experiment, "delete", run_id, wait=wait)


@ctl_app.command("clone")
def ctl_clone(
    experiment: ExperimentArg,
    run_id: RunIdArg,
    set_: SetOpt = None,
    warm_start: Annotated[bool, typer.Option("--warm-start", help="Start from the parent's latest adapter")] = False,
    wait: WaitOpt = 0.0,
) -> None:
    """A new run from RUN with changed values (--set key=value), validated and planned now like a new run."""
    _control(experiment, "clone", run_id, {"set": set_ or [], "warm_start": warm_start}, wait)


@ctl_app.command("requests")
def ctl_requests(experiment: ExperimentArg) -> None:
    """Every control request of the experiment and what became of it."""
    from rich.text import Text
    from rich.table import Table

    from finetune.schedule.folder import open_store

    store = open_store(experiment_or_exit(experiment))
    table = Table("id", "kind", "run", "details", "status", title=Text(f"requests of {experiment}"))
    for request in store.requests():
        payload = request["payload"] if isinstance(request["payload"], dict) else {}
        changes = payload.get("set")
        details = ", ".join(map(str, changes)) if isinstance(changes, list) else ""
        details += " (warm)" if payload.get("warm_start") is True else ""
        cells = (str(request["id"]), request["kind"], request["run_id"], details, request["status"])
        table.add_row(*(Text(str(cell)) for cell in cells))
    store.close()
    console.print(table)


def dashboard(
    experiment: ExperimentArg,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback makes reads need the token too")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one")] = 8765,
) -> None:
    """Serve a live web page of the experiment: runs, curves, decisions, and stop/resume/retry/delete/clone."""
    from finetune.dashboard.server import CannotServe, serve

    root = experiment_or_exit(experiment)
    try:
        serve(root, host, port, lambda url: console.print(f"dashboard of {root}: {url}", highlight=False, soft_wrap=True,
                                                          markup=False))
    except CannotServe as problem:
        exit_with(str(problem), EXIT_UNUSABLE)


def export(
    experiment: ExperimentArg,
    run_id: Annotated[str, typer.Argument(help="Run id (see `finetune status`), or `best`: the top-ranked completed run")],
    merged: Annotated[bool, typer.Option("--merged", help="Merge the adapter into its base model")] = False,
    output: Annotated[Optional[Path], typer.Option(help="Where to write; default: the run's checkpoint-merged")] = None,
) -> None:
    """Write a completed run's model: the adapter merged into its base (--merged), or a copy of checkpoint-final.
    `best` names the top-ranked completed run (as `finetune report` ranks them)."""
    import shutil

    from finetune.runtime import quiet_libraries
    from finetune.schedule.folder import read_plan

    plan = read_plan(experiment_or_exit(experiment))
    if run_id == "best":
        run_id = _best_run(experiment, plan)
    run_id = run_id_or_exit(experiment, run_id)
    name = (plan.run(run_id).config.get("run_conf") or {}).get("final_checkpoint_name", "checkpoint-final")
    run_dir = experiment / "runs" / run_id
    final = run_dir / name
    if not final.is_dir():
        exit_with(f"run {run_id} has no {name} yet (is it completed?)", EXIT_UNUSABLE)
    if output is not None and output.exists():
        exit_with(f"{output} exists; give --output a path that does not exist yet", EXIT_UNUSABLE)
    if merged and not (final / "adapter_config.json").is_file():
        exit_with(f"run {run_id} trained the full model: {final} is already a merged model", EXIT_UNUSABLE)
    destination = output if output is not None else run_dir / "checkpoint-merged" if merged else None
    if destination is not None and not _writable_place(destination):
        exit_with(f"{destination} cannot be written ({destination.parent} is read-only or missing); give --output a "
                  "writable path", EXIT_UNUSABLE)
    if merged:
        quiet_libraries()
        from finetune.train.export import export_merged

        with console.status(f"merging {final} into its base model..."):
            target = export_merged(final, output or run_dir / "checkpoint-merged")
    elif output is not None:
        target = Path(shutil.copytree(final, output))
    else:
        target = final
    console.print(str(target), highlight=False, soft_wrap=True, markup=False)


def _best_run(experiment: Path, plan: Any, completed: bool = True) -> str:
    """The top-ranked completed run (`completed`: else the top-ranked evaluated one, which may have stopped early),
    said on stderr with its value; exits when there is none."""
    from finetune.schedule.folder import open_store
    from finetune.track.ranking import ranked_runs, ranking_metric

    store = open_store(experiment)
    try:
        ranked = [entry for entry in ranked_runs(store, plan)
                  if (entry.row.state == "completed" if completed else entry.value is not None)]
    finally:
        store.close()
    if not ranked:
        exit_with(f"{experiment} has no {'completed run to export' if completed else 'evaluated run'} yet", EXIT_UNUSABLE)
    top, (metric, _) = ranked[0], ranking_metric(plan)
    value = "not measured" if top.value is None else f"{top.value:.4g}"
    errors.print(f"best run: {top.row.run_id} ({metric} {value}{'; ' + top.note if top.note else ''})",
                      markup=False, emoji=False, highlight=False)
    return top.row.run_id


def _chat_checkpoint(root: Path, run_id: str, final_name: str) -> Path:
    """The run's checkpoint-final, else its latest durable chunk (a run that successive halving stopped)."""
    from finetune.schedule.folder import open_store

    final = root / "runs" / run_id / final_name
    if final.is_dir():
        return final
    store = open_store(root)
    try:
        checkpoint = store.run(run_id).last_checkpoint
    finally:
        store.close()
    if checkpoint is None:
        exit_with(f"run {run_id} has no durable chunk yet", EXIT_UNUSABLE)
    return Path(checkpoint)


def _writable_place(path: Path) -> bool:
    """Whether `path` can be created: its nearest existing parent is a writable folder."""
    import os

    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK)


def chat(
    experiment: ExperimentArg,
    run_id: Annotated[str, typer.Argument(help="The run (see `finetune report`), or best: the first of the ranking")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Answer this and exit (repeatable); "
                                                        "without it, each line read from the terminal is a prompt")] = None,
    system: Annotated[Optional[str], typer.Option(help="A system message before each prompt")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="The longest answer, in tokens")] = 64,
) -> None:
    """Answer prompts with a run's model: its adapter on its base model (checkpoint-final, else its latest chunk)."""
    import sys

    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.runtime import quiet_libraries
    from finetune.schedule.folder import read_plan
    from finetune.train.chat import load_chat_model

    root = experiment_or_exit(experiment)
    plan = read_plan(root)
    run_id = _best_run(root, plan, completed=False) if run_id == "best" else run_id_or_exit(root, run_id)
    config = CONFIG_ADAPTER.validate_python(plan.run(run_id).located(root).config)
    checkpoint = _chat_checkpoint(root, run_id, config.run_conf.final_checkpoint_name)
    quiet_libraries()
    with console.status(f"loading run {run_id} of {root}..."):
        loaded = load_chat_model(run_id, config, checkpoint)
    console.print(f"run {loaded.run_id}, {loaded.checkpoint}", highlight=False, soft_wrap=True, style="dim")

    def reply(text: str) -> None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        console.print(loaded.answer(messages, max_new_tokens), highlight=False, soft_wrap=True, markup=False)

    if prompt:
        for text in prompt:
            reply(text)
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            console.print("> ", end="", highlight=False)
        line = sys.stdin.readline()
        if not line:
            break
        if line.strip():
            reply(line.strip())
