"""`sweep.metric` must be a metric the runs produce, ranked the right way round; generation metrics
need validation examples.

Checked on a whole (group's) tree once its fields are valid: the representative config and every
candidate of each knob under `eval_conf` (a metric one candidate does not produce is an error).
Training metrics a method logs (GRPO's rewards, DPO's reward accuracy and margins) are rankable too: the
one table of `config.directions` says which, and which way each is better.
"""

from __future__ import annotations

from typing import Any

from finetune.config.directions import direction_of, rankable
from finetune.config.issues import ConfigIssue, Locator
from finetune.config.knobs import Path, dotted, first_candidates, iter_knobs, parse_knob, set_at
from finetune.config.models import CONFIG_ADAPTER, AnyFinetuneConfig

METRIC_PATH: Path = ("sweep", "metric")
DIRECTION_PATH: Path = ("sweep", "direction")


def metric_direction(config: AnyFinetuneConfig, metric: str) -> str | None:
    """Whether `metric` is better lower or higher in runs of `config`; None when the runs do not produce it."""
    return direction_of(config.method, config.eval_conf.directions(), metric)


def sweep_metric_issues(tree: dict[str, Any], locate: Locator) -> list[ConfigIssue]:
    """The issues of `sweep.metric`, `sweep.direction` and `eval_conf` in a tree whose fields are all valid."""
    for where, variant in _eval_conf_variants(tree):
        problem = _problem(CONFIG_ADAPTER.validate_python(variant), where, locate)
        if problem is not None:
            return [problem]  # said once, for the first candidate that has it
    return []


def _eval_conf_variants(tree: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(which candidate, concrete config): the representative, then each other candidate of each eval_conf knob."""
    representative = first_candidates(tree)
    variants = [("", representative)]
    for path, plain in iter_knobs(tree):
        if path[:1] != ("eval_conf",):
            continue
        for index, candidate in enumerate(parse_knob(plain).candidates()):
            if index:
                variant = set_at(representative, path, first_candidates(candidate))
                variants.append((f"{dotted(path)}[{index}]", variant))
    return variants


def _problem(config: AnyFinetuneConfig, where: str, locate: Locator) -> ConfigIssue | None:
    in_runs = f" (with {where})" if where else ""
    if config.eval_conf.needs_generation and config.data_conf.validation_data.type == "NONE":
        return ConfigIssue(
            "eval_conf", str(locate(("eval_conf",))), f"generation metrics need validation examples{in_runs}, and "
            "data_conf.validation_data is NONE", allowed="validation_data CONCATENATION or AUTO_SPLIT, or only "
            "eval_loss / token_accuracy in eval_conf.metrics and no custom metric",
        )
    metric = getattr(config.sweep, "metric", None)
    if metric is None:
        return None
    produced = rankable(config.method, config.eval_conf.directions())
    own = direction_of(config.method, config.eval_conf.directions(), metric)
    if own is None:
        what = ("a reward GRPO logs while training: " if config.method == "grpo" else
                "a metric of eval_conf.metrics, the name of an eval_conf.custom metric, or one the runs log while training: ")
        return ConfigIssue(
            dotted(METRIC_PATH), str(locate(METRIC_PATH)), f"the runs do not produce {metric}{in_runs}", metric,
            what + ", ".join(produced) + (", rewards/<function>/mean" if config.method == "grpo" else ""),
        )
    given = getattr(config.sweep, "direction", None)
    if given is not None and given != own:
        return ConfigIssue(
            dotted(DIRECTION_PATH), str(locate(DIRECTION_PATH)),
            f"{metric} is better when {'lower' if own == 'minimize' else 'higher'}{in_runs}; ranking by {given} "
            "would keep the worst runs", given if "direction" in config.sweep.model_fields_set else f"{given} (the default)",
            own + (", or leave sweep.direction out" if _follows_metric(config) else ""),
        )
    return None


def _follows_metric(config: AnyFinetuneConfig) -> bool:
    """Whether the sweep's direction, left out, is the metric's own (else the strategy's fixed default)."""
    field = type(config.sweep).model_fields.get("direction")
    return field is not None and field.default is None
