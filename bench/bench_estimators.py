"""The grouped estimator ops beside HIAN at one batch size: torch, interpreted Triton and the official layout.

Each op at ``--sessions`` sessions x ``--turns`` turns in groups of ``--group-size`` (default 16k x 4 in
groups of 8, the size of the issue), median wall time with validation, as users call them:

- ``hian``: ``ops.hian_advantages`` (DuCA), backends torch and native; ``dual_track``: the same with
  ``std="population", clip=10`` (torch; the native library does not implement it);
- ``gopo``: ``ops.gopo_advantages`` over the sessions;
- ``proxmo``: ``ops.proxmo_advantages`` with ``--features``-dimensional state features (torch);
- ``otb``: ``ops.optimal_token_baseline_advantages`` with one token per turn (the twin's layout).

The Triton paths of HIAN/Dual-Track, GOPO, ProxMO and OTB run in a second process under ``TRITON_INTERPRET=1``
(numpy on the CPU: a correctness-path cost, not a GPU number). ``proxmo_official_dense`` is the official
code's soft baseline (``step_soft_reward``: one ``[rows, rows]`` similarity matrix over the whole batch,
masked by group) at ``--official-sessions`` sessions, beside ``proxmo`` at that size: at 16k x 4 it would
need a 64k x 64k float32 matrix (16 GiB).

Usage: python bench/bench_estimators.py [--sessions 16000] [--turns 4] [--group-size 8] [--features 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table, run_identity, time_call, write_results
from duca_fast import native, ops


def make_inputs(num_sessions: int, turns: int, group_size: int, features: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_turns = num_sessions * turns
    return dict(
        turn_rewards=torch.rand(num_turns, generator=gen) * 1e-2,
        turn_session=torch.arange(num_sessions).repeat_interleave(turns),
        session_rewards=torch.randint(0, 2, (num_sessions,), generator=gen).float(),
        session_group=torch.arange(num_sessions) // group_size,
        turn_index=torch.arange(turns).repeat(num_sessions),
        turn_features=torch.rand(num_turns, features, generator=gen),
        logprobs=-torch.rand(num_turns, generator=gen) * 3,
        sum_p2=torch.rand(num_turns, generator=gen) * 0.5,
    )


def calls(x: dict, num_groups: int, backend: str) -> dict:
    hian_args = (x["turn_rewards"], x["turn_session"], x["session_rewards"], x["session_group"])
    out = {
        "hian": lambda: ops.hian_advantages(*hian_args, num_groups=num_groups, backend=backend),
        "dual_track": lambda: ops.hian_advantages(
            *hian_args, num_groups=num_groups, std="population", clip=10.0, backend=backend
        ),
        "proxmo": lambda: ops.proxmo_advantages(
            *hian_args, x["turn_features"], turn_index=x["turn_index"], num_groups=num_groups, backend=backend
        ),
    }
    out["gopo"] = lambda: ops.gopo_advantages(x["session_rewards"], x["session_group"], backend=backend)
    out["otb"] = lambda: ops.optimal_token_baseline_advantages(
        x["turn_rewards"] + torch.where(x["turn_index"] == x["turn_index"].max(), 1.0, 0.0),
        x["logprobs"],
        x["sum_p2"],
        x["turn_session"],
        x["session_group"],
        backend=backend,
    )
    return out


def official_dense_soft_baseline(x: dict) -> torch.Tensor:
    """ProxMO's official ``step_soft_reward`` arithmetic (a dense masked softmax over the whole batch)."""
    features = x["turn_features"] / (x["turn_features"].norm(dim=1, keepdim=True) + 1e-8)
    group = x["session_group"][x["turn_session"]]
    logits = (features @ features.T / 0.1).masked_fill(group[:, None] != group[None, :], float("-inf"))
    returns = x["turn_rewards"]
    return returns - torch.softmax(logits, dim=1) @ returns


def measure(args, backend: str, repeats: int) -> dict[str, float]:
    x = make_inputs(args.sessions, args.turns, args.group_size, args.features)
    num_groups = -(-args.sessions // args.group_size)
    return {
        name: time_call(call, device="cpu", repeats=repeats) * 1e3
        for name, call in calls(x, num_groups, backend).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=16000)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--official-sessions", type=int, default=1000)
    parser.add_argument("--triton-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.triton_child:
        print(json.dumps(measure(args, "triton", repeats=1)))
        return

    load_before = os.getloadavg()[0]
    torch_ms = measure(args, "torch", repeats=7)
    native_ms = {}
    if native.available():
        x = make_inputs(args.sessions, args.turns, args.group_size, args.features)
        native_ms["hian"] = (
            time_call(
                calls(x, -(-args.sessions // args.group_size), "native")["hian"], device="cpu", repeats=7
            )
            * 1e3
        )
    print("interpreting the Triton paths in a second process ...", flush=True)
    child = subprocess.run(
        [sys.executable, __file__, "--triton-child", *sys.argv[1:]],
        capture_output=True,
        text=True,
        env=dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore"),
    )
    if child.returncode:
        raise SystemExit(f"the Triton child failed:\n{child.stderr[-3000:]}")
    triton_ms = json.loads(child.stdout.strip().splitlines()[-1])
    rows = []
    for name in ("hian", "dual_track", "gopo", "proxmo", "otb"):
        rows.append(
            {
                "op": name,
                "sessions": args.sessions,
                "turns": args.sessions * args.turns,
                "torch_ms": torch_ms.get(name, float("nan")),
                "native_ms": native_ms.get(name, float("nan")),
                "triton_interpreted_ms": triton_ms.get(name, float("nan")),
                "torch_vs_hian_torch": torch_ms.get(name, float("nan")) / torch_ms["hian"],
            }
        )
    small = make_inputs(args.official_sessions, args.turns, args.group_size, args.features)
    official = time_call(lambda: official_dense_soft_baseline(small), device="cpu", repeats=5) * 1e3
    ours = calls(small, -(-args.official_sessions // args.group_size), "torch")["proxmo"]
    ours_ms = time_call(ours, device="cpu", repeats=5) * 1e3
    rows.append(
        {
            "op": "proxmo_official_dense (soft baseline only)",
            "sessions": args.official_sessions,
            "turns": args.official_sessions * args.turns,
            "torch_ms": official,
            "native_ms": float("nan"),
            "triton_interpreted_ms": float("nan"),
            "torch_vs_hian_torch": float("nan"),
        }
    )
    rows.append(
        {
            "op": "proxmo (whole op, same size)",
            "sessions": args.official_sessions,
            "turns": args.official_sessions * args.turns,
            "torch_ms": ours_ms,
            "native_ms": float("nan"),
            "triton_interpreted_ms": float("nan"),
            "torch_vs_hian_torch": float("nan"),
        }
    )
    print(markdown_table(rows))
    path = write_results(
        "estimators_cpu",
        rows,
        run_identity("cpu"),
        notes=f"Grouped estimator ops at {args.sessions} sessions x {args.turns} turns, groups of "
        f"{args.group_size}, {args.features} ProxMO features; median wall time (7 calls; Triton interpreted: "
        "1 call after a warm-up, TRITON_INTERPRET=1, a correctness-path cost). Validation included. "
        f"1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after on {os.cpu_count()} "
        "cores.",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
