"""What ``logits_dtype="bfloat16"`` costs in accuracy, on a real model's hidden states.

SmolLM2-135M-Instruct (bf16 weights) reads sales dialogues from the scripted environment; its final
hidden states and tied lm_head go through ``ops.fused_policy_loss`` twice, with fp32 logits (the
default) and with bf16 logits (what the lm_head GEMM writes in bf16, as a bf16 ``nn.Linear`` does).
Reported per token against the fp32-logit log-probs: |delta log-prob| (max, p99, mean), |ratio - 1|
that the rounding alone puts into an on-policy PPO ratio, |delta entropy|, and the relative error of
the hidden and lm_head gradients.

Also what ``fp32_matmul="tf32"`` (the default for float32 inputs on CUDA) costs: the model runs in
fp32, its lm_head weight is moved off the bf16 grid (as fp32 training leaves it), and the lm_head
products are emulated with both operands rounded to TF32's 10-bit mantissa (round-to-nearest and
truncation, which is what tensor cores fed raw fp32 do) and accumulated in float64, against float64
products of the unrounded operands; exact fp32 GEMMs are reported beside them.

Usage: python bench/bench_logits_precision.py [--sessions 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table, run_identity, write_results  # noqa: E402


def dialogue_token_ids(tokenizer, sessions: int) -> torch.Tensor:
    """Chat-formatted transcripts of scripted sales sessions (a fixed, canned agent)."""
    from duca_fast.env import SalesEnv, generate_scenarios

    texts = []
    for index, scenario in enumerate(generate_scenarios(sessions, seed=0)):
        env = SalesEnv(max_turns=3)
        observation = env.reset(scenario, seed=index)
        messages = [{"role": "system", "content": observation.system_prompt}]
        if observation.customer_message is not None:
            messages.append({"role": "user", "content": observation.customer_message})
        for turn in range(3):
            reply = f"Our plan fits a team like yours at {19 + 10 * turn} dollars a month. Shall I start it?"
            messages.append({"role": "assistant", "content": reply})
            result = env.step(reply)
            if result.customer_message is not None:
                messages.append({"role": "user", "content": result.customer_message})
            if result.done:
                break
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return tokenizer("\n".join(texts), return_tensors="pt").input_ids[0]


def to_tf32(values: torch.Tensor, rounding: str) -> torch.Tensor:
    """fp32 values with the low 13 of 23 mantissa bits dropped: "nearest" (ties to even) or "truncate"."""
    bits = values.float().contiguous().view(torch.int32)
    if rounding == "nearest":
        bits = bits + 0xFFF + ((bits >> 13) & 1)
    return (bits & ~0x1FFF).view(torch.float32)


def tf32_rows(model, ids: torch.Tensor, target: torch.Tensor) -> list[dict[str, object]]:
    """Per-token log-prob and gradient error of TF32 lm_head products against float64 ones."""
    with torch.no_grad():
        hidden = model.float().model(ids[None]).last_hidden_state[0, :-1].contiguous()
        weight = model.lm_head.weight.detach().float()
        # fp32 training moves the weights off the bf16 grid (bf16 values are exact in TF32): a uniform
        # offset within half a bf16 step keeps each weight's bf16 rounding and fills the low bits.
        step = torch.finfo(torch.bfloat16).eps * weight.abs()
        noise = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) - 0.5
        weight = weight + step * noise
    advantages = torch.randn(target.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact_h, exact_w = hidden.double(), weight.double()
    variants = {
        "fp32 (ieee)": None,
        "tf32, round to nearest": "nearest",
        "tf32, truncation": "truncate",
    }

    def lm_head_terms(h: torch.Tensor, w: torch.Tensor, fp32: bool):
        """log-probs, d(-sum A logp)/dh, d/dW with both products over h, W as given."""
        logits = (h.float() @ w.float().T).double() if fp32 else h @ w.T
        logp = torch.log_softmax(logits, -1)
        token_logp = logp.gather(1, target[:, None])[:, 0]
        grad_logits = logp.exp() * advantages[:, None]
        grad_logits[torch.arange(target.shape[0]), target] -= advantages
        g = grad_logits.float().double() if fp32 else grad_logits
        return token_logp, g, logits

    base_logp, base_g, _ = lm_head_terms(exact_h, exact_w, fp32=False)
    base_dh, base_dw = base_g @ exact_w, base_g.T @ exact_h
    rows = []
    for name, rounding in variants.items():
        if rounding is None:
            h, w = exact_h, exact_w
            logp, g, _ = lm_head_terms(h, w, fp32=True)
            dh = (g.float() @ weight).double()
            dw = (g.float().T @ hidden).double()
        else:
            h, w = to_tf32(hidden, rounding).double(), to_tf32(weight, rounding).double()
            logp, g, _ = lm_head_terms(h, w, fp32=False)
            g = to_tf32(g.float(), rounding).double()
            dh, dw = g @ w, g.T @ h
        delta = (logp - base_logp).abs()
        rows.append(
            {
                "lm_head products": name,
                "max_abs_dlogp": delta.max().item(),
                "p99_abs_dlogp": delta.quantile(0.99).item(),
                "mean_abs_dlogp": delta.mean().item(),
                "max_abs_ratio_minus_1": (torch.exp(delta) - 1).max().item(),
                "rel_err_grad_hidden": ((dh - base_dh).norm() / base_dh.norm()).item(),
                "rel_err_grad_weight": ((dw - base_dw).norm() / base_dw.norm()).item(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--cache", default=".cache/duca_fast", help="where the converted model is kept")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads; the model's bf16 hidden states (and so the bf16 rows) change with it",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from duca_fast import ops
    from duca_fast.rollout import load_default_model_dir

    model_dir = load_default_model_dir(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = dialogue_token_ids(tokenizer, args.sessions)
    with torch.no_grad():
        hidden = model.model(ids[None]).last_hidden_state[0, :-1].contiguous()
    target = ids[1:]
    weight = model.lm_head.weight.detach()
    advantages = torch.randn(target.shape[0], generator=torch.Generator().manual_seed(0))

    results = {}
    for logits_dtype in ("float32", "bfloat16"):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        logprobs = ops.token_logprobs(h.detach(), w.detach(), target)
        # On-policy: old log-probs are the fp32 ones, so the ratio's distance from 1 is the rounding.
        loss, metrics = ops.fused_policy_loss(
            h, w, target, advantages, logprobs.detach(), logits_dtype=logits_dtype
        )
        loss.backward()
        with torch.no_grad():
            logits = (
                (hidden @ weight.T) if logits_dtype == "bfloat16" else (hidden.float() @ weight.float().T)
            )
            logp = torch.log_softmax(logits.float(), -1)
            token_logp = logp.gather(1, target[:, None])[:, 0]
            token_entropy = -(logp.exp() * logp).sum(-1)
        results[logits_dtype] = dict(
            logp=token_logp,
            entropy=token_entropy,
            grad_h=h.grad.float(),
            grad_w=w.grad.float(),
            metrics=metrics,
        )
    base, low = results["float32"], results["bfloat16"]
    delta = (low["logp"] - base["logp"]).abs()
    rows = [
        {
            "tokens": int(target.shape[0]),
            "max_abs_dlogp": delta.max().item(),
            "p99_abs_dlogp": delta.quantile(0.99).item(),
            "mean_abs_dlogp": delta.mean().item(),
            "max_abs_ratio_minus_1": (torch.exp(delta) - 1).max().item(),
            "op_ratio_mean_bf16": low["metrics"]["ratio_mean"].item(),
            "max_abs_dentropy": (low["entropy"] - base["entropy"]).abs().max().item(),
            "rel_err_grad_hidden": ((low["grad_h"] - base["grad_h"]).norm() / base["grad_h"].norm()).item(),
            "rel_err_grad_weight": ((low["grad_w"] - base["grad_w"]).norm() / base["grad_w"].norm()).item(),
        }
    ]
    notes = (
        f"SmolLM2-135M-Instruct in bf16, {args.sessions} scripted sales dialogues "
        f"({rows[0]['tokens']} tokens), "
        "fp32-logit log-probs as the baseline; per-token log-probs and entropy recomputed from the two logit "
        "dtypes; gradients from ops.fused_policy_loss (torch path, on-policy, random advantages) with "
        "logits_dtype float32 vs bfloat16."
    )
    path = write_results("logits_precision_cpu", rows, run_identity("cpu"), notes=notes)
    print(markdown_table(rows))
    print(f"wrote {path}")

    rows = tf32_rows(model, ids, target)
    notes = (
        f"SmolLM2-135M-Instruct run in fp32, its lm_head weight moved off the bf16 grid within half a bf16 "
        f"step, {args.sessions} scripted sales dialogues ({target.shape[0]} tokens). Baseline: float64 "
        "products of the fp32 operands. TF32 rows are an emulation on CPU (operands of all three lm_head "
        "products - logits, dH, dW - rounded to a 10-bit mantissa, products accumulated in float64; cuBLAS "
        "accumulates in fp32, which the fp32 row shows is ~1e-6). Gradients of -sum(A logp), random A."
    )
    path = write_results("tf32_precision_cpu", rows, run_identity("cpu"), notes=notes)
    print(markdown_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
