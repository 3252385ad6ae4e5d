"""Refresh requirements/lock.txt: exact versions of everything `make test` installs, except torch.

`make lock` runs this. The lock is a pip constraints file: `make install` passes it with `-c`, so
a fresh clone tests the versions the project was last tested with, while pyproject.toml keeps
ranges for the library's users. It is resolved for every platform and Python the project
supports (`uv pip compile --universal`).

torch and its CUDA runtime packages (nvidia-*, cuda-*, triton) are left out on purpose: the
Makefile installs the CPU build when no torch is there and otherwise keeps the torch it finds (a
GPU machine's CUDA build), so the lock must never pin a build or its runtime. No hashes: the
project itself is installed editable, which pip's hash-checking mode refuses.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
# The torch build is the machine's: never pinned (see above).
LEFT_OUT = re.compile(r"^(torch|triton|nvidia-[\w-]+|cuda-[\w-]+)==")
HEADER = """\
# Exact versions `make test` installs (a pip constraints file). Refresh with `make lock`;
# `make test-latest` tests the newest versions pyproject.toml allows instead.
# torch and its CUDA runtime are left out: the machine's own torch build is kept.
"""


def compile_lock(extras: list[str], torch_version: str) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        pin = Path(scratch) / "torch.txt"
        pin.write_text(f"torch=={torch_version}\n")
        command = [sys.executable, "-m", "uv", "pip", "compile", str(ROOT / "pyproject.toml"),
                   "--universal", "--python-version", "3.10", "--no-header",
                   "-c", str(pin)]
        for extra in extras:
            command += ["--extra", extra]
        return subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout


def without_torch_runtime(text: str) -> str:
    """Drop each left-out package's line and the `# via` lines under it."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        if line and not line.startswith(" "):
            skipping = bool(LEFT_OUT.match(line))
        if not skipping:
            kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def main() -> int:
    extras = os.environ.get("LOCK_EXTRAS", "dev").split()
    torch_version = os.environ.get("TORCH_CPU_VERSION", "2.13.0")
    body = without_torch_runtime(compile_lock(extras, torch_version))
    LOCK.parent.mkdir(exist_ok=True)
    tmp = LOCK.with_suffix(".tmp")
    tmp.write_text(HEADER + f"# extras: {' '.join(extras)}\n" + body)
    os.replace(tmp, LOCK)
    print(f"wrote {LOCK.relative_to(ROOT)} ({sum(1 for l in body.splitlines() if '==' in l)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
