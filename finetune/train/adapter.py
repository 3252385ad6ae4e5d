"""Adapters from `peft_conf`: none (full fine-tuning), a pretrained adapter, or any new PEFT type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def new_adapter_config(peft_conf: Any, added_tokens: int) -> Any | None:
    """A PEFT config for a new adapter, or None for no adapter / a pretrained one."""
    if peft_conf.peft_type in ("NO_PEFT", "PRETRAINED_PEFT"):
        return None
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    kwargs = peft_conf.peft_kwargs.model_dump(exclude_unset=True)
    if added_tokens and peft_conf.peft_type == "LORA":
        # New token rows must be trained too, or the template's special tokens stay random.
        kwargs.setdefault("modules_to_save", ["embed_tokens", "lm_head"])
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_conf.peft_type](task_type=peft_conf.task_type, **kwargs)


@dataclass
class Attached:
    """A model wrapped for one run, and copies of the base parameters the adapter trains in place."""

    model: Any
    saved_base: dict[str, Any] = field(default_factory=dict)


def _params_of_modules(model: Any, module_names: list[str]) -> dict[str, Any]:
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if any(name.rsplit(".", 1)[0].split(".")[-1] == module for module in module_names)
    }


def attach_adapter(base_model: Any, peft_conf: Any, added_tokens: int, seed: int) -> Attached:
    """Wrap the base model for training; the seed makes a new adapter's initialisation reproducible."""
    import torch
    from peft import PeftModel, get_peft_model

    torch.manual_seed(seed)
    if peft_conf.peft_type == "PRETRAINED_PEFT":
        model = PeftModel.from_pretrained(base_model, peft_conf.name_or_path, is_trainable=True)
        return Attached(model, _params_of_modules(base_model, list(model.peft_config["default"].modules_to_save or [])))
    adapter_config = new_adapter_config(peft_conf, added_tokens)
    if adapter_config is None:
        return Attached(base_model)
    saved = _params_of_modules(base_model, list(adapter_config.modules_to_save or []))
    return Attached(get_peft_model(base_model, adapter_config), saved)


def detach_adapter(attached: Attached) -> Any:
    """The base model as it was before `attach_adapter`, ready for the next run's adapter.

    PEFT's `unload()` removes the adapter layers but keeps the trained copies of
    `modules_to_save`; the saved base parameters are copied back over them.
    """
    import torch
    from peft import PeftModel

    model = attached.model
    base = model.unload() if isinstance(model, PeftModel) else model
    with torch.no_grad():
        for name, value in attached.saved_base.items():
            base.get_parameter(name).copy_(value)
    return base
