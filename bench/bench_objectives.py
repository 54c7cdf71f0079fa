"""Each objective's fused forward + backward time beside PPOClip's, in one process, same inputs.

``python -m bench.bench_objectives`` (CPU shape N=4096 H=576 V=49152 fp32 by default). Each objective
runs through ``ops.fused_policy_loss`` with ``seq_ids`` of 4 packed sequences; the sequence-level ones
(gspo, geo_mean) take chunks that end on sequence boundaries, or two passes when a sequence is longer
than a chunk (the "passes" column). Writes ``bench/results/objectives_<device>.{csv,md}``.
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from bench.bench_policy_loss import make_inputs
from bench.common import markdown_table, run_identity, time_call, write_results
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
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the op's)")
    parser.add_argument("--name", default=None, help="results file name (default: objectives_<device>)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, w, target, seq_adv, old = make_inputs(
        args.tokens, args.hidden, args.vocab, torch.float32, device, args.seqs
    )
    seq_len = args.tokens // args.seqs
    advantages = seq_adv.repeat_interleave(seq_len)
    seq_ids = torch.arange(args.seqs, device=device).repeat_interleave(seq_len)
    chunk = args.chunk_size or default_chunk_size(args.tokens, args.vocab)
    rows = []
    for name, objective in tqdm(SETTINGS.items(), desc="objectives", unit="objective"):

        def step():
            hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
            loss, _ = ops.fused_policy_loss(
                hh,
                ww,
                target,
                advantages,
                old,
                seq_ids=seq_ids,
                objective=objective,
                chunk_size=args.chunk_size,
            )
            loss.backward()

        seconds = time_call(step, device=device, repeats=args.repeats, warmup=1)
        passes = 1
        if objective.sequence_level and sequence_chunks(seq_ids, chunk) is None:
            passes = 2
        rows.append({"objective": name, "fwd_bwd_ms": seconds * 1e3, "passes": passes})
    base = rows[0]["fwd_bwd_ms"]
    for row in rows:
        row["vs_ppo_clip"] = row["fwd_bwd_ms"] / base
    notes = (
        f"N={args.tokens} ({args.seqs} packed sequences of {seq_len}), H={args.hidden}, V={args.vocab}, fp32 "
        f"on {device}, chunks of {chunk} tokens; median of {args.repeats} after one warm-up, one process. "
        "passes = 2: a sequence is longer than a chunk, so the logits are computed twice (8 N H V FLOPs)."
    )
    path = write_results(args.name or f"objectives_{device}", rows, run_identity(device), notes=notes)
    print(markdown_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
