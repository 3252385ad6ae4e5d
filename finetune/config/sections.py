"""Strict models of the config sections, after the SiloGen finetuning config reference.

Every model forbids unknown keys except `run_conf.model_args`, whose extra keys are
passed on to `from_pretrained`. Unions are discriminated so that an error names the
branch the user meant.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from finetune.config.adapters import GenericPeftConfig
from finetune.config.fields import CheckpointName, DataPath, FileName
from finetune.config.snapshot_models import MAX_EPOCHS
from finetune.data.formats import FORMAT_NAMES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)


# ---------------------------------------------------------------- data_conf

ChatTemplateName = Literal["mistral-with-system", "chat-ml", "poro", "keep-original", "simplified-llama31"]
MissingPadTokenStrategy = Literal["eos-repurpose", "bos-repurpose", "unk-repurpose", "unk-convert-to-eos"]
DataType = Literal["ChatConversation", "ChatConversationPreference", "ChatPrompt"]

DATA_TYPE_DOC = "generally, the data_type is automatically set based on the experiment config method"
MAX_SAMPLING_WEIGHT = 1e6
MAX_WEIGHT_RATIO = 1000
# Bounds that keep batch sizes and epochs where training can happen (and derived values stay small).
MAX_TOTAL_BATCH_SIZE = 1_000_000
MAX_DEVICE_BATCH_SIZE = 100_000


DataFormatName = Literal[FORMAT_NAMES]  # type: ignore[valid-type]


class DatasetDefinition(Strict):
    """Define how to load a dataset."""

    path: DataPath = Field(
        description="Local path to a JSONL, JSON or parquet file, or a directory saved with `datasets.save_to_disk`"
    )
    format: DataFormatName = Field(
        default="auto",
        description="The records' shape (docs/data.md): auto detects it from the first record; sft reads messages, "
        "sharegpt, alpaca, prompt_completion; dpo reads preference (TRL prompt/chosen/rejected), preference_messages; "
        "grpo reads prompt_only (TRL prompt), prompt_messages",
    )


class WeightedDatasetDefinition(DatasetDefinition):
    """Define a dataset, with a weight for sampling."""

    sampling_weight: float = Field(
        default=1.0, gt=0.0, le=MAX_SAMPLING_WEIGHT,
        description="Relative weight of the dataset in the mix; weights of one mix differ by at most "
        f"a factor of {MAX_WEIGHT_RATIO} (a tiny weight would make the mix draw for ever)",
    )


class ConcatenationDataInput(Strict):
    """A simple list of datasets.

    These are simply concatenated, the same as sampling all with equal weight.
    """

    type: Literal["CONCATENATION"]
    datasets: list[DatasetDefinition] = Field(min_length=1)
    data_type: DataType | None = Field(default=None, description=DATA_TYPE_DOC)


class WeightedMixDataInput(Strict):
    """A list of datasets where each is sampled by a certain weight.

    The datasets are interleaved by their sampling weights until every sample of every
    dataset has been drawn at least once, so small weights can make the mix very large.
    """

    type: Literal["PRECOMPUTE_WEIGHTED_MIX"]
    datasets: list[WeightedDatasetDefinition] = Field(min_length=1)
    data_type: DataType | None = Field(default=None, description=DATA_TYPE_DOC)
    seed: int = Field(default=19851243, description="Seed for the random number generator for interleaving draws")

    @field_validator("datasets")
    @classmethod
    def _weights_close_enough(cls, datasets: list[WeightedDatasetDefinition]) -> list[WeightedDatasetDefinition]:
        weights = [dataset.sampling_weight for dataset in datasets]
        if max(weights) > MAX_WEIGHT_RATIO * min(weights):
            raise ValueError(
                f"the sampling weights range from {min(weights):g} to {max(weights):g}, more than a factor of "
                f"{MAX_WEIGHT_RATIO}: the mix draws until every example of every dataset is drawn once, so the "
                "smallest weight would make it enormous; bring the weights closer"
            )
        return datasets


class AutoSplitDataInput(Strict):
    """Automatic validation split from the training data (split before any mixing, so nothing leaks)."""

    type: Literal["AUTO_SPLIT"]
    data_type: DataType | None = Field(default=None, description=DATA_TYPE_DOC)
    ratio: float = Field(default=0.2, gt=0.0, lt=1.0, description="Ratio of the training data to use for validation")
    seed: int = Field(default=1289525893, description="Seed for the random number generator for splitting")


class NoneDataInput(Strict):
    """A special type for not using data e.g. in validation."""

    type: Literal["NONE"]
    data_type: DataType | None = Field(default=None, description=DATA_TYPE_DOC)


TrainingDataInput = Annotated[Union[ConcatenationDataInput, WeightedMixDataInput], Field(discriminator="type")]
ValidationDataInput = Annotated[
    Union[AutoSplitDataInput, ConcatenationDataInput, NoneDataInput], Field(discriminator="type")
]


class ChatTrainValidConfig(Strict):
    """Training time data configuration.

    Always defines some data input for training and can include validation data input,
    though a trivial NONE input is also allowed for the validation side. Also holds the
    chat template and padding settings, as those are part of the data input pipeline.
    """

    training_data: TrainingDataInput
    validation_data: ValidationDataInput
    chat_template_name: ChatTemplateName = "mistral-with-system"
    padding_side: Literal["right", "left"] = Field(default="right", description="Padding side, right is usually right.")
    missing_pad_token_strategy: MissingPadTokenStrategy = Field(
        default="bos-repurpose",
        description="What to pad with when the tokenizer has no pad token. eos-repurpose can stop the model "
        "from learning to end its answers (padding is ignored in the loss); bos-repurpose and unk-repurpose "
        "avoid that; unk-convert-to-eos pads with UNK and turns input-side padding into EOS at collation.",
    )


# ---------------------------------------------------------------- overrides and batch sizes


class Overrides(Strict):
    """Override options that allow simple interfaces for charts using these configs."""

    num_train_epochs: Annotated[float, Field(gt=0, le=MAX_EPOCHS)] | None = Field(
        default=None, description="Overrides the number of epochs in the training_args"
    )
    lr_multiplier: float = Field(default=1.0, gt=0, description="Multiplier applied to the learning rate")
    lr_batch_size_scaling: Literal["none", "sqrt", "linear"] = Field(
        default="none",
        description="Scales the learning rate by a factor of the total training batch size: "
        "none; sqrt (times its square root); linear (times the batch size)",
    )


class BatchsizeConfig(Strict):
    """Config for determining the total batch size.

    Total batch size is the effective batch size of the whole run: number of processes
    times per-device batch size times gradient accumulation. The maximum per-device
    batch size is what fits in one device's memory.
    """

    total_train_batch_size: int = Field(
        gt=0, le=MAX_TOTAL_BATCH_SIZE, description="The total batch size for the training run"
    )
    max_per_device_train_batch_size: int = Field(
        gt=0, le=MAX_DEVICE_BATCH_SIZE, description="The maximum training batch size per device"
    )
    per_device_eval_batch_size: int | None = Field(
        default=None, gt=0, le=MAX_DEVICE_BATCH_SIZE,
        description="The maximum eval batch size per device; default: the training batch size",
    )


# ---------------------------------------------------------------- peft_conf


class NoPeftConfig(Strict):
    """A trivial config specifying that no peft is used (full fine-tuning)."""

    peft_type: Literal["NO_PEFT"]


class PretrainedPeftConfig(Strict):
    """PEFT adapter that uses the config and initialisation from a pretrained adapter."""

    peft_type: Literal["PRETRAINED_PEFT"]
    name_or_path: str = Field(description="HF ID or path to the pretrained peft adapter")


PeftConfig = Annotated[Union[NoPeftConfig, PretrainedPeftConfig, GenericPeftConfig], Field(discriminator="peft_type")]


# ---------------------------------------------------------------- quant_conf


class NoQuantizationConfig(Strict):
    """A marker not to use quantization."""

    quantization_type: Literal["no-quantization"] = "no-quantization"


class BnBQuantizationConfig(Strict):
    """Bits and Bytes configuration (transformers' BitsAndBytesConfig). Needs CUDA and bitsandbytes."""

    quantization_type: Literal["bits-and-bytes"] = "bits-and-bytes"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: str | None = None
    bnb_4bit_quant_type: Literal["fp4", "nf4"] = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: str | None = None

    @model_validator(mode="after")
    def _one_width(self) -> BnBQuantizationConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive; choose one")
        return self


QuantConfig = Annotated[Union[NoQuantizationConfig, BnBQuantizationConfig], Field(discriminator="quantization_type")]


# ---------------------------------------------------------------- run_conf


def _legacy_dtype_in_schema(schema: dict[str, Any]) -> None:
    """`torch_dtype` (the legacy name of `dtype`) gets the same schema, so editors and helm lint check it too."""
    schema["properties"]["torch_dtype"] = {**schema["properties"]["dtype"], "description": "Legacy name of dtype"}
    schema["properties"]["torch_dtype"].pop("default", None)


class ModelArguments(BaseModel):
    """Arguments passed to `AutoModelForCausalLM.from_pretrained`.

    Keys not listed here are passed on as they are (they are Hugging Face arguments).
    The quantization config is not set here but in `quant_conf`.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True, json_schema_extra=_legacy_dtype_in_schema)

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        validation_alias=AliasChoices("dtype", "torch_dtype"),
        description="Weights dtype; `torch_dtype` is accepted as the legacy name",
    )
    device_map: Union[dict[str, Any], str, int, None] = Field(
        default=None,
        description="Where modules go; the scheduler places whole runs on devices, so leave it unset "
        "unless one run must span devices (auto, balanced_low_0, sequential, or a map)",
    )
    max_memory: dict[str, Any] | None = None
    low_cpu_mem_usage: bool = False
    attn_implementation: str | None = Field(default=None, description='"sdpa", "flash_attention_2" or "eager"')
    offload_folder: str | None = None
    offload_state_dict: bool | None = None
    offload_buffers: bool | None = None
    use_cache: bool = Field(default=True, description="Mutually exclusive with gradient_checkpointing")
    cache_dir: str | None = None
    force_download: bool = False
    local_files_only: bool = False
    proxies: dict[str, str] | None = None
    revision: str = "main"
    code_revision: str = "main"
    subfolder: str | None = None
    token: str | None = None
    use_safetensors: bool | None = None
    variant: str | None = None
    trust_remote_code: bool = Field(default=False, description="If true, allows execution of downloaded remote code")


class RunConfig(Strict):
    """Model related configuration."""

    model: str = Field(default="/local_resources/basemodel", description="Local path or hub id of the base model")
    model_args: ModelArguments = Field(default_factory=ModelArguments)
    tokenizer: str | None = Field(default=None, description="Tokenizer hub id or path; default: the model's")
    use_fast_tokenizer: bool = True
    resume_from_checkpoint: Union[bool, str] = Field(
        default=False,
        description="A path: a checkpoint (HF format, or a finetune chunk-K) whose weights, and optimizer and scheduler "
        "state where present, each run starts from, as a new run (its own step 0 and data order). A sharded chunk-K "
        "(of an fsdp run) starts fsdp and fsdp_grad_op runs only, on any devices_per_run. "
        "auto, true and false change nothing: finetune always continues a run from its last durable chunk",
    )
    final_checkpoint_name: CheckpointName = Field(
        default="checkpoint-final", description="Name of the final checkpoint (a folder in the run's directory)"
    )


# ---------------------------------------------------------------- tracking


class FinetuningTrackingConfig(Strict):
    """Where run details are logged (MLflow). Without this section, a SQLite store in the experiment directory."""

    mlflow_server_uri: str = Field(description="MLflow tracking URI: a server URL, or a local path / sqlite URI")
    experiment_name: str = Field(description="Experiment name used for MLflow tracking")
    run_id: str | None = Field(default=None, description="Run id, to resume logging to a previously started run")
    run_name: str | None = Field(default=None, description="Name of the parent run shown in the MLflow UI")
    hf_mlflow_log_artifacts: Union[bool, Literal["True", "False", "true", "false"]] = Field(
        default="False", description="Whether to store model artifacts (final checkpoints) in MLflow"
    )

    @property
    def log_artifacts(self) -> bool:
        return str(self.hf_mlflow_log_artifacts).lower() == "true"


# ---------------------------------------------------------------- method arguments


class SFTArguments(Strict):
    """Supervised fine-tuning arguments."""

    max_seq_length: int = Field(default=2048, gt=0, description="Longer examples are filtered out (and counted).")
    save_name_if_new_basemodel: FileName = Field(
        default="checkpoint-new-basemodel", description="If a new basemodel is saved, it is saved with this name"
    )
    train_on_completions_only: bool = Field(default=False, description="Only compute loss on the assistant's turns.")
    padding_free: bool = Field(
        default=False,
        description="Tell examples apart by position_ids that restart at each, not by padding and an attention mask, "
        "so the attention never crosses from one example to another. With flash_attention_2/3 a micro-batch's examples "
        "then run as one row with no padding at all; other attention implementations (whose masked attention costs "
        "the square of a row's length) keep one row per example, so there it pays with packing",
    )
    packing: bool = Field(
        default=False,
        description="Pack the training examples into rows of up to max_seq_length tokens (TRL's best-fit decreasing; an "
        "example is never split) and train on them padding-free. The batch sizes then count rows, not examples. "
        "Evaluation data is never packed, so eval_loss stays comparable between runs. Packed rows are padding-free",
    )

    @model_validator(mode="after")
    def _packed_rows_are_padding_free(self) -> SFTArguments:
        if self.packing and "padding_free" in self.model_fields_set and not self.padding_free:
            raise ValueError("packing: true with padding_free: false: packed rows are always padding-free; remove "
                             "padding_free (or set it true)")
        return self


class DPOArguments(Strict):
    """Direct preference optimisation arguments (beta, loss type etc. are in training_args)."""

    max_seq_length: int = Field(default=2048, gt=0, description="Pairs whose prompt+answer is longer are filtered out.")
    save_name_if_new_basemodel: FileName = "checkpoint-new-basemodel"
    reference_model: str | None = Field(
        default=None,
        description="Path or hub id of the reference model. Default: TRL's default, i.e. the base model "
        "with the adapter disabled for adapter runs, a frozen copy of the model otherwise.",
    )


class GRPOArguments(Strict):
    """Group relative policy optimisation arguments."""

    reward_functions: list[str] = Field(
        min_length=1,
        description="Reward functions: built-in names (length_penalty, reference_match, format_chat) "
        "or importable `module:function`, a `def` taking **kwargs (checked from its source: validating never imports it)",
    )
    reward_timeout_s: float = Field(
        default=60.0, gt=0, le=86_400, description="Seconds a reward function of yours may take per call; it runs in "
        "a child process of the worker, which is then killed, and those completions get no reward from it")
    max_prompt_length: int = Field(default=512, gt=0, description="Prompts longer than this are filtered out.")
    save_name_if_new_basemodel: FileName = "checkpoint-new-basemodel"

    @field_validator("reward_functions")
    @classmethod
    def _known_rewards(cls, names: list[str]) -> list[str]:
        from finetune.config.rewards_catalog import BUILTIN_REWARDS

        from finetune.config.user_code import reward_function_problem

        for name in names:
            if ":" not in name and name not in BUILTIN_REWARDS:
                raise ValueError(
                    f"unknown reward function '{name}': use a built-in ({', '.join(sorted(BUILTIN_REWARDS))}) "
                    "or an importable 'module:function'"
                )
            problem = reward_function_problem(name) if ":" in name else None  # read from source, never imported
            if problem:
                raise ValueError(problem)
        return names
