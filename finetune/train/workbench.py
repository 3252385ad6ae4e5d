"""A worker's bench: loaded base models, the runs resident on them, and the chunk step.

`Workbench.train_chunk` is what a worker does for a (run, chunk) task: find the run's session
(building it on the run's first chunk, or restoring it from its durable checkpoint after a crash
or a move), train to the chunk boundary, evaluate, take a CPU snapshot and hand it to the
background writer, which makes the chunk durable while the device trains the next one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from finetune.plan.model import PlannedRun
from finetune.train.checkpoint import DurableWriter, WriteJob, is_run_state, read_run_state, write_run_state
from finetune.train.residency import Budgets, Resident, plan_placement
from finetune.train.session import MetricsSink, RunSession, RunState

MAX_RESIDENT_BASES = 2


@dataclass
class ChunkOutcome:
    run_id: str
    chunk: int
    global_step: int
    checkpoint: str
    metrics: dict[str, float]
    final: bool
    step_seconds: float
    eval_seconds: float
    seconds: float
    peak_memory: int = 0
    total_memory: int = 0


@dataclass
class LoadedBase:
    """A (tokenizer, base model) pair and what the runs that share it share: data, the PeftModel."""

    key: str
    tokenizer: Any
    model: Any
    new_token_ids: list[int]
    input_pad_id: int
    shared: Any = None  # the PeftModel holding every resident run's adapter
    data: dict[str, Any] = field(default_factory=dict)
    data_keys: dict[str, str] = field(default_factory=dict)
    saved_as: Path | None = None


def base_key(config: Any) -> str:
    """Runs with the same key share a loaded base model (and tokenizer) on a worker."""
    from finetune.train.adapter import adapter_family

    run_conf, args = config.run_conf, config.training_args
    shaping = [
        run_conf.model, run_conf.tokenizer, run_conf.use_fast_tokenizer, run_conf.model_args.model_dump_json(),
        config.quant_conf.model_dump_json(), config.data_conf.chat_template_name,
        config.data_conf.missing_pad_token_strategy, config.data_conf.padding_side, adapter_family(config.peft_conf),
        bool(getattr(args, "bf16", False)), bool(getattr(args, "fp16", False)), bool(getattr(args, "gradient_checkpointing", False)),
    ]
    return json.dumps(shaping, default=str)


def chunk_boundary(run: PlannedRun, chunk: int) -> int:
    """The global step at which chunk `chunk` (0-based; -1: before the first) ends."""
    assert run.derived.chunk_steps is not None
    return sum(run.derived.chunk_steps[: chunk + 1])


def eval_subset(dataset: Any, limit: int | None) -> Any:
    if dataset is None or limit is None or len(dataset) <= limit:
        return dataset
    return dataset.select(range(limit))


class Workbench:
    """What a worker holds. In a gang (one rank of the k processes training one run) each run owns
    its model, one run is resident at a time, and rank 0 writes the checkpoints."""

    def __init__(self, root: Path, device: str, budgets: Budgets, writer: DurableWriter | None = None,
                 sink: MetricsSink | None = None, on_durable: Callable[[dict[str, Any]], None] | None = None,
                 gang_rank: int | None = None) -> None:
        self.root, self.device, self.budgets = root, device, budgets
        self.gang_rank = gang_rank
        self.writer = writer or DurableWriter()
        self.sink = sink
        self.on_durable = on_durable or (lambda message: None)
        self.bases: OrderedDict[str, LoadedBase] = OrderedDict()
        self.sessions: OrderedDict[str, RunSession] = OrderedDict()
        self.session_base: dict[str, str] = {}

    # ------------------------------------------------------------ the chunk step

    def train_chunk(self, run: PlannedRun, config: Any, chunk: int, resume_from: str | None,
                    max_eval_samples: int | None, evaluate: bool = True) -> ChunkOutcome:
        started = time.perf_counter()
        session = self._session(run, config, chunk_boundary(run, chunk - 1), resume_from, max_eval_samples)
        self._place(run.run_id)
        step_seconds = session.train_until(chunk_boundary(run, chunk))
        eval_started = time.perf_counter()
        # GRPO is ranked by the rewards it logs while training; evaluating would mean generating again.
        evaluate = evaluate and config.method != "grpo" and session.trainer.eval_dataset is not None
        metrics = session.evaluate() if evaluate else {}
        eval_seconds = time.perf_counter() - eval_started
        final = chunk == len(run.derived.chunk_steps or []) - 1
        target = self.root / "runs" / run.run_id / f"chunk-{chunk}"
        state = session.snapshot()  # in a gang, every rank takes part; rank 0 gets the state and writes it
        if state is not None:
            self._write_durably(run, config, session, state, chunk, target, final)
        if final:
            self.close(run.run_id, wait=False)
        peak, total = _memory(self.device)
        return ChunkOutcome(run.run_id, chunk, session.step, str(target), metrics, final, step_seconds, eval_seconds,
                            time.perf_counter() - started, peak, total)

    def _write_durably(self, run: PlannedRun, config: Any, session: RunSession, state: RunState, chunk: int,
                       target: Path, final: bool) -> None:
        adapter_config = self._adapter_config(session)
        base = self.bases[self.session_base[run.run_id]]
        full_model = session.model if session.adapter_name is None else None

        def write() -> str | None:
            write_run_state(target, state, adapter_config)
            if not final:
                return None
            from finetune.train.export import write_final

            return str(write_final(config, run.run_id, self.root, state.trainable, adapter_config, base, full_model))

        def done(final_checkpoint: str | None) -> None:
            self.on_durable({"type": "chunk_durable", "run_id": run.run_id, "chunk": chunk, "checkpoint": str(target),
                             "final_checkpoint": final_checkpoint})

        def failed(error: BaseException) -> None:
            self.on_durable({"type": "write_failed", "run_id": run.run_id, "chunk": chunk, "error": f"{type(error).__name__}: {error}"})

        self.writer.submit(WriteJob(run.run_id, write, done, failed))

    def _adapter_config(self, session: RunSession) -> Any | None:
        if session.adapter_name is None:
            return None
        base = self.bases[self.session_base[session.run_id]]
        adapter_config = copy.copy(session.model.peft_config[session.adapter_name])
        adapter_config.base_model_name_or_path = str(base.saved_as) if base.saved_as else adapter_config.base_model_name_or_path
        return adapter_config

    # ------------------------------------------------------------ sessions

    def _session(self, run: PlannedRun, config: Any, start_step: int, resume_from: str | None,
                 max_eval_samples: int | None) -> RunSession:
        session = self.sessions.get(run.run_id)
        if session is not None and session.step == start_step:
            self.sessions.move_to_end(run.run_id)
            return session
        if session is not None:
            self.close(run.run_id)  # stale: the run went on elsewhere
        if self.gang_rank is not None:
            for other in list(self.sessions):  # a gang's runs are large: one at a time in memory
                self.close(other)
        session = self._open(run, config, max_eval_samples)
        if resume_from and is_run_state(resume_from):
            session.restore(read_run_state(resume_from))
        elif resume_from:
            from finetune.train.export import load_initial_checkpoint

            load_initial_checkpoint(session, resume_from)
        if session.step != start_step:
            raise RuntimeError(f"run {run.run_id} is at step {session.step}, its chunk starts at step {start_step}: "
                               "its durable checkpoint is missing")
        return session

    def _open(self, run: PlannedRun, config: Any, max_eval_samples: int | None) -> RunSession:
        from finetune.train.adapter import attach_adapter
        from finetune.train.trainer import build_trainer

        base = self._base(config)
        data = self._data(base, run.run_id, config)
        seed = int(config.training_args.seed if getattr(config.training_args, "seed", None) is not None else 42)
        if self.gang_rank is not None:
            # DDP and FSDP wrap one model with one set of trainable weights: the run owns the loaded base.
            model, base.model = base.model, None
            if config.peft_conf.peft_type != "NO_PEFT":
                model = attach_adapter(model, None, config.peft_conf, base.new_token_ids, "default", seed)
            adapter_name = None if config.peft_conf.peft_type == "NO_PEFT" else "default"
        elif config.peft_conf.peft_type == "NO_PEFT":
            model, adapter_name = copy.deepcopy(base.model), None
        elif config.method == "dpo":
            # TRL's DPO keeps its reference as an adapter copied from one named "default": a private model.
            model = attach_adapter(copy.deepcopy(base.model), None, config.peft_conf, base.new_token_ids, "default", seed)
            adapter_name = "default"
        else:
            base.shared = attach_adapter(base.model, base.shared, config.peft_conf, base.new_token_ids, run.run_id, seed)
            model, adapter_name = base.shared, run.run_id
        run_dir = self.root / "runs" / run.run_id
        callbacks = [_metrics_callback(run.run_id, self.sink)]
        trainer = build_trainer(config, run.derived, model, base.tokenizer, data.train, eval_subset(data.eval, max_eval_samples),
                                run_dir, self.device, callbacks, base.input_pad_id)
        assert run.derived.total_steps is not None
        session = RunSession(run.run_id, trainer, adapter_name, self.device, run.derived.total_steps)
        self.sessions[run.run_id] = session
        self.session_base[run.run_id] = base.key
        return session

    def close(self, run_id: str, wait: bool = True) -> None:
        """Forget a run's in-memory state (its durable checkpoint stays)."""
        from finetune.train.adapter import detach_adapter

        session = self.sessions.pop(run_id, None)
        if session is None:
            return
        if wait:
            self.writer.wait_for(run_id)
        base = self.bases.get(self.session_base.pop(run_id))
        if base is not None and base.shared is not None and session.model is base.shared:
            detach_adapter(base.shared, session.adapter_name)

    def _place(self, active: str) -> None:
        """Bring the active run's state to the device; move or drop others to stay within budget."""
        if self.gang_rank is not None:
            return  # alone on its devices
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        residents = [Resident(run_id, s.resident_bytes("cuda"), s.resident_bytes("cpu")) for run_id, s in self.sessions.items()]
        offload, drop = plan_placement(residents, active, self.budgets)
        for run_id in drop:
            self.close(run_id)
        for run_id in offload:
            self.sessions[run_id].move_state("cpu")
        if device_type == "cuda":
            self.sessions[active].move_state(self.device)

    # ------------------------------------------------------------ base models and data

    def _base(self, config: Any) -> LoadedBase:
        key = base_key(config)
        if key in self.bases:
            self.bases.move_to_end(key)
            base = self.bases[key]
            if base.model is None:  # a gang's run took it
                from finetune.train.model import load_base_model

                base.model = load_base_model(config, len(base.tokenizer), self.device)
            return base
        while len(self.bases) >= MAX_RESIDENT_BASES:
            oldest = next(iter(self.bases))
            for run_id in [r for r, k in self.session_base.items() if k == oldest]:
                self.close(run_id)
            self.bases.pop(oldest)
        self.bases[key] = self._load_base(key, config)
        return self.bases[key]

    def _load_base(self, key: str, config: Any) -> LoadedBase:
        from finetune.data.pipeline import input_pad_token_id, prepare_tokenizer
        from finetune.runtime import freeze_long_lived_objects
        from finetune.train.model import load_base_model, load_tokenizer

        tokenizer = load_tokenizer(config)
        added = prepare_tokenizer(tokenizer, config.data_conf)
        model = load_base_model(config, len(tokenizer), self.device)
        new_ids = list(range(len(tokenizer) - added, len(tokenizer)))
        base = LoadedBase(key, tokenizer, model, new_ids, input_pad_token_id(tokenizer, config.data_conf))
        target = self.root / "base-models" / _short_hash(key)
        if added and self.gang_rank in (None, 0):
            from finetune.train.export import save_base_once

            base.saved_as = save_base_once(model, tokenizer, target)
        elif added:  # another rank of the gang: HF's save_pretrained writes no weights off rank 0
            base.saved_as = target.resolve()
        if self.gang_rank is None:  # a gang's models come and go with its runs: frozen, their cycles would leak
            freeze_long_lived_objects()
        return base

    def _data(self, base: LoadedBase, run_id: str, config: Any) -> Any:
        """The run's datasets; the content hash (which reads every data file) is computed once per run."""
        from finetune.data.pipeline import data_cache_key, prepare_data

        if run_id not in base.data_keys:
            base.data_keys[run_id] = data_cache_key(config, base.tokenizer)
        key = base.data_keys[run_id]
        if key not in base.data:
            base.data[key] = prepare_data(config, base.tokenizer, self.root / "cache")
        return base.data[key]


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _memory(device: str) -> tuple[int, int]:
    """(peak bytes allocated by this worker, the device's total bytes); zeros on the CPU."""
    if not device.startswith("cuda"):
        return 0, 0
    import torch

    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.get_device_properties(device).total_memory)


def _metrics_callback(run_id: str, sink: MetricsSink | None) -> Any:
    from transformers import TrainerCallback

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if sink is not None and logs:
                numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                sink(run_id, state.global_step, numbers)

    return _Forward()
