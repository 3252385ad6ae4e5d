"""The layout is the architecture: each package of `finetune` imports only packages below it, and no modules
import each other in a circle (read from the source with `ast`; nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# Lowest first. A module may import its own package and any package listed before it, never one after it.
LAYERS = [
    {"finetune", "io", "runtime"},  # the package's version, small helpers
    {"data"},  # data files, formats, tokenising: no config models needed
    {"config"},  # the config models (they validate data formats)
    {"plan"},  # a config into runs
    {"search"},  # halving, Optuna, PBT: decisions over plain views of runs
    {"evaluate"},  # metrics and generation, the user-code sandbox
    {"train"},  # a run's session, chunks, checkpoints
    {"schedule"},  # the controller, its workers and the experiment folder
    {"track"},  # MLflow and W&B, and what reads an experiment (report, ranking)
    {"dashboard"},
    {"cli", "cli_common", "cli_experiment", "cli_tools", "__main__"},
]
RANK = {name: index for index, layer in enumerate(LAYERS) for name in layer}
PACKAGE = REPO / "finetune"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module_level_only: bool) -> list[tuple[str, int]]:
    """The `finetune` modules a file imports, with their line (`module_level_only`: not those inside a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "finetune":
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "finetune"]
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_of_finetune_has_a_layer() -> None:
    unplaced = {layer_of(module_name(path)) for path in sources()} - RANK.keys()
    assert not unplaced, f"give {sorted(unplaced)} a place in LAYERS"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for path in sources():
        own = layer_of(module_name(path))
        for target, line in imports(path, module_level_only=False):
            other = layer_of(target)
            if other in RANK and own in RANK and RANK[other] > RANK[own]:
                upward.append(f"{path.relative_to(REPO)}:{line} ({own}) imports {target} ({other})")
    assert not upward, "\n".join(upward)


def test_modules_import_each_other_in_no_circle() -> None:
    known = {module_name(path): path for path in sources()}

    def resolve(target: str) -> str | None:  # `from finetune.x import name`: the module x, or x.name if that is one
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    graph = {module: {found for target, _ in imports(path, module_level_only=True)
                      if (found := resolve(target)) and found != module and not module.startswith(found + ".")}
             for module, path in known.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                pytest.fail("an import circle: " + " -> ".join([*stack[stack.index(other):], other]))
            if other not in state:
                visit(other)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_checks_see_an_upward_import(tmp_path) -> None:
    """The reader finds imports inside functions and at the top, as the checks above rely on."""
    source = tmp_path / "probe.py"
    source.write_text("from finetune.config import models\n\ndef later():\n    from finetune.schedule.store import StateStore\n")
    assert imports(source, module_level_only=False) == [("finetune.config.models", 1), ("finetune.schedule.store.StateStore", 4)]
    assert imports(source, module_level_only=True) == [("finetune.config.models", 1)]
    assert RANK[layer_of("finetune.schedule.store")] > RANK[layer_of("finetune.train.session")]
