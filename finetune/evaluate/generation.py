"""Answers generated for evaluation, done the way a served model would answer.

Each prompt is the conversation before the reference answer, rendered by the run's own chat
template with its generation prompt (the assistant header). Prompts are batched with padding on the
left, so every answer starts right after its prompt, and the attention mask hides the padding (the
position ids then count from each prompt's first real token): a batch gives the answers the
prompts would get one at a time. A prompt that leaves no room for `max_new_tokens` in the model's
context is skipped and counted, never cut.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from finetune.evaluate.samples import EvalSample

# Tokens that end an assistant turn in the chat templates finetune installs (besides EOS).
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>")


@dataclass(frozen=True)
class Answers:
    samples: list[EvalSample]  # the samples answered, in order
    completions: list[str]
    too_long: int  # prompts skipped: prompt and max_new_tokens do not fit in the model's context


def prompt_ids(tokenizer: Any, sample: EvalSample) -> list[int]:
    encoded = tokenizer.apply_chat_template(sample.prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """EOS, the model's own end tokens, and the turn-end tokens of the template when it has them."""
    vocab = tokenizer.get_vocab()
    stops = [tokenizer.eos_token_id] + [vocab[token] for token in TURN_END_TOKENS if token in vocab]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(token for token in stops if token is not None))


def context_length(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """(input ids, attention mask), every prompt padded on the left to the longest."""
    width = max(len(ids) for ids in prompts)
    ids = [[pad_id] * (width - len(prompt)) + prompt for prompt in prompts]
    mask = [[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts]
    return ids, mask


def generate_answers(model: Any, tokenizer: Any, samples: list[EvalSample], settings: Any, device: str, pad_id: int,
                     synced: bool = False) -> Answers:
    """Answers to `samples` under `settings` (eval_conf.generation). `synced`: the ranks of a sharded
    gang generate together, each the same prompts, until every rank is done."""
    limit = context_length(model)
    encoded, kept, too_long = [], [], 0
    for sample in samples:
        ids = prompt_ids(tokenizer, sample)
        if limit is not None and len(ids) + settings.max_new_tokens > limit:
            too_long += 1
            continue
        encoded.append(ids)
        kept.append(sample)
    completions: list[str] = []
    stops = stop_token_ids(tokenizer, model)
    with _evaluation_mode(model, device, settings.seed):
        for start in range(0, len(encoded), settings.batch_size):
            batch = encoded[start:start + settings.batch_size]
            completions += _generate_batch(model, tokenizer, batch, settings, device, pad_id, stops, synced)
    return Answers(kept, completions, too_long)


def _generate_batch(model: Any, tokenizer: Any, prompts: list[list[int]], settings: Any, device: str, pad_id: int,
                    stops: list[int], synced: bool) -> list[str]:
    import torch
    from transformers import GenerationConfig

    ids, mask = left_padded(prompts, pad_id)
    sampling = settings.temperature > 0
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=sampling, temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None, top_k=None, pad_token_id=pad_id, eos_token_id=stops, use_cache=True,
    )
    output = model.generate(
        input_ids=torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device),
        generation_config=config, synced_gpus=synced,
    )
    new_tokens = output[:, len(ids[0]):].tolist()
    return [tokenizer.decode(until_stop(tokens, stops), skip_special_tokens=True).strip() for tokens in new_tokens]


def until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index]
    return tokens


@contextlib.contextmanager
def _evaluation_mode(model: Any, device: str, seed: int) -> Any:
    """Eval mode (no dropout), no gradients, and sampling seeded apart from the training RNG."""
    import torch

    was_training = model.training
    devices = [torch.device(device)] if device.startswith("cuda") else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)
