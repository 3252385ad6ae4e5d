"""The seam on Trainer.training_step (finetune.train.micro_step): set up once per chunk, the same math."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from finetune.train.micro_step import has_plain_training_step


def _session(config: Any, out: Path, fast: bool) -> Any:
    from finetune.data.pipeline import input_pad_token_id, prepare_data, prepare_tokenizer
    from finetune.plan.derive import derive
    from finetune.train.adapter import attach_adapter
    from finetune.train.model import load_base_model, load_tokenizer
    from finetune.train.session import RunSession
    from finetune.train.trainer import build_trainer

    tokenizer = load_tokenizer(config)
    prepare_tokenizer(tokenizer, config.data_conf)
    data = prepare_data(config, tokenizer)
    model = attach_adapter(load_base_model(config, len(tokenizer)), None, config.peft_conf, [], "run", seed=7)
    derived = derive(config, data.stats.train_rows)
    trainer = build_trainer(config, derived, model, tokenizer, data.train, None, out, "cpu", [], input_pad_token_id(tokenizer, config.data_conf))
    session = RunSession("run", trainer, "run", "cpu", derived.total_steps)
    session.micro_step.fast = fast
    return session


@pytest.mark.slow
@pytest.mark.parametrize("sft_args", [{}, {"padding_free": True}], ids=["padded", "padding-free"])
def test_the_fast_micro_step_trains_bitwise_as_trainer_training_step(demo_dir, base_config, tmp_path, sft_args) -> None:
    import torch

    from finetune.config.models import CONFIG_ADAPTER

    tree = copy.deepcopy(base_config)
    tree["data_conf"]["training_data"]["datasets"] = [{"path": str(demo_dir / "data" / "sft_train.jsonl")}]
    tree["run_conf"]["model"] = str(demo_dir / "model")
    tree["training_args"].update(max_steps=6, max_grad_norm=1.0, logging_steps=2, learning_rate=1e-2)
    tree["sft_args"] = {"train_on_completions_only": True, **sft_args}
    tree["peft_conf"]["peft_kwargs"].update(target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1)  # mode matters
    config = CONFIG_ADAPTER.validate_python(tree)  # total batch 8 of micro-batches of 4: accumulation 2
    sessions = [_session(config, tmp_path / name, fast) for name, fast in (("slow", False), ("fast", True))]
    assert sessions[1].micro_step.fast and sessions[0].trainer.args.gradient_accumulation_steps == 2
    for session in sessions:
        session.train_until(3)
        session.model.eval()  # as a chunk boundary's evaluation leaves it: the next chunk must switch back
        session.train_until(6)
    slow, fast = (session.trainable_state() for session in sessions)
    assert slow.keys() == fast.keys()
    assert all(torch.equal(slow[key], fast[key]) for key in slow)
    assert sessions[0].tr_loss.item() == sessions[1].tr_loss.item()
    trained = [key for key in fast if "lora_B" in key]  # LoRA's B starts at zero: training moved it
    assert trained and all(fast[key].abs().sum() > 0 for key in trained)


class _Accelerator:
    distributed_type = "NO"
    parallelism_config = None


def _trainer_of(cls: type, optim: str = "adamw_torch") -> Any:
    trainer = object.__new__(cls)
    trainer.accelerator = _Accelerator()
    trainer.args = type("Args", (), {"optim": optim})()
    return trainer


def test_only_trainers_whose_training_step_is_trainers_own_take_the_fast_path() -> None:
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    assert has_plain_training_step(_trainer_of(SFTTrainer))
    assert has_plain_training_step(_trainer_of(DPOTrainer))
    assert not has_plain_training_step(_trainer_of(GRPOTrainer))  # generates completions in its training_step
    assert not has_plain_training_step(_trainer_of(SFTTrainer, optim="OptimizerNames.LOMO"))

    class Custom(SFTTrainer):
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            return super().training_step(*args, **kwargs)

    assert not has_plain_training_step(_trainer_of(Custom))
