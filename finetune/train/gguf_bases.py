"""GGUF files (llama.cpp's and Ollama's format) as base models.

`run_conf.model` names a `.gguf` file, or a folder with `run_conf.model_args.gguf_file` naming the
file in it. transformers reads such a file with the `gguf` package and de-quantises every tensor
to float; a model loaded that way cannot be saved (transformers marks it as quantized), and
de-quantising 100 M parameters takes the better part of a minute on a small CPU. So the file is
converted once into an ordinary safetensors folder (the model rebuilt from its config, its state
dict loaded, the tokenizer read from the same file) in a cache beside the experiments,
`<experiment.output_dir>/gguf-bases/<file name>-<sha256 of the file>`, written to a temporary
folder and renamed into place. Every process (the controller's preparation, each worker, `chat`,
`export`) then loads that folder.

The file's hash is the cache key: a file replaced under the same name is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_FILE_KEY = "gguf_file"
CACHE_FOLDER = "gguf-bases"
INSTALL_HINT = "pip install 'finetune[gguf]'"
# llama.cpp's names for architectures that transformers knows under another name.
ARCHITECTURE_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}

Problem = tuple[str, str]


@dataclass(frozen=True)
class GgufSource:
    """The GGUF file a run's model comes from, and the config key that names it."""

    folder: Path
    name: str
    key: str

    @property
    def path(self) -> Path:
        return self.folder / self.name


def gguf_source(run_conf: Any) -> GgufSource | None:
    """The run's GGUF file, or None when its model is an ordinary folder or hub id."""
    extra = getattr(run_conf.model_args, "model_extra", None) or {}
    if extra.get(GGUF_FILE_KEY):
        return GgufSource(Path(run_conf.model).expanduser(), str(extra[GGUF_FILE_KEY]), f"run_conf.model_args.{GGUF_FILE_KEY}")
    if str(run_conf.model).lower().endswith(".gguf"):
        path = Path(run_conf.model).expanduser()
        return GgufSource(path.parent, path.name, "run_conf.model")
    return None


def read_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file (read from its header; the tensors are not touched)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        raise ValueError("it has no general.architecture")
    return str(field.contents())


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def gguf_problems(config: Any) -> list[Problem]:
    """What keeps a run's GGUF file from loading, found before any work: the file, the package, the
    architecture."""
    source = gguf_source(config.run_conf)
    if source is None:
        return []
    if not source.path.is_file():
        return [(source.key, f"{source.path} does not exist (a GGUF file was expected there)")]
    if importlib.util.find_spec("gguf") is None:
        return [(source.key, f"{source.path} is a GGUF file; reading it needs the gguf package: {INSTALL_HINT}")]
    try:
        architecture = read_architecture(source.path)
    except Exception as error:  # not a GGUF file, or a damaged one
        return [(source.key, f"{source.path} cannot be read as a GGUF file ({type(error).__name__}: {error})")]
    supported = supported_architectures()
    if architecture not in supported and ARCHITECTURE_ALIASES.get(architecture) not in supported:
        return [(source.key, f"{source.path} holds a '{architecture}' model, which transformers cannot load from "
                 f"GGUF; it can load: {', '.join(supported)}")]
    return []


_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """The file's sha256 (remembered per path, size and modification time within a process)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def cache_folder(config: Any, source: GgufSource) -> Path:
    stem = source.path.stem.replace(" ", "_")
    return (Path(config.experiment.output_dir) / CACHE_FOLDER / f"{stem}-{file_hash(source.path)[:16]}").resolve()


def converted_model(config: Any) -> Path | None:
    """The safetensors folder of the run's GGUF file, converted now if it is not yet (None: no GGUF)."""
    source = gguf_source(config.run_conf)
    if source is None:
        return None
    problems = gguf_problems(config)
    if problems:
        key, problem = problems[0]
        raise ValueError(f"{key}: {problem}")
    target = cache_folder(config, source)
    if not (target / "config.json").is_file():
        convert(source, target)
    return target


def convert(source: GgufSource, target: Path) -> None:
    """De-quantise the GGUF file into a safetensors folder (float32) with its tokenizer, atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    size = source.path.stat().st_size / 1e6
    print(f"Converting {source.path} ({size:.0f} MB) to a safetensors model in {target} "
          "(de-quantising to float32, once; later runs load the copy)...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.name, dtype=torch.float32)
    model_config = AutoConfig.from_pretrained(source.folder, gguf_file=source.name)
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    model_config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    if model.generation_config is not None:
        model.generation_config.bos_token_id = model_config.bos_token_id
        model.generation_config.eos_token_id = model_config.eos_token_id
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.name)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"{source.path.resolve()}\nsha256 {file_hash(source.path)}\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Converted {source.name} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def model_path(config: Any) -> str:
    """Where the run's base model loads from: the converted folder of a GGUF file, else run_conf.model."""
    converted = converted_model(config)
    return str(converted) if converted is not None else config.run_conf.model


def load_model_config(config: Any) -> Any:
    """The transformers config of the run's GGUF model, read from the file (nothing is converted)."""
    from transformers import AutoConfig

    source = gguf_source(config.run_conf)
    assert source is not None
    return AutoConfig.from_pretrained(source.folder, gguf_file=source.name)
