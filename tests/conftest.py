from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "example_configs"

BASE_SFT: dict[str, Any] = {
    "method": "sft",
    "data_conf": {
        "training_data": {"type": "CONCATENATION", "datasets": [{"path": "train.jsonl"}]},
        "validation_data": {"type": "AUTO_SPLIT", "ratio": 0.25},
        "chat_template_name": "chat-ml",
    },
    "training_args": {"learning_rate": 1e-4, "num_train_epochs": 1, "logging_steps": 1},
    "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": 4},
    "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}},
    "run_conf": {"model": "model"},
    "experiment": {"name": "t", "num_chunks": 4},
}


@pytest.fixture
def base_config() -> dict[str, Any]:
    return copy.deepcopy(BASE_SFT)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The offline demo (tiny model, tokenizer trained on the fly, chat data), built once per session."""
    from finetune.train.demo import init_demo

    return init_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def demo_project(tmp_path, demo_dir) -> Path:
    """A folder as after `finetune demo init demo` in it (the demo linked at demo/): the example configs'
    paths resolve from there."""
    (tmp_path / "demo").symlink_to(demo_dir)
    return tmp_path


@pytest.fixture
def demo_tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir / "model")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` run only where CUDA is available."""
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
