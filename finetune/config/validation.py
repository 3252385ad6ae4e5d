"""Validate a config tree, knobs and all, into a list of issues a person can act on.

Knobs are checked by substitution: the representative config (every knob at its first
candidate) is validated in full, then each other candidate of each knob is put in its
place and validated; errors under the knob's path are reported with the candidate's
index, e.g. `peft_conf.peft_kwargs.r[1]`.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from finetune.config.compat import legacy_message
from finetune.config.knobs import (
    LIST_KEY,
    RANGE_KEY,
    KnobSyntaxError,
    Path,
    dotted,
    first_candidates,
    iter_knobs,
    knob_kind,
    parse_knob,
    set_at,
)
from finetune.config.guards import FINITE_FORM, bad_numbers, number_issue, run_count_issues, total_runs_issue
from finetune.config.issues import ConfigInvalid as ConfigInvalid  # re-exported: callers import it from here
from finetune.config.issues import ConfigIssue, Locator, did_you_mean, short_choices, short_repr
from finetune.config.loading import Location, SourceDoc
from finetune.config.metric_check import sweep_metric_issues
from finetune.config.models import CONFIG_ADAPTER, DISCRIMINATOR_KEYS, FinetuneConfig, AnyFinetuneConfig
from finetune.config.scheduling import EXPERIMENT_WIDE_KEYS, PER_RUN_EXPERIMENT_KEYS
from finetune.config.training_keys import refusals

NOT_KNOBBABLE = ("method", "experiment", "sweep", "groups")


# ---------------------------------------------------------------- pydantic errors -> issues


def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _tag_of(member: Any) -> set[Any]:
    tags: set[Any] = set()
    if typing.get_origin(member) is typing.Annotated:
        tags.update(meta.tag for meta in typing.get_args(member)[1:] if hasattr(meta, "tag"))
    model = _strip(member)
    if _is_model(model):
        for key in {*DISCRIMINATOR_KEYS.values(), "peft_type", "type", "quantization_type"}:
            field = model.model_fields.get(key)
            if field is not None and typing.get_origin(field.annotation) is typing.Literal:
                tags.update(typing.get_args(field.annotation))
    return tags


def _step(annotation: Any, part: Any) -> Any:
    annotation = _strip(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members = [m for m in typing.get_args(annotation) if m is not type(None)]
        for member in members:
            if part in _tag_of(member):
                return member
        if len(members) == 1:
            return _step(members[0], part)
        return None
    if _is_model(annotation):
        field = annotation.model_fields.get(part)
        return field.annotation if field is not None else None
    if origin is list and isinstance(part, int):
        return typing.get_args(annotation)[0]
    if origin is dict:
        return typing.get_args(annotation)[1]
    return None


def allowed_keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the model accepts at a pydantic error location (with union tags)."""
    annotation: Any = FinetuneConfig
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    annotation = _strip(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        models = [m for m in typing.get_args(annotation) if _is_model(_strip(m))]
        annotation = _strip(models[0]) if len(models) == 1 else None
    if not _is_model(annotation):
        return []
    return [name for name, field in annotation.model_fields.items() if not field.exclude]


def _data_path(tree: Any, loc: tuple[Any, ...]) -> tuple[Path, tuple[Any, ...]]:
    """Map a pydantic loc to a path in the user's data, dropping union tags and branch labels.

    Returns (path, the loc prefix up to the last element that is a real key).
    """
    path: list[Any] = []
    node = tree
    model_loc: list[Any] = []
    for index, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            path.append(part)
            model_loc.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path.append(part)
            model_loc.append(part)
            node = node[part]
        elif isinstance(node, dict) and index < len(loc) - 1:
            model_loc.append(part)  # a union tag, e.g. 'sft' or 'LORA'
        elif isinstance(node, dict):
            path.append(part)  # a missing key or an unknown one
            break
        else:
            break  # a scalar: the rest are union branch labels such as 'str' or 'list[any]'
    return tuple(path), tuple(model_loc)


def _issue_parts(error: dict[str, Any], loc_model: tuple[Any, ...], path: Path) -> tuple[Path, str, str | None, str | None]:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    given = None if kind in ("missing", "union_tag_not_found") else short_repr(error.get("input"))
    if kind == "extra_forbidden":
        key = str(path[-1]) if path else "?"
        if "training_args" in path and (replaced := legacy_message(key)) is not None:
            return path, replaced, None, None
        allowed = allowed_keys_at(loc_model[:-1] if loc_model and loc_model[-1] == key else loc_model)
        hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        message = f"unknown key '{key}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
        listing = ", ".join(sorted(allowed)) if len(allowed) <= 20 else f"{len(allowed)} keys, see docs/config-reference.md"
        return path, message, None, listing
    if kind == "missing":
        return path, f"missing required key '{path[-1]}'", None, None
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = str(ctx.get("discriminator", "")).strip("'")
        key = DISCRIMINATOR_KEYS.get(discriminator.removesuffix("()"), discriminator)
        expected = str(ctx.get("expected_tags", ""))
        if kind == "union_tag_not_found":
            return (*path, key), f"missing key '{key}', which picks the kind of this section", None, expected
        tag = str(ctx.get("tag"))
        return (*path, key), f"unknown {key} '{tag}'{did_you_mean(tag, expected)}", short_repr(ctx.get("tag")), short_choices(expected)
    if kind == "literal_error":
        expected = str(ctx.get("expected"))
        hint = did_you_mean(error.get("input"), expected)
        return path, f"not one of the allowed values{hint}", given, short_choices(expected) if hint else expected
    message = error["msg"].removeprefix("Value error, ")
    return path, message, given, ctx.get("allowed")


def issues_from_validation_error(
    error: ValidationError, tree: Any, locate: Locator, skip: frozenset[Path] = frozenset()
) -> list[ConfigIssue]:
    """Issues of pydantic's errors, one per key path; paths in `skip` (reported already) are left out."""
    grouped: dict[Path, list[tuple[str, str | None, str | None]]] = {}
    for item in error.errors(include_url=False):
        path, loc_model = _data_path(tree, tuple(item["loc"]))
        path, message, given, allowed = _issue_parts(item, loc_model, path)
        if path not in skip:
            grouped.setdefault(path, []).append((message, given, allowed))
    issues = []
    for path, parts in grouped.items():
        messages = list(dict.fromkeys(message for message, _, _ in parts))
        given = next((g for _, g, _ in parts if g is not None), None)
        allowed = "; ".join(dict.fromkeys(a for _, _, a in parts if a)) or None
        issues.append(ConfigIssue(dotted(path), str(locate(path)), "; or ".join(messages), given, allowed))
    return issues


# ---------------------------------------------------------------- concrete configs


def with_default_method(tree: dict[str, Any]) -> dict[str, Any]:
    return tree if "method" in tree else {"method": "sft", **tree}


def validate_concrete(tree: dict[str, Any], locate: Locator) -> tuple[AnyFinetuneConfig | None, list[ConfigIssue]]:
    """Validate one knob-free config (a run of a plan, a clone): every number finite, every field as its model says."""
    bad = bad_numbers(tree)
    numbers = [number_issue(tree, path, locate) for path in bad]
    try:
        config = CONFIG_ADAPTER.validate_python(tree)
    except ValidationError as error:
        return None, numbers + issues_from_validation_error(error, tree, locate, frozenset(bad))
    numbers += [_coerced_issue(tree, path, locate) for path in bad_numbers(config.model_dump()) if path not in bad]
    numbers += _refused_training_keys(config, locate)
    return (None, numbers) if numbers else (config, [])


def _refused_training_keys(config: AnyFinetuneConfig, locate: Locator) -> list[ConfigIssue]:
    """training_args values that finetune's chunked loop cannot honour (`training_keys.refusals`)."""
    issues = []
    for key, problem, given, allowed in refusals(config):
        path = ("training_args", key)
        issues.append(ConfigIssue(dotted(path), str(locate(path)), problem, short_repr(given), allowed))
    return issues


def _coerced_issue(tree: Any, path: Path, locate: Locator) -> ConfigIssue:
    """A text that a number field read as a non-finite number ("inf", "Infinity", "1e999")."""
    value: Any = tree
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return ConfigIssue(dotted(path), str(locate(path)), "reads as a number that is not finite", short_repr(value), FINITE_FORM)


# ---------------------------------------------------------------- knob trees


def _per_run_experiment_key(path: Path) -> bool:
    return len(path) == 2 and path[0] == "experiment" and path[1] in PER_RUN_EXPERIMENT_KEYS


def _knobbable_there(section: Any) -> str | None:
    if section != "experiment":
        return None
    return "in experiment, only " + " and ".join(PER_RUN_EXPERIMENT_KEYS) + " (each run's devices) may be knobs"


def _knob_syntax_issues(tree: Any, strategy: str, locate: Locator, base: Path = ()) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    for path, plain in iter_knobs(tree):
        full = (*base, *path)
        if path and path[0] in NOT_KNOBBABLE and not _per_run_experiment_key(path):
            issues.append(ConfigIssue(dotted(full), str(locate(full)), f"'{path[0]}' cannot hold a sweep knob",
                                      allowed=_knobbable_there(path[0])))
            continue
        if knob_kind(plain) == RANGE_KEY and (bad := bad_numbers(plain)):
            issues.extend(number_issue(plain, where, locate, full) for where in bad)
            continue
        try:
            knob = parse_knob(plain)
        except KnobSyntaxError as error:
            issues.append(ConfigIssue(dotted(full), str(locate((*full, *error.sub_path))), str(error)))
            continue
        if knob_kind(plain) == RANGE_KEY and strategy == "grid":
            issues.append(
                ConfigIssue(
                    dotted(full),
                    str(locate(full)),
                    "grid search takes only $list knobs",
                    allowed="a $list of values, or sweep.strategy random / successive_halving / optuna / pbt for a $range",
                )
            )
        for index, candidate in enumerate(knob.candidates() if knob_kind(plain) == LIST_KEY else []):
            issues.extend(_knob_syntax_issues(candidate, strategy, locate, (*full, LIST_KEY, index)))
    return issues


def _candidate_path(knob_path: Path, kind: str, index: int) -> Path:
    return (*knob_path, kind, index if kind == LIST_KEY else ("start", "end")[index])


def _rebase(issue_path: Path, knob_path: Path, kind: str, index: int) -> Path:
    return (*_candidate_path(knob_path, kind, index), *issue_path[len(knob_path) :])


def validate_tree(tree: Any, locate: Locator) -> list[ConfigIssue]:
    """All issues of one (group's) knob tree; empty when every candidate fits its field."""
    if not isinstance(tree, dict):
        return [ConfigIssue("<root>", str(locate(())), "a config must be a mapping of sections")]
    tree = with_default_method(tree)
    sweep = tree.get("sweep")
    strategy = sweep.get("strategy", "grid") if isinstance(sweep, dict) else "grid"
    issues = _knob_syntax_issues(tree, strategy, locate)
    if issues:
        return issues
    issues = run_count_issues(tree, locate)
    knobs = list(iter_knobs(tree))
    representative = first_candidates(tree)
    knob_at = {path: knob_kind(plain) for path, plain in knobs}

    def relocated(found: list[ConfigIssue], raw_paths: list[Path], only_under: Path | None, index: int) -> list[ConfigIssue]:
        result = []
        for issue, raw in zip(found, raw_paths):
            owner = next((p for p in knob_at if raw[: len(p)] == p), None)
            if only_under is not None and owner != only_under:
                continue
            if owner is not None and not (raw == owner and issue.given is None):  # the key itself (a typo): said once
                raw = _rebase(raw, owner, knob_at[owner], index if only_under is not None else 0)
            result.append(ConfigIssue(dotted(raw), str(locate(raw)), issue.message, issue.given, issue.allowed))
        return result

    found, raw_paths = _validate_with_paths(representative, locate)
    issues.extend(relocated(found, raw_paths, None, 0))
    for path, plain in knobs:
        knob = parse_knob(plain)
        for index, candidate in enumerate(knob.candidates()):
            if index == 0:
                continue
            variant = set_at(representative, path, first_candidates(candidate))
            found, raw_paths = _validate_with_paths(variant, locate)
            issues.extend(relocated(found, raw_paths, path, index))
    return list(dict.fromkeys(issues))  # a problem of a knob's key, not of its values, is found once per candidate


def _validate_with_paths(tree: dict[str, Any], locate: Locator) -> tuple[list[ConfigIssue], list[Path]]:
    raw_paths: list[Path] = []

    def remember(path: Path) -> Location:
        raw_paths.append(path)
        return Location("")

    _, issues = validate_concrete(tree, remember)
    return issues, raw_paths


# ---------------------------------------------------------------- groups and documents


def deep_merge(base: Any, overlay: Any) -> Any:
    """Overlay wins; mappings merge key by key; a knob or list in the overlay replaces the base value."""
    if isinstance(base, dict) and isinstance(overlay, dict) and not knob_kind(overlay) and not knob_kind(base):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    return overlay


def group_trees(tree: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """[(prefix of the group in the file, merged tree)]; one entry with prefix () when there are no groups."""
    groups = tree.get("groups")
    if groups is None:
        return [((), tree)]
    base = {key: value for key, value in tree.items() if key != "groups"}
    return [(("groups", index), deep_merge(base, overlay)) for index, overlay in enumerate(groups)]


def group_locator(doc: SourceDoc, prefix: Path) -> Locator:
    def locate(path: Path) -> Location:
        if prefix:
            for end in range(len(path), 0, -1):
                found = doc.positions.get((*prefix, *path[:end]))
                if found is not None:
                    return found
        return doc.locate(path)

    return locate


def validate_document(doc: SourceDoc) -> list[ConfigIssue]:
    tree = doc.tree
    if not isinstance(tree, dict):
        return [ConfigIssue("<root>", str(doc.locate(())), "a config must be a mapping of sections")]
    groups = tree.get("groups")
    if groups is not None and (not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups)):
        return [ConfigIssue("groups", str(doc.locate(("groups",))), "groups must be a non-empty list of mappings (overlays)")]
    issues = _experiment_wide_keys_in_groups(doc, groups or [])
    reported = {issue.path for issue in issues}
    merged_groups = group_trees(tree)
    for prefix, merged in merged_groups:
        locate = group_locator(doc, prefix)
        for issue in validate_tree(merged, locate) or sweep_metric_issues(with_default_method(merged), locate):
            if f"{dotted(prefix)}.{issue.path}" in reported:
                continue  # a knob on an experiment-wide key of a group: said once, by the group check
            path = f"{dotted(prefix)}: {issue.path}" if prefix else issue.path
            issues.append(ConfigIssue(path, issue.location, issue.message, issue.given, issue.allowed))
    total = total_runs_issue(merged_groups, tree, doc.locate) if groups is not None else None
    return sorted(dict.fromkeys([*issues, *([total] if total else [])]), key=_position_order)


def _experiment_wide_keys_in_groups(doc: SourceDoc, groups: list[dict[str, Any]]) -> list[ConfigIssue]:
    """A group is a set of runs inside one experiment: it may not set what the whole experiment shares."""
    issues = []
    for index, overlay in enumerate(groups):
        experiment = overlay.get("experiment")
        for key in experiment if isinstance(experiment, dict) else ():
            if key in EXPERIMENT_WIDE_KEYS:
                path = ("groups", index, "experiment", key)
                issues.append(ConfigIssue(
                    dotted(path), str(doc.locate(path)), f"experiment.{key} belongs to the whole experiment, not to a group",
                    allowed="set it once at the top level of the file, outside groups",
                ))
    return issues


def _position_order(issue: ConfigIssue) -> tuple[str, int, int]:
    source, _, rest = issue.location.partition(":")
    line, _, column = rest.partition(":")
    return (source, int(line) if line.isdigit() else 0, int(column) if column.isdigit() else 0)
