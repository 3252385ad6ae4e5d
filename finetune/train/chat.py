"""`finetune chat EXP RUN`: a run's model answering prompts in a terminal.

The run's adapter is loaded on its base model as training had it: the checkpoint-final of a
completed run, else its latest durable chunk (a run that successive halving stopped), with the
run's tokenizer (the chat template and tokens it trained with). Answers are greedy and end at the
template's end-of-turn token, as the evaluation's answers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ChatUnavailable(RuntimeError):
    pass


@dataclass
class ChatModel:
    run_id: str
    checkpoint: Path
    model: Any
    tokenizer: Any
    stops: list[int]

    def answer(self, messages: list[dict[str, str]], max_new_tokens: int = 64) -> str:
        import torch

        from finetune.evaluate.generation import _until_stop

        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = torch.tensor([list(encoded["input_ids"])])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]
        with torch.no_grad():
            output = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                         do_sample=False, eos_token_id=self.stops, pad_token_id=pad)
        return self.tokenizer.decode(_until_stop(output[0, ids.shape[1]:].tolist(), self.stops), skip_special_tokens=True).strip()


def pick_run(root: Path, run_id: str) -> str:
    """`best`: the first run of the ranking that `finetune report` shows; otherwise the id as given."""
    if run_id != "best":
        return run_id
    from finetune.schedule.folder import open_store, read_plan
    from finetune.track.ranking import ranked_runs

    store = open_store(root)
    try:
        ranked = [entry for entry in ranked_runs(store, read_plan(root)) if entry.value is not None]
    finally:
        store.close()
    if not ranked:
        raise ChatUnavailable(f"no run of {root} has been evaluated yet")
    return ranked[0].row.run_id


def run_checkpoint(root: Path, run_id: str, config: Any) -> Path:
    from finetune.schedule.folder import open_store

    final = root / "runs" / run_id / config.run_conf.final_checkpoint_name
    if final.is_dir():
        return final
    store = open_store(root)
    try:
        row = store.run(run_id)
    finally:
        store.close()
    if row.last_checkpoint is None:
        raise ChatUnavailable(f"run {run_id} has no durable chunk yet")
    return Path(row.last_checkpoint)


def load_chat_model(root: Path, run_id: str) -> ChatModel:
    """The run's model on the CPU (its base as training loaded it, the adapter or full weights on it)."""
    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.data.pipeline import prepare_tokenizer
    from finetune.evaluate.generation import stop_token_ids
    from finetune.schedule.folder import read_plan
    from finetune.train.model import load_base_model, load_tokenizer

    plan = read_plan(root)
    try:
        planned = plan.run(run_id)
    except KeyError:
        raise ChatUnavailable(f"{root} has no run {run_id} (see `finetune status {root}`)") from None
    config = CONFIG_ADAPTER.validate_python(planned.located(root).config)
    checkpoint = run_checkpoint(root, run_id, config)
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
