"""Training one run chunk by chunk on a worker that keeps base models loaded.

`Resident` holds what runs can share on a device: the tokenizer and the base model of one
(model, template) pair, and each data setting's prepared datasets. A run's chunk attaches
its adapter (or copies the base for full fine-tuning), resumes from the run's last durable
checkpoint, trains up to the chunk boundary, saves, evaluates and detaches again.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from finetune.plan.model import PlannedRun

MetricsSink = Callable[[str, int, dict[str, float]], None]


@dataclass
class ChunkOutcome:
    run_id: str
    chunk: int
    global_step: int
    checkpoint: str
    metrics: dict[str, float]
    final_checkpoint: str | None = None
    step_seconds: float = 0.0


@dataclass
class Resident:
    """A loaded (tokenizer, base model) pair and the prepared data of the runs that share it."""

    tokenizer: Any
    base_model: Any
    added_tokens: int
    input_pad_id: int
    data: dict[str, Any] = field(default_factory=dict)
    data_keys: dict[str, str] = field(default_factory=dict)


def base_key(config: Any) -> str:
    """Runs with the same key share a loaded base model (and tokenizer) on a worker."""
    run_conf = config.run_conf
    shaping = [
        run_conf.model,
        run_conf.tokenizer,
        run_conf.use_fast_tokenizer,
        run_conf.model_args.model_dump_json(),
        config.quant_conf.model_dump_json(),
        config.data_conf.chat_template_name,
        config.data_conf.missing_pad_token_strategy,
        config.data_conf.padding_side,
    ]
    return json.dumps(shaping, default=str)


def load_resident(config: Any, device: str) -> Resident:
    from finetune.data.pipeline import input_pad_token_id, prepare_tokenizer
    from finetune.train.model import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(config)
    added = prepare_tokenizer(tokenizer, config.data_conf)
    model = load_base_model(config, len(tokenizer), device)
    return Resident(tokenizer, model, added, input_pad_token_id(tokenizer, config.data_conf))


def prepared_data(resident: Resident, run_id: str, config: Any, cache_dir: Path) -> Any:
    """The run's datasets; the content hash (which reads every data file) is computed once per run."""
    from finetune.data.pipeline import data_cache_key, prepare_data

    if run_id not in resident.data_keys:
        resident.data_keys[run_id] = data_cache_key(config, resident.tokenizer)
    key = resident.data_keys[run_id]
    if key not in resident.data:
        resident.data[key] = prepare_data(config, resident.tokenizer, cache_dir)
    return resident.data[key]


def eval_subset(dataset: Any, limit: int | None) -> Any:
    if dataset is None or limit is None or len(dataset) <= limit:
        return dataset
    return dataset.select(range(limit))


def _metrics_callback(run_id: str, sink: MetricsSink | None) -> Any:
    from transformers import TrainerCallback

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if sink is not None and logs:
                numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                sink(run_id, state.global_step, numbers)

    return _Forward()


@dataclass
class StepTimer:
    """Wall time spent inside optimizer steps (forward, backward, update): a chunk's compute."""

    seconds: float = 0.0

    def as_callback(self) -> Any:
        import time

        from transformers import TrainerCallback

        timer = self

        class _Timer(TrainerCallback):
            started = 0.0

            def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                self.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                timer.seconds += time.perf_counter() - self.started

        return _Timer()


def _stop_callback(stop_step: int) -> Any:
    from transformers import TrainerCallback

    class _StopAtBoundary(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step >= stop_step:
                control.should_save = True
                control.should_training_stop = True
            return control

    return _StopAtBoundary()


def chunk_boundary(run: PlannedRun, chunk: int) -> int:
    assert run.derived.chunk_steps is not None
    return sum(run.derived.chunk_steps[: chunk + 1])


def train_chunk(
    run: PlannedRun,
    config: Any,
    chunk: int,
    resume_from: str | None,
    resident: Resident,
    run_dir: Path,
    cache_dir: Path,
    device: str,
    max_eval_samples: int | None,
    sink: MetricsSink | None = None,
) -> ChunkOutcome:
    """Train chunk `chunk` of `run` (0-based; `config` is its validated config) from `resume_from`,
    save at its boundary, evaluate."""
    from finetune.train.adapter import attach_adapter, detach_adapter
    from finetune.train.trainer import build_trainer

    data = prepared_data(resident, run.run_id, config, cache_dir)
    seed = int(run.config.get("training_args", {}).get("seed", 42))
    full_finetune = config.peft_conf.peft_type == "NO_PEFT"
    base = copy.deepcopy(resident.base_model) if full_finetune else resident.base_model
    attached = attach_adapter(base, config.peft_conf, resident.added_tokens, seed)
    stop_step = chunk_boundary(run, chunk)
    evaluation = eval_subset(data.eval, max_eval_samples)
    timer = StepTimer()
    try:
        trainer = build_trainer(
            config, run.derived, attached.model, resident.tokenizer, data.train, evaluation, run_dir, device,
            [timer.as_callback(), _stop_callback(stop_step), _metrics_callback(run.run_id, sink)], resident.input_pad_id,
        )
        trainer.train(resume_from_checkpoint=resume_from)
        metrics: dict[str, float] = {}
        if evaluation is not None and config.method != "grpo":
            metrics = {k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}
        checkpoint = run_dir / f"checkpoint-{stop_step}"
        final = None
        if chunk == len(run.derived.chunk_steps or []) - 1:
            final = str(save_final(config, trainer.model, resident.tokenizer, run_dir))
        return ChunkOutcome(run.run_id, chunk, stop_step, str(checkpoint), metrics, final, timer.seconds)
    finally:
        if not full_finetune:
            detach_adapter(attached)


def _save_atomically(target: Path, model: Any, tokenizer: Any) -> None:
    """Write model and tokenizer into a temporary directory, then rename it to `target`."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def save_final(config: Any, model: Any, tokenizer: Any, run_dir: Path) -> Path:
    """`checkpoint-final` (the adapter, or the full model, with the tokenizer); for adapter runs also the
    adapter merged into the base model, under the method's `save_name_if_new_basemodel`."""
    from peft import PeftModel

    final = run_dir / config.run_conf.final_checkpoint_name
    _save_atomically(final, model, tokenizer)
    method_args = {"sft": config.sft_args, "dpo": getattr(config, "dpo_args", None), "grpo": getattr(config, "grpo_args", None)}[config.method]
    if isinstance(model, PeftModel) and method_args is not None:
        merged = copy.deepcopy(model).merge_and_unload()
        _save_atomically(run_dir / method_args.save_name_if_new_basemodel, merged, tokenizer)
    return final
