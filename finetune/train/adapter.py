"""Adapters from `peft_conf`, many of them on one shared base model.

Runs whose adapters are of one PEFT type share one `PeftModel`: each run's adapter is a named
adapter on it (the run id), and switching runs is `set_adapter`. A full fine-tune (NO_PEFT) gets
its own copy of the weights instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.train.seams.peft import expose_token_wrapper_bias


def adapter_family(peft_conf: Any) -> str:
    """Runs of one family can share a base model: 'full', or the PEFT type of their adapter."""
    if peft_conf.peft_type == "NO_PEFT":
        return "full"
    if peft_conf.peft_type == "PRETRAINED_PEFT":
        config_file = Path(peft_conf.name_or_path) / "adapter_config.json"
        if config_file.is_file():
            return str(json.loads(config_file.read_text()).get("peft_type", "LORA"))
        return "LORA"
    return str(peft_conf.peft_type)


def embedding_module_names(model: Any) -> list[str]:
    """The names PEFT targets for new token rows: the input embeddings, and the output layer unless tied."""
    modules = {module: name for name, module in model.named_modules()}
    names = [modules[model.get_input_embeddings()].rsplit(".", 1)[-1]]
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    output = model.get_output_embeddings()
    if output is not None and not getattr(text_config, "tie_word_embeddings", False):
        names.append(modules[output].rsplit(".", 1)[-1])
    return names


def new_adapter_config(peft_conf: Any, new_token_ids: list[int], model: Any) -> Any | None:
    """A PEFT config for a new adapter, or None for no adapter / a pretrained one.

    When the chat template added tokens, a LoRA adapter trains just their rows (PEFT's trainable
    token indices) unless the config asks for whole embeddings through `modules_to_save`.
    """
    if peft_conf.peft_type in ("NO_PEFT", "PRETRAINED_PEFT"):
        return None
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    kwargs = peft_conf.peft_kwargs.model_dump(exclude_unset=True)
    if new_token_ids and peft_conf.peft_type == "LORA":
        names = embedding_module_names(model)
        trained_whole = set(kwargs.get("modules_to_save") or []) & set(names)
        if not trained_whole and kwargs.get("trainable_token_indices") is None:
            expose_token_wrapper_bias()
            kwargs["trainable_token_indices"] = {name: list(new_token_ids) for name in names}
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_conf.peft_type](task_type=peft_conf.task_type, **kwargs)


def attach_adapter(model: Any, shared: Any | None, peft_conf: Any, new_token_ids: list[int], name: str, seed: int) -> Any:
    """Add the run's adapter `name` to the shared PeftModel (created on first use) and activate it.

    The seed makes a new adapter's initialisation reproducible, whichever adapters came before.
    """
    import torch
    from peft import PeftModel, get_peft_model

    torch.manual_seed(seed)
    expose_token_wrapper_bias()
    if peft_conf.peft_type == "PRETRAINED_PEFT":
        if shared is None:
            shared = PeftModel.from_pretrained(model, peft_conf.name_or_path, adapter_name=name, is_trainable=True)
        else:
            shared.load_adapter(peft_conf.name_or_path, adapter_name=name, is_trainable=True)
    else:
        config = new_adapter_config(peft_conf, new_token_ids, model if shared is None else shared.get_base_model())
        if shared is None:
            shared = get_peft_model(model, config, adapter_name=name)
        else:
            shared.add_adapter(name, config)
    shared.set_adapter(name)
    return shared


def detach_adapter(shared: Any, name: str) -> None:
    """Free a finished run's adapter (the last one stays: a PeftModel needs one)."""
    if name in shared.peft_config and len(shared.peft_config) > 1:
        if shared.active_adapter == name:
            shared.set_adapter(next(other for other in shared.peft_config if other != name))
        shared.delete_adapter(name)
