"""`finetune chat EXP RUN`: a run's model answering prompts in a terminal.

The run's adapter is loaded on its base model as training had it, with the run's tokenizer (the chat
template and tokens it trained with); which checkpoint (checkpoint-final of a completed run, else its
latest durable chunk) the command finds in the experiment. Answers are greedy and end at the template's
end-of-turn token, as the evaluation's answers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ChatModel:
    run_id: str
    checkpoint: Path
    model: Any
    tokenizer: Any
    stops: list[int]

    def answer(self, messages: list[dict[str, str]], max_new_tokens: int = 64) -> str:
        import torch

        from finetune.evaluate.generation import until_stop

        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = torch.tensor([list(encoded["input_ids"])])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]
        with torch.no_grad():
            output = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                         do_sample=False, eos_token_id=self.stops, pad_token_id=pad)
        return self.tokenizer.decode(until_stop(output[0, ids.shape[1]:].tolist(), self.stops), skip_special_tokens=True).strip()


def load_chat_model(run_id: str, config: Any, checkpoint: Path) -> ChatModel:
    """The run's model on the CPU (its base as training loaded it, the adapter or full weights of `checkpoint`
    on it). `config`: the run's validated config, with its paths located."""
    from finetune.data.pipeline import prepare_tokenizer
    from finetune.evaluate.generation import stop_token_ids
    from finetune.train.model import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(config)
    prepare_tokenizer(tokenizer, config.data_conf)
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base_model(config, len(tokenizer)), checkpoint)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.eval()
    return ChatModel(run_id, checkpoint, model, tokenizer, stop_token_ids(tokenizer, model))
