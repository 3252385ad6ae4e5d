"""The `finetune` command line.

Commands that train nothing (validate, plan, schema, schema-docs, status) keep torch,
transformers, trl and mlflow out of their import path, so that they answer in about a
second: heavy modules are imported inside the commands that train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from finetune.config import ConfigLoadError, SourceDoc, load_document, validate_document

app = typer.Typer(
    help="Declarative fine-tuning sweeps (SFT, DPO, GRPO) trained concurrently with a chunk scheduler.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)

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


def load_or_exit(config: Path, values_key: str | None, overrides: list[str] | None, as_json: bool) -> SourceDoc:
    try:
        return load_document(config, values_key=values_key, overrides=overrides)
    except ConfigLoadError as error:
        if as_json:
            console.print_json(json.dumps({"valid": False, "usable": False, "error": str(error)}))
        else:
            errors.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(EXIT_UNUSABLE) from None


@app.command()
def validate(
    config: ConfigArg, values_key: ValuesKeyOpt = None, set_: SetOpt = None, as_json: JsonOpt = False
) -> None:
    """Check a config, knobs and all. Exit 0 valid, 1 invalid, 2 unusable call."""
    doc = load_or_exit(config, values_key, set_, as_json)
    issues = validate_document(doc)
    report_issues(config, issues, as_json)
    if not issues and not as_json:
        console.print(f"[green]✓[/] {config} is valid", highlight=False)
    if issues:
        raise typer.Exit(EXIT_INVALID)


def build_plan_or_exit(doc: SourceDoc, config: Path, as_json: bool):  # -> RunPlan
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
            errors.print(f"[red]✗ cannot plan {config}:[/] {error}", highlight=False)
    raise typer.Exit(EXIT_INVALID)


def report_issues(config: Path, issues: list, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps({"valid": not issues, "errors": [issue.as_dict() for issue in issues]}))
    elif issues:
        errors.print(f"[red]✗ {len(issues)} problem(s) in {config}[/]", highlight=False)
        for issue in issues:
            errors.print(str(issue), highlight=False, markup=False)


@app.command()
def plan(config: ConfigArg, values_key: ValuesKeyOpt = None, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Expand the sweep into its runs and print them; trains nothing."""
    from finetune.plan.render import plan_table, plan_summary

    doc = load_or_exit(config, values_key, set_, as_json)
    run_plan = build_plan_or_exit(doc, config, as_json)
    if as_json:
        console.print_json(run_plan.model_dump_json())
        return
    console.print(plan_table(run_plan))
    console.print(plan_summary(run_plan), highlight=False)


def _generated_files(generators: dict[Path, Callable[[], str]], check: bool) -> None:
    from finetune.io import write_text_atomic

    stale = []
    for path, generate in generators.items():
        text = generate()
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if check:
            if current != text:
                stale.append(path)
        elif current != text:
            write_text_atomic(path, text)
            console.print(f"wrote {path}", highlight=False)
        else:
            console.print(f"unchanged {path}", highlight=False)
    if stale:
        names = ", ".join(str(path) for path in stale)
        errors.print(f"[red]out of date:[/] {names}; run `make docs` (or the same command without --check)")
        raise typer.Exit(EXIT_INVALID)
    if check:
        console.print("[green]✓[/] generated files are up to date")


@app.command()
def schema(
    out_dir: Annotated[Path, typer.Option(help="Where the JSON Schemas go")] = Path("schemas"),
    chart_dir: Annotated[Path, typer.Option(help="The Helm chart whose values.schema.json is written")] = Path(
        "charts/finetune"
    ),
    check: CheckOpt = False,
) -> None:
    """Write the JSON Schemas of a concrete config, a sweep config, and the Helm chart's values."""
    from finetune.config.schema import helm_values_schema, render_json, sweep_schema, concrete_schema

    generators: dict[Path, Callable[[], str]] = {
        out_dir / "finetune.schema.json": lambda: render_json(concrete_schema()),
        out_dir / "finetune-sweep.schema.json": lambda: render_json(sweep_schema()),
    }
    if chart_dir.is_dir():
        generators[chart_dir / "values.schema.json"] = lambda: render_json(helm_values_schema())
    _generated_files(generators, check)


@app.command("schema-docs")
def schema_docs(
    out: Annotated[Path, typer.Option(help="The Markdown reference")] = Path("docs/config-reference.md"),
    check: CheckOpt = False,
) -> None:
    """Write the Markdown config reference generated from the models."""
    from finetune.config.reference_docs import reference_markdown

    _generated_files({out: reference_markdown}, check)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
