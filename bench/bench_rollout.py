"""Rollout engine: multi-turn driver throughput vs one plain batched generate, and weight-sync time.

(a) The driver runs B scenarios x G sessions of an echo customer for K agent turns (K rounds of
B*G requests, chat-template tokenization, env steps); the baseline is one ``engine.generate`` call
over B*G*K first-turn prompts with the same sampling, and K calls of B*G such prompts (the batch shape
the driver itself can use). Overhead = 1 - driver tok/s / baseline tok/s; the share of the driver's wall
time spent outside the engine is reported too.
(b) ``WeightSync.push`` of a perturbed copy of the model, median of 3, with the log-prob mismatch
measured after the last push.

Each model runs in its own process (vLLM keeps process-global state; one engine per process).
Usage: python bench/bench_rollout.py [--models tiny default] [--sessions 16] [--turns 4] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import markdown_table, run_identity, write_results
from duca_fast.env.base import Observation, Outcome, TurnResult

CACHE_DIR = Path(os.environ.get("DUCA_CACHE", Path.home() / ".cache" / "duca_fast"))


class EchoCustomer:
    """Replies a fixed sentence; ends after ``scenario`` agent turns."""

    turn_reward_names = ("length",)
    session_reward_names = ("conversion",)

    def reset(self, scenario: int, seed: int) -> Observation:
        self.turns, self.limit = 0, scenario
        return Observation("You sell green tea. Be brief and honest.", "Hello, which teas do you have?")

    def step(self, agent_message: str) -> TurnResult:
        self.turns += 1
        rewards = {"length": float(len(agent_message))}
        if self.turns < self.limit:
            return TurnResult("I see. Tell me more about the price.", rewards, done=False)
        outcome = Outcome(converted=False, flagged_bot=False, num_turns=self.turns, reason="done")
        return TurnResult(None, rewards, True, {"conversion": 0.0}, outcome)

    async def astep(self, agent_message: str) -> TurnResult:
        return self.step(agent_message)


def model_dir_for(name: str) -> Path:
    from duca_fast.rollout import build_tiny_model_dir, load_default_model_dir

    if name == "default":
        return load_default_model_dir(CACHE_DIR)
    return build_tiny_model_dir(Path(tempfile.mkdtemp(prefix="duca-tiny-")))


def bench_model(name: str, sessions: int, turns: int, tokens: int) -> list[dict[str, object]]:
    from transformers import AutoModelForCausalLM

    from duca_fast.rollout import (
        IncrementalChat,
        RolloutConfig,
        SamplingConfig,
        VLLMEngine,
        WeightSync,
        make_session_specs,
        rollout,
    )

    started = time.perf_counter()
    model_dir = model_dir_for(name)
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    engine = VLLMEngine(model_dir, max_model_len=2048, kv_cache_bytes=1024 * 2**20)
    init_s = time.perf_counter() - started
    sampling = SamplingConfig(max_new_tokens=tokens, temperature=1.0)
    config = RolloutConfig(sampling=sampling, max_turns=turns)
    specs = make_session_specs([turns] * (sessions // 4), group_size=4)

    rollout(engine, EchoCustomer, specs[:4], config)  # warm-up
    started = time.perf_counter()
    batch = rollout(engine, EchoCustomer, specs, config)
    driver_s = time.perf_counter() - started

    chat = IncrementalChat(engine.tokenizer)
    observation = EchoCustomer().reset(turns, 0)
    prompt = chat.append("system", observation.system_prompt) + chat.append(
        "user", observation.customer_message
    )
    prompt += chat.generation_prompt()
    requests = len(specs) * turns
    engine.reset_prefix_cache()
    started = time.perf_counter()
    plain = engine.generate([prompt] * requests, sampling, seeds=list(range(requests)))
    plain_s = time.perf_counter() - started
    plain_tokens = sum(len(c.token_ids) for c in plain)
    # Same requests in K rounds of B*G, as the driver must send them: what remains is the driver's cost
    # (tokenization, env steps) and the longer multi-turn prompts, not the batch shape.
    engine.reset_prefix_cache()
    started = time.perf_counter()
    rounds_tokens = 0
    for round_index in range(turns):
        seeds = [round_index * len(specs) + i for i in range(len(specs))]
        rounds_tokens += sum(
            len(c.token_ids) for c in engine.generate([prompt] * len(specs), sampling, seeds)
        )
    rounds_tps = rounds_tokens / (time.perf_counter() - started)
    driver_tps = batch.num_generated_tokens / driver_s
    plain_tps = plain_tokens / plain_s
    rows: list[dict[str, object]] = [
        {
            "model": name,
            "what": f"driver {len(specs)} sessions x {turns} turns vs 1 generate of {requests}",
            "params_MB": float("nan"),
            "seconds": driver_s,
            "tokens": batch.num_generated_tokens,
            "tok_per_s": driver_tps,
            "baseline_tok_per_s": plain_tps,
            "overhead": 1 - driver_tps / plain_tps,
            "outside_engine": 1 - batch.generate_seconds / driver_s,
            "logprob_mad": float("nan"),
            "engine_init_s": init_s,
            "model_prepare_s": prepare_s,
        },
        {
            "model": name,
            "what": f"driver vs {turns} generates of {len(specs)} (same batch per round)",
            "params_MB": float("nan"),
            "seconds": driver_s,
            "tokens": batch.num_generated_tokens,
            "tok_per_s": driver_tps,
            "baseline_tok_per_s": rounds_tps,
            "overhead": 1 - driver_tps / rounds_tps,
            "outside_engine": 1 - batch.generate_seconds / driver_s,
            "logprob_mad": float("nan"),
            "engine_init_s": init_s,
            "model_prepare_s": prepare_s,
        },
    ]

    trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in trainer.parameters():
            param.mul_(1.01)
    for bucket_mb in (256, 32):
        sync = WeightSync(engine, bucket_bytes=bucket_mb * 2**20)
        times = [sync.push(trainer).seconds for _ in range(3)]
        report = sync.push(trainer, check_prompts=[prompt, prompt])
        rows.append(
            {
                "model": name,
                "what": f"WeightSync.push, {bucket_mb} MiB buckets ({report.num_buckets} buckets)",
                "params_MB": report.num_bytes / 1e6,
                "seconds": sorted(times)[1],
                "tokens": float("nan"),
                "tok_per_s": float("nan"),
                "baseline_tok_per_s": float("nan"),
                "overhead": float("nan"),
                "outside_engine": float("nan"),
                "logprob_mad": report.logprob_mismatch,
                "engine_init_s": init_s,
                "model_prepare_s": prepare_s,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "default"], choices=["tiny", "default"])
    parser.add_argument("--sessions", type=int, default=16, help="sessions per driver run (groups of 4)")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per agent turn")
    parser.add_argument("--worker-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_json:
        rows = bench_model(args.models[0], args.sessions, args.turns, args.tokens)
        Path(args.worker_json).write_text(json.dumps(rows))
        return
    rows = []
    for model in args.models:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--models", model, "--worker-json", out.name]
            command += [
                "--sessions",
                str(args.sessions),
                "--turns",
                str(args.turns),
                "--tokens",
                str(args.tokens),
            ]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            rows += json.loads(Path(out.name).read_text())
        print(markdown_table(rows), flush=True)
    notes = (
        "overhead = 1 - driver tok/s / one-batched-generate tok/s (the driver runs K sequential rounds of "
        "smaller batches plus tokenization and env steps); outside_engine = share of the driver's wall "
        "time not spent in engine.generate; logprob_mad = mean |engine - trainer| log-prob after the push."
    )
    path = write_results(
        "rollout_cpu" if not torch.cuda.is_available() else "rollout_cuda",
        rows,
        run_identity("cuda" if torch.cuda.is_available() else "cpu"),
        notes,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
