"""The `eval_conf` section: which metrics rank a run, and how completions are generated for them.

Two kinds of metric. The teacher-forced pass over the validation data (the trainer's own
evaluation) gives `eval_loss` and, for SFT, `token_accuracy`. Generation metrics compare the
model's greedy answer to each validation example's reference answer (its last assistant turn):
`exact_match`, `rouge_l`, `bleu`, `chrf`, and a user's own functions (`custom`).

Every metric has a direction, so that a sweep ranks by it the right way round.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from finetune.config.sections import Strict

Direction = Literal["minimize", "maximize"]
DIRECTION_ALIASES = {"min": "minimize", "max": "maximize"}

TEACHER_FORCED_METRICS: dict[str, Direction] = {"eval_loss": "minimize", "token_accuracy": "maximize"}
GENERATION_METRICS: dict[str, Direction] = {
    "exact_match": "maximize", "rouge_l": "maximize", "bleu": "maximize", "chrf": "maximize",
}
BUILTIN_METRICS: dict[str, Direction] = {**TEACHER_FORCED_METRICS, **GENERATION_METRICS}
# Metrics only SFT's teacher-forced pass logs (TRL's SFTTrainer: mean_token_accuracy).
SFT_ONLY_METRICS = ("token_accuracy",)
DEFAULT_METRICS = ["eval_loss"]

METRIC_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
FUNCTION_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
# Names the trainers or finetune itself log: a custom metric by one of them would mix two series in
# state.db, MLflow and the dashboard. HF Trainer.log (loss, grad_norm, learning_rate, epoch,
# num_input_tokens_seen, total_flos, the train_/eval_/test_ speed metrics, memory metrics,
# hyperparameter search's objective) and the keys of TRL's `_metrics` in its SFT, DPO and GRPO
# trainers that fit a metric name (those with a '/' cannot).
RESERVED_METRIC_NAMES = (
    "loss", "learning_rate", "grad_norm", "epoch", "step", "num_input_tokens_seen", "total_flos", "objective",
    "entropy", "mean_token_accuracy", "num_tokens", "aux_loss", "step_time", "reward", "reward_std",
    "frac_reward_zero_std", "kl", "policy_loss", "entropy_coef", "cispo_clip_ratio", "generation_prompts_too_long",
)
# The columns of the report, `finetune status` and the dashboard's runs: a metric by one of these names
# would show as a second column of that name (compared ignoring case).
REPORT_COLUMNS = ("rank", "run", "run_id", "label", "state", "chunks", "value", "knobs", "latest", "position",
                  "error", "parent_run_id", "total_chunks", "lineage", "decision", "detail")
RESERVED_METRIC_PREFIXES = ("eval_", "train_", "test_", "predict_", "init_mem_", "before_init_mem_")
MAX_NEW_TOKENS = 32_768
MAX_GENERATION_SAMPLES = 100_000
MAX_GENERATION_BATCH = 4_096

BuiltinMetric = Literal[tuple(BUILTIN_METRICS)]  # type: ignore[valid-type]


def long_direction(value: str) -> str:
    return DIRECTION_ALIASES.get(value, value)


class GenerationConfig(Strict):
    """How completions are generated for the generation metrics: batched, left-padded, from the
    run's chat template with its generation prompt. A prompt that leaves no room for max_new_tokens
    in the model's context is skipped (and counted as generation_prompts_too_long), never cut."""

    max_new_tokens: int = Field(default=64, ge=1, le=MAX_NEW_TOKENS, description="Tokens generated per answer at most")
    temperature: float = Field(
        default=0.0, ge=0.0, le=100.0, description="0: greedy decoding (deterministic); above 0: sampling at this temperature"
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling (with temperature above 0)")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the sampling (with temperature above 0)")
    batch_size: int = Field(default=8, ge=1, le=MAX_GENERATION_BATCH, description="Prompts generated together")
    max_samples: int = Field(
        default=32, ge=1, le=MAX_GENERATION_SAMPLES,
        description="Generate for the first this many validation examples (generation is costly)",
    )
    every_chunks: int = Field(
        default=1, ge=1,
        description="Compute the generation metrics after every N chunks; always after a run's last chunk and at "
        "the chunks where successive halving compares runs",
    )


class CustomMetric(Strict):
    """A user's metric: `function(prompts, completions, references) -> float` over the generated sample.

    `prompts` are the conversations before the answer (lists of {role, content}), `completions` the
    generated answers and `references` the validation answers, all in the same order."""

    name: str = Field(
        pattern=METRIC_NAME_PATTERN,
        description="The metric's name (as logged, and as sweep.metric names it)",
    )
    function: str = Field(
        pattern=FUNCTION_PATTERN,
        description="An importable `package.module:function` (on the PYTHONPATH of finetune's processes)",
    )
    direction: Literal["minimize", "maximize", "min", "max"] = Field(
        default="maximize", description="Whether a lower or a higher value is better"
    )

    @field_validator("name")
    @classmethod
    def _not_taken(cls, name: str) -> str:
        if name.lower() in REPORT_COLUMNS:
            raise ValueError(f"'{name}' is a column of the report and of `finetune status`; choose another (not one of "
                             + ", ".join(REPORT_COLUMNS) + ")")
        if name in BUILTIN_METRICS or name in RESERVED_METRIC_NAMES or name.startswith(RESERVED_METRIC_PREFIXES):
            prefixes = ", ".join(prefix + "*" for prefix in RESERVED_METRIC_PREFIXES)
            raise ValueError(f"'{name}' is the name of a built-in metric or of one the trainer logs; choose another "
                             f"(not {prefixes}, not one of " + ", ".join([*BUILTIN_METRICS, *RESERVED_METRIC_NAMES]) + ")")
        return name

    @field_validator("function")
    @classmethod
    def _importable(cls, function: str) -> str:
        problem = function_problem(function)
        if problem:
            raise ValueError(problem)
        return function

    @field_validator("direction")
    @classmethod
    def _long_direction(cls, value: str) -> str:
        return long_direction(value)


METRIC_KEYWORDS = ("prompts", "completions", "references")
METRIC_CALL = "function(prompts=..., completions=..., references=...)"


def function_problem(path: str) -> str | None:
    """Why `package.module:function` cannot be called as a custom metric, or None when it can; read from the
    module's source, never imported (`config.user_code`)."""
    from finetune.config.user_code import keyword_call_problem

    return keyword_call_problem(path, METRIC_KEYWORDS, METRIC_CALL)


class EvalConfig(Strict):
    """What each run is measured by at chunk boundaries (usable as sweep.metric)."""

    metrics: list[BuiltinMetric] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(DEFAULT_METRICS), min_length=1,
        description="Built-in metrics: eval_loss and token_accuracy (SFT) from the teacher-forced pass over the "
        "validation data; exact_match (after trimming and collapsing whitespace), rouge_l (ROUGE-L F1, "
        "rouge-score), bleu and chrf (corpus scores 0-100, sacrebleu) over generated answers",
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Generation for the generation metrics")
    custom: list[CustomMetric] = Field(
        default_factory=list, description="Your own metrics over the generated answers. They run in a child process of "
        "each worker, on copies of the sample; one that fails, hangs, exits or leaves processes or threads behind is "
        "missing for that evaluation (a warning event in state.db), and training goes on")
    custom_timeout_s: float = Field(
        default=60.0, gt=0, le=86_400, description="Seconds each custom metric may take per evaluation; it is then "
        "killed and its value is missing")
    custom_memory_gb: float = Field(
        default=8.0, gt=0, le=4096, description="Address space (GB) of the process that runs the custom metrics; "
        "beyond it their allocations fail")

    @field_validator("metrics")
    @classmethod
    def _each_once(cls, metrics: list[str]) -> list[str]:
        repeated = sorted({name for name in metrics if metrics.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return metrics

    @field_validator("custom")
    @classmethod
    def _distinct_custom_names(cls, custom: list[CustomMetric]) -> list[CustomMetric]:
        names = [metric.name for metric in custom]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"custom metric {', '.join(repeated)} is defined more than once")
        return custom

    @property
    def teacher_forced(self) -> list[str]:
        return [name for name in self.metrics if name in TEACHER_FORCED_METRICS]

    @property
    def generated(self) -> list[str]:
        return [name for name in self.metrics if name in GENERATION_METRICS]

    @property
    def needs_generation(self) -> bool:
        return bool(self.generated or self.custom)

    def directions(self) -> dict[str, str]:
        """Every metric this section produces, with whether lower or higher is better."""
        return {**{name: BUILTIN_METRICS[name] for name in self.metrics},
                **{metric.name: metric.direction for metric in self.custom}}


def method_metric_problem(method: str, eval_conf: EvalConfig) -> str | None:
    """Why `method`'s runs cannot produce what `eval_conf` asks for, or None."""
    if method == "grpo" and (eval_conf.metrics != DEFAULT_METRICS or eval_conf.custom):
        return ("GRPO runs are not evaluated at chunk boundaries: they are ranked by the rewards they log while "
                "training (sweep.metric: reward); leave eval_conf out")
    if method != "sft" and (only := [name for name in eval_conf.metrics if name in SFT_ONLY_METRICS]):
        return f"{', '.join(only)} is measured by SFT's evaluation only; {method} runs do not produce it"
    return None


def directions_in(config: dict[str, Any]) -> dict[str, str]:
    """The metrics a run's validated config (plain data, as in plan.json) produces, with their directions;
    read without importing its custom functions, so that report and dashboard never run user code."""
    if config.get("method") == "grpo":
        return {}
    eval_conf = config.get("eval_conf") or {}
    found = {name: BUILTIN_METRICS[name] for name in eval_conf.get("metrics", DEFAULT_METRICS) if name in BUILTIN_METRICS}
    for metric in eval_conf.get("custom", []):
        found[metric["name"]] = long_direction(metric.get("direction", "maximize"))
    return found
