"""Names of the built-in GRPO reward functions (implemented in `finetune.train.rewards`)."""

BUILTIN_REWARDS: dict[str, str] = {
    "length_penalty": "Prefers completions close to 32 words (a smooth demo reward).",
    "reference_match": "1.0 when the completion contains the dataset's `reference` field, else 0.0.",
    "format_chat": "Rewards completions that end cleanly with sentence punctuation.",
}
