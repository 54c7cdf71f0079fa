"""verl's fused-kernel forward: its torch backend vs ``impl_backend=duca`` (duca_fast ``token_logprobs``).

SmolLM2-135M-Instruct (fp32, V=49152, from the local GGUF package) in verl's remove-padding layout: one
packed row of ``--seqs`` sequences of ``--length`` tokens. One step = the patched forward (backbone and
LM head), then backward of ``sum(w * log_probs) + 0.01 * sum(entropy)``, as an actor update with an
entropy term does. ``duca`` also returns ``sum_pi_squared`` (what verl's torch backend cannot). Each
variant in a fresh process: peak RSS above the level before the first step, then the median time of
the following steps.

Usage: python bench/bench_verl_backend.py [--seqs 4] [--length 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_policy_loss import RssPeak  # noqa: E402
from bench.common import add_variant_arguments, rows_per_variant, run_identity, time_call, write_results  # noqa: E402

VARIANTS = ("verl_torch", "duca")


def measure(args) -> dict[str, object]:
    from transformers import AutoModelForCausalLM

    verl_dir = Path(sys.prefix) / "verl-nodeps"
    if verl_dir.is_dir():
        sys.path.append(str(verl_dir))
    from verl.models.transformers.dense_common import forward_with_torch_backend

    from duca_fast.integrations import verl_kernels

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model._verl_fused_kernels_backend = "torch"
    forward = (
        forward_with_torch_backend if args.variant == "verl_torch" else verl_kernels.forward_with_duca_backend
    )
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (1, args.seqs * args.length), generator=generator)
    position_ids = torch.arange(args.length).repeat(args.seqs)[None]
    weights = torch.randn(input_ids.shape, generator=generator)

    def step():
        model.zero_grad(set_to_none=True)
        out = forward(
            model, input_ids=input_ids, position_ids=position_ids, temperature=1.0, return_dict=True
        )
        ((out.log_probs * weights).sum() + 0.01 * out.entropy.sum()).backward()

    with RssPeak() as meter:
        step()
    seconds = time_call(step, device="cpu", repeats=args.repeats, warmup=0)
    return {"variant": args.variant, "step_s": seconds, "peak_MiB": (meter.peak - meter.start) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="verl_backend_cpu")
    add_variant_arguments(parser, VARIANTS)
    args = parser.parse_args()
    rows = rows_per_variant(__file__, args, VARIANTS, measure, ("seqs", "length", "repeats"))
    if rows is None:
        return
    for row in rows:
        row["step_vs_verl"] = row["step_s"] / rows[0]["step_s"]
        row["peak_vs_verl"] = row["peak_MiB"] / rows[0]["peak_MiB"]
    notes = (
        f"SmolLM2-135M-Instruct fp32 (H=576, V=49152), one packed row of {args.seqs} x {args.length} tokens; "
        "patched forward + backward of sum(w log_probs) + 0.01 sum(entropy); verl 0.9.1's torch backend "
        "(FusedLinearForPPO, chunks of 512) vs impl_backend=duca (also returns sum_pi_squared); median of "
        f"{args.repeats} after the measured first step; peak RSS of the first step, fresh process per "
        "variant."
    )
    path = write_results(args.name, rows, run_identity("cpu"), notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
