"""Configs written for SiloGen's engine and for older transformers and TRL.

Every `TrainingArguments` key of transformers 4.x that transformers 5 no longer has is one of:
renamed (the value moves to the new key, with a one-line notice), dropped (it has no effect any
more: removed with a notice), or removed (no translation exists: validation rejects it and names
what replaced it). `docs/compatibility.md` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from finetune.config.knobs import knob_kind

OMIT = object()  # a converted value that means: drop the key


@dataclass(frozen=True)
class Renamed:
    new: str
    why: str
    convert: Callable[[Any], Any] = lambda value: value


@dataclass(frozen=True)
class Dropped:
    why: str


@dataclass(frozen=True)
class Removed:
    instead: str


def _flag_to(value: Any, when_true: Any) -> Any:
    return when_true if value is True else OMIT if value is False else value


TRAINING_ARGS: dict[str, Renamed | Dropped | Removed] = {
    "warmup_ratio": Renamed("warmup_steps", "transformers 5 removed warmup_ratio; a warmup_steps below 1 is a ratio of the total steps"),
    "evaluation_strategy": Renamed("eval_strategy", "renamed in transformers 4.46; like eval_strategy itself it has no "
                                   "effect: finetune evaluates at chunk boundaries, every experiment.eval_every_chunks"),
    "no_cuda": Renamed("use_cpu", "renamed in transformers 4.34"),
    "push_to_hub_token": Renamed("hub_token", "renamed in transformers 4.x"),
    "push_to_hub_model_id": Renamed("hub_model_id", "renamed in transformers 4.x"),
    "torchdynamo": Renamed("torch_compile_backend", "renamed in transformers 4.x"),
    "include_inputs_for_metrics": Renamed("include_for_metrics", "renamed in transformers 4.46", lambda v: _flag_to(v, ["inputs"])),
    "include_tokens_per_second": Renamed("include_num_input_tokens_seen", "tokens per second are logged with the tokens seen in transformers 5",
                                         lambda v: _flag_to(v, True)),
    "adafactor": Renamed("optim", "transformers 5 chooses Adafactor through optim", lambda v: _flag_to(v, "adafactor")),
    "group_by_length": Renamed("train_sampling_strategy", "transformers 5 chooses the sampling through train_sampling_strategy",
                               lambda v: _flag_to(v, "group_by_length")),
    "logging_dir": Dropped("finetune logs to MLflow (the tracking section); no TensorBoard directory is written"),
    "overwrite_output_dir": Dropped("finetune owns the experiment directory (experiment.output_dir/experiment.name)"),
    "save_safetensors": Dropped("checkpoints are always safetensors in transformers 5"),
    "fp16_backend": Dropped("transformers 5 always uses torch autocast for half precision"),
    "half_precision_backend": Dropped("transformers 5 always uses torch autocast for half precision"),
    "fp16_opt_level": Dropped("an apex setting; transformers 5 has no apex"),
    "per_gpu_train_batch_size": Removed("batchsize_conf.max_per_device_train_batch_size"),
    "per_gpu_eval_batch_size": Removed("batchsize_conf.per_device_eval_batch_size"),
    "push_to_hub_organization": Removed("hub_model_id, written as ORGANIZATION/NAME"),
    "fsdp_min_num_params": Removed("fsdp_config: {min_num_params: N}"),
    "fsdp_transformer_layer_cls_to_wrap": Removed("fsdp_config: {transformer_layer_cls_to_wrap: [...]}"),
    "use_mps_device": Removed("experiment.devices (finetune trains on CUDA devices or the CPU)"),
    "tpu_num_cores": Removed("nothing: finetune trains on CUDA devices or the CPU"),
    "tpu_metrics_debug": Removed("debug: tpu_metrics_debug"),
    "mp_parameters": Removed("nothing: SageMaker model parallelism is gone from transformers 5"),
    "jit_mode_eval": Removed("torch_compile"),
    "use_legacy_prediction_loop": Removed("nothing: transformers 5 has one evaluation loop"),
    "past_index": Removed("nothing: transformers 5 removed it"),
    "ray_scope": Removed("nothing: hyperparameter search is finetune's sweep section"),
}


def legacy_message(key: str) -> str | None:
    """Why a legacy training argument left in a config is an error, or None for other keys.

    Renamed keys are only left in place when their new name is given too.
    """
    entry = TRAINING_ARGS.get(key)
    if isinstance(entry, Removed):
        return f"'{key}' no longer exists in transformers 5; use {entry.instead}"
    if isinstance(entry, Renamed):
        return f"'{key}' is the old name of '{entry.new}', which is given too: keep one of them"
    return None


def _convert(entry: Renamed, value: Any) -> Any:
    if knob_kind(value) is not None:
        return value  # each candidate is translated as written; only plain renames take knobs
    return entry.convert(value)


@dataclass(frozen=True)
class Translation:
    """One legacy key read differently: where it was, where its value went (None: dropped), why."""

    old: tuple
    new: tuple | None
    notice: str


def translate_training_args(section: Any, prefix: tuple, method: str | None = None) -> list[Translation]:
    """Rename and drop legacy keys of one `training_args` mapping in place, and drop the keys finetune
    ignores (`training_keys`: for `method`, or for every method when it is not known here).

    A key given under both its old and its new name is left alone, for validation to reject.
    """
    from finetune.config.training_keys import ignored_note

    if not isinstance(section, dict):
        return []
    where = ".".join(str(part) for part in prefix)
    done = []
    for key in [key for key in section if key not in TRAINING_ARGS]:
        note = ignored_note(key, method)
        if note is not None:
            section.pop(key)
            done.append(Translation((*prefix, key), None, f"{where}.{key} is ignored: {note}"))
    for key in [key for key in section if key in TRAINING_ARGS]:
        entry = TRAINING_ARGS[key]
        if isinstance(entry, Dropped):
            section.pop(key)
            done.append(Translation((*prefix, key), None, f"{where}.{key} is ignored: {entry.why}"))
        elif isinstance(entry, Renamed) and entry.new not in section:
            value = _convert(entry, section.pop(key))
            new = None if value is OMIT else (*prefix, entry.new)
            if new is not None:
                section[entry.new] = value
            shown = "" if value is OMIT else f": {value!r}"
            done.append(Translation((*prefix, key), new, f"{where}.{key} is read as {where}.{entry.new}{shown} ({entry.why})"))
    return done


def translate_document(tree: Any) -> list[Translation]:
    """Translate `training_args` at the top and in every `groups` overlay."""
    if not isinstance(tree, dict):
        return []
    top = _method(tree, "sft")
    groups = tree.get("groups")
    methods = {_method(group, top) for group in groups if isinstance(group, dict)} if isinstance(groups, list) else set()
    shared = top if methods <= {top} else None  # the top-level keys of groups of several methods
    sections: list[tuple[tuple, Any, str | None]] = [(("training_args",), tree.get("training_args"), shared)]
    for index, group in enumerate(groups if isinstance(groups, list) else []):
        if isinstance(group, dict):
            sections.append((("groups", index, "training_args"), group.get("training_args"), _method(group, top)))
    return [translation for prefix, section, method in sections
            for translation in translate_training_args(section, prefix, method)]


def _method(tree: dict, default: str | None) -> str | None:
    """The method a (group's) tree trains, None when it is a knob (its keys are ignored only if every method ignores them)."""
    method = tree.get("method", default)
    return method if isinstance(method, str) else None


def compatibility_markdown() -> str:
    """`docs/compatibility.md`: what happens to each legacy key (generated from `TRAINING_ARGS`)."""
    lines = [
        "# Configs written for SiloGen's engine and older transformers",
        "",
        "<!-- generated by `finetune schema-docs` from finetune/config/compat.py; do not edit -->",
        "",
        "SiloGen's engine passes `training_args` to the `TrainingArguments` of transformers 4.x. Keys that",
        "transformers 5 no longer has are read under their new name (`finetune validate` prints a `note:` with",
        "the file position), ignored with a note when they no longer have any effect, or rejected with what",
        "replaced them. Every other key means what the installed TRL means by it.",
        "",
        "| key in `training_args` | what finetune does |",
        "| --- | --- |",
    ]
    for key, entry in sorted(TRAINING_ARGS.items()):
        if isinstance(entry, Renamed):
            what = f"read as `{entry.new}` ({entry.why})"
        elif isinstance(entry, Dropped):
            what = f"ignored, with a note: {entry.why}"
        else:
            what = f"rejected: use {entry.instead}"
        lines.append(f"| `{key}` | {what} |")
    lines += [
        "",
        "Flags that became values: `adafactor: true` is read as `optim: adafactor`, `group_by_length: true` as",
        "`train_sampling_strategy: group_by_length`, `include_inputs_for_metrics: true` as",
        "`include_for_metrics: [inputs]`; `false` drops the key. A key given under its old and its new name is an",
        "error. Other differences from SiloGen's engine: `run_conf.model_args.torch_dtype` is read as `dtype`,",
        "and `sweep.direction` takes `min`/`max` as well as `minimize`/`maximize`.",
        "",
        *training_keys_section(),
    ]
    return "\n".join(lines)


def training_keys_section() -> list[str]:
    """The fate of every `training_args` key of each method (`finetune.config.training_keys`), from the snapshot."""
    from finetune.config.snapshot_models import load_snapshot
    from finetune.config.training_args import owned_keys
    from finetune.config.training_keys import fate_table_markdown

    snapshot = load_snapshot("trl")
    methods = {method: set(spec["fields"]) for method, spec in snapshot["methods"].items()}
    owned = {method: owned_keys(method) for method in methods}
    return [
        f"## What finetune does with each training argument (TRL {snapshot['trl_version']})",
        "",
        "finetune trains each run in chunks with TRL's trainers used as libraries and never calls `trainer.train()`",
        "(see `finetune/train/session.py`): it replays the inside of HF's loop (callbacks included) and decides at",
        "chunk boundaries what `train()` decides by steps (evaluation, checkpoints). So every key of `training_args`",
        "is one of: *honoured* (how it maps onto chunks is said), *passed to TRL* (the trainer's own code reads it: its",
        "loss, data preparation, collator, model set-up or evaluation), *ignored, with a note* at validate (the note",
        "names what to use instead), *refused* unless set to a value that asks for nothing, or *rejected* because",
        "another section sets it. Generated from `finetune/config/training_keys.py`.",
        "",
        fate_table_markdown(methods, owned),
        "",
    ]
