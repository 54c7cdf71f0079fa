import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from duca_fast.rollout import VLLMEngine, build_tiny_model_dir, load_default_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_default_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A random 2-layer Llama (tied embeddings) with SmolLM2's tokenizer, saved once per test session."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), tokenizer=tokenizer, seed=0)


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir):
    """One in-process vLLM engine for the whole session (initialization takes seconds)."""
    engine = VLLMEngine(tiny_model_dir, max_model_len=512, dtype=torch.float32, kv_cache_bytes=64 * 2**20)
    yield engine
    engine.close()


@pytest.fixture
def trainer_model(tiny_model_dir):
    """A fresh trainer-side copy of the tiny model (same weights as the engine at start)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def engine(vllm_engine, trainer_model):
    """The shared vLLM engine, reset to the tiny model's saved weights (tests push other weights)."""
    from duca_fast.rollout import WeightSync

    if not vllm_engine.weights_consistent or vllm_engine.weight_version > 0:
        WeightSync(vllm_engine).push(trainer_model)
    return vllm_engine
