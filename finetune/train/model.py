"""Loading the tokenizer and the base model from `run_conf` and `quant_conf` (path, hub id or GGUF file)."""

from __future__ import annotations

from typing import Any

from finetune.train.gguf_bases import GGUF_FILE_KEY


class QuantizationUnavailable(RuntimeError):
    pass


def check_quantization(config: Any) -> None:
    """Fail before any work when bitsandbytes quantization cannot run here."""
    from finetune.train.preflight import check_quantization as quantization_problems

    for path, problem in quantization_problems(config):
        raise QuantizationUnavailable(f"{path}: {problem}")


def load_tokenizer(config: Any) -> Any:
    from transformers import AutoTokenizer

    from finetune.train.gguf_bases import model_path

    run_conf = config.run_conf
    args = run_conf.model_args
    return AutoTokenizer.from_pretrained(
        run_conf.tokenizer or model_path(config),
        use_fast=run_conf.use_fast_tokenizer,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        local_files_only=args.local_files_only,
        cache_dir=args.cache_dir,
        token=args.token,
    )


def model_kwargs(config: Any, device: str) -> dict[str, Any]:
    """`from_pretrained` arguments: model_args (extra keys included) plus quantization and placement."""
    import torch

    from finetune.train.seams.transformers import checkpointing_requested

    model_args = config.run_conf.model_args
    args = model_args.model_dump(exclude_unset=True, exclude_none=True)
    args.pop("dtype", None)
    args.pop(GGUF_FILE_KEY, None)  # the GGUF file is loaded through its converted copy (`gguf_bases`)
    dtype = model_args.dtype
    kwargs: dict[str, Any] = {**args, "dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if config.quant_conf.quantization_type == "bits-and-bytes":
        from transformers import BitsAndBytesConfig

        quant = config.quant_conf.model_dump(exclude={"quantization_type"})
        kwargs["quantization_config"] = BitsAndBytesConfig(**quant)
    if "device_map" not in kwargs and device != "cpu":
        kwargs["device_map"] = {"": device}
    if checkpointing_requested(config.training_args):
        if "use_cache" in model_args.model_fields_set and model_args.use_cache:
            raise ValueError(
                "training_args.gradient_checkpointing (or activation_checkpointing) and run_conf.model_args.use_cache are both true, "
                "which exclude each other: set one of them to false"
            )
        kwargs["use_cache"] = False  # not set by the user; the KV cache is useless with checkpointing
    return kwargs


def load_base_model(config: Any, tokenizer_size: int, device: str = "cpu") -> Any:
    """The base model, its embeddings grown (mean-initialised) when the template added tokens."""
    from transformers import AutoModelForCausalLM

    from finetune.train.gguf_bases import model_path

    check_quantization(config)
    model = AutoModelForCausalLM.from_pretrained(model_path(config), **model_kwargs(config, device))
    if tokenizer_size > model.get_input_embeddings().weight.shape[0]:
        import torch

        # The new rows are sampled; a fixed seed gives every worker process the same base model,
        # so a run resumed elsewhere (after a crash) continues on the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(tokenizer_size, mean_resizing=True)
    return model
