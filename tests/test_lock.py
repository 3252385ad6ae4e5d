"""The lock that `make test` installs from agrees with pyproject.toml and with what is installed.

A fresh clone once tested whatever PyPI served that day and failed on a reworded help string;
the lock (requirements/lock.txt, `make lock`) pins every package instead. These tests keep the
lock honest: it never pins torch or its CUDA runtime (a GPU machine's build is kept), every pin
satisfies the ranges pyproject.toml promises users, and `make test` really installed the pins.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
MAKEFILE = ROOT / "Makefile"


def _pins() -> dict[str, str]:
    """The lock's pin for this interpreter, per package."""
    environment = default_environment()
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith((" ", "#")):
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            (version,) = [spec.version for spec in requirement.specifier]
            pins[canonicalize_name(requirement.name)] = version
    return pins


def _tested_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = re.search(r"^TEST_EXTRAS \?= (.+)$", MAKEFILE.read_text(), re.M).group(1).split(",")
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra.strip()]
    return [Requirement(line) for line in lines]


def test_lock_leaves_the_torch_build_to_the_machine() -> None:
    pinned = [line for line in LOCK.read_text().splitlines() if re.match(r"(torch|triton|nvidia-|cuda-)\S*==", line)]
    assert pinned == []


def test_every_tested_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    problems = []
    for requirement in _tested_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        if name not in pins:
            problems.append(f"{name}: not in the lock (run `make lock`)")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} is outside pyproject's {requirement.specifier}")
    assert problems == []


@pytest.mark.skipif(bool(os.environ.get("FINETUNE_UNLOCKED")), reason="make test-latest tests unlocked versions")
def test_installed_versions_are_the_locked_ones() -> None:
    pins = _pins()
    differing = []
    for requirement in _tested_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch" or name not in pins:
            continue
        installed = metadata.version(requirement.name)
        if installed != pins[name]:
            differing.append(f"{name}: installed {installed}, locked {pins[name]}")
    assert differing == [], "the venv was not installed from the lock: `rm .venv/.installed && make install`"
