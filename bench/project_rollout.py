"""Trace-driven projection of a rollout step's makespan on a GPU: rounds, async, async with over-sampling.

Inputs:
- a per-turn trace recorded by ``bench/bench_drivers.py`` on a real run
  (``bench/results/rollout_trace_cpu.json``): per session, the agent tokens of each turn and the
  customer's latency after it (an LLM customer served by vLLM on this CPU); sessions are drawn from
  it with replacement;
- a decode-step model: the time of one engine step as a function of the sequences decoding in it,
  interpolated (piecewise linear, linear beyond the last point) from the published time per output token
  of vLLM 0.21.0 serving Llama-3.1-8B-Instruct fp16 on one H100-80GB at concurrency 1 / 4 / 16 / 64:
  6.48 / 6.59 / 10.94 / 46.91 ms (median TPOT, the "concurrency sweep" recipe of the InferenceBench
  documentation, yobitelcomm.github.io/bench/recipes/concurrency-sweep, captured 2026-05-16). Those
  TPOTs include the prefill steps of arriving requests, so the model is pessimistic at high batch sizes.
  ``--customer-scale`` multiplies the recorded customer latencies (a GPU-served customer answers faster).

Simulated (prefill and prefix-cache effects left out; at most ``--max-num-seqs`` sequences per step, the
rest wait):
- ``rounds``: every live session's turn k decodes in one batch (the step shrinks as turns finish), then
  the round waits for its slowest customer, then turn k+1;
- ``async``: each session submits its next turn when its customer has answered; every step decodes all
  sequences present;
- ``async + oversample``: ``--oversample`` extra groups started, the step ends when the needed groups
  have every session ended (the rest aborted);
- ``async + oversample + carry-over``: the same, the groups left carried into the next step from where they
  stopped (a turn being decoded is decoded again; the step also waits for the customers answering when it
  ends); the mean makespan of ``--steps`` steps after the first.

Usage: python bench/project_rollout.py [--sessions 256 1024] [--group-size 8] [--oversample 0.25]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, markdown_table, run_identity, write_results

TPOT_MS = ((1, 6.48), (4, 6.59), (16, 10.94), (64, 46.91))
"""(concurrency, median time per output token in ms): vLLM 0.21.0, Llama-3.1-8B-Instruct fp16, 1x H100-80GB,
InferenceBench concurrency-sweep recipe (yobitelcomm.github.io/bench/recipes/concurrency-sweep)."""


def step_seconds(batch: int) -> float:
    """One decode step with ``batch`` sequences, from ``TPOT_MS`` (piecewise linear, linear past the end)."""
    xs = [x for x, _ in TPOT_MS]
    ys = [y for _, y in TPOT_MS]
    if batch <= xs[0]:
        return ys[0] / 1000
    i = min(bisect_right(xs, batch), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return (y0 + (y1 - y0) * (batch - x0) / (x1 - x0)) / 1000


def draw_sessions(trace: list[dict], count: int, seed: int, scale: float) -> list[list[tuple[int, float]]]:
    """``count`` sessions drawn with replacement: per turn (agent tokens, customer latency after it)."""
    rng = random.Random(seed)
    usable = [s for s in trace if s["agent_tokens"]]
    out = []
    for _ in range(count):
        session = rng.choice(usable)
        latencies = session["customer_latency_s"] + [0.0] * len(session["agent_tokens"])
        out.append([(max(t, 1), latencies[k] * scale) for k, t in enumerate(session["agent_tokens"])])
    return out


def rounds_makespan(sessions: list[list[tuple[int, float]]], max_num_seqs: int) -> float:
    clock, turn = 0.0, 0
    while True:
        live = [s[turn] for s in sessions if turn < len(s)]
        if not live:
            return clock
        for chunk in range(0, len(live), max_num_seqs):
            tokens = sorted(t for t, _ in live[chunk : chunk + max_num_seqs])
            done, batch = 0, len(tokens)
            for index, need in enumerate(tokens):  # sequences leave the batch as their turns end
                clock += (need - done) * step_seconds(batch)
                done, batch = need, len(tokens) - index - 1
        clock += max(latency for _, latency in live)
        turn += 1


def async_makespan(
    sessions: list[list[tuple[int, float]]], groups: list[int], needed: int | None, max_num_seqs: int
) -> float:
    """Event simulation; ``needed`` groups complete ends the step (None: every session)."""
    return async_step(sessions, groups, [0] * len(sessions), needed, max_num_seqs, carry=False)[0]


def async_step(
    sessions: list[list[tuple[int, float]]],
    groups: list[int],
    start_turn: list[int],
    needed: int | None,
    max_num_seqs: int,
    carry: bool,
) -> tuple[float, list[int], list[int]]:
    """One rollout of the async driver from each session's ``start_turn``; returns (makespan, the turn each
    session reached, the groups that completed in order). ``needed`` groups complete end the step: without
    ``carry`` at once (the rest aborted), with ``carry`` once the customers answering at that moment have
    answered (the driver suspends sessions between turns; a turn being decoded is dropped and decoded
    again in the next step)."""
    clock = 0.0
    turn = list(start_turn)
    ready = [s for s in range(len(sessions)) if turn[s] < len(sessions[s])]
    decoding: dict[int, int] = {}  # session -> tokens left in its turn
    answers: list[tuple[float, int]] = []  # (time the customer answers, session)
    left = {g: 0 for g in groups}
    for s, g in enumerate(groups):
        left[g] += turn[s] < len(sessions[s])
    complete = [g for g in dict.fromkeys(groups) if left[g] == 0]  # carried groups already done
    while needed is None or len(complete) < needed:
        while ready and len(decoding) < max_num_seqs:
            s = ready.pop(0)
            decoding[s] = sessions[s][turn[s]][0]
        if not decoding:
            if not answers:
                break
            clock = max(clock, answers[0][0])
        else:
            clock += step_seconds(len(decoding))
            for s in list(decoding):
                decoding[s] -= 1
                if decoding[s] == 0:
                    del decoding[s]
                    latency = sessions[s][turn[s]][1]
                    turn[s] += 1
                    if turn[s] == len(sessions[s]):
                        left[groups[s]] -= 1
                        if left[groups[s]] == 0:
                            complete.append(groups[s])
                    else:
                        heapq.heappush(answers, (clock + latency, s))
        while answers and answers[0][0] <= clock:
            _, s = heapq.heappop(answers)
            ready.append(s)
    if carry and answers:
        clock = max(clock, max(at for at, _ in answers))
    return clock, turn, complete


def carry_over_makespan(
    draw: Callable[[int], list[list[tuple[int, float]]]],
    needed: int,
    extra: int,
    group_size: int,
    steps: int,
    max_num_seqs: int,
) -> float:
    """Mean step makespan over ``steps`` steps (the first left out: nothing is carried into it) of async
    with over-sampling and carry-over: each step plays the groups carried from the last one from where they
    stopped, plus new groups up to ``needed + extra``; the first ``needed`` complete groups train."""
    carried: list[tuple[list[tuple[int, float]], int, int]] = []  # (session, group, turn reached)
    spans = []
    next_group = 0
    for step in range(steps):
        new_groups = needed + extra - len({g for _, g, _ in carried})
        fresh = draw(new_groups * group_size)
        sessions = [s for s, _, _ in carried] + fresh
        groups = [g for _, g, _ in carried] + [next_group + i // group_size for i in range(len(fresh))]
        next_group += new_groups
        start = [t for _, _, t in carried] + [0] * len(fresh)
        clock, turn, complete = async_step(sessions, groups, start, needed, max_num_seqs, carry=True)
        chosen = set(complete[:needed])
        carried = [(s, g, t) for s, g, t in zip(sessions, groups, turn, strict=True) if g not in chosen]
        if step:
            spans.append(clock)
    return sum(spans) / len(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=RESULTS_DIR / "rollout_trace_cpu.json")
    parser.add_argument("--sessions", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument(
        "--oversample", type=float, default=0.25, help="extra groups, as a share of the needed"
    )
    parser.add_argument("--customer-scale", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument(
        "--steps", type=int, default=9, help="carry-over: steps simulated (the first is left out)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    recorded = json.loads(args.trace.read_text())
    trace = recorded["sessions"]
    rows = []
    for scale in args.customer_scale:
        for count in args.sessions:
            needed = count // args.group_size
            extra = max(1, round(needed * args.oversample))
            pool = draw_sessions(trace, (needed + extra) * args.group_size, args.seed, scale)
            base = pool[: needed * args.group_size]
            groups = [i // args.group_size for i in range(len(pool))]
            rounds = rounds_makespan(base, args.max_num_seqs)
            asynchronous = async_makespan(base, groups[: len(base)], None, args.max_num_seqs)
            oversampled = async_makespan(pool, groups, needed, args.max_num_seqs)
            draws = iter(range(1, 10**6))

            def draw(count: int) -> list[list[tuple[int, float]]]:
                return draw_sessions(trace, count, args.seed * 1000 + next(draws), scale)

            carried = carry_over_makespan(draw, needed, extra, args.group_size, args.steps, args.max_num_seqs)
            rows.append(
                {
                    "sessions": count,
                    "customer_latency_scale": scale,
                    "rounds_s": rounds,
                    "async_s": asynchronous,
                    "extra_groups": extra,
                    "async_oversample_s": oversampled,
                    "async_carry_over_s": carried,
                    "async_vs_rounds": rounds / asynchronous,
                    "oversample_vs_rounds": rounds / oversampled,
                    "carry_over_vs_rounds": rounds / carried,
                }
            )
    notes = (
        f"Trace: {args.trace.name} ({len(trace)} sessions, recorded {recorded.get('date')} at commit "
        f"{recorded.get('commit')}; {recorded.get('setting')}). Decode-step model: TPOT_MS in this script "
        f"(vLLM 0.21.0, Llama-3.1-8B fp16, H100). Groups of {args.group_size}, max_num_seqs "
        f"{args.max_num_seqs}, over-sampling {args.oversample:.0%} extra groups; carry-over: mean of steps 2-"
        f"{args.steps} (fresh sessions drawn per step); prefill left out. "
        "A projection, not a measurement."
    )
    print(markdown_table(rows))
    write_results(
        "rollout_projection", rows, {**run_identity("cpu"), "device": "projection (no device)"}, notes
    )


if __name__ == "__main__":
    main()
