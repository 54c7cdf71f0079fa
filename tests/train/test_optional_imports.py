"""``duca_fast.env`` and ``duca_fast.ops`` import without the ``train`` extra (the LLM customer says so)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN_EXTRA = (
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "gguf",
    "tensorboard",
    "matplotlib",
    "openai",
)
WITHOUT_TRAIN_EXTRA = f"""
import importlib.abc, sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {(*TRAIN_EXTRA, "vllm")!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Missing())
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TRAIN_EXTRA + code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_env_and_ops_import_without_the_train_extra():
    result = run(
        "import duca_fast.env, duca_fast.ops\n"
        "env = duca_fast.env.make_env('sales-acts', max_turns=2)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TRAIN_EXTRA!r}))\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_llm_customer_names_its_missing_dependency():
    result = run("import duca_fast.env\nduca_fast.env.LLMCustomerFactory\n")
    assert result.returncode != 0
    assert "needs openai" in result.stderr and "duca-fast[train]" in result.stderr


def test_a_run_on_a_bare_gpu_image_needs_neither_openai_matplotlib_nor_tensorboard(tmp_path):
    """The GPU image has torch, transformers and peft but no openai, matplotlib or tensorboard: the rollout
    driver imports without openai, and a run's records end with warnings instead of a crash."""
    bare = f"""
import importlib.abc, sys, logging

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("openai", "matplotlib", "tensorboard", "vllm"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Missing())
logging.basicConfig(level=logging.WARNING)
import duca_fast.rollout
from duca_fast.train.records import RunRecords
records = RunRecords({str(tmp_path)!r})
records.log(1, {{"loss/total": 0.5}})
print(records.plot())
records.close()
"""
    result = subprocess.run(
        [sys.executable, "-c", bare], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    assert "TensorBoard events skipped" in result.stderr and "plots skipped: matplotlib" in result.stderr
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
