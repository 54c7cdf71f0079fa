"""Each objective's fused forward + backward time beside PPOClip's, in one process, same inputs.

``python -m bench.bench_objectives`` (CPU shape N=4096 H=576 V=49152 fp32 by default;
on CUDA N=8192 H=4096 V=151936 bf16). Each objective
runs through ``ops.fused_policy_loss`` with ``seq_ids`` of 4 packed sequences; the sequence-level ones
(gspo, geo_mean) take chunks that end on sequence boundaries, or two passes when a sequence is longer
than a chunk (the "passes" column). Writes ``bench/results/objectives_<device>.{csv,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from bench.bench_policy_loss import make_inputs
from bench.common import markdown_table, run_identity, write_results
from duca_fast import ops
from duca_fast.ops import objectives
from duca_fast.ops.policy_loss.head import sequence_chunks
from duca_fast.ops.policy_loss.torch_path import default_chunk_size

SETTINGS = {
    "ppo_clip": objectives.PPOClip(),
    "gspo": objectives.GSPO(clip_low=3e-4, clip_high=4e-4),
    "geo_mean": objectives.GeoMean(clip_low=0.4, clip_high=0.4),
    "cispo": objectives.CISPO(clip_high=0.28),
    "sapo": objectives.SAPO(),
    "gpg": objectives.GPG(),
    "dro": objectives.DRO(beta=0.1),
    "dppo": objectives.DPPO("kl", clip_low=0.05, clip_high=0.05),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=8192 if cuda else 4096)
    parser.add_argument("--hidden", type=int, default=4096 if cuda else 576)
    parser.add_argument("--vocab", type=int, default=151936 if cuda else 49152)
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the op's)")
    parser.add_argument("--name", default=None, help="results file name (default: objectives_<device>)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    h, w, target, seq_adv, old = make_inputs(args.tokens, args.hidden, args.vocab, dtype, device, args.seqs)
    seq_len = args.tokens // args.seqs
    advantages = seq_adv.repeat_interleave(seq_len)
    seq_ids = torch.arange(args.seqs, device=device).repeat_interleave(seq_len)
    if device == "cuda":
        from duca_fast.ops.policy_loss.triton_path import chunk_rows_for

        chunk = chunk_rows_for(h, args.vocab, args.chunk_size, False)
    else:
        chunk = args.chunk_size or default_chunk_size(args.tokens, args.vocab)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(objective) -> float:
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        sync()
        started = time.perf_counter()
        loss, _ = ops.fused_policy_loss(
            hh, ww, target, advantages, old, seq_ids=seq_ids, objective=objective, chunk_size=args.chunk_size
        )
        loss.backward()
        sync()
        return time.perf_counter() - started

    # Round robin (one warm-up each, then every objective once per round): a drift of the machine over
    # the run reaches every objective alike instead of whichever ran last.
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for objective in SETTINGS.values():
        step(objective)
    for _ in tqdm(range(args.repeats), desc="rounds over the objectives", unit="round"):
        for name, objective in SETTINGS.items():
            times[name].append(step(objective))
    rows = []
    for name, objective in SETTINGS.items():
        passes = 2 if objective.sequence_level and sequence_chunks(seq_ids, chunk) is None else 1
        ms = [t * 1e3 for t in times[name]]
        rows.append(
            {
                "objective": name,
                "fwd_bwd_ms": statistics.median(ms),
                "min_ms": min(ms),
                "max_ms": max(ms),
                "passes": passes,
            }
        )
    base = rows[0]["fwd_bwd_ms"]
    for row in rows:
        row["vs_ppo_clip"] = row["fwd_bwd_ms"] / base
    notes = (
        f"N={args.tokens} ({args.seqs} packed sequences of {seq_len}), H={args.hidden}, V={args.vocab}, "
        f"{args.dtype} on {device}, chunks of {chunk} tokens; median (min, max) of {args.repeats} rounds "
        "over all objectives after one warm-up each, one process. "
        "passes = 2: a sequence is longer than a chunk, so the logits are computed twice (8 N H V FLOPs)."
    )
    path = write_results(args.name or f"objectives_{device}", rows, run_identity(device), notes=notes)
    print(markdown_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
