"""The whole config of one run: a union of the three methods, discriminated by `method`."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, field_validator

from finetune.config.evaluation import EvalConfig, method_metric_problem
from finetune.data.formats import format_problem

from finetune.config.sections import (
    BatchsizeConfig,
    ChatTrainValidConfig,
    DPOArguments,
    FinetuningTrackingConfig,
    GRPOArguments,
    NoQuantizationConfig,
    Overrides,
    PeftConfig,
    QuantConfig,
    RunConfig,
    SFTArguments,
    Strict,
)
from finetune.config.scheduling import (
    ExperimentConfig,
    GridSweep,
    OptunaSweep,
    PopulationBasedSweep,
    RandomSweep,
    SuccessiveHalvingSweep,
)
from finetune.config.training_args import DPOTrainingArguments, GRPOTrainingArguments, SFTTrainingArguments

METHODS = ("sft", "dpo", "grpo")


def sweep_strategy_of(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("strategy", "grid")
    return getattr(value, "strategy", None)


SweepConfig = Annotated[
    Union[
        Annotated[GridSweep, Tag("grid")],
        Annotated[RandomSweep, Tag("random")],
        Annotated[SuccessiveHalvingSweep, Tag("successive_halving")],
        Annotated[OptunaSweep, Tag("optuna")],
        Annotated[PopulationBasedSweep, Tag("pbt")],
    ],
    Discriminator(sweep_strategy_of),
]


class CommonSections(Strict):
    data_conf: ChatTrainValidConfig = Field(description="The data input config")
    overrides: Overrides = Field(default_factory=Overrides, description="Overrides to simplify the config interface")
    batchsize_conf: BatchsizeConfig = Field(description="Batch size configuration")
    peft_conf: PeftConfig = Field(description="Adapter configuration")
    run_conf: RunConfig = Field(default_factory=RunConfig, description="Model related configuration")
    tracking: FinetuningTrackingConfig | None = Field(default=None, description="MLflow tracking configuration")
    quant_conf: QuantConfig = Field(default_factory=NoQuantizationConfig, description="Quantization configuration")
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig, description="Experiment and chunking")
    sweep: SweepConfig = Field(default_factory=GridSweep, description="How knobs become runs")
    eval_conf: EvalConfig = Field(
        default_factory=EvalConfig, description="Metrics measured at chunk boundaries (default: eval_loss only)"
    )


def _metrics_for(method: str, eval_conf: EvalConfig) -> EvalConfig:
    problem = method_metric_problem(method, eval_conf)
    if problem:
        raise ValueError(problem)
    return eval_conf


def _formats_for(method: str, data_conf: ChatTrainValidConfig) -> ChatTrainValidConfig:
    """Every dataset's named `format` is one the method reads."""
    for section in ("training_data", "validation_data"):
        for index, dataset in enumerate(getattr(getattr(data_conf, section), "datasets", None) or []):
            problem = format_problem(dataset.format, method)
            if problem:
                raise ValueError(f"data_conf.{section}.datasets[{index}].format: {problem}")
    return data_conf


class SFTFinetuneConfig(CommonSections):
    """Supervised fine-tuning on chat conversations (TRL SFTTrainer)."""

    method: Literal["sft"] = "sft"
    training_args: SFTTrainingArguments = Field(description="TRL SFTConfig arguments")
    sft_args: SFTArguments = Field(default_factory=SFTArguments, description="SFT specific arguments")

    @field_validator("data_conf")
    @classmethod
    def _sft_formats(cls, data_conf: ChatTrainValidConfig) -> ChatTrainValidConfig:
        return _formats_for("sft", data_conf)


class DPOFinetuneConfig(CommonSections):
    """Direct preference optimisation on chosen/rejected pairs (TRL DPOTrainer)."""

    method: Literal["dpo"]
    training_args: DPOTrainingArguments = Field(description="TRL DPOConfig arguments")
    dpo_args: DPOArguments = Field(default_factory=DPOArguments, description="DPO specific arguments")
    sft_args: None = Field(default=None, description="Not used by DPO (SiloGen configs write `sft_args: null`)")

    @field_validator("data_conf")
    @classmethod
    def _dpo_formats(cls, data_conf: ChatTrainValidConfig) -> ChatTrainValidConfig:
        return _formats_for("dpo", data_conf)

    @field_validator("eval_conf")
    @classmethod
    def _dpo_metrics(cls, eval_conf: EvalConfig) -> EvalConfig:
        return _metrics_for("dpo", eval_conf)

    @field_validator("training_args")
    @classmethod
    def _padded_batches(cls, training_args: Any) -> Any:
        if getattr(training_args, "padding_free", False):
            raise ValueError("padding_free: TRL's DPO trainer (1.x) trains padded batches (its padding_free only warns and "
                             "falls back to padding); remove it")
        return training_args


class GRPOFinetuneConfig(CommonSections):
    """Group relative policy optimisation on prompts with reward functions (TRL GRPOTrainer)."""

    method: Literal["grpo"]
    training_args: GRPOTrainingArguments = Field(description="TRL GRPOConfig arguments")
    grpo_args: GRPOArguments = Field(description="GRPO specific arguments")
    sft_args: None = Field(default=None, description="Not used by GRPO")

    @field_validator("data_conf")
    @classmethod
    def _grpo_formats(cls, data_conf: ChatTrainValidConfig) -> ChatTrainValidConfig:
        return _formats_for("grpo", data_conf)

    @field_validator("eval_conf")
    @classmethod
    def _grpo_metrics(cls, eval_conf: EvalConfig) -> EvalConfig:
        return _metrics_for("grpo", eval_conf)


def method_of(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("method", "sft")
    return getattr(value, "method", None)


FinetuneConfig = Annotated[
    Union[
        Annotated[SFTFinetuneConfig, Tag("sft")],
        Annotated[DPOFinetuneConfig, Tag("dpo")],
        Annotated[GRPOFinetuneConfig, Tag("grpo")],
    ],
    Discriminator(method_of),
]
AnyFinetuneConfig = Union[SFTFinetuneConfig, DPOFinetuneConfig, GRPOFinetuneConfig]

CONFIG_ADAPTER: TypeAdapter[AnyFinetuneConfig] = TypeAdapter(FinetuneConfig)
DISCRIMINATOR_KEYS = {"method_of": "method", "sweep_strategy_of": "strategy"}
