"""A merged export stops at the chat template's end-of-turn token when generated from its folder, as a
server or a transformers pipeline would (reading generation_config.json and the tokenizer's files)."""

from __future__ import annotations

import json

import pytest


def bigram_model(demo_dir, tokenizer):
    """The demo model rewired into a bigram model (the layers add nothing, so the next token depends on
    the last only): after the generation prompt's newline it says "7", then `<|im_end|>`, then runs on
    with "." and `<|im_end|>` for ever, as the issue's untrained export did."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model", dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    newline, seven, end, dot = (tokenizer.convert_tokens_to_ids(t) for t in (tokenizer.tokenize("\n")[0], "7", "<|im_end|>", "."))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.get_input_embeddings().weight, model.lm_head.weight
        embed.zero_()
        embed[:, 4] = 1.0
        for token, dim in ((newline, 1), (seven, 2), (end, 3)):
            embed[token].zero_()
            embed[token, dim] = 1.0
        head.zero_()
        head[seven, 1] = head[end, 2] = head[end, 4] = head[dot, 3] = 10.0
    return model


def generate(folder) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)  # what the folder's files say, nothing more
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1]:])


@pytest.mark.parametrize("template", ["chat-ml"])
def test_a_merged_export_stops_at_the_end_of_turn_token(tmp_path, demo_dir, template) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from finetune.data.templates import install_template, load_template
    from finetune.train.export import export_merged

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    install_template(load_template(template, tokenizer), tokenizer)
    base = tmp_path / "base"
    bigram_model(demo_dir, tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    assert generate(base) == "7<|im_end|>.<|im_end|>.<|im_end|>.<|im_end|>"  # the folder as it was: it runs on
    adapter = get_peft_model(bigram_model(demo_dir, tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.peft_config["default"].base_model_name_or_path = str(base)
    adapter.save_pretrained(tmp_path / "checkpoint-final")
    tokenizer.save_pretrained(tmp_path / "checkpoint-final")
    merged = export_merged(tmp_path / "checkpoint-final", tmp_path / "merged")
    assert generate(merged) == "7<|im_end|>"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [end, tokenizer.eos_token_id]
    assert AutoTokenizer.from_pretrained(merged).eos_token == "<|im_end|>"


def test_a_template_whose_turns_end_with_eos_is_left_alone(demo_dir) -> None:
    from transformers import AutoTokenizer

    from finetune.data.templates import install_template, load_template
    from finetune.train.export import end_of_turn_token

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    install_template(load_template("mistral-with-system", tokenizer), tokenizer)
    assert end_of_turn_token(tokenizer) is None
    install_template(load_template("simplified-llama31", tokenizer), tokenizer)
    assert end_of_turn_token(tokenizer) == "<|eot_id|>"
