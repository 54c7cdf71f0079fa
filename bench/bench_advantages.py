"""HIAN advantages on the CPU: the public op (torch and native backends), the native library called directly,
a Python loop and an index_add version.

The Python-loop baseline follows the way verl's GRPO outcome advantage is computed (a dict of lists
per group id, then one pass to normalize), done for both horizons. The index_add baseline is the
obvious vectorized version with a one-pass sum-of-squares variance. ``ops.hian_advantages`` is timed with
backend="torch" and backend="native" (validation included, as users call it); "native_lib" calls
duca_fast.native directly (kernels/, float64 two-pass), so the difference is the Python-side overhead.
The native columns need the library (`make native`). On CUDA it also measures the Triton kernels'
achieved bandwidth against a device copy.

Usage: python bench/bench_advantages.py [--sessions 1000 16000 128000] [--turns 4] [--group-size 8]
       [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table, run_identity, time_call, write_results
from duca_fast import native, ops


def make_inputs(num_sessions: int, turns: int, group_size: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    session_group = (torch.arange(num_sessions) // group_size).to(device)
    turn_session = torch.arange(num_sessions).repeat_interleave(turns).to(device)
    turn_rewards = (torch.rand(num_sessions * turns, generator=gen) * 1e-2).to(device)
    session_rewards = (torch.randint(0, 2, (num_sessions,), generator=gen).float() * 1e3).to(device)
    return turn_rewards, turn_session, session_rewards, session_group


def python_loop_hian(turn_rewards, turn_session, session_rewards, session_group, eps=1e-6):
    """One horizon at a time the verl way: collect per group id in Python, normalize in a second loop."""

    def normalize(scores, index):
        by_group = defaultdict(list)
        for i in range(len(scores)):
            by_group[index[i]].append(scores[i])
        mean, std = {}, {}
        for key, values in by_group.items():
            if len(values) == 1:
                mean[key], std[key] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                stacked = torch.stack(values)
                mean[key], std[key] = stacked.mean(), stacked.std()
        out = scores.clone()
        for i in range(len(scores)):
            out[i] = (scores[i] - mean[index[i]]) / (std[index[i]] + eps)
        return out

    groups = session_group.tolist()
    session_adv = normalize(session_rewards, groups)
    turn_groups = [groups[s] for s in turn_session.tolist()]
    turn_adv = normalize(turn_rewards, turn_groups)
    return turn_adv + session_adv[turn_session]


def index_add_hian(turn_rewards, turn_session, session_rewards, session_group, eps=1e-6):
    """Vectorized with index_add_ and a one-pass E[x^2] - E[x]^2 variance (cancels for large rewards)."""
    num_groups = int(session_group.max()) + 1

    def normalize(x, key):
        count = torch.zeros(num_groups, device=x.device).index_add_(0, key, torch.ones_like(x))
        total = torch.zeros(num_groups, device=x.device).index_add_(0, key, x)
        total_sq = torch.zeros(num_groups, device=x.device).index_add_(0, key, x * x)
        mean = total / count
        var = (total_sq - count * mean * mean) / (count - 1).clamp_min(1)
        adv = (x - mean[key]) / (var.clamp_min(0).sqrt()[key] + eps)
        return torch.where(count[key] > 1, adv, torch.zeros_like(adv))

    session_adv = normalize(session_rewards, session_group)
    turn_adv = normalize(turn_rewards, session_group[turn_session])
    return turn_adv + session_adv[turn_session]


def bench_cpu(sessions: list[int], turns: int, group_size: int) -> list[dict[str, object]]:
    rows = []
    for num_sessions in sessions:
        inputs = make_inputs(num_sessions, turns, group_size, "cpu")
        num_groups = num_sessions // group_size

        def public_op(backend: str):
            return lambda: ops.hian_advantages(*inputs, num_groups=num_groups, backend=backend)

        torch_op = time_call(public_op("torch"), device="cpu", repeats=15)
        index_add = time_call(lambda: index_add_hian(*inputs), device="cpu", repeats=15)
        native_op = native_lib = float("nan")
        if native.available():
            native_op = time_call(public_op("native"), device="cpu", repeats=15)
            native_call = lambda: native.hian_advantages(
                *inputs, None, None, None, None, 1.0, 1.0, "group", "group", 1e-6, "raise", num_groups
            )
            native_lib = time_call(native_call, device="cpu", repeats=15)
        loop_repeats = 1 if num_sessions > 20_000 else 3
        loop = time_call(lambda: python_loop_hian(*inputs), device="cpu", repeats=loop_repeats, warmup=0)
        rows.append(
            {
                "sessions": num_sessions,
                "turns": num_sessions * turns,
                "torch_op_ms": torch_op * 1e3,
                "native_op_ms": native_op * 1e3,
                "native_lib_ms": native_lib * 1e3,
                "index_add_ms": index_add * 1e3,
                "python_loop_ms": loop * 1e3,
                "native_op_vs_torch_op": torch_op / native_op,
                "native_lib_vs_torch_op": torch_op / native_lib,
                "native_op_vs_index_add": index_add / native_op,
                "native_lib_vs_index_add": index_add / native_lib,
                "torch_op_vs_loop": loop / torch_op,
            }
        )
        print(markdown_table(rows[-1:]), flush=True)
    return rows


def bench_triton_bandwidth(num_turns_list: list[int], group_size: int) -> list[dict[str, object]]:
    """Achieved GB/s of the Triton path (bytes it must read and write once) vs a device-to-device copy."""
    from triton.testing import do_bench

    rows = []
    for num_turns in num_turns_list:
        turns = 4
        inputs = make_inputs(num_turns // turns, turns, group_size, "cuda")
        num_groups = num_turns // turns // group_size
        call = lambda: ops.hian_advantages(*inputs, num_groups=num_groups, validate=False)
        # Device events, the L2 flushed before each call, median (triton.testing.do_bench).
        seconds = do_bench(call, warmup=25, rep=200, return_mode="median") / 1e3
        compulsory = sum(t.numel() * t.element_size() for t in inputs) + num_turns * 4
        buffer = torch.randn(compulsory // 4, device="cuda")
        copy_seconds = do_bench(lambda: buffer.clone(), warmup=25, rep=200, return_mode="median") / 1e3
        achieved, copy_bw = compulsory / seconds / 1e9, 2 * compulsory / copy_seconds / 1e9
        rows.append(
            {
                "turns": num_turns,
                "triton_us": seconds * 1e6,
                "achieved_GBps": achieved,
                "copy_GBps": copy_bw,
                "fraction_of_copy": achieved / copy_bw,
            }
        )
        print(markdown_table(rows[-1:]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[1000, 16000, 128000])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--gpu-turns", type=int, nargs="+", default=[1 << 20, 1 << 23])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for torch and the native kernels (one OpenMP runtime); default: torch's",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    rows = bench_cpu(args.sessions, args.turns, args.group_size)
    native_note = (
        f"native: duca_kernels with {native.cpu_threads()} OpenMP threads, float32 rewards read in place. "
        if native.available()
        else "native: library not built (`make native`), column empty. "
    )
    path = write_results(
        "advantages_cpu",
        rows,
        run_identity("cpu"),
        notes=f"HIAN over sessions x {args.turns} turns, groups of {args.group_size}; median wall time. "
        "*_op: ops.hian_advantages(backend=...) with validation; native_lib: duca_fast.native directly. "
        "Goal: >= 50x faster than the Python loop at 16k sessions; native >= 3x torch and faster than "
        f"index_add at 16k sessions. {native_note}1-min load average {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after on {os.cpu_count()} cores (other processes share the CPU when it "
        "exceeds the core count).",
    )
    print(f"wrote {path}")
    if torch.cuda.is_available():
        gpu_rows = bench_triton_bandwidth(args.gpu_turns, args.group_size)
        path = write_results(
            "advantages_triton",
            gpu_rows,
            run_identity("cuda"),
            notes="Bytes = inputs read once + fp32 output written once. Goal: >= 60% of copy bandwidth.",
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
