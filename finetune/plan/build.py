"""load -> knob tree -> expand (strategy) -> concrete configs -> validate each -> derive -> RunPlan."""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from finetune.config.knobs import dotted
from finetune.config.loading import SourceDoc
from finetune.config.models import AnyFinetuneConfig
from finetune.config.scheduling import DIRECTIONS
from finetune.config.validation import (
    ConfigInvalid,
    ConfigIssue,
    group_locator,
    group_trees,
    validate_concrete,
    validate_document,
    with_default_method,
)
from finetune.data.mixing import auto_split_sizes, count_jsonl_records, weighted_mix_order
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


def train_examples_from_files(config: AnyFinetuneConfig) -> int | None:
    """Training examples (before length filtering) counted from the files, or None if unknown."""
    data = config.data_conf
    sizes = [count_jsonl_records(dataset.path) for dataset in data.training_data.datasets]
    if any(size is None for size in sizes):
        return None
    if data.training_data.type == "PRECOMPUTE_WEIGHTED_MIX":
        weights = [dataset.sampling_weight for dataset in data.training_data.datasets]
        if data.validation_data.type == "AUTO_SPLIT":
            sizes = [auto_split_sizes(size, data.validation_data.ratio)[0] for size in sizes]  # type: ignore[arg-type]
        return len(weighted_mix_order(sizes, weights, data.training_data.seed))  # type: ignore[arg-type]
    total = sum(sizes)  # type: ignore[arg-type]
    if data.validation_data.type == "AUTO_SPLIT":
        return auto_split_sizes(total, data.validation_data.ratio)[0]
    return total


def expand_group(tree: dict[str, Any]) -> list[Expansion]:
    sweep = tree.get("sweep") or {}
    strategy = sweep.get("strategy", "grid")
    if strategy == "grid":
        return expand_grid(tree)
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
                derived = derive(config, train_examples(config))
            except DeriveError as error:
                raise PlanError(f"{where}run with {_describe_knobs(expansion)}: {error}") from None
            run_id = run_id_of(expansion.config)
            if run_id in seen:
                continue
            seen.add(run_id)
            experiment_config = experiment_config or config.experiment
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
        if "direction" in sweep:
            sweep["direction"] = DIRECTIONS.get(sweep["direction"], sweep["direction"])
        sweeps.append(sweep)
    assert experiment_config is not None
    return RunPlan(
        experiment=experiment_config.name,
        output_dir=experiment_config.output_dir,
        source=doc.source,
        num_chunks=experiment_config.num_chunks,
        sweeps=sweeps,
        runs=runs,
        settings=experiment_config,
    )


def _with_knobs(issue: ConfigIssue, expansion: Expansion, where: str) -> ConfigIssue:
    return ConfigIssue(
        f"{where}{issue.path}",
        issue.location,
        f"{issue.message} (in the run with {_describe_knobs(expansion)})",
        issue.given,
        issue.allowed,
    )
