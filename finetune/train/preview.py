"""`finetune data preview`: examples as the model sees them, with the loss-carrying tokens highlighted."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from finetune.config.validation import CONFIG_ADAPTER
from finetune.data.pipeline import IGNORE_INDEX, DataStats, build_examples, pack_training_rows, prepare_tokenizer


def highlighted(tokenizer: Any, input_ids: list[int], labels: list[int]) -> Text:
    text = Text()
    for token, label in zip(input_ids, labels):
        piece = tokenizer.decode([token])
        text.append(piece, style="bold green" if label != IGNORE_INDEX else "dim")
    return text


def preview(config_tree: dict[str, Any], count: int, console: Console) -> None:
    from finetune.runtime import quiet_libraries
    from finetune.train.model import load_tokenizer

    quiet_libraries()
    config = CONFIG_ADAPTER.validate_python(config_tree)
    tokenizer = load_tokenizer(config)
    added = prepare_tokenizer(tokenizer, config.data_conf)
    stats = DataStats(added_special_tokens=added)
    train, evaluation = build_examples(config, tokenizer, stats)
    if config.method == "sft" and config.sft_args.packing:
        import datasets

        pack_training_rows(config, datasets.Dataset.from_list(train), stats)
    for index, example in enumerate(train[:count]):
        if config.method == "sft":
            body = highlighted(tokenizer, example["input_ids"], example["labels"])
            subtitle = f"{len(example['input_ids'])} tokens, {sum(l != IGNORE_INDEX for l in example['labels'])} carry loss (bold)"
        else:
            prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
            body = Text(prompt)
            for key in ("chosen", "rejected"):
                if key in example:
                    body.append(f"\n[{key}] " + " ".join(m["content"] for m in example[key]), style="green" if key == "chosen" else "red")
            subtitle = config.method
        console.print(Panel(body, title=f"example {index}", subtitle=subtitle))
    console.print(
        f"read {stats.read} records; training examples {stats.train_examples}"
        f"{'' if stats.packed_rows is None else f' (packed into {stats.packed_rows} rows)'}, validation {stats.eval_examples}; "
        f"filtered (longer than the maximum length) {stats.filtered_too_long}; "
        f"training tokens {stats.train_tokens}, carrying loss {stats.loss_tokens}; "
        f"special tokens added by the template {stats.added_special_tokens}",
        highlight=False,
    )
    for warning in stats.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
