"""Strict models of the sections that say how runs are made and scheduled: `experiment`, `sweep`."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from finetune.config.fields import FileName
from finetune.config.sections import Strict

DIRECTIONS = {"min": "minimize", "max": "maximize"}
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "fsdp_grad_op", "deepspeed_zero1", "deepspeed_zero3")
# The keys of `experiment` that belong to each run rather than to the experiment: knobs may set them.
PER_RUN_EXPERIMENT_KEYS = ("devices_per_run", "distributed", "fsdp_cpu_offload")
# Runs a sweep may make: sweep.max_runs, by default and at most (planning 10,000 runs takes seconds).
DEFAULT_MAX_RUNS = 10_000
MAX_RUNS_CEILING = 100_000
MAX_CHUNKS = 10_000
# The keys that belong to the whole experiment: one value for all its runs, so neither a knob nor a group sets them.
EXPERIMENT_WIDE_KEYS = ("name", "output_dir", "backend", "ray_address", "devices", "runs_per_device", "threads_per_worker",
                        "gpu_state_budget_gb", "cpu_state_budget_gb", "keep", "fuse")


class ExperimentConfig(Strict):
    """Where an experiment lives and how its runs are cut into chunks and scheduled."""

    name: FileName = Field(default="experiment", description="Experiment name (a folder in output_dir)")
    output_dir: str = Field(default="runs", description="The experiment directory is output_dir/name")
    num_chunks: int = Field(default=4, ge=1, le=MAX_CHUNKS, description="Each run's training is cut into this many chunks")
    eval_every_chunks: int = Field(default=1, ge=1, description="Evaluate after every N chunks (and after the last)")
    max_eval_samples: int | None = Field(
        default=None, gt=0, description="Evaluate on a fixed subset of at most this many validation examples"
    )
    devices: Union[Literal["auto", "cpu"], Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, json_schema_extra={"uniqueItems": True})]] = Field(
        default="auto", description="auto (every visible GPU, else the CPU), cpu, or a list of GPU ordinals, each once"
    )
    runs_per_device: Union[Literal["auto"], Annotated[int, Field(ge=1, le=64)]] = Field(
        default=1,
        description="Runs trained at once on each device, each in its own worker process (a slot); auto: on a GPU as "
        "many as its memory allows by the footprint measured on the first chunk (at most 8), on the CPU 1. Workers on "
        "the CPU split its cores (see threads_per_worker)",
    )
    fuse: Union[Literal["off", "auto"], Annotated[int, Field(ge=2, le=64)]] = Field(
        default="off",
        description="Train compatible LoRA runs as one fused group in one worker: one forward and backward of the shared "
        "frozen base over one micro-batch of each, each adapter on its own rows, each run with its own loss, optimizer "
        "and schedule (the same training as alone, within a stated bound; see docs/running.md). "
        "Runs fuse when they share a base model and "
        "its precision, train SFT with plain LoRA adapters and train on one device. off; k: at most k runs per group; "
        "auto: as many as keep a fused micro-batch within 64 rows",
    )
    threads_per_worker: int | None = Field(
        default=None, ge=1, le=1024,
        description="Torch CPU threads of each worker process; default: the machine's cores shared evenly by its workers",
    )
    gpu_state_budget_gb: float | None = Field(
        default=None, gt=0,
        description="GPU memory a worker keeps runs' state in between their chunks (adapters, optimizer moments); "
        "beyond it state moves to pinned CPU memory. Default: a quarter of the GPU, shared by its workers",
    )
    cpu_state_budget_gb: float | None = Field(
        default=None, gt=0,
        description="CPU memory a worker keeps runs' state in; beyond it a run is read back from its last durable "
        "checkpoint when its turn comes. Default: half the free memory, shared by the workers",
    )
    devices_per_run: int = Field(
        default=1, ge=1, le=64,
        description="Devices (GPUs, or processes on the CPU) that train one run together as one data-parallel gang; "
        "a run needing k devices trains when k are free. May differ per run (a knob or a group)",
    )
    distributed: Literal[DISTRIBUTED_STRATEGIES] = Field(  # type: ignore[valid-type]
        default="ddp",
        description="How a run's processes share it: ddp (each holds the whole model), fsdp (PyTorch FSDP2: weights, "
        "gradients and optimizer state sharded, as ZeRO-3), fsdp_grad_op (FSDP2 keeping each layer's weights gathered "
        "from forward to backward, as ZeRO-2). deepspeed_zero1 and deepspeed_zero3 are planned but not trained: "
        "finetune run names their torch-native equivalent (see docs/multi-device.md); with one device, ddp is plain training",
    )
    fsdp_cpu_offload: bool = Field(
        default=False,
        description="With fsdp or fsdp_grad_op: keep the weight, gradient and optimizer shards in CPU memory and the "
        "optimizer step on the CPU, for models larger than the gang's GPU memory (slower)",
    )
    backend: Literal["local", "ray"] = Field(
        default="local",
        description="local: worker processes on this machine; ray: workers as Ray actors, one per device slot "
        "(pip install 'finetune[ray]'), for sweeps that need more GPUs than one machine has",
    )
    ray_address: str | None = Field(
        default=None,
        description="With backend ray: unset starts a local Ray runtime; auto, or an address such as "
        "ray://head:10001 or head:6379, joins that cluster",
    )
    keep: Literal["last", "best"] = Field(
        default="last",
        description="Which chunk checkpoints of each run stay on disk: last (only the latest durable chunk), or best "
        "(also the chunk with the best value of the sweep's metric, so at most two per run); report shows its path",
    )
    save_merged_model: bool = Field(
        default=False,
        description="Also write each adapter run's adapter merged into its base model (checkpoint-merged); "
        "otherwise `finetune export EXP RUN --merged` does it on request",
    )

    @field_validator("devices")
    @classmethod
    def _each_device_once(cls, devices: Any) -> Any:
        if isinstance(devices, list):
            repeated = sorted({device for device in devices if devices.count(device) > 1})
            if repeated:
                raise ValueError(
                    f"GPU {', '.join(map(str, repeated))} is listed more than once; list each GPU once and set "
                    "experiment.runs_per_device to train several runs on one GPU"
                )
        return devices


MAX_RUNS_DOC = (f"The most runs this sweep may make (default {DEFAULT_MAX_RUNS:,}, at most {MAX_RUNS_CEILING:,}); "
                "a larger grid or num_runs is refused before anything is expanded. The top-level sweep's value also "
                "bounds all groups together")


def max_runs_field() -> Any:
    return Field(default=DEFAULT_MAX_RUNS, ge=1, le=MAX_RUNS_CEILING, description=MAX_RUNS_DOC)


def num_runs_field(least: int) -> Any:
    return Field(ge=least, le=MAX_RUNS_CEILING, description="How many distinct runs to sample (at most sweep.max_runs)")


DIRECTION_DOC = ("Whether a lower or a higher metric is better; min and max as in Ray Tune and Optuna. Default: the "
                 "metric's own direction (loss-like minimize; accuracy-, score- and reward-like maximize; a custom metric "
                 "its eval_conf direction)")
RANK_BY_DOC = ("How report, the dashboard and `finetune export EXP best` rank runs that trained all their chunks: by "
               "their final value of the metric, or their best value at any evaluated chunk (with experiment.keep: "
               "best its checkpoint is kept). Runs stopped early always rank below runs that got further")


class BoundedSweep(Strict):
    max_runs: int = max_runs_field()
    rank_by: Literal["final", "best"] = Field(default="final", description=RANK_BY_DOC)

    @field_validator("num_runs", check_fields=False)
    @classmethod
    def _within_max_runs(cls, num_runs: int, info: ValidationInfo) -> int:
        max_runs = info.data.get("max_runs", DEFAULT_MAX_RUNS)
        if num_runs > max_runs:
            raise ValueError(f"num_runs {num_runs} is more than sweep.max_runs {max_runs}; lower num_runs or raise max_runs "
                             f"(at most {MAX_RUNS_CEILING:,})")
        return num_runs


class RankedSweep(BoundedSweep):
    """A sweep that does not decide by a metric as it goes, but whose runs are ranked by one at the end."""

    metric: str | None = Field(
        default=None,
        description="The metric report, the dashboard and `export EXP best` rank runs by (eval_loss, a metric of "
        "eval_conf, a custom metric, GRPO's reward, DPO's rewards/accuracies or rewards/margins); default: eval_loss, "
        "else eval_conf's first metric, GRPO's reward",
    )
    direction: Literal["minimize", "maximize", "min", "max"] | None = Field(default=None, description=DIRECTION_DOC)

    @field_validator("direction")
    @classmethod
    def _long_direction(cls, value: str | None) -> str | None:
        return DIRECTIONS.get(value, value) if value is not None else None


class GridSweep(RankedSweep):
    """Every combination of the `$list` knobs."""

    strategy: Literal["grid"] = "grid"


class RandomSweep(RankedSweep):
    """`num_runs` distinct i.i.d. samples of every `$list` and `$range` knob."""

    strategy: Literal["random"]
    num_runs: int = num_runs_field(1)
    seed: int = 42


class SuccessiveHalvingSweep(BoundedSweep):
    """A random sample whose runs are halved at rungs, in chunk units (asynchronous successive halving)."""

    strategy: Literal["successive_halving"]
    num_runs: int = num_runs_field(2)
    seed: int = 42
    metric: str = Field(
        default="eval_loss",
        description="The metric that ranks runs: one the runs produce (eval_loss, a metric of eval_conf.metrics, the "
        "name of an eval_conf.custom metric; for GRPO a reward it logs)",
    )
    direction: Literal["minimize", "maximize", "min", "max"] | None = Field(
        default=None,
        description="Whether a lower or a higher metric is better; min and max as in Ray Tune and Optuna. Default: the "
        "metric's own direction (eval_loss minimize, the other built-in metrics maximize, a custom metric its "
        "eval_conf direction; minimize for another)",
    )
    min_chunks: int = Field(default=1, ge=1, le=MAX_CHUNKS, description="Chunks a run trains before its first rung")
    max_chunks: int | None = Field(default=None, ge=1, le=MAX_CHUNKS, description="Default: experiment.num_chunks")
    reduction_factor: int = Field(default=2, ge=2, description="Keep the best 1/reduction_factor at each rung")
    min_early_stopping_rate: int = Field(default=0, ge=0, description="Skip this many lowest rungs")

    @field_validator("direction")
    @classmethod
    def _long_direction(cls, value: str | None) -> str | None:
        return DIRECTIONS.get(value, value) if value is not None else None

    @model_validator(mode="after")
    def _rungs(self) -> SuccessiveHalvingSweep:
        if self.max_chunks is not None and self.max_chunks < self.min_chunks:
            raise ValueError(f"max_chunks ({self.max_chunks}) must be at least min_chunks ({self.min_chunks})")
        return self




SAMPLERS = ("tpe", "random", "cmaes", "gp")
PRUNERS = ("none", "median", "successive_halving", "hyperband", "asha")


class OptunaSweep(BoundedSweep):
    """An Optuna study whose trials are runs: its sampler proposes each new run while the experiment goes on,
    from the results so far (the latest chunk metrics of runs still training included), and its pruner stops
    runs at chunk boundaries. The study is kept in optuna.db in the experiment folder and resumes with it."""

    strategy: Literal["optuna"]
    num_runs: int = Field(ge=1, le=MAX_RUNS_CEILING, description="How many runs the study proposes in all (at most sweep.max_runs)")
    seed: int = 42
    metric: str = Field(default="eval_loss", description="The evaluation metric the study optimizes")
    direction: Literal["minimize", "maximize", "min", "max"] | None = Field(default=None, description=DIRECTION_DOC)
    sampler: Literal[SAMPLERS] = Field(  # type: ignore[valid-type]
        default="tpe", description="How new runs are proposed: tpe (Optuna's TPESampler), random, cmaes (CMA-ES) or gp "
        "(Gaussian process; imports torch)",
    )
    startup_runs: int | None = Field(
        default=None, ge=0, le=MAX_RUNS_CEILING,
        description="Runs proposed at random before the sampler models the results (tpe, cmaes, gp); default: "
        "num_runs // 4, at least 2",
    )
    max_concurrent_runs: int = Field(
        default=4, ge=1, le=1024,
        description="Runs of the study training at once (they take turns on the slots, chunk by chunk); a new run is "
        "proposed when one of them ends, is pruned or fails",
    )
    pruner: Literal[PRUNERS] = Field(  # type: ignore[valid-type]
        default="median",
        description="What stops runs at chunk boundaries: none, median (Optuna's MedianPruner), successive_halving, "
        "hyperband (Optuna's), or asha (finetune's own asynchronous successive halving, as strategy successive_halving)",
    )
    min_chunks: int = Field(default=1, ge=1, le=MAX_CHUNKS, description="Chunks a run trains before it can be pruned")
    reduction_factor: int = Field(default=2, ge=2, le=100, description="successive_halving, hyperband, asha: keep the best "
                                  "1/reduction_factor at each rung")

    @field_validator("direction")
    @classmethod
    def _long_direction(cls, value: str | None) -> str | None:
        return DIRECTIONS.get(value, value) if value is not None else None

    def startup(self) -> int:
        return self.startup_runs if self.startup_runs is not None else max(2, self.num_runs // 4)


class PopulationBasedSweep(BoundedSweep):
    """Population-based training: a random population of num_runs runs; at every perturbation_interval chunks
    the worst runs stop and each is replaced by a warm-started clone of one of the best, its knobs perturbed."""

    strategy: Literal["pbt"]
    num_runs: int = Field(ge=2, le=MAX_RUNS_CEILING, description="The population: runs sampled at random to start")
    seed: int = 42
    metric: str = Field(default="eval_loss", description="The evaluation metric that ranks runs")
    direction: Literal["minimize", "maximize", "min", "max"] | None = Field(default=None, description=DIRECTION_DOC)
    perturbation_interval: int = Field(default=1, ge=1, le=MAX_CHUNKS, description="Chunks between two exploit steps of a run")
    quantile_fraction: float = Field(
        default=0.25, gt=0, le=0.5,
        description="The bottom fraction of the population is replaced by clones of the top fraction (at least one run each)",
    )
    resample_probability: float = Field(
        default=0.25, ge=0, le=1, description="A perturbed knob is drawn afresh from its $list or $range with this probability"
    )
    perturbation_factors: list[float] = Field(
        default=[0.8, 1.2], min_length=1, max_length=16,
        description="A $range knob is multiplied by one of these, picked at random (then kept within its range); a $list "
        "knob moves to a neighbouring value",
    )

    @field_validator("direction")
    @classmethod
    def _long_direction(cls, value: str | None) -> str | None:
        return DIRECTIONS.get(value, value) if value is not None else None

    @field_validator("perturbation_factors")
    @classmethod
    def _positive_factors(cls, value: list[float]) -> list[float]:
        if not all(math.isfinite(factor) and factor > 0 for factor in value):
            raise ValueError("perturbation factors must be positive finite numbers")
        return value
