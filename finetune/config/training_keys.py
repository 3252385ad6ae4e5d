"""What finetune does with each key of `training_args` (TRL's SFTConfig, DPOConfig, GRPOConfig).

finetune trains a run in chunks with TRL's trainers used as libraries and never calls `trainer.train()`
(`finetune.train.session`), so a key that only `train()` reads would validate and then do nothing. Every
key therefore has one fate here:

- `Honoured`: finetune does what the key asks, and says how it maps onto chunks;
- `Passed`: the key goes to TRL's config and the trainer's own code reads it (its loss, data
  preparation, collator, model set-up, evaluation): the default for keys not listed here;
- `Ignored`: taken out before training, with a `note:` at validate naming what to use instead;
- `Refused`: a value other than the ones listed (those that turn the feature off) is a validation
  error naming the key and what to use instead (`checked_by` says when: validate, or `finetune run`'s
  check of every run before any work).

Keys another section sets (batch sizes, output directory, ...) are in `training_args.OWNED_*`.
`docs/compatibility.md` lists every key of every method and its fate (`fate_table_markdown`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class Honoured:
    how: str


@dataclass(frozen=True)
class Passed:
    how: str = "passed to TRL's config; the trainer's own code reads it"


@dataclass(frozen=True)
class Ignored:
    instead: str


@dataclass(frozen=True)
class Refused:
    instead: str
    accepts: tuple[Any, ...] = (False, None)  # values that validate (they ask for nothing)
    checked_by: str = "validate"


Fate = Union[Honoured, Passed, Ignored, Refused]

_OPTIMIZER = Honoured("the run's optimizer, created once and continued across chunks; its moments are in every durable chunk")
_SCHEDULE = Honoured("one schedule over the run's total steps, continued across chunks (saved with every durable chunk)")
_LOGGING = Honoured("decided step by step by HF's flow callback, as under train(), across chunk boundaries; "
                    "logs go to the state store, MLflow and W&B (report_to)")
_EVALUATION = Ignored("experiment.eval_every_chunks: finetune evaluates at chunk boundaries (eval_conf says what)")
_SAVING = Ignored("every chunk boundary writes a durable checkpoint (runs/<run>/chunk-<k>); experiment.num_chunks sets how often")
_HUB = Ignored("nothing is pushed to the Hub (push_to_hub is refused)")
_TRACKIO = Ignored("trackio is no report_to of finetune: runs log to MLflow (the tracking section) and W&B (report_to: [wandb])")
_SFT_DATA = Ignored("finetune prepares SFT data itself: data_conf (chat_template_name, missing_pad_token_strategy) and sft_args")
_MODEL_LOADING = Ignored("run_conf.model_args: finetune loads the model itself")
_LOADER = Passed("the evaluation loader reads it; the training micro-batches are read by finetune's stream "
                 "(dataloader_num_workers, dataloader_drop_last)")
_SYNC_REF = Honoured("TRL's SyncRefModelCallback mixes the policy into the reference model at each step's end, as under "
                     "train(); the reference weights are part of every durable chunk. Refused with a PEFT adapter (TRL keeps "
                     "no separate reference model then) and with experiment.distributed fsdp/fsdp_grad_op")

SUPPORTED_REPORT_TO = ("mlflow", "wandb", "none")

KEY_FATES: dict[str, Fate] = {
    # ---- what the loop does, honoured by finetune's chunked loop
    "learning_rate": Honoured("the run's optimizer, after overrides.lr_multiplier and lr_batch_size_scaling"),
    "num_train_epochs": Honoured("the run's total optimizer steps (with max_steps), split into experiment.num_chunks chunks"),
    "max_steps": Honoured("the run's total optimizer steps, split into experiment.num_chunks chunks"),
    "optim": _OPTIMIZER, "optim_args": _OPTIMIZER, "optim_target_modules": _OPTIMIZER, "adam_beta1": _OPTIMIZER,
    "adam_beta2": _OPTIMIZER, "adam_epsilon": _OPTIMIZER, "weight_decay": _OPTIMIZER,
    "lr_scheduler_type": _SCHEDULE, "lr_scheduler_kwargs": _SCHEDULE, "warmup_steps": _SCHEDULE,
    "max_grad_norm": Honoured("gradient clipping at each optimizer step"),
    "seed": Honoured("the adapter's initialisation and the RNG state a run carries from chunk to chunk; the epoch order "
                     "when data_seed is unset"),
    "data_seed": Honoured("the epoch order: epoch e is the trainer's sampler seeded with data_seed + e, as under train()"),
    "train_sampling_strategy": Honoured("the trainer's own sampler draws each epoch's order"),
    "dataloader_drop_last": Honoured("the training stream drops a short last micro-batch of each epoch"),
    "dataloader_num_workers": Honoured("worker processes of the training stream and of the evaluation loader"),
    "dataloader_pin_memory": _LOADER, "dataloader_persistent_workers": _LOADER, "dataloader_prefetch_factor": _LOADER,
    "dataloader_multiprocessing_context": _LOADER, "dataloader_in_order": _LOADER,
    "logging_steps": _LOGGING, "logging_first_step": _LOGGING, "logging_strategy": _LOGGING,
    "logging_nan_inf_filter": Honoured("as HF's loop: a non-finite micro-batch loss counts as the mean loss since the last log"),
    "include_num_input_tokens_seen": Honoured("counted per micro-batch over every rank, logged as num_input_tokens_seen, "
                                              "continued across chunks"),
    "gradient_checkpointing": Honoured("turned on as train() does, once per loaded base model"),
    "gradient_checkpointing_kwargs": Honoured("turned on as train() does, once per loaded base model"),
    "activation_checkpointing": Honoured("turned on as train() does, once per loaded base model"),
    "activation_checkpointing_kwargs": Honoured("turned on as train() does, once per loaded base model"),
    "neftune_noise_alpha": Honoured("NEFTune's embedding noise, added as train() adds it; each run its own alpha"),
    "use_liger_kernel": Honoured("applied as train() applies it, once per loaded base model (CUDA only: refused on the CPU "
                                "before any work)"),
    "liger_kernel_config": Honoured("applied as train() applies it, once per loaded base model"),
    "bf16": Honoured("autocast around the forward, as under train()"),
    "fp16": Honoured("autocast around the forward, as under train() (GPU only: refused on the CPU before any work)"),
    "torch_empty_cache_steps": Honoured("as training_step does, counted in optimizer steps across chunks"),
    "eval_on_start": Honoured("an evaluation before the first step, recorded at step 0"),
    "report_to": Honoured("mlflow: the tracking section, always on; wandb: one W&B run per run, the same metrics at the same "
                          "steps as MLflow (pip install 'finetune[wandb]'; WANDB_MODE=offline works without network); "
                          "other integrations are refused"),
    "project": Honoured("the W&B project when report_to names wandb (default: the experiment's tracking name)"),
    "sync_ref_model": _SYNC_REF, "ref_model_sync_steps": _SYNC_REF, "ref_model_mixup_alpha": _SYNC_REF,
    # ---- what finetune decides at chunk boundaries instead
    "eval_strategy": _EVALUATION, "eval_steps": _EVALUATION, "eval_delay": _EVALUATION,
    "save_strategy": _SAVING, "save_steps": _SAVING, "save_total_limit": _SAVING, "save_on_each_node": _SAVING,
    "save_only_model": _SAVING,
    "metric_for_best_model": Ignored("sweep.metric (and sweep.direction) rank runs; `finetune report` shows the ranking"),
    "greater_is_better": Ignored("sweep.direction"),
    "load_best_model_at_end": Ignored("a run's final model is its last step's; sweep.metric ranks the runs and "
                                      "`finetune report` shows the best"),
    "ignore_data_skip": Ignored("a run always continues at its exact data position (finetune skips consumed batches "
                                "without reading them)"),
    "restore_callback_states_from_checkpoint": Ignored("finetune's durable chunks hold the run's whole state"),
    "enable_jit_checkpoint": Ignored("durable chunks and `finetune run --resume` cover preemption"),
    "auto_find_batch_size": Refused("batchsize_conf.max_per_device_train_batch_size (gradient accumulation is derived from "
                                    "batchsize_conf.total_train_batch_size)"),
    "disable_tqdm": Ignored("finetune shows its own progress"),
    "use_cpu": Ignored("experiment.devices chooses where runs train"),
    "local_rank": Ignored("finetune starts and numbers its own processes (experiment.devices_per_run)"),
    "debug": Ignored("its options act inside train(), which finetune does not call"),
    "do_train": Ignored("no effect in transformers either (read by example scripts only)"),
    "do_eval": Ignored("no effect in transformers either (read by example scripts only); eval_conf says what is measured"),
    "do_predict": Ignored("no effect in transformers either (read by example scripts only)"),
    "push_to_hub": Refused("nothing: finetune trains without network access; upload runs/<run>/checkpoint-final yourself "
                           "(huggingface-cli upload)"),
    "hub_model_id": _HUB, "hub_strategy": _HUB, "hub_token": _HUB, "hub_private_repo": _HUB, "hub_always_push": _HUB,
    "hub_revision": _HUB,
    "log_completions_hub_repo": Refused("nothing: nothing is pushed to the Hub; log_completions logs them with the metrics"),
    "trackio_space_id": _TRACKIO, "trackio_bucket_id": _TRACKIO, "trackio_static_space_id": _TRACKIO,
    "trust_remote_code": _MODEL_LOADING, "model_init_kwargs": _MODEL_LOADING,
    "deepspeed": Refused("experiment.distributed (fsdp, fsdp_grad_op or ddp) and experiment.devices_per_run",
                         accepts=(None,), checked_by="finetune run"),
    "fsdp": Refused("experiment.distributed (fsdp, fsdp_grad_op or ddp) and experiment.devices_per_run",
                    accepts=(None, "", False), checked_by="finetune run"),
    "fsdp_config": Refused("experiment.distributed and experiment.fsdp_cpu_offload", accepts=(None,), checked_by="finetune run"),
}

# Keys whose fate depends on the method.
METHOD_FATES: dict[str, dict[str, Fate]] = {
    "sft": {
        "dataset_text_field": _SFT_DATA, "dataset_kwargs": _SFT_DATA, "dataset_num_proc": _SFT_DATA, "eos_token": _SFT_DATA,
        "pad_token": _SFT_DATA, "chat_template_path": Ignored("data_conf.chat_template_name"),
        "shuffle_dataset": Ignored("each epoch's order is the trainer's sampler seeded with data_seed (or seed) + epoch"),
        "truncation_mode": Ignored("sft_args.max_seq_length: longer examples are dropped, never truncated"),
        "pad_to_multiple_of": _SFT_DATA,
        "activation_offloading": Honoured("the training step runs in TRL's activation-offload context, as under train()"),
    },
    "dpo": {
        "activation_offloading": Honoured("the training step runs in TRL's activation-offload context, as under train()"),
    },
}


def fate_of(key: str, method: str) -> Fate:
    return METHOD_FATES.get(method, {}).get(key) or KEY_FATES.get(key) or Passed()


def ignored_keys(method: str) -> set[str]:
    return {key for key in {*KEY_FATES, *METHOD_FATES.get(method, {})} if isinstance(fate_of(key, method), Ignored)}


def ignored_note(key: str, method: str | None) -> str | None:
    """The note for an ignored key (None if the key is not ignored for `method`; any method when None)."""
    methods = [method] if method else ["sft", "dpo", "grpo"]
    fates = [fate_of(key, name) for name in methods]
    ignored = [fate for fate in fates if isinstance(fate, Ignored)]
    if not ignored or (method is None and len(ignored) < len(fates)):
        return None
    return f"finetune does not use it; {ignored[0].instead}"


def report_to_values(value: Any) -> list[str]:
    if value is None:
        return ["none"]
    return [value] if isinstance(value, str) else [str(item) for item in value]


def refusals(config: Any) -> list[tuple[str, str, Any, str]]:
    """(key, problem, given, allowed) for each training_args value finetune refuses in this concrete config."""
    args, method = config.training_args, config.method
    found = []
    for key in sorted(args.model_fields_set):
        fate, value = fate_of(key, method), getattr(args, key, None)
        if isinstance(fate, Refused) and fate.checked_by == "validate" and value not in fate.accepts:
            allowed = " or ".join(repr(item) for item in fate.accepts if item is not None) or "unset"
            found.append((key, f"finetune cannot honour {key}; use {fate.instead}", value, f"{allowed} (or leave it out)"))
    unsupported = [name for name in report_to_values(getattr(args, "report_to", None)) if name not in SUPPORTED_REPORT_TO]
    if unsupported:
        found.append(("report_to", f"finetune reports to mlflow and wandb only, not {', '.join(unsupported)}", args.report_to,
                      "a list of: " + ", ".join(SUPPORTED_REPORT_TO)))
    if getattr(args, "sync_ref_model", False):
        if config.peft_conf.peft_type != "NO_PEFT":
            found.append(("sync_ref_model", "with a PEFT adapter TRL keeps no separate reference model to synchronise",
                          True, "false, or peft_conf.peft_type: NO_PEFT"))
        elif config.experiment.distributed.startswith("fsdp"):
            found.append(("sync_ref_model", "finetune does not checkpoint a sharded reference model",
                          True, "false, or experiment.distributed: ddp"))
    return found


def fate_table_markdown(methods: dict[str, set[str]], owned: dict[str, dict[str, str]]) -> str:
    """The table of every key of every method (`methods`: method -> its keys; `owned`: method -> key -> owner)."""
    keys = sorted(set().union(*methods.values()))
    lines = ["| key in `training_args` | methods | fate | how, or what to use instead |", "| --- | --- | --- | --- |"]
    for key in keys:
        rows: dict[str, list[str]] = {}
        for method in ("sft", "dpo", "grpo"):
            if key not in methods.get(method, ()):
                continue
            rows.setdefault(_describe(key, method, owned.get(method, {})), []).append(method)
        for described, names in rows.items():
            lines.append(f"| `{key}` | {', '.join(names)} | {described} |")
    return "\n".join(lines)


def _describe(key: str, method: str, owned: dict[str, str]) -> str:
    if key in owned:
        return f"rejected | set by {owned[key]}"
    fate = fate_of(key, method)
    if isinstance(fate, Honoured):
        return f"honoured | {fate.how}"
    if isinstance(fate, Passed):
        return f"passed to TRL | {fate.how}"
    if isinstance(fate, Ignored):
        return f"ignored, with a note | {fate.instead}"
    accepted = ", ".join(f"`{item}`" for item in fate.accepts if item is not None)
    when = "at validate" if fate.checked_by == "validate" else "by `finetune run` before any work"
    return f"refused {when} (accepted: {accepted or 'unset'}) | {fate.instead}"
