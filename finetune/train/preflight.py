"""What can be known about a run before any work: checked by `finetune run` for every run at once,
before data preparation, workers or MLflow start, so a typo costs seconds, not a failed night.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

from finetune.plan.resources import data_problems, hub_offline, in_hub_cache, looks_like_path, model_problems
from finetune.train.attention import check_liger, check_padding_free, load_model_config

HUB_SECONDS = 10  # how long `run` waits for the Hub to say whether a model it has not cached exists
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}

Problem = tuple[str, str]  # (config key path, what is wrong and what to do)


def check_model_source(config: Any) -> list[Problem]:
    """The model and tokenizer are a local folder or a hub id that can be had (`plan.resources`)."""
    return model_problems(config)


def check_hub_model(config: Any, seconds: float = HUB_SECONDS) -> list[Problem]:
    """A hub id that is not cached, with the Hub reachable (offline mode off): does it exist? Asked once,
    with a short timeout, rather than found by every worker after minutes of retries."""
    problems = []
    run_conf = config.run_conf
    for key, name in (("run_conf.model", run_conf.model), ("run_conf.tokenizer", run_conf.tokenizer)):
        if (not name or Path(name).expanduser().exists() or looks_like_path(name) or hub_offline()
                or run_conf.model_args.local_files_only or in_hub_cache(name, config)):
            continue
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            HfApi(token=run_conf.model_args.token).model_info(name, revision=run_conf.model_args.revision, timeout=seconds)
        except (RepositoryNotFoundError, RevisionNotFoundError) as error:
            problems.append((key, f"{name} is no local folder, and the Hugging Face Hub has no such model "
                                  f"({type(error).__name__}); check the name, or give a local path"))
        except GatedRepoError:
            problems.append((key, f"{name} is a gated model on the Hugging Face Hub: accept its licence and log in "
                                  "(`hf auth login`) or set run_conf.model_args.token"))
        except Exception as error:  # no network, a proxy, a timeout
            problems.append((key, f"{name} is no local folder and the Hugging Face Hub cannot be reached to get it "
                                  f"({type(error).__name__}); give a local path, or with the model in the cache set "
                                  "HF_HUB_OFFLINE=1"))
    return problems


RecordReader = Callable[[str, str, str], Any]  # (path, method, data format) -> records, as `data.readers.read_records`


def check_data_and_template(config: Any, load_tokenizer: Callable[[Any], Any], read_records: RecordReader) -> list[Problem]:
    """Every data file reads as records of the method's shape, and the chat template applies to the first
    record of each (with the tokenizer prepared as training prepares it). `read_records(path, method,
    format)` may cache: many runs share their data."""
    from finetune.data.pipeline import prepare_tokenizer, preference_examples, prompt_examples, tokenize_conversation

    problems: list[Problem] = []
    firsts = []
    for key, path, data_format in datasets_of(config):
        try:
            records = read_records(path, config.method, data_format)
        except Exception as error:
            problems.append((key, str(error) or type(error).__name__))
            continue
        if records:
            firsts.append((key, path, records[0]))
    if problems or not firsts:
        return problems
    from finetune.data.templates import TemplateError

    try:
        tokenizer = load_tokenizer(config)
        prepare_tokenizer(tokenizer, config.data_conf)
    except TemplateError:
        return []  # keep-original without a template: `check_chat_template` says so
    except Exception as error:
        return [("data_conf.chat_template_name", f"{type(error).__name__}: {error}")]
    for key, path, record in firsts:
        try:
            if config.method == "sft":
                tokenize_conversation(tokenizer, record["messages"], config.sft_args.train_on_completions_only)
            elif config.method == "dpo":
                preference_examples([record], tokenizer, 1 << 30, _Stats())
            else:
                prompt_examples([record], tokenizer, 1 << 30, _Stats())
        except Exception as error:
            problems.append(("data_conf.chat_template_name", f"{config.data_conf.chat_template_name} does not apply to "
                             f"the first record of {path} ({key}): {type(error).__name__}: {error}"))
    return problems


class _Stats:
    filtered_too_long = 0


def datasets_of(config: Any) -> list[tuple[str, str, str]]:
    """(key path, data path, data format) of every dataset a validated config reads."""
    found = []
    for section in ("training_data", "validation_data"):
        datasets = getattr(getattr(config.data_conf, section, None), "datasets", None) or []
        found += [(f"data_conf.{section}.datasets[{index}].path", dataset.path, getattr(dataset, "format", "auto"))
                  for index, dataset in enumerate(datasets)]
    return found


def check_attention(config: Any, devices: list[str]) -> list[Problem]:
    implementation = config.run_conf.model_args.attn_implementation
    key = "run_conf.model_args.attn_implementation"
    if implementation == "flex_attention" and not any(device.startswith("cuda") for device in devices):
        return [(key, f"flex_attention has no backward pass on the CPU, so it cannot train on {', '.join(devices)}; "
                 "use sdpa or eager")]
    package = ATTENTION_PACKAGES.get(implementation or "")
    if package is None:
        return []
    if importlib.util.find_spec(package) is None:
        return [(key, f"{implementation} needs the {package} package, which is not installed; use sdpa, or install it")]
    if not any(device.startswith("cuda") for device in devices):
        return [(key, f"{implementation} runs on CUDA devices only; these runs train on {', '.join(devices)}")]
    return []


def check_precision(config: Any, devices: list[str]) -> list[Problem]:
    args = config.training_args
    if getattr(args, "fp16", False) and all(device == "cpu" for device in devices):
        return [("training_args.fp16", "fp16 mixed precision needs a GPU; on the CPU use bf16 or neither")]
    if getattr(args, "bf16", False) and any(device.startswith("cuda") for device in devices):
        import torch

        if not torch.cuda.is_bf16_supported():
            return [("training_args.bf16", f"{torch.cuda.get_device_name(0)} has no bfloat16 support; use fp16: true, bf16: false")]
    return []


def check_quantization(config: Any) -> list[Problem]:
    if config.quant_conf.quantization_type != "bits-and-bytes":
        return []
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install 'finetune[quantization]')")
    if not missing:
        return []
    return [("quant_conf.quantization_type", f"bits-and-bytes needs {' and '.join(missing)}; remove quant_conf to train unquantized")]


def check_backend(config: Any) -> list[Problem]:
    if config.experiment.backend == "ray" and importlib.util.find_spec("ray") is None:
        return [("experiment.backend", "ray needs the ray package: pip install 'finetune[ray]'")]
    return []


TRAINER_SHARDING_KEYS = ("fsdp", "fsdp_config", "deepspeed")
# What a SiloGen config's DeepSpeed stage becomes here: the PyTorch strategy that shards at least as much.
DEEPSPEED_EQUIVALENTS = {"deepspeed_zero1": "fsdp_grad_op", "deepspeed_zero3": "fsdp"}


def check_sharding_settings(config: Any) -> list[Problem]:
    """Sharding is said once, in `experiment`: not in the trainer's arguments, and offload only with FSDP."""
    problems = [(f"training_args.{key}", f"{key} would hand the run to accelerate's FSDP or DeepSpeed, which do not train "
                 "in chunks; remove it and set experiment.distributed (fsdp, fsdp_grad_op or ddp) and devices_per_run")
                for key in TRAINER_SHARDING_KEYS if getattr(config.training_args, key, None)]
    strategy = config.experiment.distributed
    if config.experiment.fsdp_cpu_offload and not strategy.startswith("fsdp"):
        problems.append(("experiment.fsdp_cpu_offload", f"offloads FSDP's shards; this run is trained with {strategy}: "
                         "set experiment.distributed: fsdp, or remove fsdp_cpu_offload"))
    return problems


def check_distributed(config: Any, devices: list[str] | None) -> list[Problem]:
    """A run on several devices: they must exist, and its strategy must run there."""
    experiment = config.experiment
    width, strategy = experiment.devices_per_run, experiment.distributed
    problems = check_sharding_settings(config)
    if width == 1 and strategy == "ddp":
        return problems
    if experiment.backend != "local":
        return [*problems, ("experiment.devices_per_run", "runs on several devices (or sharded with fsdp) train with "
                            "backend: local; on a cluster, run one finetune Job per node group")]
    gpus = [device for device in devices or [] if device.startswith("cuda")]
    if gpus and width > len(gpus):
        problems.append(("experiment.devices_per_run", f"{width} devices per run, but this experiment has "
                         f"{len(gpus)} GPU(s): {', '.join(gpus)}"))
    if devices is not None and not gpus:
        problems += cpu_gang_problems(width)
    if strategy in DEEPSPEED_EQUIVALENTS:
        problems.append(("experiment.distributed", f"{strategy} is not trained by finetune (DeepSpeed's engine owns the "
                         f"training loop that finetune cuts into chunks); use distributed: {DEEPSPEED_EQUIVALENTS[strategy]}, "
                         "its PyTorch equivalent that shards at least as much (see docs/multi-device.md)"))
    return problems


CPU_RANK_GB = 0.5  # what one rank's process holds before its model: Python, torch and the ML stack imported


def cpu_gang_problems(width: int, cores: int | None = None, available_gb: float | None = None) -> list[Problem]:
    """A gang on the CPU is `width` processes on this machine: no more than its cores (2 always fit), and
    their base footprint within its available memory."""
    import os

    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    available_gb = available_gb if available_gb is not None else _available_gb()
    if width > max(2, cores):
        return [("experiment.devices_per_run", f"{width} processes per run on the CPU, but this machine has {cores} "
                 f"core(s); at most {max(2, cores)}")]
    if available_gb is not None and width * CPU_RANK_GB > available_gb:
        return [("experiment.devices_per_run", f"{width} processes per run on the CPU need at least "
                 f"{width * CPU_RANK_GB:.1f} GB before the model, but {available_gb:.1f} GB of memory is available")]
    return []


def _available_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_chat_template(config: Any, load_tokenizer: Callable[[Any], Any]) -> list[Problem]:
    """`keep-original` needs a chat template in the tokenizer (checked where the tokenizer is local)."""
    from finetune.data.templates import KEEP_ORIGINAL

    if config.data_conf.chat_template_name != KEEP_ORIGINAL:
        return []
    source = config.run_conf.tokenizer or config.run_conf.model
    if not Path(source).expanduser().is_dir():
        return []
    if not getattr(load_tokenizer(config), "chat_template", None):
        return [("data_conf.chat_template_name", f"keep-original, but the tokenizer of {source} has no chat template; "
                 "choose one of finetune's templates (chat-ml, for example)")]
    return []


def check_generation_room(config: Any, load_model_config: Callable[[Any], Any | None]) -> list[Problem]:
    """Generation metrics need room for a prompt besides `max_new_tokens` in the model's context: without it
    every prompt would be skipped, and the generation metrics (perhaps sweep.metric) never measured."""
    if config.method == "grpo" or not config.eval_conf.needs_generation:
        return []
    model_config = load_model_config(config)
    context = getattr(model_config, "max_position_embeddings", None) if model_config is not None else None
    wanted = config.eval_conf.generation.max_new_tokens
    if not isinstance(context, int) or wanted < context:
        return []
    return [("eval_conf.generation.max_new_tokens", f"{wanted} new tokens leave no room for a prompt in the "
             f"{context}-token context of {config.run_conf.model} (max_position_embeddings), so no answer would be "
             f"generated and no generation metric measured; use fewer than {context}, with room for the prompts")]


def check_wandb(config: Any) -> list[Problem]:
    """W&B's package, when a run's report_to names wandb (its metrics are logged by the controller)."""
    from finetune.config.training_keys import report_to_values

    if "wandb" in report_to_values(config.training_args.report_to) and importlib.util.find_spec("wandb") is None:
        return [("training_args.report_to", "names wandb, which is not installed: pip install 'finetune[wandb]', "
                 "or remove wandb from report_to")]
    return []


def preflight(config: Any, devices: list[str] | None, load_tokenizer: Callable[[Any], Any],
              read_records: RecordReader | None = None) -> list[Problem]:
    """Every problem this run would hit at start-up, found now.

    `devices` None: the devices are elsewhere (Ray actors on a cluster), so what depends on them
    (CUDA, bf16 support, flash-attention's package) is left to the workers. `read_records`: read and
    check the data files and apply the chat template to their first records (None: only that they exist).
    """
    from finetune.train.gguf_bases import gguf_problems

    model_problems = check_model_source(config) or gguf_problems(config) or check_hub_model(config)
    missing_data = data_problems(config)
    data_and_template = [] if model_problems or missing_data or read_records is None else (
        check_data_and_template(config, load_tokenizer, read_records))
    on_devices = [] if devices is None else [
        *check_quantization(config), *check_attention(config, devices), *check_precision(config, devices),
        *check_liger(config, devices),
    ]
    return [
        *missing_data,
        *model_problems,
        *data_and_template,
        *on_devices,
        *check_backend(config),
        *check_wandb(config),
        *check_distributed(config, devices),
        *([] if model_problems else check_chat_template(config, load_tokenizer)),
        *([] if model_problems else check_padding_free(config, load_model_config)),
        *([] if model_problems else check_generation_room(config, load_model_config)),
    ]
