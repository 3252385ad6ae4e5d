"""Every private API of a third-party library that finetune touches, one module per library.

finetune trains a run in chunks with TRL's trainers used as libraries (`finetune.train.session`), so it
reaches into what `Trainer.train()` does inside. Where a public API does the job it is used directly
(accelerate's `Accelerator.sync_gradients` setter, `Trainer.get_batch_samples`, `TrainerState.compute_steps`,
the callback handler's events). What is left is here, each use with the reason the public API does not
suffice, so that an upgrade that breaks one fails in one place: `tests/test_seams.py` checks each seam
against the installed versions, and pyproject.toml bounds each library to the versions the seams were
checked against (lower: the first release that has every seam; upper: the next major release).

- `seams.transformers`: `Trainer._prepare_inputs`, `Trainer._get_train_sampler`, `Trainer.loss_is_scaled_for_ga`
  (public, from transformers 5.19), `masking_utils.find_packed_sequence_indices` and the modeling modules'
  `create_causal_mask`, `PreTrainedModel._no_split_modules`.
- `seams.trl`: `GRPOTrainer._step` (its generation counter), the `training_step` overrides that only wrap
  `Trainer.training_step`.
- `seams.peft`: `TrainableTokensWrapper._hasattr_wrapped` / `_getattr_wrapped` (a monkeypatch).
- Optuna: no private attribute is read; the study is reached through the public storage interface of a
  storage finetune creates itself (`finetune/search/optuna_storage.py`).
"""
