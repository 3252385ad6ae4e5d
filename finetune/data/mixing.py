"""Pure-Python data arithmetic shared by the plan and the data pipeline: no torch, no datasets.

The plan needs the number of training examples before anything is tokenised; these
functions give exactly the numbers the pipeline will produce from the same inputs.
"""

from __future__ import annotations

import json
import math
import random
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

from finetune.data.files import count_nonblank_lines, open_regular

# A weighted mix draws until every example of every dataset was drawn once: a small weight on a large
# dataset makes that enormous (weights 1 and 1e-12 would never end). Beyond this many draws it is refused.
MAX_MIX_DRAWS = 10_000_000


class MixError(ValueError):
    """Data that cannot be mixed or split as the config asks; the message says why and what would work."""


def _active(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    if any(not math.isfinite(weight) or weight < 0 for weight in weights):
        raise MixError("sampling weights must be finite and not negative")
    active = [index for index, (size, weight) in enumerate(zip(sizes, weights)) if weight > 0 and size > 0]
    if not active:
        raise MixError("no dataset has both examples and a positive sampling weight")
    return active


def expected_mix_draws(sizes: Sequence[int], weights: Sequence[float]) -> tuple[float, int]:
    """(about how many draws the mix takes, the dataset that takes longest to exhaust)."""
    active = _active(sizes, weights)
    total = math.fsum(weights[index] for index in active)
    needs = {index: sizes[index] * total / weights[index] for index in active}
    slowest = max(needs, key=needs.__getitem__)
    return needs[slowest], slowest


def check_mix_size(sizes: Sequence[int], weights: Sequence[float], names: Sequence[str] | None = None) -> None:
    """Refuse, before drawing anything, a mix that would take more than MAX_MIX_DRAWS draws."""
    draws, slowest = expected_mix_draws(sizes, weights)
    if draws > MAX_MIX_DRAWS:
        name = names[slowest] if names else f"dataset {slowest}"
        raise MixError(
            f"the weighted mix would take about {draws:.3g} draws to draw each of the {sizes[slowest]} examples of "
            f"{name} once (its sampling_weight {weights[slowest]:g} of {math.fsum(weights):g} in all); the limit is "
            f"{MAX_MIX_DRAWS:,}: give that dataset a larger weight, or the others smaller ones"
        )


def _mix_draws(sizes: Sequence[int], weights: Sequence[float], seed: int) -> Iterator[tuple[int, int]]:
    active = _active(sizes, weights)
    check_mix_size(sizes, weights)
    rng = random.Random(seed)
    orders = {index: rng.sample(range(sizes[index]), sizes[index]) for index in active}
    cursor = {index: 0 for index in active}
    exhausted: set[int] = set()
    equal = len({weights[index] for index in active}) == 1
    turn = 0
    while len(exhausted) < len(active):
        if turn >= 2 * MAX_MIX_DRAWS:
            raise MixError(f"the weighted mix took more than {2 * MAX_MIX_DRAWS:,} draws; give the datasets closer weights")
        if equal:
            dataset = active[turn % len(active)]
        else:
            dataset = rng.choices(active, weights=[weights[index] for index in active])[0]
        turn += 1
        position = cursor[dataset]
        yield dataset, orders[dataset][position % sizes[dataset]]
        cursor[dataset] = position + 1
        if cursor[dataset] >= sizes[dataset]:
            exhausted.add(dataset)


def weighted_mix_order(sizes: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """The (dataset, example) draws of a precomputed weighted mix.

    Datasets of weight 0 are skipped. Equal weights alternate between the datasets.
    Otherwise a dataset is drawn with probability proportional to its weight, cycling
    through its shuffled examples, until every dataset has been exhausted at least once.
    A mix that would take more than MAX_MIX_DRAWS draws is refused before any is made.
    """
    return list(_mix_draws(sizes, weights, seed))


@lru_cache(maxsize=256)
def weighted_mix_size(sizes: tuple[int, ...], weights: tuple[float, ...], seed: int) -> int:
    """len(weighted_mix_order(...)), without keeping the draws; the plan asks it once per run, so it is cached."""
    return sum(1 for _ in _mix_draws(sizes, weights, seed))


def auto_split_sizes(total: int, ratio: float) -> tuple[int, int]:
    """(train, validation) sizes of an automatic split; validation gets at least one example."""
    if total < 2:
        raise MixError(
            f"AUTO_SPLIT takes the validation examples from the training data, which has {total} record(s); "
            "it needs at least 2 (give validation_data its own datasets, or type NONE)"
        )
    validation = min(total - 1, max(1, round(total * ratio)))
    return total - validation, validation


def auto_split_indices(total: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    train_size, _ = auto_split_sizes(total, ratio)
    order = random.Random(seed).sample(range(total), total)
    return sorted(order[:train_size]), sorted(order[train_size:])


def count_jsonl_records(path: str | Path) -> int | None:
    """Records of a data path without reading them all: the non-blank lines of a JSONL file, the records of a
    JSON array file, the rows of a parquet file (from its footer) or of a folder saved with
    `datasets.save_to_disk` (its Arrow files, memory-mapped); None when unknown (another kind of file, or
    one that cannot be read: the reader says why when the data is read).

    Counted in bounded memory, never from a device or FIFO, and cached by the file's identity, size and
    modification time: a plan of many runs counts a file once.
    """
    file_path = Path(path)
    try:
        if file_path.is_dir():
            state = _saved_split(file_path) / "state.json"
            return _count_saved(str(state.resolve()), state.stat().st_mtime_ns)
        if not file_path.is_file() or file_path.suffix not in (".jsonl", ".json", ".parquet"):
            return None
        status = file_path.stat()
    except OSError:
        return None
    return _count_records(str(file_path.resolve()), status.st_size, status.st_mtime_ns, status.st_ino)


def _saved_split(folder: Path) -> Path:
    """The folder of the split the reader takes from a saved dataset: a DatasetDict's `train`, else its first."""
    listing = folder / "dataset_dict.json"
    if not listing.is_file():
        return folder
    splits = json.loads(listing.read_text()).get("splits") or []
    return folder / ("train" if "train" in splits else splits[0]) if splits else folder


@lru_cache(maxsize=256)
def _count_saved(state: str, mtime_ns: int) -> int | None:
    try:
        import pyarrow as pa

        folder = Path(state).parent
        total = 0
        for entry in json.loads(Path(state).read_text())["_data_files"]:
            with pa.memory_map(str(folder / entry["filename"])) as source:
                total += pa.ipc.open_stream(source).read_all().num_rows
        return total
    except Exception:  # noqa: BLE001 - not a dataset this can count: the reader says what is wrong
        return None


@lru_cache(maxsize=256)
def _count_records(path: str, size: int, mtime_ns: int, inode: int) -> int | None:
    from finetune.data.readers import DataError, count_json_array, is_json_array

    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet

            return pyarrow.parquet.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - not a parquet file this can count: the reader says what is wrong
            return None
    if path.endswith(".json") and is_json_array(Path(path)):
        try:
            return count_json_array(Path(path))
        except DataError:
            pass  # counted as lines; the reader reports the problem when the data is read
    with open_regular(path) as stream:
        return count_nonblank_lines(stream)
