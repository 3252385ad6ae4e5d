"""Commands on an experiment directory beyond run/status/report: interactive control, the
dashboard, and exports (registered on the app by `finetune.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.cli_common import EXIT_INVALID, EXIT_UNUSABLE, ExperimentArg, SetOpt, console, errors, experiment_or_exit

ctl_app = typer.Typer(help="Interactive control of a live (or stopped) experiment, applied at chunk boundaries.", no_args_is_help=True)


def _control(experiment: Path, kind: str, run_id: str, payload: dict | None = None) -> None:
    from finetune.schedule.store import StateStore

    store = StateStore(experiment_or_exit(experiment) / "state.db")
    try:
        store.run(run_id)
    except KeyError:
        errors.print(f"[red]error:[/] no run {run_id} in {experiment}")
        raise typer.Exit(EXIT_INVALID) from None
    request = store.request(kind, run_id, payload)
    console.print(f"request {request}: {kind} {run_id}, applied at the next chunk boundary "
                  "(run `finetune run --resume` if the experiment is not running)", highlight=False)


RunIdArg = Annotated[str, typer.Argument(help="Run id (see `finetune status`)")]


@ctl_app.command("stop")
def ctl_stop(experiment: ExperimentArg, run_id: RunIdArg) -> None:
    """Stop a run after its current chunk (resumable)."""
    _control(experiment, "stop", run_id)


@ctl_app.command("resume")
def ctl_resume(experiment: ExperimentArg, run_id: RunIdArg) -> None:
    """Resume a stopped run from its last chunk."""
    _control(experiment, "resume", run_id)


@ctl_app.command("delete")
def ctl_delete(experiment: ExperimentArg, run_id: RunIdArg) -> None:
    """Delete a run and its checkpoints."""
    _control(experiment, "delete", run_id)


@ctl_app.command("clone")
def ctl_clone(
    experiment: ExperimentArg,
    run_id: RunIdArg,
    set_: SetOpt = None,
    warm_start: Annotated[bool, typer.Option("--warm-start", help="Start from the parent's latest adapter")] = False,
) -> None:
    """A new run from RUN with changed values (--set key=value)."""
    _control(experiment, "clone", run_id, {"set": set_ or [], "warm_start": warm_start})


def dashboard(
    experiment: ExperimentArg,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback makes reads need the token too")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one")] = 8765,
) -> None:
    """Serve a live web page of the experiment: runs, curves, decisions, and stop/resume/delete/clone."""
    from finetune.dashboard.server import serve

    root = experiment_or_exit(experiment)
    serve(root, host, port, lambda url: console.print(f"dashboard of {root}: {url}", highlight=False, soft_wrap=True))


def export(
    experiment: ExperimentArg,
    run_id: RunIdArg,
    merged: Annotated[bool, typer.Option("--merged", help="Merge the adapter into its base model")] = False,
    output: Annotated[Optional[Path], typer.Option(help="Where to write; default: the run's checkpoint-merged")] = None,
) -> None:
    """Write a completed run's model: the adapter merged into its base (--merged), or a copy of checkpoint-final."""
    import shutil

    from finetune.plan.model import RunPlan
    from finetune.runtime import quiet_libraries

    plan = RunPlan.model_validate_json((experiment_or_exit(experiment) / "plan.json").read_text())
    try:
        name = (plan.run(run_id).config.get("run_conf") or {}).get("final_checkpoint_name", "checkpoint-final")
    except KeyError:
        errors.print(f"[red]error:[/] {experiment} has no run {run_id}")
        raise typer.Exit(EXIT_UNUSABLE) from None
    run_dir = experiment / "runs" / run_id
    final = run_dir / name
    if not final.is_dir():
        errors.print(f"[red]error:[/] run {run_id} has no {name} yet (is it completed?)")
        raise typer.Exit(EXIT_UNUSABLE)
    if merged and not (final / "adapter_config.json").is_file():
        errors.print(f"[red]error:[/] run {run_id} trained the full model: {final} is already a merged model")
        raise typer.Exit(EXIT_UNUSABLE)
    if merged:
        quiet_libraries()
        from finetune.train.export import export_merged

        with console.status(f"merging {final} into its base model..."):
            target = export_merged(final, output or run_dir / "checkpoint-merged")
    elif output is not None:
        target = Path(shutil.copytree(final, output))
    else:
        target = final
    console.print(str(target), highlight=False, soft_wrap=True)
