"""A damaged state.db, whatever the damage (random contents and sizes, drawn by hypothesis): every command that
reads it either works or says in one line which file is damaged, exit status 2; never a traceback.

The commands run through the app object itself, as the installed `finetune` script calls it
(`finetune.cli:app`), not through `main`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_experiment_folder import make_experiment, run_ids

COMMANDS = {
    "status": ["status", "{root}"],
    "report": ["report", "{root}"],
    "requests": ["ctl", "requests", "{root}"],
    "stop": ["ctl", "stop", "{root}", "{run}"],
    "clone": ["ctl", "clone", "{root}", "{run}", "--set", "training_args.learning_rate=0.01"],
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_experiment(tmp_path_factory.mktemp("pristine"))


def _random_bytes(data: st.DataObject, original: bytes) -> bytes:
    size = data.draw(st.integers(0, 65_536), label="size")
    return data.draw(st.binary(min_size=size, max_size=size), label="contents")


def _header_then_random(data: st.DataObject, original: bytes) -> bytes:
    return original[:100] + data.draw(st.binary(min_size=0, max_size=len(original)), label="rest")


def _truncated(data: st.DataObject, original: bytes) -> bytes:
    return original[:data.draw(st.integers(1, len(original) - 1), label="length")]


def _overwritten(data: st.DataObject, original: bytes) -> bytes:
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 64), label="patches")):
        start = data.draw(st.integers(0, len(original) - 1))
        patch = data.draw(st.binary(min_size=1, max_size=512))
        damaged[start:start + len(patch)] = patch
    return bytes(damaged[:len(original)])


DAMAGE = [_random_bytes, _header_then_random, _truncated, _overwritten]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_damaged_state_store_is_one_line_in_every_command(pristine, data, capsys) -> None:
    from finetune.cli import app

    damage = data.draw(st.sampled_from(DAMAGE), label="damage")
    command = data.draw(st.sampled_from(sorted(COMMANDS)), label="command")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "exp"
        shutil.copytree(pristine, root)
        original = (root / "state.db").read_bytes()
        (root / "state.db").write_bytes(damage(data, original))
        args = [arg.format(root=root, out=Path(tmp) / "report.md", run=run_ids(pristine)[0]) for arg in COMMANDS[command]]
        capsys.readouterr()
        try:
            app(args, prog_name="finetune")
            code = 0
        except SystemExit as stopped:
            code = stopped.code
        out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 2 and "state.db" in err:  # said in one line (wrapped by the console only), naming the file
        assert err.startswith("error: ") and err.count("error:") == 1, err
        return
    assert code in (0, 1, None), (code, out, err)  # the damage missed what this command reads
