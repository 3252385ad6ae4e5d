"""Gangs: the k worker processes that train one run on k devices together.

A gang is one worker to the controller and the policy: it holds its devices (its units) while it
trains, takes the same tasks, and is alive only while all its ranks are. Each kind of multi-device
run (`ddp:2`, `fsdp:8`, ...) has its own gangs, because a process's distributed set-up is fixed
once it starts.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any


def gang_kind(experiment: Any) -> str:
    """The kind of worker a run needs: "" for one device trained as usual, else "<strategy>:<devices>"."""
    if experiment.devices_per_run == 1 and experiment.distributed == "ddp":
        return ""
    return f"{experiment.distributed}:{experiment.devices_per_run}"


def parse_kind(kind: str) -> tuple[str, int]:
    strategy, _, width = kind.partition(":")
    return strategy, int(width)


def gang_layouts(devices: list[str], width: int) -> list[tuple[str, ...]]:
    """The device sets gangs of `width` train on: consecutive GPUs, as many gangs as fit; on the CPU,
    one gang of `width` processes."""
    if devices == ["cpu"]:
        return [("cpu",) * width]
    return [tuple(devices[start : start + width]) for start in range(0, len(devices) - width + 1, width)]


def units_of(layout: tuple[str, ...]) -> tuple[str, ...]:
    """The device units a gang holds while it trains (the CPU is one unit, however many processes)."""
    return tuple(dict.fromkeys(layout))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class GangProcess:
    """The gang's ranks, seen as one process: alive while every rank is."""

    processes: list[Any]

    def is_alive(self) -> bool:
        return all(process.is_alive() for process in self.processes)

    def describe(self) -> str:
        """How each rank ended, e.g. "rank 0: running, rank 1: exit code -9"."""
        states = ("running" if p.is_alive() else f"exit code {p.exitcode}" for p in self.processes)
        return ", ".join(f"rank {rank}: {state}" for rank, state in enumerate(states))

    def terminate(self) -> None:
        """End every rank (those left waiting on a dead peer included)."""
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(timeout=30)

    def join(self, timeout: float | None = None) -> None:
        for process in self.processes:
            process.join(timeout=timeout)


@dataclass
class GangQueue:
    """Every rank gets every task."""

    queues: list[Any]

    def put(self, item: Any) -> None:
        for queue in self.queues:
            queue.put(item)
