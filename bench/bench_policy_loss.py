"""Policy loss from hidden states: duca_fast vs naive torch vs Liger's fused linear GRPO loss.

Time (median) and peak extra memory of forward and forward+backward, same settings for everyone:
token-level PPO clip 0.2/0.2, token-mean aggregation, no KL, per-sequence advantages (what Liger's
chunked loss accepts; ours takes them per token). On CUDA also Liger's logits-level triton_grpo_loss
(after a cuBLAS lm_head) and the bare lm_head GEMMs forward+backward, the floor.

CPU memory is the peak RSS above the level before the call, sampled every millisecond in a fresh
process per variant; on CUDA it is torch.cuda.max_memory_allocated above the inputs.

Usage: python bench/bench_policy_loss.py [--tokens 4096 --hidden 576 --vocab 49152 --dtype float32]
       (CUDA defaults: 8192 x 4096 x 151936 bfloat16)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table, run_identity, time_call, write_results  # noqa: E402

VARIANTS_CPU = ["duca_fast", "liger_chunked", "naive_torch"]
VARIANTS_CUDA = [
    "duca_fast",
    "duca_fast_bf16_logits",
    "liger_chunked",
    "liger_triton_logits",
    "naive_torch",
    "lm_head_gemms",
]


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seqs: int):
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=gen) * 0.5).to(device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device=device, dtype=dtype)
    target = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    seq_adv = torch.randn(seqs, generator=gen).to(device)
    old = (-torch.rand(tokens, generator=gen) * 5 - 8).to(device)
    return h, w, target, seq_adv, old


def dialogue_mask(tokens: int, seqs: int, loss_share: float, device) -> torch.Tensor:
    """``[seqs, len]`` bool: each sequence alternates customer and agent turns of 64 tokens, the agent
    (loss) turns covering ``loss_share`` of the tokens, the way our multi-turn batches look."""
    seq_len = tokens // seqs
    if loss_share >= 1.0:
        return torch.ones(seqs, seq_len, dtype=torch.bool, device=device)
    turn = 64
    agent = max(1, round(2 * turn * loss_share))
    position = torch.arange(seq_len) % (2 * turn)
    row = position >= 2 * turn - agent
    return row.expand(seqs, seq_len).to(device)


def build(
    variant: str,
    h,
    w,
    target,
    seq_adv,
    old,
    seqs: int,
    *,
    objective: str | None = None,
    loss_share: float = 1.0,
):
    """Return a closure running forward (and backward when ``backward``) of one variant."""
    tokens = h.shape[0]
    seq_len = tokens // seqs
    token_adv = seq_adv.repeat_interleave(seq_len)
    loss_mask = dialogue_mask(tokens, seqs, loss_share, h.device)
    flat_mask = loss_mask.reshape(-1)
    seq_ids = torch.arange(seqs, device=h.device).repeat_interleave(seq_len)
    from duca_fast import ops

    if variant in ("duca_fast", "duca_fast_bf16_logits"):
        # The 16-bit-logits variant writes the lm_head output in the input dtype (logits_dtype).
        logits_dtype = (
            str(h.dtype).removeprefix("torch.") if variant == "duca_fast_bf16_logits" else "float32"
        )

        def run(backward: bool):
            hh, ww = h.detach().requires_grad_(backward), w.detach().requires_grad_(backward)
            loss, _ = ops.fused_policy_loss(
                hh,
                ww,
                target,
                token_adv,
                old,
                mask=None if loss_share >= 1.0 else flat_mask,
                seq_ids=seq_ids,
                objective=objective,
                logits_dtype=logits_dtype,
            )
            if backward:
                loss.backward()

        return run
    if variant == "naive_torch":

        def run(backward: bool):
            hh, ww = h.detach().requires_grad_(backward), w.detach().requires_grad_(backward)
            logp = torch.log_softmax((hh @ ww.T).float(), -1).gather(1, target[:, None])[:, 0]
            ratio = torch.exp(logp - old)
            per_token = torch.maximum(-token_adv * ratio, -token_adv * ratio.clamp(0.8, 1.2))
            loss = (per_token * flat_mask).sum() / flat_mask.sum()
            if backward:
                loss.backward()

        return run
    if variant == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        compiled = h.device.type == "cuda"
        module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", compiled=compiled)
        mask = loss_mask.float()

        def run(backward: bool):
            hh, ww = h.detach().requires_grad_(backward), w.detach().requires_grad_(backward)
            out = module(
                hh.view(seqs, seq_len, -1),
                ww,
                target.view(seqs, seq_len),
                mask,
                seq_adv,
                old_per_token_logps=old.view(seqs, seq_len),
            )
            loss = out[0] if isinstance(out, tuple) else out
            if backward:
                loss.backward()

        return run
    if variant == "liger_triton_logits":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        mask = loss_mask.float()
        ids = target.view(seqs, seq_len).contiguous()
        old_logp = old.view(seqs, seq_len).contiguous()

        def run(backward: bool):
            hh, ww = h.detach().requires_grad_(backward), w.detach().requires_grad_(backward)
            # Liger's kernel reads logits for positions 0..L-1 of a [B, L+1, V] tensor.
            logits = (hh @ ww.T).view(seqs, seq_len, -1)
            logits = torch.cat([logits, logits[:, -1:]], dim=1).contiguous()
            out = triton_grpo_loss(
                logits,
                old_logp,
                None,
                ids,
                seq_adv,
                mask,
                temperature=1.0,
                beta=0.0,
                eps_low=0.2,
                eps_high=0.2,
                inplace=True,
                loss_type="dapo",
                reduce=True,
            )
            loss = out[0] if isinstance(out, tuple) else out
            if backward:
                loss.backward()

        return run
    if variant == "lm_head_gemms":

        def run(backward: bool):
            logits = h @ w.T
            if backward:
                grad = torch.ones_like(logits)
                _ = grad @ w, grad.T @ h

        return run
    raise ValueError(f"unknown variant {variant!r}")


class RssPeak:
    """Peak resident set size of this process while active, sampled every millisecond."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def peak_extra_mib(call, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with RssPeak() as meter:
        call()
    return (meter.peak - meter.start) / 2**20


def measure_one(args) -> dict[str, object]:
    """Run one variant in this process: times and peak extra memory."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = getattr(torch, args.dtype)
    if dtype == torch.float32 and device == "cuda":
        # Our op multiplies fp32 on tf32 tensor cores by default; the baselines get the same switch.
        torch.backends.cuda.matmul.allow_tf32 = True  # legacy API: both APIs stay readable after it
    inputs = make_inputs(args.tokens, args.hidden, args.vocab, dtype, device, args.seqs)
    run = build(args.variant, *inputs, seqs=args.seqs, objective=args.objective, loss_share=args.loss_share)
    row: dict[str, object] = {"variant": args.variant}
    # Memory first, in this fresh process: after a warm-up the allocator reuses pages it already holds
    # and the resident-set peak would hide the variant's real footprint.
    for backward in (False, True):
        label = "fwd_bwd" if backward else "fwd"
        try:
            row[f"{label}_peak_MiB"] = peak_extra_mib(lambda: run(backward), device)
        except Exception as error:  # a baseline that cannot run is reported, not fatal
            row[f"{label}_peak_MiB"] = f"failed: {type(error).__name__}: {str(error)[:80]}"
    for backward in (False, True):
        label = "fwd_bwd" if backward else "fwd"
        if isinstance(row[f"{label}_peak_MiB"], str):
            row[f"{label}_ms"] = ""
            continue
        row[f"{label}_ms"] = (
            time_call(lambda: run(backward), device=device, repeats=args.repeats, warmup=1) * 1e3
        )
    return row


# ---------------------------------------------------------------------------------------------------
# performance model of the CUDA path (duca_fast.ops.policy_loss.triton_path), per pass

# Stated H100 SXM rates the prediction uses (sustained, not peak): cuBLAS dense bf16/fp16 GEMM (~70% of
# the 989 TFLOP/s peak), tf32 GEMM (fp32 inputs by default; ~70% of 495), fp32 GEMM on FMA
# (fp32_matmul="ieee"; 67 peak), HBM3 bandwidth.
RATES = {
    "bf16_gemm_flops": 700e12,
    "fp16_gemm_flops": 700e12,
    "tf32_gemm_flops": 350e12,
    "fp32_gemm_flops": 50e12,
    "hbm_bytes": 3.0e12,
}


def gemm_rate(dtype: str, fp32_matmul: str = "tf32") -> float:
    if dtype == "float32":
        return RATES["tf32_gemm_flops" if fp32_matmul == "tf32" else "fp32_gemm_flops"]
    return RATES[f"{dtype.replace('bfloat', 'bf').replace('float', 'fp')}_gemm_flops"]


def performance_model(
    tokens: int, hidden: int, vocab: int, dtype: str, logits_dtype: str = "float32", fp32_matmul: str = "tf32"
) -> tuple[list[dict[str, object]], dict]:
    """FLOPs, bytes and predicted H100 time of every pass; peak extra memory by live-buffer accounting.

    All tokens carry loss (N_loss = N). Chunk rows and the side stream come from the launcher itself.
    A pass takes max(FLOPs / GEMM rate, bytes / HBM rate). The serial total adds the passes; with the
    side stream (16-bit inputs, fp32 logits) GEMM1, the row kernel and the head of chunk i+1 run beside
    GEMM2/GEMM3 of chunk i, so the overlapped total is a bound: the row kernel of every chunk but the
    first hidden under those GEMMs (how much really hides depends on how the SMs are shared).
    """
    from duca_fast.ops.policy_loss.triton_path import chunk_rows

    size = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    logit = 4 if logits_dtype == "float32" else size
    rate = gemm_rate(dtype, fp32_matmul)
    chunk = chunk_rows(tokens, vocab, None, torch.device("cuda"), logit)
    chunks = -(-tokens // chunk)
    in_place = logit == size  # d-logits overwrite the logits buffer: no side stream
    n, h, v = tokens, hidden, vocab
    passes = [
        # name, FLOPs, bytes (all chunks together)
        (
            f"GEMM1 logits = h_c @ W.T ({'fp32' if logit == 4 else dtype} out)",
            2 * n * h * v,
            n * h * size + chunks * v * h * size + n * v * logit,
        ),
        ("row kernel (vocabulary split) + combine", 0, n * v * logit + chunks * v * size),
        ("policy head on [chunk] vectors", 0, 0),
        (
            "d-logits kernel" + (" (in place)" if in_place else ""),
            0,
            n * v * logit + n * v * size + chunks * v * size,
        ),
        ("GEMM2 dH_c = G @ W", 2 * n * h * v, n * v * size + chunks * v * h * size + n * h * 4),
        (
            "GEMM3 dW += G.T @ h_c (fp32 accumulate)",
            2 * n * h * v,
            n * v * size + n * h * size + chunks * v * h * 8,
        ),
        ("backward: scale by grad_loss and cast dW, dH", 0, v * h * (4 + size) + n * h * (4 + size)),
    ]
    rows = []
    for name, flops, moved in passes:
        seconds = max(flops / rate, moved / RATES["hbm_bytes"])
        rows.append(
            {"pass": name, "GFLOP": flops / 1e9, "GB moved": moved / 1e9, "predicted_ms": seconds * 1e3}
        )
    serial = sum(row["predicted_ms"] for row in rows)
    row_ms = rows[1]["predicted_ms"]
    overlapped = serial if in_place else serial - row_ms * (chunks - 1) / chunks
    live = {
        f"logits buffer [chunk, V] ({'float32' if logit == 4 else dtype})": chunk * v * logit,
        f"d-logits buffer [chunk, V] ({dtype}; the logits buffer itself when the dtypes agree)": 0
        if in_place
        else chunk * v * size,
        "fp32 dW accumulator [V, H]": v * h * 4,
        "fp32 dH [N, H]": n * h * 4,
        "per-token vectors and vocabulary-split partials": n * 4 * 16 + 4 * 4 * n,
    }
    summary = {
        "chunk_rows": chunk,
        "chunks": chunks,
        "side_stream": not in_place,
        "serial_predicted_ms": serial,
        "overlapped_predicted_ms": overlapped,
        "floor_6NHV_ms": 6 * n * h * v / rate * 1e3,
        "peak_extra_GiB": sum(live.values()) / 2**30,
        "live_buffers_GiB": {name: value / 2**30 for name, value in live.items()},
    }
    return rows, summary


def model_notes(tokens: int, hidden: int, vocab: int, dtype: str, logits_dtype: str, summary: dict) -> str:
    buffers = "; ".join(f"{name} {gib:.2f} GiB" for name, gib in summary["live_buffers_GiB"].items())
    rates = (
        f"{RATES['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s bf16 GEMM, "
        f"{RATES['tf32_gemm_flops'] / 1e12:.0f} TFLOP/s tf32 GEMM (fp32 inputs, the default), "
        f"{RATES['fp32_gemm_flops'] / 1e12:.0f} TFLOP/s fp32 FMA GEMM (fp32_matmul='ieee'), "
        f"{RATES['hbm_bytes'] / 1e12:.1f} TB/s HBM"
    )
    overlap = (
        f"with the row kernel of chunks 2..{summary['chunks']} hidden under the side stream's GEMM2/GEMM3 "
        f"(a bound, not a measurement) {summary['overlapped_predicted_ms']:.1f} ms"
        if summary["side_stream"]
        else "no side stream (the d-logits overwrite the logits buffer)"
    )
    return (
        f"Performance model (no measurement) of the CUDA path at N={tokens}, H={hidden}, V={vocab}, "
        f"{dtype}, logits_dtype={logits_dtype}, every token with loss: {summary['chunks']} chunks of "
        f"{summary['chunk_rows']} rows. Rates: {rates}; a pass takes max(FLOPs/rate, bytes/bandwidth). "
        f"Predicted forward+backward: passes in series {summary['serial_predicted_ms']:.1f} ms; {overlap} "
        f"(6NHV floor {summary['floor_6NHV_ms']:.1f} ms). Peak extra memory by accounting of live buffers "
        f"{summary['peak_extra_GiB']:.2f} GiB: {buffers}."
    )


def write_model(tokens: int, hidden: int, vocab: int, dtype: str) -> list[Path]:
    """One table per logits dtype (fp32 always; the input dtype too for 16-bit inputs)."""
    paths = []
    for logits_dtype in ("float32",) if dtype == "float32" else ("float32", dtype):
        rows, summary = performance_model(tokens, hidden, vocab, dtype, logits_dtype)
        notes = model_notes(tokens, hidden, vocab, dtype, logits_dtype, summary)
        suffix = "" if logits_dtype == "float32" else f"_{logits_dtype}_logits"
        paths.append(
            write_results(f"policy_loss_model_{dtype}{suffix}", rows, run_identity("cpu"), notes=notes)
        )
        print(markdown_table(rows))
        print(notes)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=8192 if cuda else 4096)
    parser.add_argument("--hidden", type=int, default=4096 if cuda else 576)
    parser.add_argument("--vocab", type=int, default=151936 if cuda else 49152)
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--seqs", type=int, default=4, help="sequences (Liger takes [seqs, len, H])")
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--cpu", action="store_true", help="force CPU even when CUDA is present")
    parser.add_argument(
        "--variant-timeout", type=float, default=300, help="seconds one variant's process may run"
    )
    parser.add_argument(
        "--loss-share",
        type=float,
        default=1.0,
        help="share of tokens that carry loss (alternating 64-token turns; 0.33 ~ our dialogues)",
    )
    parser.add_argument("--objective", help="duca_fast's objective (ops.objectives name; default ppo_clip)")
    parser.add_argument("--only", help="comma-separated variants to run (default: all)")
    parser.add_argument("--name", help="results file name (default: policy_loss_<device>[_dtype])")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model", action="store_true", help="print and write the performance model only")
    args = parser.parse_args()

    if args.model:
        for path in write_model(args.tokens, args.hidden, args.vocab, args.dtype):
            print(f"wrote {path}")
        return

    if args.variant:
        print(json.dumps(measure_one(args)))
        return
    device = "cuda" if cuda and not args.cpu else "cpu"
    rows = []
    variants = VARIANTS_CUDA if device == "cuda" else VARIANTS_CPU
    if args.only:
        variants = [v for v in variants if v in args.only.split(",") or v == "duca_fast"]
    for variant in variants:
        if variant == "duca_fast_bf16_logits" and args.dtype == "float32":
            continue
        # A fresh process per variant: peak memory of one cannot hide in another's freed pages.
        command = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, cwd=ROOT, timeout=args.variant_timeout
            )
        except subprocess.TimeoutExpired:
            rows.append({"variant": variant, "fwd_ms": f"timed out after {args.variant_timeout:.0f} s"})
            print(f"{variant}: timed out after {args.variant_timeout:.0f} s", flush=True)
            continue
        if result.returncode != 0:
            rows.append({"variant": variant, "fwd_ms": f"crashed: {result.stderr.strip()[-120:]}"})
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(markdown_table(rows[-1:]), flush=True)
    columns = ["variant", "fwd_ms", "fwd_peak_MiB", "fwd_bwd_ms", "fwd_bwd_peak_MiB"]
    rows = [{c: row.get(c, "") for c in columns} for row in rows]
    ours = next(r for r in rows if r["variant"] == "duca_fast")
    for row in rows:
        for key in ("fwd_bwd_ms", "fwd_bwd_peak_MiB"):
            if isinstance(row[key], float) and isinstance(ours[key], float) and ours[key] > 0:
                row[f"{key}_vs_ours"] = row[key] / ours[key]
            else:
                row[f"{key}_vs_ours"] = ""
    notes = (
        f"N={args.tokens} tokens in {args.seqs} sequences, H={args.hidden}, V={args.vocab}, {args.dtype} "
        f"on {device}; median of {args.repeats}. *_vs_ours > 1 means that variant is slower / larger."
    )
    if args.loss_share < 1.0:
        kept = int(dialogue_mask(args.tokens, args.seqs, args.loss_share, "cpu").sum())
        notes += (
            f" Multi-turn layout: alternating 64-token turns, {kept} of {args.tokens} tokens carry loss "
            "(every variant gets the same mask; ours drops the others before the lm_head GEMMs)."
        )
    if args.objective:
        notes += f" duca_fast objective: {args.objective}."
    if device == "cuda" and args.dtype == "float32":
        notes += " fp32 GEMMs on tf32 tensor cores in every variant (torch's switch set for all)."
    if device == "cuda" and any(r["variant"] == "lm_head_gemms" for r in rows):
        floor = next(r for r in rows if r["variant"] == "lm_head_gemms")
        flops = 6 * args.tokens * args.hidden * args.vocab
        if isinstance(ours["fwd_bwd_ms"], float):
            tflops = flops / ours["fwd_bwd_ms"] / 1e9
            notes += f" 6NHV = {flops / 1e12:.2f} TFLOP; ours runs at {tflops:.0f} TFLOP/s"
            if isinstance(floor["fwd_bwd_ms"], float):
                share = floor["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
                notes += f", {share:.0%} of the bare-GEMM floor's speed measured here"
            notes += "."
        for variant, logits_dtype in (("duca_fast", "float32"), ("duca_fast_bf16_logits", args.dtype)):
            if variant == "duca_fast_bf16_logits" and args.dtype == "float32":
                continue  # not run in fp32 (see the variant loop above)
            if not any(r["variant"] == variant for r in rows):
                continue
            _, summary = performance_model(args.tokens, args.hidden, args.vocab, args.dtype, logits_dtype)
            measured = next(r for r in rows if r["variant"] == variant)["fwd_bwd_ms"]
            notes += (
                f" {variant}: measured {measured if isinstance(measured, str) else f'{measured:.1f}'} ms "
                f"beside the H100 model's {summary['serial_predicted_ms']:.1f} ms in series / "
                f"{summary['overlapped_predicted_ms']:.1f} ms overlapped."
            )
    # The GPU headline is bf16; other dtypes there get their own files (fp32 = the tf32 default).
    name = args.name or (
        f"policy_loss_{device}"
        if device == "cpu" or args.dtype == "bfloat16"
        else f"policy_loss_{device}_{args.dtype}"
    )
    path = write_results(name, rows, run_identity(device), notes=notes)
    print(markdown_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
