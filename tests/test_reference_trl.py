"""finetune's chunked loop against TRL's own `trainer.train()`: the same config, seed and data give the
same weights, bitwise on the CPU (LoRA and full fine-tuning with SFT, and DPO).

Both sides build their trainer with `finetune.train.trainer.build_trainer` from one validated config (so the
data, collator and TRL arguments are the same); one trains with `trainer.train()`, the other with a
`RunSession` in two chunks, with an evaluation between them as a chunk boundary has.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
STEPS = 4


def _config(method: str, demo_dir: Path, peft_type: str) -> Any:
    from finetune.config.models import CONFIG_ADAPTER
    from tests.conftest import BASE_SFT

    tree: dict[str, Any] = copy.deepcopy(BASE_SFT)
    tree["run_conf"]["model"] = str(demo_dir / "model")
    # Accumulation 2 (micro-batches of 4, total 8), a ratio of the steps for logging, clipping on.
    tree["training_args"].update(max_steps=STEPS, learning_rate=1e-2, max_grad_norm=1.0, logging_steps=0.5, seed=11,
                                 data_seed=5, include_num_input_tokens_seen="non_padding")
    tree["peft_conf"]["peft_kwargs"].update(target_modules=["q_proj", "v_proj"])
    if peft_type == "NO_PEFT":
        tree["peft_conf"] = {"peft_type": "NO_PEFT"}
        tree["training_args"]["learning_rate"] = 1e-3
    if method == "dpo":
        tree.update(method="dpo", sft_args=None, dpo_args={"max_seq_length": 128})
        tree["data_conf"]["training_data"]["datasets"] = [{"path": str(demo_dir / "data" / "dpo_train.jsonl")}]
        tree["training_args"]["beta"] = 0.1
    else:
        tree["data_conf"]["training_data"]["datasets"] = [{"path": str(demo_dir / "data" / "sft_train.jsonl")}]
        tree["sft_args"] = {"train_on_completions_only": True}
    return CONFIG_ADAPTER.validate_python(tree)


class EventRecorder:
    """A trainer callback that records each event it sees with the step it was at."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        events: list[tuple[str, int]] = []
        self.events = events

        class _Recorder(TrainerCallback):
            pass

        for name in ("on_epoch_begin", "on_epoch_end", "on_step_begin", "on_substep_end", "on_pre_optimizer_step",
                     "on_optimizer_step", "on_step_end"):
            setattr(_Recorder, name, lambda self, args, state, control, _name=name, **kwargs: events.append((_name, state.global_step)))

        def on_log(self: Any, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:  # the training logs (not an evaluation's, nor train()'s closing summary)
                events.append(("on_log", state.global_step))

        _Recorder.on_log = on_log
        self.callback = _Recorder()


def _trainer(config: Any, out: Path, callbacks: list[Any] | None = None) -> tuple[Any, str | None, int]:
    from finetune.data.pipeline import input_pad_token_id, prepare_data, prepare_tokenizer
    from finetune.plan.derive import derive
    from finetune.train.adapter import attach_adapter
    from finetune.train.model import load_base_model, load_tokenizer
    from finetune.train.trainer import build_trainer

    tokenizer = load_tokenizer(config)
    prepare_tokenizer(tokenizer, config.data_conf)
    data = prepare_data(config, tokenizer)
    model = load_base_model(config, len(tokenizer))
    adapter = None if config.peft_conf.peft_type == "NO_PEFT" else "default"
    if adapter:
        model = attach_adapter(model, None, config.peft_conf, [], adapter, seed=7)
    derived = derive(config, data.stats.train_rows)
    trainer = build_trainer(config, derived, model, tokenizer, data.train, data.eval, out, "cpu", callbacks or [],
                            input_pad_token_id(tokenizer, config.data_conf))
    return trainer, adapter, derived.total_steps


def _weights(model: Any, adapter: str | None) -> dict[str, Any]:
    if adapter is None:
        return {key: value.detach().clone() for key, value in model.state_dict().items()}
    from peft import get_peft_model_state_dict

    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def _training_logs(trainer: Any) -> list[dict[str, Any]]:
    """What the trainer logged while training, wall-clock figures aside (train() adds its runtime and the
    tokens per second of its one call to each log; finetune times chunks instead)."""
    timing = ("train_runtime", "train_tokens_per_second")
    return [{key: value for key, value in entry.items() if key not in timing}
            for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize(("method", "peft_type"), [("sft", "LORA"), ("sft", "NO_PEFT"), ("dpo", "LORA")],
                         ids=["sft-lora", "sft-full", "dpo-lora"])
def test_chunks_train_the_weights_trl_trains(demo_dir, tmp_path, method, peft_type) -> None:
    import torch

    from finetune.train.session import RunSession

    config = _config(method, demo_dir, peft_type)
    recorders = EventRecorder(), EventRecorder()
    reference, adapter, total = _trainer(config, tmp_path / "trl", [recorders[0].callback])
    assert total == STEPS and reference.args.gradient_accumulation_steps == 2
    initial = _weights(reference.model, adapter)
    reference.train()
    expected = _weights(reference.model, adapter)

    trainer, adapter, total = _trainer(config, tmp_path / "finetune", [recorders[1].callback])
    session = RunSession("run", trainer, adapter, "cpu", total)
    session.train_until(STEPS // 2)
    session.evaluate()  # a chunk boundary: evaluation must leave the training untouched
    session.train_until(STEPS)
    got = _weights(session.model, adapter)

    assert got.keys() == expected.keys()
    moved = [key for key in expected if not torch.equal(expected[key], initial[key])]
    assert moved, "training changed no weight: the comparison would prove nothing"
    different = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not different, f"weights differ from trainer.train(): {different[:5]}"
    # The same logs (loss, grad_norm, learning_rate, epoch, tokens seen) at the same steps: logging_steps 0.5 of 4.
    assert _training_logs(trainer) == _training_logs(reference) and len(_training_logs(reference)) == 2
    assert "num_input_tokens_seen" in _training_logs(reference)[0]
    # The callbacks see the events of HF's loop in its order (the evaluation between the chunks aside).
    assert recorders[1].events == recorders[0].events
    assert recorders[0].events[:6] == [("on_epoch_begin", 0), ("on_step_begin", 0), ("on_substep_end", 0),
                                       ("on_pre_optimizer_step", 0), ("on_optimizer_step", 0), ("on_step_end", 1)]
