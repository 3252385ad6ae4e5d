"""What `RunSession` does that `Trainer.train()` would have done: TRL's callbacks act (sync_ref_model moves
the reference model, which then travels with the run's checkpoints), the model is prepared as train()
prepares it (activation checkpointing, NEFTune), and a callback's request to stop is not ignored.
(The order of the callback events and the logs against `trainer.train()` itself: tests/test_reference_trl.py.)"""

from __future__ import annotations

import pytest

from tests.test_reference_trl import _config, _trainer

pytestmark = pytest.mark.slow


def test_sync_ref_model_moves_the_dpo_reference_and_checkpoints_carry_it(demo_dir, tmp_path) -> None:
    import torch

    from finetune.train.checkpoint import read_run_state, write_run_state
    from finetune.train.session import RunSession

    config = _config("dpo", demo_dir, "NO_PEFT")
    config.training_args.sync_ref_model, config.training_args.ref_model_sync_steps = True, 1
    config.training_args.ref_model_mixup_alpha = 0.5
    trainer, _, total = _trainer(config, tmp_path / "dpo")
    session = RunSession("run", trainer, None, "cpu", total)
    reference = trainer.ref_model
    before = {key: value.clone() for key, value in reference.state_dict().items()}
    session.train_until(1)
    after, policy = reference.state_dict(), session.model.state_dict()
    moved = [key for key in before if not torch.equal(before[key], after[key])]
    assert moved, "the reference model did not move: TRL's SyncRefModelCallback never ran"
    for key in moved:  # TR-DPO's mix at the step's end: ref = (1 - alpha) ref + alpha policy
        assert torch.allclose(after[key], 0.5 * before[key] + 0.5 * policy[key], atol=1e-6)

    state = session.snapshot(tmp_path / "chunk", final=False)
    assert state.reference is not None
    written = read_run_state(write_run_state(tmp_path / "chunk-0", state, None))
    assert all(torch.equal(written.reference[key], after[key]) for key in after)
    session.train_until(2)  # moves the reference again
    session.restore(written)
    assert all(torch.equal(reference.state_dict()[key], written.reference[key]) for key in after)


def test_a_session_prepares_the_model_as_train_does_and_honours_a_stop_request(demo_dir, tmp_path) -> None:
    import torch
    from transformers import TrainerCallback

    from finetune.train.session import RunSession

    class StopAtTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step == 2:
                control.should_training_stop = True

    config = _config("sft", demo_dir, "LORA")
    config.training_args.gradient_checkpointing, config.training_args.neftune_noise_alpha = True, 5.0
    trainer, adapter, total = _trainer(config, tmp_path / "sft", [StopAtTwo()])
    session = RunSession("run", trainer, adapter, "cpu", total)
    assert session.model.is_activation_checkpointing
    embeddings = session.model.get_base_model().get_input_embeddings()
    ids = torch.tensor([[1, 2, 3]])
    embeddings.train()
    assert not torch.equal(embeddings(ids), embeddings(ids))  # NEFTune's noise, in training mode only
    embeddings.eval()
    assert torch.equal(embeddings(ids), embeddings(ids))

    session.train_until(1)
    with pytest.raises(RuntimeError, match="should_training_stop"):
        session.train_until(total)
    assert session.step == 2
