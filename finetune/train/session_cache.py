"""The session cache of a worker: the runs resident in its memory, least recently used first."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from finetune.train.bases import LoadedBase
from finetune.train.session import RunSession


class SessionCache:
    """Each resident run's `RunSession` and the key of the base it trains on. Closing a session waits
    for its pending checkpoint writes (`wait_for(run_id)`) and frees its adapter on the shared model."""

    def __init__(self, wait_for: Callable[[str], None]) -> None:
        self.wait_for = wait_for
        self.sessions: OrderedDict[str, RunSession] = OrderedDict()
        self.base_of: dict[str, str] = {}

    def __contains__(self, run_id: str) -> bool:
        return run_id in self.sessions

    def __getitem__(self, run_id: str) -> RunSession:
        return self.sessions[run_id]

    def run_ids(self) -> tuple[str, ...]:
        """Resident runs, least recently used first."""
        return tuple(self.sessions)

    def of_base(self, key: str) -> list[str]:
        return [run_id for run_id, base in self.base_of.items() if base == key]

    def touch(self, run_id: str) -> RunSession | None:
        """The run's session, now the most recently used; None if it is not resident."""
        session = self.sessions.get(run_id)
        if session is not None:
            self.sessions.move_to_end(run_id)
        return session

    def add(self, session: RunSession, base_key: str) -> None:
        self.sessions[session.run_id] = session
        self.base_of[session.run_id] = base_key

    def close(self, run_id: str, base: LoadedBase | None, wait: bool = True) -> None:
        """Forget a run's in-memory state (its durable checkpoint stays)."""
        from finetune.train.adapter import detach_adapter

        session = self.sessions.pop(run_id, None)
        self.base_of.pop(run_id, None)
        if session is None:
            return
        if wait:
            self.wait_for(run_id)
        if base is not None and base.shared is not None and session.model is base.shared:
            detach_adapter(base.shared, session.adapter_name)
