"""The offline demo: a tiny Llama-shaped model with random weights, a tokenizer trained on the
fly and small chat datasets (SFT, DPO, GRPO), so that everything runs with no model hub.

The conversations are simple arithmetic, so a few hundred steps visibly lower the loss.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
SYSTEM = "You are a careful calculator."
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _sum_conversation(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    question = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]).format(a=a, b=b)
    answer = f"{a} plus {b} is {a + b}."
    messages = [{"role": "user", "content": question}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return messages, answer


def _word_conversation(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    n = rng.randint(0, 10)
    return [{"role": "user", "content": f"Write {n} as a word."}], f"{n} is {NUMBER_WORDS[n]}."


def sft_records(count: int, seed: int, maker=_sum_conversation) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        messages, answer = maker(rng)
        records.append({"messages": [*messages, {"role": "assistant", "content": answer}]})
    return records


def dpo_records(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        messages, answer = _sum_conversation(rng)
        wrong = answer.rsplit(" ", 1)[0] + f" {rng.randint(41, 99)}."
        records.append(
            {
                "prompt_messages": messages,
                "chosen_messages": [{"role": "assistant", "content": answer}],
                "rejected_messages": [{"role": "assistant", "content": wrong}],
            }
        )
    return records


def grpo_records(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        messages, answer = _sum_conversation(rng)
        records.append({"prompt_messages": messages, "reference": answer.rsplit(" ", 1)[-1].rstrip(".")})
    return records


def _corpus(records: list[dict[str, Any]]) -> list[str]:
    texts = []
    for record in records:
        for key in ("messages", "prompt_messages", "chosen_messages", "rejected_messages"):
            texts.extend(message["content"] for message in record.get(key, []))
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL)


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped model's size: the demo's is tiny; the GPU benchmark's presets are ~0.7 B and ~3 B."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2


DEMO_SHAPE = ModelShape()


def build_model(tokenizer: Any, seed: int = 0, shape: ModelShape = DEMO_SHAPE, dtype: str = "float32") -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    return LlamaForCausalLM(config).to(getattr(torch, dtype))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    from finetune.io import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def init_demo(directory: str | Path, force: bool = False) -> Path:
    """Build the demo model and data in `directory` (skipped when already there, unless `force`)."""
    root = Path(directory)
    marker = root / "model" / "config.json"
    if marker.is_file() and not force:
        return root
    data = {
        "sft_train.jsonl": sft_records(256, seed=1),
        "sft_valid.jsonl": sft_records(32, seed=2),
        "sft_extra.jsonl": sft_records(64, seed=3, maker=_word_conversation),
        "dpo_train.jsonl": dpo_records(96, seed=4),
        "grpo_prompts.jsonl": grpo_records(48, seed=5),
    }
    for name, records in data.items():
        write_jsonl(root / "data" / name, records)
    texts = [text for records in data.values() for text in _corpus(records)]
    texts += [SYSTEM] + [f"{n} is {word}." for n, word in enumerate(NUMBER_WORDS)]
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer)
    tmp = root / ".model.tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if (root / "model").exists():
        import shutil

        shutil.rmtree(root / "model")
    tmp.rename(root / "model")
    return root
