"""Each private third-party API finetune touches (`finetune.train.seams`) still exists and behaves as the
code assumes, so that an upgrade of transformers, TRL, PEFT or accelerate that breaks one fails here, by
name, rather than at a run's first chunk. Also the public APIs the loop moved to, where their
behaviour is what the loop relies on."""

from __future__ import annotations

import inspect
from typing import Any

import pytest


@pytest.fixture(scope="module")
def tiny() -> Any:
    """A 2-layer Llama of a 64-token vocabulary and a plain Trainer around it (built in well under a second)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", seed=3)
    return Trainer(model=model, args=args)


# ------------------------------------------------------------ transformers


def test_prepare_inputs_puts_a_micro_batch_on_the_trainers_device(tiny) -> None:
    import torch

    from finetune.train.seams.transformers import prepare_inputs

    prepared = prepare_inputs(tiny, {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 2, 3]])})
    assert set(prepared) == {"input_ids", "labels"}
    assert prepared["input_ids"].device.type == tiny.args.device.type
    assert prepared["input_ids"].tolist() == [[1, 2, 3]]


def test_the_train_sampler_draws_its_order_from_a_generator_finetune_can_seed(tiny) -> None:
    import torch

    from finetune.train.seams.transformers import train_sampler

    dataset = list(range(50))

    def order(seed: int) -> list[int]:
        sampler = train_sampler(tiny, dataset)
        assert hasattr(sampler, "generator"), "data_order re-seeds the sampler's generator per epoch"
        sampler.generator = torch.Generator().manual_seed(seed)
        return list(iter(sampler))

    assert sorted(order(1)) == dataset
    assert order(1) == order(1) and order(1) != order(2)


def test_loss_is_scaled_for_ga_is_what_training_step_decides_by() -> None:
    from transformers import Trainer
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    from finetune.train.seams.transformers import loss_is_scaled_for_ga

    assert "loss_is_scaled_for_ga" in inspect.getsource(Trainer.training_step)
    for cls in (Trainer, SFTTrainer, DPOTrainer, GRPOTrainer):
        assert loss_is_scaled_for_ga(object.__new__(cls)) in (None, True, False)
    assert loss_is_scaled_for_ga(object.__new__(GRPOTrainer)) is True  # GRPO scales its own loss


def test_transformers_builds_block_diagonal_masks_for_llama() -> None:
    import torch
    from transformers import masking_utils

    from finetune.train.seams.transformers import builds_packed_masks, causal_lm_builds_masks

    assert builds_packed_masks()
    packed = masking_utils.find_packed_sequence_indices(torch.tensor([[0, 1, 0, 1, 2, 0]]))
    assert packed.tolist() == [[0, 0, 1, 1, 1, 2]]
    assert causal_lm_builds_masks("llama") == (True, "LlamaForCausalLM")
    assert causal_lm_builds_masks("no-such-model")[0] is False


def test_no_split_modules_name_the_decoder_layer_class(tiny) -> None:
    from finetune.train.seams.transformers import no_split_module_classes

    names = no_split_module_classes(tiny.model)
    assert names == {"LlamaDecoderLayer"}
    assert sum(type(module).__name__ in names for module in tiny.model.modules()) == 2


def test_get_batch_samples_counts_the_label_tokens_of_a_step(tiny) -> None:
    """Public since transformers 4.4x; the loop hands it a step's micro-batches to get `num_items_in_batch`."""
    import torch

    batches = [{"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[-100, 2, 3]])},
               {"input_ids": torch.tensor([[4, 5, 6]]), "labels": torch.tensor([[-100, -100, 6]])}]
    got, items = tiny.get_batch_samples(iter(batches), 4, tiny.args.device)
    assert got == batches
    assert int(items) == 3  # the tokens the loss is averaged over (labels shifted: the first never counts)


# ------------------------------------------------------------ TRL


def test_grpo_counts_its_micro_batches_in_step() -> None:
    from trl import GRPOTrainer

    from finetune.train.seams.trl import generation_counter, set_generation_counter

    source = inspect.getsource(GRPOTrainer)
    assert "self._step = 0" in source and "self._step += 1" in source
    trainer = object.__new__(GRPOTrainer)
    trainer._step = 5
    assert generation_counter(trainer) == 5
    set_generation_counter(trainer, 9)
    assert trainer._step == 9
    plain = object()
    assert generation_counter(plain) == 0
    set_generation_counter(plain, 3)  # nothing to continue: no attribute is made up
    assert not hasattr(plain, "_step")


def test_the_training_steps_finetune_replays_only_wrap_trainers_own() -> None:
    import trl

    from finetune.train.seams.trl import OFFLOAD_WRAPPERS

    for qualname in OFFLOAD_WRAPPERS:
        cls_name, method = qualname.split(".")
        source = inspect.getsource(getattr(getattr(trl, cls_name), method))
        assert "super().training_step(" in source and "maybe_activation_offload_context" in source, qualname


# ------------------------------------------------------------ PEFT


def test_the_trainable_token_wrapper_answers_bias_after_the_patch(tiny) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    from finetune.train.seams.peft import expose_token_wrapper_bias

    expose_token_wrapper_bias()
    expose_token_wrapper_bias()  # twice: patched once
    config = LoraConfig(target_modules=["q_proj"], trainable_token_indices={"lm_head": [1, 2], "embed_tokens": [1, 2]})
    model = get_peft_model(copy.deepcopy(tiny.model), config)
    head = model.get_output_embeddings()
    assert type(head).__name__ == "TrainableTokensWrapper"
    assert head.bias is None  # the wrapped layer's bias (Llama's head has none), not an AttributeError
    assert tuple(head.weight.shape) == (64, 16)


# ------------------------------------------------------------ accelerate


def test_the_public_sync_gradients_setter_gates_the_optimizer_step() -> None:
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = accelerator.prepare(torch.optim.SGD([weight], lr=1.0))
    weight.grad = torch.ones(2)
    accelerator.sync_gradients = False
    optimizer.step()
    assert weight.tolist() == [1.0, 1.0]  # a micro-batch that does not end a step: no update
    accelerator.sync_gradients = True
    optimizer.step()
    assert weight.tolist() == [0.0, 0.0]
