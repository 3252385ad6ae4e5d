"""The model cache of a worker: (tokenizer, base model) pairs, least recently used first.

Runs whose configs give the same `base_key` share one loaded base. A chat template that adds
tokens grows the base's vocabulary; the grown base is written once per experiment
(`base-models/<hash>`), not once per run.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MAX_RESIDENT_BASES = 2


@dataclass
class LoadedBase:
    """A (tokenizer, base model) pair and what the runs that share it share: data, the PeftModel."""

    key: str
    tokenizer: Any
    model: Any  # None while a run owns it (a gang's run trains the loaded weights themselves)
    new_token_ids: list[int]
    input_pad_id: int
    shared: Any = None  # the PeftModel holding every resident run's adapter
    data: dict[str, Any] = field(default_factory=dict)
    data_keys: dict[str, str] = field(default_factory=dict)
    saved_as: Path | None = None


def base_key(config: Any) -> str:
    """Runs with the same key share a loaded base model (and tokenizer) on a worker."""
    from finetune.train.adapter import adapter_family
    from finetune.train.seams.transformers import checkpointing_requested

    run_conf, args = config.run_conf, config.training_args
    shaping = [
        run_conf.model, run_conf.tokenizer, run_conf.use_fast_tokenizer, run_conf.model_args.model_dump_json(),
        config.quant_conf.model_dump_json(), config.data_conf.chat_template_name,
        config.data_conf.missing_pad_token_strategy, config.data_conf.padding_side, adapter_family(config.peft_conf),
        bool(getattr(args, "bf16", False)), bool(getattr(args, "fp16", False)), checkpointing_requested(args),
        # Liger patches the loaded model's layers in place: a patched base is not shared with unpatched runs.
        bool(getattr(args, "use_liger_kernel", False)), json.dumps(getattr(args, "liger_kernel_config", None), default=str),
        # NEFTune hooks the input embeddings (each run sets its own alpha): runs without it never meet the hook.
        getattr(args, "neftune_noise_alpha", None) is not None,
        json.dumps(getattr(args, "gradient_checkpointing_kwargs", None), default=str),
    ]
    return json.dumps(shaping, default=str)


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class BaseCache:
    """At most `MAX_RESIDENT_BASES` loaded bases. `writes_files`: this process writes the grown base
    (in a gang only rank 0 does; HF writes no weights off rank 0). `freeze`: move a loaded base out of
    the garbage collector's scans (not for a gang's models, which come and go with its runs)."""

    def __init__(self, root: Path, device: str, writes_files: bool, freeze: bool) -> None:
        self.root, self.device, self.writes_files, self.freeze = root, device, writes_files, freeze
        self.loaded: OrderedDict[str, LoadedBase] = OrderedDict()

    def keys(self) -> tuple[str, ...]:
        return tuple(self.loaded)

    def get(self, key: str) -> LoadedBase | None:
        return self.loaded.get(key)

    def acquire(self, config: Any, evict: Callable[[str], None]) -> LoadedBase:
        """The run's base, loaded if needed; `evict(key)` is called for a base dropped to make room."""
        key = base_key(config)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            base = self.loaded[key]
            if base.model is None:  # a run took it as its own
                from finetune.train.model import load_base_model

                base.model = load_base_model(config, len(base.tokenizer), self.device)
            return base
        while len(self.loaded) >= MAX_RESIDENT_BASES:
            oldest = next(iter(self.loaded))
            evict(oldest)
            self.loaded.pop(oldest)
        self.loaded[key] = self._load(key, config)
        return self.loaded[key]

    def _load(self, key: str, config: Any) -> LoadedBase:
        from finetune.data.pipeline import input_pad_token_id, prepare_tokenizer
        from finetune.runtime import freeze_long_lived_objects
        from finetune.train.model import load_base_model, load_tokenizer

        tokenizer = load_tokenizer(config)
        added = prepare_tokenizer(tokenizer, config.data_conf)
        model = load_base_model(config, len(tokenizer), self.device)
        new_ids = list(range(len(tokenizer) - added, len(tokenizer)))
        base = LoadedBase(key, tokenizer, model, new_ids, input_pad_token_id(tokenizer, config.data_conf))
        target = self.root / "base-models" / short_hash(key)
        if added and self.writes_files:
            from finetune.train.export import save_base_once

            base.saved_as = save_base_once(model, tokenizer, target)
        elif added:
            base.saved_as = target.resolve()
        if self.freeze:
            freeze_long_lived_objects()
        return base

    def data(self, base: LoadedBase, run_id: str, config: Any) -> Any:
        """The run's datasets; the content hash (which reads every data file) is computed once per run."""
        from finetune.data.pipeline import data_cache_key, prepare_data

        if run_id not in base.data_keys:
            base.data_keys[run_id] = data_cache_key(config, base.tokenizer)
        key = base.data_keys[run_id]
        if key not in base.data:
            base.data[key] = prepare_data(config, base.tokenizer, self.root / "cache")
        return base.data[key]
