"""Where a session starts when it is not at its plan's beginning: a run's own last durable chunk, or the
checkpoint `run_conf.resume_from_checkpoint` names, read by a session of the kind that wrote it."""

from __future__ import annotations

from finetune.train.checkpoint import read_run_state
from finetune.train.session import RunSession
from finetune.train.sharded import ShardedSession, is_shard_checkpoint, start_problem


def resume_session(session: RunSession, checkpoint: str, initial: bool) -> None:
    """`initial` (the run is at its step 0): `checkpoint` is `run_conf.resume_from_checkpoint`, whose
    weights and optimizer state the run starts from. Otherwise it is the run's own last durable chunk,
    which it continues, read by a run of its own kind (whole or sharded)."""
    if initial:
        problem = start_problem(checkpoint, session.strategy if isinstance(session, ShardedSession) else "ddp")
        if problem:
            raise RuntimeError(f"run {session.run_id}: run_conf.resume_from_checkpoint: {problem}")
        if isinstance(session, ShardedSession):
            session.start_from_shards(checkpoint)
        else:
            from finetune.train.export import load_initial_checkpoint

            load_initial_checkpoint(session, checkpoint)
        return
    shards = is_shard_checkpoint(checkpoint)
    if shards != isinstance(session, ShardedSession):
        written = "sharded (fsdp)" if shards else "whole (ddp or one device)"
        raise RuntimeError(f"run {session.run_id}: {checkpoint} was written {written}; resume it with the "
                           "experiment.distributed it was trained with")
    if isinstance(session, ShardedSession):
        session.restore_shards(checkpoint)
    else:
        session.restore(read_run_state(checkpoint))
