"""The run plan: plain, JSON-serialisable data; the contract between the config and the scheduler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetune.config.knobs import first_candidates
from finetune.config.scheduling import ExperimentConfig


class Derived(BaseModel):
    """Values the tool computes for a run from its concrete config (SiloGen semantics)."""

    model_config = ConfigDict(extra="forbid")

    num_processes: int
    total_train_batch_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    per_device_eval_batch_size: int
    base_learning_rate: float
    learning_rate: float = Field(description="after overrides.lr_multiplier and lr_batch_size_scaling")
    num_train_epochs: float
    train_examples: int | None = Field(description="before length filtering; None when not known yet")
    steps_per_epoch: int | None
    total_steps: int | None
    chunk_steps: list[int] | None = Field(description="optimizer steps of each chunk; they add up to total_steps")

    @property
    def num_chunks(self) -> int | None:
        return len(self.chunk_steps) if self.chunk_steps is not None else None


class PlannedRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="a short hash of the concrete config")
    label: str = Field(description="human label built from the knob values")
    group: int = 0
    knobs: dict[str, Any] = Field(description="knob path -> chosen value")
    config: dict[str, Any] = Field(description="the concrete config, knob-free")
    derived: Derived
    parent_run_id: str | None = Field(default=None, description="set for runs cloned from another run")
    warm_start: str | None = Field(
        default=None,
        description="a warm-start clone's adapter, relative to the experiment folder (its config names the same path)",
    )
    trial: int | None = Field(default=None, description="the Optuna trial that proposed it (sweep.strategy optuna)")
    lineage_start: int = Field(
        default=0, ge=0,
        description="chunks its lineage had trained before it: a warm-start clone continues its parent's count",
    )

    def located(self, root: Path) -> PlannedRun:
        """This run with its warm-start adapter where the experiment folder `root` holds it now (a
        folder can be moved or copied; the plan keeps the path relative)."""
        if self.warm_start is None:
            return self
        peft = {"peft_type": "PRETRAINED_PEFT", "name_or_path": str(root / self.warm_start)}
        return self.model_copy(update={"config": {**self.config, "peft_conf": peft}})


class RunPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment: str
    output_dir: str
    source: str
    num_chunks: int
    sweeps: list[dict[str, Any]] = Field(description="the sweep section of each group")
    runs: list[PlannedRun]
    failed: dict[str, str] = Field(default_factory=dict, description="runs whose model or data could not be prepared")
    search_spaces: dict[int, dict[str, Any]] = Field(
        default_factory=dict,
        description="the knob tree of each group (by index) that proposes runs while the experiment goes on (sweep.strategy "
        "optuna and pbt)",
    )
    settings: ExperimentConfig = Field(
        default_factory=ExperimentConfig,
        description="the experiment section; its experiment-wide keys (devices, slots, backend, budgets) are read "
        "from here, never from a run (validation keeps groups and knobs from setting them)",
    )

    @model_validator(mode="before")
    @classmethod
    def _settings_of_an_older_plan(cls, value: Any) -> Any:
        """A plan.json written before `settings` existed: its runs share the experiment section."""
        runs = value.get("runs") if isinstance(value, dict) and "settings" not in value else None
        if not runs or not isinstance(runs, list):
            return value  # a plan of another shape: the fields' own validation says what is wrong
        first = runs[0]
        config = first.config if isinstance(first, PlannedRun) else first.get("config") if isinstance(first, dict) else None
        experiment = config.get("experiment") if isinstance(config, dict) else None
        return {**value, "settings": experiment if isinstance(experiment, dict) else {}}

    @property
    def total_steps(self) -> int | None:
        steps = [run.derived.total_steps for run in self.runs]
        return None if any(step is None for step in steps) else sum(steps)  # type: ignore[arg-type]

    def first_config(self) -> dict[str, Any]:
        """The first run's config; before a study has proposed any, its search space's representative (each
        knob's first value): what experiment-wide settings such as tracking are read from."""
        if self.runs or not self.search_spaces:
            return self.runs[0].config
        return first_candidates(self.search_spaces[min(self.search_spaces)])

    def run(self, run_id: str) -> PlannedRun:
        for run in self.runs:
            if run.run_id == run_id:
                return run
        raise KeyError(run_id)
