"""load -> knob tree -> expand (strategy) -> concrete configs -> validate each -> derive -> RunPlan."""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from finetune.config.knobs import dotted, first_candidates
from finetune.config.loading import SourceDoc
from finetune.config.metric_check import metric_direction
from finetune.config.models import AnyFinetuneConfig
from finetune.config.scheduling import DEFAULT_MAX_RUNS, DIRECTIONS
from finetune.config.validation import (
    ConfigInvalid,
    ConfigIssue,
    group_locator,
    group_trees,
    validate_concrete,
    validate_document,
    with_default_method,
)
from finetune.data.mixing import MixError, auto_split_sizes, check_mix_size, count_jsonl_records, weighted_mix_size
from finetune.plan.derive import DeriveError, derive
from finetune.plan.expand import Expansion, ExpansionError, canonical_json, expand_grid, expand_random
from finetune.plan.model import PlannedRun, RunPlan

TrainSizeFn = Callable[[AnyFinetuneConfig], "int | None"]


class PlanError(ValueError):
    """A sweep that cannot become a plan; the message names the group and the knob values."""


def run_id_of(config: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:10]


def short_knob_names(paths: list[str]) -> dict[str, str]:
    """The last key of each knob path, or the whole path where two knobs share a last key."""
    last = [path.rsplit(".", 1)[-1] for path in paths]
    return {path: path if last.count(name) > 1 else name for path, name in zip(paths, last)}


def label_of(expansion: Expansion) -> str:
    if not expansion.labels:
        return "base"
    names = short_knob_names(list(expansion.labels))
    return ",".join(f"{names[path]}={value}" for path, value in expansion.labels.items())


def packs_rows(config: AnyFinetuneConfig) -> bool:
    """Whether the batches are of packed rows, whose number is known only once the data is tokenised."""
    return config.method == "sft" and config.sft_args.packing


def train_examples_from_files(config: AnyFinetuneConfig) -> int | None:
    """Training examples (before length filtering) counted from the files, or None if unknown.

    Raises DeriveError, naming the file, for a file without records, one too small for AUTO_SPLIT, or a
    weighted mix that would grow without bound.
    """
    data = config.data_conf
    datasets = data.training_data.datasets
    sizes = [count_jsonl_records(dataset.path) for dataset in datasets]
    if any(size is None for size in sizes):
        return None
    names = [dataset.path for dataset in datasets]
    empty = [name for name, size in zip(names, sizes) if size == 0]
    if empty:
        raise DeriveError(f"{empty[0]} has no records; every training dataset needs at least one")
    split = data.validation_data.ratio if data.validation_data.type == "AUTO_SPLIT" else None
    try:
        if data.training_data.type == "PRECOMPUTE_WEIGHTED_MIX":
            weights = [dataset.sampling_weight for dataset in datasets]
            sizes = [_train_part(size, split, name) for size, name in zip(sizes, names)]  # type: ignore[arg-type]
            check_mix_size(sizes, weights, names)  # type: ignore[arg-type]
            return weighted_mix_size(tuple(sizes), tuple(weights), data.training_data.seed)  # type: ignore[arg-type]
        return _train_part(sum(sizes), split, ", ".join(names))  # type: ignore[arg-type]
    except MixError as error:
        raise DeriveError(str(error)) from None


def _train_part(size: int, ratio: float | None, name: str) -> int:
    """The training share of `size` records after an AUTO_SPLIT of `ratio` (all of them without one)."""
    if ratio is None:
        return size
    try:
        return auto_split_sizes(size, ratio)[0]
    except MixError as error:
        raise DeriveError(f"{name}: {error}") from None


# Strategies that propose runs while the experiment goes on: their knob trees stay in the plan.
SEARCHING_STRATEGIES = ("optuna", "pbt")
# Strategies that plan no run ahead: each run is proposed by the study as slots free up.
PROPOSING_STRATEGIES = ("optuna",)
DECIDING_STRATEGIES = ("successive_halving", "optuna", "pbt")  # they compare runs by sweep.metric as they go


def strategy_of(tree: dict[str, Any]) -> str:
    return str((tree.get("sweep") or {}).get("strategy", "grid"))


def expand_group(tree: dict[str, Any]) -> list[Expansion]:
    """The group's planned runs; for a strategy that proposes them as it goes, only the representative config
    (each knob's first candidate), which is validated and derived but not planned."""
    sweep = tree.get("sweep") or {}
    strategy = sweep.get("strategy", "grid")
    if strategy in PROPOSING_STRATEGIES:
        return [Expansion(first_candidates(tree))]
    if strategy == "grid":
        return expand_grid(tree, int(sweep.get("max_runs", DEFAULT_MAX_RUNS)))
    return expand_random(tree, int(sweep["num_runs"]), int(sweep.get("seed", 42)))


def _describe_knobs(expansion: Expansion) -> str:
    return ", ".join(f"{path}={value}" for path, value in expansion.labels.items()) or "no knobs"


def build_plan(
    doc: SourceDoc, train_examples: TrainSizeFn = train_examples_from_files
) -> RunPlan:
    issues = validate_document(doc)
    if issues:
        raise ConfigInvalid(issues)
    runs: list[PlannedRun] = []
    sweeps: list[dict[str, Any]] = []
    search_spaces: dict[int, dict[str, Any]] = {}
    seen: set[str] = set()
    experiment_config = None
    for group_index, (prefix, tree) in enumerate(group_trees(doc.tree)):
        tree = with_default_method(tree)
        where = f"{dotted(prefix)}: " if prefix else ""
        try:
            expansions = expand_group(tree)
        except ExpansionError as error:
            raise PlanError(f"{where}{error}") from None
        locate = group_locator(doc, prefix)
        for expansion in expansions:
            config, problems = validate_concrete(expansion.config, locate)
            if config is None:
                raise ConfigInvalid([_with_knobs(issue, expansion, where) for issue in problems])
            try:
                examples = train_examples(config)  # checks the files even when packing hides the row count
                derived = derive(config, None if packs_rows(config) else examples)
            except DeriveError as error:
                raise PlanError(f"{where}run with {_describe_knobs(expansion)}: {error}") from None
            experiment_config = experiment_config or config.experiment
            run_id = run_id_of(expansion.config)
            if run_id in seen or strategy_of(tree) in PROPOSING_STRATEGIES:
                continue
            seen.add(run_id)
            runs.append(
                PlannedRun(
                    run_id=run_id,
                    label=label_of(expansion),
                    group=group_index,
                    knobs=expansion.knobs,
                    config=expansion.config,
                    derived=derived,
                )
            )
        sweep = dict(tree.get("sweep") or {"strategy": "grid"})
        if sweep.get("strategy") in DECIDING_STRATEGIES:
            sweep.setdefault("metric", "eval_loss")
        if "direction" in sweep:
            sweep["direction"] = DIRECTIONS.get(sweep["direction"], sweep["direction"])
        elif "metric" in sweep and config is not None and (own := metric_direction(config, sweep["metric"])):
            sweep["direction"] = own  # normalised once, here: the metric's own (`config.directions`' table)
        sweeps.append(sweep)
        if strategy_of(tree) in SEARCHING_STRATEGIES:
            search_spaces[group_index] = tree
    assert experiment_config is not None
    return RunPlan(
        experiment=experiment_config.name,
        output_dir=experiment_config.output_dir,
        source=doc.source,
        num_chunks=experiment_config.num_chunks,
        sweeps=sweeps,
        runs=runs,
        settings=experiment_config,
        search_spaces=search_spaces,
    )


def _with_knobs(issue: ConfigIssue, expansion: Expansion, where: str) -> ConfigIssue:
    return ConfigIssue(
        f"{where}{issue.path}",
        issue.location,
        f"{issue.message} (in the run with {_describe_knobs(expansion)})",
        issue.given,
        issue.allowed,
    )
