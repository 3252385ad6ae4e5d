"""From `data_conf` to training and evaluation datasets.

Order: read and check every file -> automatic split (before mixing, so oversampled
duplicates cannot leak into validation) -> weighted mix -> chat template and
tokenisation (SFT) -> length filter. Tokenised SFT datasets are cached on disk by a
content hash of everything that shapes them, so runs that share data settings tokenise once.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.files import BLOCK_BYTES, open_regular
from finetune.data.mixing import MixError, auto_split_indices, check_mix_size, weighted_mix_order
from finetune.data.readers import DataError, read_records
from finetune.data.templates import install_template, load_template

IGNORE_INDEX = -100
MIX_WARN_FACTOR = 10


@dataclass
class DataStats:
    read: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    filtered_too_long: int = 0
    train_tokens: int = 0
    loss_tokens: int = 0
    added_special_tokens: int = 0
    packed_rows: int | None = None  # sft_args.packing: the rows the training examples were packed into
    warnings: list[str] = field(default_factory=list)

    @property
    def train_rows(self) -> int:
        """What the batch sizes count: packed rows, or else examples."""
        return self.packed_rows if self.packed_rows is not None else self.train_examples


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset
    eval: Any | None
    stats: DataStats


# ---------------------------------------------------------------- tokenizer set-up


def prepare_tokenizer(tokenizer: Any, data_conf: Any) -> int:
    """Install the chat template, pick a pad token if there is none, set the padding side.

    Returns the number of special tokens added (the model's embeddings must grow by as many).
    """
    added = install_template(load_template(data_conf.chat_template_name, tokenizer), tokenizer)
    if tokenizer.pad_token is None:
        source = {
            "eos-repurpose": "eos_token",
            "bos-repurpose": "bos_token",
            "unk-repurpose": "unk_token",
            "unk-convert-to-eos": "unk_token",
        }[data_conf.missing_pad_token_strategy]
        token = getattr(tokenizer, source)
        if token is None:
            raise ValueError(
                f"data_conf.missing_pad_token_strategy is {data_conf.missing_pad_token_strategy} "
                f"but the tokenizer has no {source.removesuffix('_token').upper()} token; choose another strategy"
            )
        tokenizer.pad_token = token
    tokenizer.padding_side = data_conf.padding_side
    return added


def input_pad_token_id(tokenizer: Any, data_conf: Any) -> int:
    """The id the collator pads inputs with: EOS for unk-convert-to-eos, else the pad token."""
    if data_conf.missing_pad_token_strategy == "unk-convert-to-eos" and tokenizer.pad_token_id == tokenizer.unk_token_id:
        return tokenizer.eos_token_id
    return tokenizer.pad_token_id


# ---------------------------------------------------------------- records


def _read_inputs(data_input: Any, method: str) -> list[list[dict[str, Any]]]:
    return [read_records(dataset.path, method, dataset.format) for dataset in data_input.datasets]


def gather_records(data_conf: Any, method: str, stats: DataStats) -> tuple[list[dict], list[dict]]:
    """(training records, validation records), split before mixing."""
    training = data_conf.training_data
    validation = data_conf.validation_data
    per_dataset = _read_inputs(training, method)
    stats.read = sum(len(records) for records in per_dataset)
    eval_records: list[dict[str, Any]] = []
    names = [dataset.path for dataset in training.datasets]
    if validation.type == "AUTO_SPLIT":
        per_dataset, eval_records = _auto_split(per_dataset, names, training.type == "CONCATENATION", validation)
    elif validation.type == "CONCATENATION":
        eval_records = [record for records in _read_inputs(validation, method) for record in records]
    if training.type == "PRECOMPUTE_WEIGHTED_MIX":
        weights = [dataset.sampling_weight for dataset in training.datasets]
        check_mix_size([len(records) for records in per_dataset], weights, names)
        order = weighted_mix_order([len(records) for records in per_dataset], weights, training.seed)
        train_records = [per_dataset[dataset][index] for dataset, index in order]
        unique = sum(len(records) for records, weight in zip(per_dataset, weights) if weight > 0)
        if len(train_records) > MIX_WARN_FACTOR * unique:
            stats.warnings.append(
                f"the weighted mix has {len(train_records)} examples, {len(train_records) / unique:.0f}x the "
                f"{unique} distinct ones: small sampling weights make it very large"
            )
    else:
        train_records = [record for records in per_dataset for record in records]
    return train_records, eval_records


def _auto_split(
    per_dataset: list[list[dict]], names: list[str], concatenate: bool, validation: Any
) -> tuple[list[list[dict]], list[dict]]:
    """(training records of each dataset, validation records): each dataset split on its own, or all together
    when they are concatenated; a dataset too small to split is an error that names its file(s)."""
    if concatenate:
        per_dataset, names = [[record for records in per_dataset for record in records]], [", ".join(names)]
    split, eval_records = [], []
    for records, name in zip(per_dataset, names):
        try:
            train_idx, eval_idx = auto_split_indices(len(records), validation.ratio, validation.seed)
        except MixError as error:
            raise DataError(name, None, str(error)) from None
        split.append([records[i] for i in train_idx])
        eval_records.extend(records[i] for i in eval_idx)
    return split, eval_records


# ---------------------------------------------------------------- SFT tokenisation


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], completions_only: bool,
                          completion_start: int | None = None) -> dict[str, list[int]]:
    """Token ids and labels; with `completions_only` only the assistant turns carry loss, and of those, when
    `completion_start` is given (a prompt/completion record whose prompt holds assistant turns), only the
    turns from that message on: the prompt's assistant turns are context."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=completions_only
    )
    input_ids = list(encoded["input_ids"])
    if completions_only:
        mask = list(encoded["assistant_masks"])
        if completion_start:
            mask = _without_first_turns(mask, sum(message["role"] == "assistant" for message in messages[:completion_start]))
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask)]
    else:
        labels = list(input_ids)
    return {"input_ids": input_ids, "labels": labels}


def _without_first_turns(mask: list[int], turns: int) -> list[int]:
    """The assistant mask with its first `turns` runs of ones cleared (each assistant message is one
    {% generation %} block, and a role header always separates two of them)."""
    cleared, seen, previous = list(mask), 0, 0
    for index, keep in enumerate(mask):
        if keep and not previous:
            seen += 1
        if keep and seen <= turns:
            cleared[index] = 0
        previous = keep
    return cleared


def tokenize_sft(records: list[dict], tokenizer: Any, max_length: int, completions_only: bool, stats: DataStats) -> list[dict]:
    examples = []
    for record in records:
        example = tokenize_conversation(tokenizer, record["messages"], completions_only, record.get("completion_start"))
        if len(example["input_ids"]) > max_length:
            stats.filtered_too_long += 1
            continue
        examples.append(example)
    return examples


def _length_of(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> int:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True)
    return len(encoded["input_ids"])  # transformers 5 returns a BatchEncoding, whose len() counts its keys


def preference_examples(records: list[dict], tokenizer: Any, max_length: int, stats: DataStats) -> list[dict]:
    examples = []
    for record in records:
        prompt = record["prompt_messages"]
        longest = max(_length_of(tokenizer, prompt + record[key]) for key in ("chosen_messages", "rejected_messages"))
        if longest > max_length:
            stats.filtered_too_long += 1
            continue
        examples.append({"prompt": prompt, "chosen": record["chosen_messages"], "rejected": record["rejected_messages"]})
    return examples


def prompt_examples(records: list[dict], tokenizer: Any, max_length: int, stats: DataStats) -> list[dict]:
    examples = []
    for record in records:
        if _length_of(tokenizer, record["prompt_messages"], generation_prompt=True) > max_length:
            stats.filtered_too_long += 1
            continue
        extra = {key: value for key, value in record.items() if key != "prompt_messages"}
        examples.append({"prompt": record["prompt_messages"], **extra})
    return examples


# ---------------------------------------------------------------- the whole pipeline


LENGTH_KEYS = {"sft": ("sft_args", "max_seq_length"), "dpo": ("dpo_args", "max_seq_length"), "grpo": ("grpo_args", "max_prompt_length")}


def _length_key(config: Any) -> str:
    """The config key of the method's length limit (examples longer than it are filtered out)."""
    return ".".join(LENGTH_KEYS[config.method])


def _max_length(config: Any) -> int:
    section, key = LENGTH_KEYS[config.method]
    return getattr(getattr(config, section), key)


def data_cache_key(config: Any, tokenizer: Any) -> str:
    """A hash of everything that shapes the prepared data: file contents, template, tokenizer, lengths."""
    digest = hashlib.sha256()
    inputs = [config.data_conf.training_data]
    if config.data_conf.validation_data.type == "CONCATENATION":
        inputs.append(config.data_conf.validation_data)
    for data_input in inputs:
        for dataset in data_input.datasets:
            digest.update(_file_digest(Path(dataset.path)).encode())
    digest.update(config.data_conf.model_dump_json().encode())
    sft = config.sft_args if config.method == "sft" else None
    shaping = [config.method, _max_length(config), getattr(sft, "train_on_completions_only", None), getattr(sft, "packing", False)]
    digest.update(json.dumps(shaping).encode())
    digest.update(str(tokenizer.chat_template).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256("".join(_file_digest(child) for child in sorted(path.rglob("*")) if child.is_file()).encode()).hexdigest()
    digest = hashlib.sha256()
    with open_regular(path) as stream:
        for block in iter(lambda: stream.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def check_loss_masking(config: Any, tokenizer: Any) -> None:
    """Completions-only loss needs assistant turns marked in the template, or no token would carry loss."""
    if config.method != "sft" or not config.sft_args.train_on_completions_only:
        return
    if not load_template(config.data_conf.chat_template_name, tokenizer).marks_assistant_turns:
        raise ValueError(
            "sft_args.train_on_completions_only needs a chat template that marks assistant turns with "
            "{% generation %} blocks; the tokenizer's own template (keep-original) does not, so no token "
            "would carry loss. Choose chat-ml, mistral-with-system, poro or simplified-llama31, or set it to false"
        )


def build_examples(config: Any, tokenizer: Any, stats: DataStats) -> tuple[list[dict], list[dict]]:
    check_loss_masking(config, tokenizer)
    train_records, eval_records = gather_records(config.data_conf, config.method, stats)
    max_length = _max_length(config)
    if config.method == "sft":
        completions = config.sft_args.train_on_completions_only
        train = tokenize_sft(train_records, tokenizer, max_length, completions, stats)
        evaluation = tokenize_sft(eval_records, tokenizer, max_length, completions, stats)
        stats.train_tokens = sum(len(example["input_ids"]) for example in train)
        # A sequence's first label is never a target (nothing precedes it to predict it).
        stats.loss_tokens = sum(sum(label != IGNORE_INDEX for label in example["labels"][1:]) for example in train)
    elif config.method == "dpo":
        train = preference_examples(train_records, tokenizer, max_length, stats)
        evaluation = preference_examples(eval_records, tokenizer, max_length, stats)
    else:
        train = prompt_examples(train_records, tokenizer, max_length, stats)
        evaluation = prompt_examples(eval_records, tokenizer, max_length, stats)
    if not train:
        key = _length_key(config)
        raise ValueError(f"no training example is left after filtering those longer than {max_length} tokens ({key}); "
                         f"raise {key} or shorten the examples (`finetune data preview` shows their lengths)")
    stats.train_examples, stats.eval_examples = len(train), len(evaluation)
    return train, evaluation


def prepare_data(config: Any, tokenizer: Any, cache_dir: Path | None = None) -> PreparedData:
    """Training and evaluation datasets for a validated config; the tokenizer must be prepared already."""
    import datasets

    stats = DataStats()
    cached = cache_dir / f"data-{data_cache_key(config, tokenizer)}" if cache_dir else None
    if cached is not None and (cached / "stats.json").is_file():
        stats = DataStats(**json.loads((cached / "stats.json").read_text()))
        evaluation = datasets.load_from_disk(str(cached / "eval")) if (cached / "eval").is_dir() else None
        return PreparedData(datasets.load_from_disk(str(cached / "train")), evaluation, stats)
    train, evaluation = build_examples(config, tokenizer, stats)
    train_set = pack_training_rows(config, datasets.Dataset.from_list(train), stats)
    eval_set = datasets.Dataset.from_list(evaluation) if evaluation else None
    if cached is not None:
        _save_atomically(cached, train_set, eval_set, stats)
    return PreparedData(train_set, eval_set, stats)


def pack_training_rows(config: Any, train: Any, stats: DataStats) -> Any:
    """The training set as the batches will draw it: packed rows under `sft_args.packing`."""
    if config.method != "sft" or not config.sft_args.packing:
        return train
    packed = pack_rows(train, config.sft_args.max_seq_length)
    stats.packed_rows = len(packed)
    if len(packed) == len(train):
        stats.warnings.append(f"sft_args.packing packed nothing: no two training examples fit in {config.sft_args.max_seq_length} "
                              "tokens (sft_args.max_seq_length), so each row holds one example")
    return packed


def pack_rows(dataset: Any, row_length: int) -> Any:
    """TRL's best-fit-decreasing packing: rows of at most `row_length` tokens, each with the lengths of
    the examples in it (`seq_lengths`); examples are never split (none is longer: they were filtered)."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset, row_length, strategy="bfd")


def _save_atomically(target: Path, train: Any, evaluation: Any, stats: DataStats) -> None:
    import shutil

    tmp = target.with_name(f".{target.name}.{random.getrandbits(32):08x}")
    train.save_to_disk(str(tmp / "train"))
    if evaluation is not None:
        evaluation.save_to_disk(str(tmp / "eval"))
    (tmp / "stats.json").write_text(json.dumps(stats.__dict__))
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process cached the same data first
