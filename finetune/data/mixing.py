"""Pure-Python data arithmetic shared by the plan and the data pipeline: no torch, no datasets.

The plan needs the number of training examples before anything is tokenised; these
functions give exactly the numbers the pipeline will produce from the same inputs.
"""

from __future__ import annotations

import random
from pathlib import Path


def weighted_mix_order(sizes: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """The (dataset, example) draws of a precomputed weighted mix.

    Datasets of weight 0 are skipped. Equal weights alternate between the datasets.
    Otherwise a dataset is drawn with probability proportional to its weight, cycling
    through its shuffled examples, until every dataset has been exhausted at least once.
    """
    if any(weight < 0 for weight in weights):
        raise ValueError("sampling weights must not be negative")
    active = [index for index, (size, weight) in enumerate(zip(sizes, weights)) if weight > 0 and size > 0]
    if not active:
        raise ValueError("no dataset has both examples and a positive sampling weight")
    rng = random.Random(seed)
    orders = {index: rng.sample(range(sizes[index]), sizes[index]) for index in active}
    cursor = {index: 0 for index in active}
    exhausted: set[int] = set()
    draws: list[tuple[int, int]] = []
    equal = len({weights[index] for index in active}) == 1
    turn = 0
    while len(exhausted) < len(active):
        if equal:
            dataset = active[turn % len(active)]
            turn += 1
        else:
            dataset = rng.choices(active, weights=[weights[index] for index in active])[0]
        position = cursor[dataset]
        draws.append((dataset, orders[dataset][position % sizes[dataset]]))
        cursor[dataset] = position + 1
        if cursor[dataset] >= sizes[dataset]:
            exhausted.add(dataset)
    return draws


def auto_split_sizes(total: int, ratio: float) -> tuple[int, int]:
    """(train, validation) sizes of an automatic split; validation gets at least one example."""
    if total < 2:
        raise ValueError(f"cannot split {total} example(s) into training and validation")
    validation = min(total - 1, max(1, round(total * ratio)))
    return total - validation, validation


def auto_split_indices(total: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    train_size, _ = auto_split_sizes(total, ratio)
    order = random.Random(seed).sample(range(total), total)
    return sorted(order[:train_size]), sorted(order[train_size:])


def count_jsonl_records(path: str | Path) -> int | None:
    """Non-blank lines of a JSONL file, or None when the size is not known without loading it."""
    file_path = Path(path)
    if not file_path.is_file() or file_path.suffix not in (".jsonl", ".json"):
        return None
    with file_path.open("rb") as stream:
        return sum(1 for line in stream if line.strip())
