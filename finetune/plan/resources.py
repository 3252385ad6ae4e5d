"""What a run needs from outside its config, checked without ML libraries: its data files exist and
their first records parse, its model and tokenizer are a local folder or a hub id that can be had.

`finetune validate` reports these as warnings (a config may be validated on another machine than
the one that trains it); `finetune plan` and `finetune run` refuse them before any work. The checks
that need the ML stack (loading the tokenizer, applying the chat template, reaching the Hub) are
`train.preflight`'s, run by `finetune run` only.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

from finetune.data.files import DATA_PATH_FORM, data_paths, special_kind

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FIRST_RECORDS = 5  # records of each JSONL file that `plan` parses
TRUTHY = ("1", "true", "yes", "on")

Problem = tuple[str, str]  # (config key path, what is wrong and what to do)


def hub_offline() -> bool:
    """Whether the Hugging Face libraries are told to stay offline (HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(name, "").strip().lower() in TRUTHY for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path: absolute, relative with ./ or ~, deeper than org/name, or no hub id."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or not HUB_ID.match(name)


def _suggestion(path: Path) -> str:
    """' (did you mean demo/model?)' when the folder holding `path` has an entry with a close name."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [entry.name for entry in parent.iterdir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f" (did you mean {parent / close[0] if str(path.parent) not in ('', '.') else close[0]}?)" if close else ""


def in_hub_cache(repo_id: str, config: Any) -> bool:
    """Whether the Hugging Face cache holds `repo_id` (its config.json, or a tokenizer file)."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = config.run_conf.model_args.cache_dir
    revision = config.run_conf.model_args.revision
    for filename in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        try:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        except Exception:  # a malformed id or revision: not cached
            return False
        if isinstance(found, str):
            return True
    return False


def model_problems(config: Any) -> list[Problem]:
    """The model and tokenizer: an existing local folder, or a hub id that is not also a local path that
    is missing (`demo/modle` where `demo/` is a folder here) and that can be had (cached, or online)."""
    problems = []
    run_conf = config.run_conf
    for key, name in (("run_conf.model", run_conf.model), ("run_conf.tokenizer", run_conf.tokenizer)):
        if not name or (key == "run_conf.tokenizer" and name == run_conf.model):
            continue
        path = Path(name).expanduser()
        if path.exists():
            continue
        if looks_like_path(name):
            problems.append((key, f"{name} does not exist, and is no hub id (organisation/name){_suggestion(path)}"))
            continue
        first = Path(name.split("/")[0])
        if "/" in name and first.is_dir():
            problems.append((key, f"{name} does not exist{_suggestion(path)}; {first}/ is a folder here, so it reads as "
                                  "a local path, not a hub id (to train a hub model of that name, run elsewhere or "
                                  "rename the folder)"))
            continue
        offline = hub_offline() or run_conf.model_args.local_files_only
        if offline and not in_hub_cache(name, config):
            why = "HF_HUB_OFFLINE is set" if hub_offline() else "run_conf.model_args.local_files_only is true"
            problems.append((key, f"{name} is neither a local folder nor in the Hugging Face cache, and {why}: "
                                  f"download it first (`hf download {name}`) or give a local path"))
    return problems


def data_problems(config: Any, first_records: int = FIRST_RECORDS) -> list[Problem]:
    """Each data file exists, is a file or a saved dataset folder, and (JSONL) its first records are JSON objects."""
    problems = []
    for key, name in data_paths(config):
        path = Path(name).expanduser()
        if not path.exists():
            problems.append((key, f"{name} does not exist{_suggestion(path)}"))
            continue
        kind = special_kind(path)
        if kind is not None:
            problems.append((key, f"{name} is {kind}; a data path must be {DATA_PATH_FORM}"))
        elif path.is_file() and path.suffix in (".jsonl", ".json", ".ndjson", ""):
            problem = first_records_problem(path, first_records)
            if problem:
                problems.append((key, problem))
    return problems


def first_records_problem(path: Path, count: int) -> str | None:
    """What is wrong with the first `count` records of a JSONL file (syntax only: the readers check shapes)."""
    if path.suffix == ".json":
        return None  # one JSON document: its reader parses it whole
    seen = 0
    try:
        with path.open("rb") as stream:
            for number, raw in enumerate(stream, start=1):
                if not raw.strip():
                    continue
                if seen == 0 and raw.lstrip()[:1] == b"[":
                    return None  # one JSON array: its reader parses it whole
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError) as error:
                    return f"{path}:{number}: not a JSON record ({str(error).split(':')[0]}); each line of a JSONL file is one JSON object"
                if not isinstance(record, dict):
                    return f"{path}:{number}: each line must be a JSON object, got {type(record).__name__}"
                seen += 1
                if seen >= count:
                    break
    except OSError as error:
        return f"{path} cannot be read: {error.strerror or error}"
    return None if seen else f"{path} has no records: the file is empty"


def resource_problems(config: Any) -> list[Problem]:
    return [*data_problems(config), *model_problems(config)]


def plan_configs(plan: Any) -> dict[str, tuple[str, Any]]:
    """The validated config of each run of `plan` and of each search space's representative config (each
    knob's first value), by run id or `group N`, with how to name it."""
    from finetune.config.knobs import first_candidates
    from finetune.config.validation import CONFIG_ADAPTER

    named = [(run.run_id, f"run {run.run_id} ({run.label or 'the only run'})", run.config) for run in plan.runs]
    named += [(f"group {group}", f"the search space of group {group} (each knob's first value)", first_candidates(tree))
              for group, tree in sorted(plan.search_spaces.items())]
    return {key: (name, CONFIG_ADAPTER.validate_python(tree)) for key, name, tree in named}


def plan_resource_lines(plan: Any) -> list[str]:
    """One line per problem of `resource_problems` over the plan's configs, each said once with the runs it
    concerns ("every run" when all of them)."""
    configs = plan_configs(plan)
    where: dict[Problem, list[str]] = {}
    for key, (name, config) in configs.items():
        for problem in resource_problems(config):
            where.setdefault(problem, []).append(key)
    lines = []
    for (path, problem), keys in where.items():
        whose = "" if len(configs) == 1 else " (every run)" if len(keys) == len(configs) else f" ({', '.join(keys)})"
        lines.append(f"{path}: {problem}{whose}")
    return lines
