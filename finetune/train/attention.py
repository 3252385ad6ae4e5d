"""Whether a run's model keeps padding-free examples apart, and whether its fused kernels can run.

A padding-free row holds several examples end to end; only `position_ids` say where one ends.
Flash-attention turns the restarts into variable-length sequences, and transformers (5.x) turns
them into a block-diagonal mask for sdpa, eager and flex_attention, but only in models whose
modeling code builds its masks with `transformers.masking_utils`. Anything else (custom remote
code, recurrent models such as Mamba or RWKV, another attention kernel) would let an example see
the one before it, so such a combination is refused before any work rather than trained wrongly.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

# Attention implementations that honour position_id restarts (with a model that uses masking_utils).
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")
MASKED_KERNELS = ("sdpa", "eager", "flex_attention")
SAFE_KERNELS = VARLEN_KERNELS + MASKED_KERNELS

Problem = tuple[str, str]


def padding_free_key(config: Any) -> str | None:
    """The key that asks for padding-free rows in this config, or None when batches are padded."""
    if config.method == "sft":
        if config.sft_args.packing:
            return "sft_args.packing"
        return "sft_args.padding_free" if config.sft_args.padding_free else None
    return None


def transformers_packs_masks() -> bool:
    """Whether the installed transformers builds block-diagonal masks from position_ids."""
    from finetune.train.seams.transformers import builds_packed_masks

    return builds_packed_masks()


def model_class_builds_masks(model_config: Any) -> tuple[bool, str]:
    """(safe, the model's name): whether its modeling code builds masks with masking_utils."""
    from finetune.train.seams.transformers import causal_lm_builds_masks

    if getattr(model_config, "auto_map", None):
        return False, "custom modeling code (trust_remote_code)"
    return causal_lm_builds_masks(getattr(model_config, "model_type", ""))


def check_padding_free(config: Any, load_model_config: Callable[[Any], Any | None]) -> list[Problem]:
    key = padding_free_key(config)
    if key is None:
        return []
    implementation = config.run_conf.model_args.attn_implementation
    if implementation is not None and implementation not in SAFE_KERNELS:
        return [(key, f"padding-free rows need an attention that keeps their examples apart ({', '.join(SAFE_KERNELS)}); "
                 f"run_conf.model_args.attn_implementation is {implementation}: change it, or set {key}: false")]
    if implementation not in VARLEN_KERNELS and not transformers_packs_masks():
        return [(key, "this transformers version does not build masks from position_ids, so padding-free examples would "
                 f"attend to each other: upgrade transformers to 5.x, use flash_attention_2, or set {key}: false")]
    model_config = load_model_config(config)
    if model_config is None:
        return []  # not readable here: the workers load it, and padding-free is checked again there
    safe, name = model_class_builds_masks(model_config)
    if not safe:
        return [(key, f"{name} does not build its attention from position_ids, so padding-free examples would see "
                 f"each other; set {key}: false for this model")]
    return []


def check_liger(config: Any, devices: list[str]) -> list[Problem]:
    """Liger's Triton kernels run on CUDA devices, with the liger-kernel package."""
    if not getattr(config.training_args, "use_liger_kernel", False):
        return []
    key = "training_args.use_liger_kernel"
    if not any(device.startswith("cuda") for device in devices):
        return [(key, f"Liger's Triton kernels run on CUDA devices only; these runs train on {', '.join(devices)}: "
                 "remove use_liger_kernel")]
    if importlib.util.find_spec("liger_kernel") is None:
        return [(key, "needs the liger-kernel package: pip install 'finetune[gpu]'; or remove use_liger_kernel")]
    return []


def load_model_config(config: Any) -> Any | None:
    """The model's transformers config, or None when it cannot be read from here."""
    from transformers import AutoConfig

    from finetune.train.gguf_bases import gguf_source
    from finetune.train.gguf_bases import load_model_config as gguf_model_config

    try:
        if gguf_source(config.run_conf) is not None:
            return gguf_model_config(config)
        return AutoConfig.from_pretrained(config.run_conf.model)
    except (OSError, ValueError):
        return None
