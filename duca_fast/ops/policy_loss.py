"""Hidden states -> log-probs -> clipped policy loss, forward and backward, without ``[N, V]`` logits.

Per token (unmasked): ``z = (h @ W.T + b) / temperature``, ``logp = log_softmax(z)[target]``,
``r = exp(logp - old)``, ``l = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)`` (with ``dual_clip=c``
and ``A < 0``: ``l = min(l, -c A)``), times the detached TIS weight ``min(exp(old - behavior), tis_cap)``,
plus ``kl_coef * kl(logp, ref)`` minus ``entropy_coef * H(softmax(z))``; aggregated by ``loss_agg``.

The loss is a scalar, so the gradient of every token's loss with respect to its log-prob and its
entropy is known once the token's statistics are (``policy_head``). The backends use that:
- ``torch``: token chunks; per chunk one GEMM for the logits, the statistics, the analytic gradient of
  the logits, then two GEMMs for the gradients of hidden and weight. Three GEMMs in all, peak extra
  memory two ``[chunk, V]`` buffers. Gradients are computed in the forward pass and scaled in backward.
- ``triton``: on-chip logit tiles with an online logsumexp (logits never reach global memory); the
  backward kernel recomputes the tiles and writes the logit gradients of one token chunk, which two
  cuBLAS GEMMs turn into the gradients of hidden and weight.
- ``reference``: float64, materialized logits, autograd; the ground truth for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duca_fast.ops._checks import (
    ValueChecks,
    check_choice,
    check_same_device,
    check_tensor,
    select_backend,
)

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")
KL_TYPES = ("k1", "k2", "k3")
# exp() arguments are clamped here (as verl does for log-ratios) so a stale old log-prob cannot overflow.
LOG_RATIO_LIMIT = 20.0
# Default token-chunk budget for the torch path: chunk x V logits of at most this many elements.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class PolicyLossOptions:
    """Everything that shapes the per-token objective (one frozen object through autograd)."""

    clip_low: float = 0.2
    """PPO clip below 1: ratios under ``1 - clip_low`` stop pushing (for A < 0)."""
    clip_high: float = 0.2
    """PPO clip above 1 (DAPO's clip-higher uses a larger value than clip_low)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: for A < 0 the loss is capped at ``-c * A``."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to ``ref_logprobs``."""
    kl_type: str = "k3"
    """KL estimator with ``d = logp - ref``: "k1" d, "k2" d^2/2, "k3" exp(-d) + d - 1."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    temperature: float = 1.0
    """Logits are divided by this before the softmax (match the sampler's temperature)."""
    loss_agg: str = "token_mean"
    """"token_mean", "seq_mean_token_mean", "seq_mean_token_sum" or "token_sum_norm"."""
    max_tokens: int | None = None
    """Divisor of "token_sum_norm" (sequences x max length for Dr.GRPO)."""
    tis_cap: float | None = None
    """Truncated importance sampling cap on ``exp(old - behavior)``; needs ``behavior_logprobs``."""

    def __post_init__(self) -> None:
        check_choice("loss_agg", self.loss_agg, LOSS_AGGS)
        check_choice("kl_type", self.kl_type, KL_TYPES)
        for name in ("clip_low", "clip_high", "kl_coef", "entropy_coef", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"clip_low and clip_high must be >= 0, got {self.clip_low}, {self.clip_high}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1 (the lower bound is 1 - clip_low), got {self.clip_low}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.dual_clip is not None and not (math.isfinite(self.dual_clip) and self.dual_clip > 1):
            raise ValueError(f"dual_clip must be a finite number > 1, got {self.dual_clip}")
        if self.tis_cap is not None and not (math.isfinite(self.tis_cap) and self.tis_cap > 0):
            raise ValueError(f"tis_cap must be a finite number > 0, got {self.tis_cap}")
        if self.loss_agg == "token_sum_norm":
            if self.max_tokens is None:
                raise ValueError("loss_agg='token_sum_norm' needs max_tokens (sequences x max length)")
            if (
                isinstance(self.max_tokens, bool)
                or not isinstance(self.max_tokens, int)
                or self.max_tokens < 1
            ):
                raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")


@dataclass(frozen=True)
class TokenInputs:
    """Validated per-token tensors (compute dtype) that the objective needs besides the log-probs."""

    target: torch.Tensor
    """int64 [N]; masked tokens point at 0 so they can be gathered safely."""
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    behavior_logprobs: torch.Tensor | None
    token_weights: torch.Tensor
    """Aggregation weight of each token: the loss is ``sum(token_weights * l)``; 0 when masked."""
    active: torch.Tensor
    """bool [N]: the token counts (mask)."""


@dataclass(frozen=True)
class HeadOutput:
    """Per-token objective and its derivatives, from ``policy_head``."""

    loss: torch.Tensor
    """Scalar: ``sum(token_weights * l)``."""
    grad_logprobs: torch.Tensor
    """[N] d loss / d logp."""
    grad_entropy: torch.Tensor | None
    """[N] d loss / d H, None when entropy_coef is 0."""
    metrics: dict[str, torch.Tensor]


def _check_vector(name: str, value: torch.Tensor | None, num_tokens: int, kind: str) -> None:
    if value is None:
        return
    check_tensor(name, value, ndims=(1,), kind=kind)
    if value.shape[0] != num_tokens:
        raise ValueError(f"{name} has {value.shape[0]} entries but target has {num_tokens} tokens")


def prepare_token_inputs(
    target: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    *,
    vocab_size: int,
    mask: torch.Tensor | None,
    seq_ids: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    behavior_logprobs: torch.Tensor | None,
    options: PolicyLossOptions,
    compute_dtype: torch.dtype,
) -> TokenInputs:
    """Validate the per-token arguments (names in every message) and build the aggregation weights."""
    check_tensor("target", target, ndims=(1,), kind="int")
    num_tokens = target.shape[0]
    _check_vector("advantages", advantages, num_tokens, "float")
    _check_vector("old_logprobs", old_logprobs, num_tokens, "float")
    _check_vector("ref_logprobs", ref_logprobs, num_tokens, "float")
    _check_vector("behavior_logprobs", behavior_logprobs, num_tokens, "float")
    _check_vector("seq_ids", seq_ids, num_tokens, "int")
    if mask is not None:
        check_tensor("mask", mask, ndims=(1,), kind="any")
        if mask.shape[0] != num_tokens:
            raise ValueError(f"mask has {mask.shape[0]} entries but target has {num_tokens} tokens")
    if options.kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if options.tis_cap is not None and behavior_logprobs is None:
        raise ValueError("tis_cap needs behavior_logprobs (the engine's sampler log-probs)")
    if options.loss_agg.startswith("seq_") and seq_ids is None:
        raise ValueError(f"loss_agg={options.loss_agg!r} needs seq_ids (the sequence of each token)")

    active = torch.ones(num_tokens, dtype=torch.bool, device=target.device) if mask is None else mask.bool()
    checks = ValueChecks()
    checks.forbid(
        active & ((target < 0) | (target >= vocab_size)),
        lambda i: f"target[{i}] = {int(target[i])} is outside [0, {vocab_size}) (vocabulary of weight)",
    )
    for name, values in (
        ("advantages", advantages),
        ("old_logprobs", old_logprobs),
        ("ref_logprobs", ref_logprobs),
        ("behavior_logprobs", behavior_logprobs),
    ):
        if values is not None:
            checks.forbid(
                active & ~torch.isfinite(values),
                lambda i, name=name, values=values: f"{name}[{i}] = {float(values[i])} is not finite",
            )
    if seq_ids is not None:
        checks.forbid(seq_ids < 0, lambda i: f"seq_ids[{i}] = {int(seq_ids[i])} must be >= 0")
    checks.raise_if_failed()

    def cast(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        return torch.where(
            active, values.to(compute_dtype), torch.zeros((), dtype=compute_dtype, device=values.device)
        )

    weights = active.to(compute_dtype)
    if options.loss_agg == "token_mean":
        weights = weights / weights.sum().clamp_min(1.0)
    elif options.loss_agg == "token_sum_norm":
        weights = weights / options.max_tokens
    else:
        seq = seq_ids.long()
        num_seqs = int(seq.max().item()) + 1 if num_tokens else 0
        counts = weights.new_zeros(num_seqs).index_add_(0, seq, weights)
        num_nonempty = (counts > 0).sum().clamp_min(1).to(compute_dtype)
        if options.loss_agg == "seq_mean_token_mean":
            weights = weights / (counts[seq].clamp_min(1.0) * num_nonempty)
        else:
            weights = weights / num_nonempty
    return TokenInputs(
        target=torch.where(active, target.long(), torch.zeros((), dtype=torch.long, device=target.device)),
        advantages=cast(advantages),
        old_logprobs=cast(old_logprobs),
        ref_logprobs=cast(ref_logprobs),
        behavior_logprobs=cast(behavior_logprobs),
        token_weights=weights,
        active=active,
    )


def _masked_mean(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    count = active.sum().clamp_min(1)
    return (
        torch.where(active, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum() / count
    )


@torch.no_grad()
def policy_head(
    logprobs: torch.Tensor, entropy: torch.Tensor, inputs: TokenInputs, options: PolicyLossOptions
) -> HeadOutput:
    """Per-token objective, its analytic derivatives w.r.t. logp and H, and the diagnostics."""
    advantages = inputs.advantages
    old = inputs.old_logprobs if inputs.old_logprobs is not None else logprobs
    log_ratio = logprobs - old
    ratio_live = (log_ratio >= -LOG_RATIO_LIMIT) & (log_ratio <= LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - options.clip_low, 1.0 + options.clip_high)
    is_clipped = clipped > unclipped
    pg_loss = torch.maximum(unclipped, clipped)
    d_pg = torch.where(is_clipped | ~ratio_live, torch.zeros_like(ratio), -advantages * ratio)
    metrics: dict[str, torch.Tensor] = {}
    active = inputs.active
    if options.dual_clip is not None:
        cap = -options.dual_clip * advantages
        dual = (advantages < 0) & (pg_loss > cap)
        pg_loss = torch.where(dual, cap, pg_loss)
        d_pg = torch.where(dual, torch.zeros_like(d_pg), d_pg)
        metrics["dual_clip_frac"] = _masked_mean(dual.to(ratio.dtype), active)
    if inputs.behavior_logprobs is not None:
        # The training/inference mismatch: trainer log-probs vs the engine's sampler log-probs.
        metrics["behavior_logprob_gap"] = _masked_mean((logprobs - inputs.behavior_logprobs).abs(), active)
    if inputs.behavior_logprobs is not None and options.tis_cap is not None:
        raw_weight = torch.exp((old - inputs.behavior_logprobs).clamp(max=LOG_RATIO_LIMIT))
        tis_weight = raw_weight.clamp(max=options.tis_cap)
        pg_loss = pg_loss * tis_weight
        d_pg = d_pg * tis_weight
        metrics["tis_frac_capped"] = _masked_mean((raw_weight > options.tis_cap).to(ratio.dtype), active)
    per_token = pg_loss
    d_logp = d_pg
    if inputs.ref_logprobs is not None:
        kl, d_kl = _kl(logprobs - inputs.ref_logprobs, options.kl_type)
        metrics["kl_ref"] = _masked_mean(kl, active)
        if options.kl_coef != 0:
            per_token = per_token + options.kl_coef * kl
            d_logp = d_logp + options.kl_coef * d_kl
    if options.entropy_coef != 0:
        per_token = per_token - options.entropy_coef * entropy
    weights = inputs.token_weights
    loss = torch.where(active, weights * per_token, torch.zeros_like(per_token)).sum()
    grad_logprobs = torch.where(active, weights * d_logp, torch.zeros_like(d_logp))
    grad_entropy = -options.entropy_coef * weights if options.entropy_coef != 0 else None

    dtype = ratio.dtype
    metrics["clip_frac_low"] = _masked_mean((is_clipped & (advantages < 0)).to(dtype), active)
    metrics["clip_frac_high"] = _masked_mean((is_clipped & (advantages > 0)).to(dtype), active)
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    # k3 estimate of KL(old || current) from samples of the old policy.
    metrics["approx_kl"] = _masked_mean(
        ratio - 1.0 - log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT), active
    )
    metrics["ratio_mean"] = _masked_mean(ratio, active)
    metrics["entropy"] = _masked_mean(entropy, active)
    metrics["pg_loss"] = torch.where(active, weights * pg_loss, torch.zeros_like(pg_loss)).sum()
    return HeadOutput(loss, grad_logprobs, grad_entropy, {k: v.float() for k, v in metrics.items()})


def _kl(diff: torch.Tensor, kl_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """KL estimate and its derivative w.r.t. logp, with ``diff = logp - ref``."""
    if kl_type == "k1":
        return diff, torch.ones_like(diff)
    if kl_type == "k2":
        return 0.5 * diff * diff, diff
    exp_neg = torch.exp((-diff).clamp(max=LOG_RATIO_LIMIT))
    live = -diff <= LOG_RATIO_LIMIT
    return exp_neg + diff - 1.0, 1.0 - torch.where(live, exp_neg, torch.zeros_like(exp_neg))


# ---------------------------------------------------------------------------------------------------
# torch chunked path


def default_chunk_size(num_tokens: int, vocab_size: int) -> int:
    return max(1, min(num_tokens, CHUNK_ELEMENTS // max(vocab_size, 1)))


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """``(h @ W.T + b) / temperature`` in float32 (float64 for float64 inputs), one chunk."""
    logits = hidden @ weight.T
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = logits.to(compute)
    if bias is not None:
        logits = logits + bias.to(compute)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _chunk_stats(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-sum-exp, target log-prob, entropy and the probabilities of one chunk of logits.

    One extra ``[chunk, V]`` buffer (the probabilities) and no hidden temporaries: ``logsumexp`` and
    ``(p * z).sum(-1)`` would each allocate another one (measured: 627 -> 390 MiB peak at N=4096,
    V=49152 with the default chunk).
    """
    row_max = logits.max(dim=-1, keepdim=True).values
    probs = torch.sub(logits, row_max).exp_()
    sum_exp = probs.sum(dim=-1, keepdim=True)
    probs.div_(sum_exp)
    lse = (row_max + sum_exp.log()).squeeze(-1)
    logprobs = logits.gather(1, target[:, None])[:, 0] - lse
    # Entropy = lse - sum(p z); a batched dot product needs no [chunk, V] temporary.
    entropy = lse - torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).reshape(-1)
    return lse, logprobs, entropy, probs


def _grad_logits_(
    logits: torch.Tensor,
    probs: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """d loss / d (h @ W.T + b) of one chunk, written over ``probs``.

    ``dlogp/dz = onehot - p`` and ``dH/dz = -p (z - lse + H)``; the 1/temperature of ``z`` comes last.
    """
    if grad_entropy is None:
        grad = probs.mul_(-grad_logprobs[:, None])
    else:
        centered = logits.sub_((lse - entropy)[:, None])
        grad = centered.mul_(grad_entropy[:, None]).add_(grad_logprobs[:, None]).mul_(probs).neg_()
    grad.scatter_add_(1, target[:, None], grad_logprobs[:, None].to(grad.dtype))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


def _accumulate_param_grads(
    grad_logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: slice,
    grads: dict[str, torch.Tensor | None],
) -> None:
    if grads["hidden"] is not None:
        grads["hidden"][rows] = (grad_logits.to(weight.dtype) @ weight).to(grads["hidden"].dtype)
    if grads["weight"] is not None:
        # fp32 (or fp64) accumulation across chunks whatever the input dtype.
        grads["weight"].addmm_(grad_logits.T, hidden[rows].to(grad_logits.dtype))
    if grads["bias"] is not None:
        grads["bias"].add_(grad_logits.sum(0))


def _new_grads(hidden, weight, bias, needs: tuple[bool, bool, bool], compute: torch.dtype) -> dict:
    return {
        "hidden": torch.empty_like(hidden, dtype=compute) if needs[0] else None,
        "weight": torch.zeros_like(weight, dtype=compute) if needs[1] else None,
        "bias": torch.zeros_like(bias, dtype=compute) if bias is not None and needs[2] else None,
    }


def fused_loss_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inputs: TokenInputs,
    options: PolicyLossOptions,
    needs: tuple[bool, bool, bool],
    chunk_size: int,
) -> tuple[HeadOutput, torch.Tensor, torch.Tensor, dict]:
    """One pass over token chunks: statistics, objective, and (when needed) the parameter gradients."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    num_tokens = hidden.shape[0]
    logprobs = hidden.new_empty(num_tokens, dtype=compute)
    entropy = hidden.new_empty(num_tokens, dtype=compute)
    grads = _new_grads(hidden, weight, bias, needs, compute)
    want_grads = any(g is not None for g in grads.values())
    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, num_tokens))
        logits = _chunk_logits(hidden[rows], weight, bias, options.temperature)
        lse, logprobs[rows], entropy[rows], probs = _chunk_stats(logits, inputs.target[rows])
        if not want_grads:
            continue
        chunk_inputs = _slice_inputs(inputs, rows)
        head = policy_head(logprobs[rows], entropy[rows], chunk_inputs, options)
        grad_logits = _grad_logits_(
            logits,
            probs,
            inputs.target[rows],
            lse,
            entropy[rows],
            head.grad_logprobs,
            head.grad_entropy,
            options.temperature,
        )
        del logits
        _accumulate_param_grads(grad_logits, hidden, weight, rows, grads)
    head = policy_head(logprobs, entropy, inputs, options)
    return head, logprobs, entropy, grads


def _slice_inputs(inputs: TokenInputs, rows: slice) -> TokenInputs:
    def cut(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[rows]

    return TokenInputs(
        target=inputs.target[rows],
        advantages=inputs.advantages[rows],
        old_logprobs=cut(inputs.old_logprobs),
        ref_logprobs=cut(inputs.ref_logprobs),
        behavior_logprobs=cut(inputs.behavior_logprobs),
        token_weights=inputs.token_weights[rows],
        active=inputs.active[rows],
    )


def logprob_stats_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    temperature: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-sum-exp, target log-prob and entropy of every token, chunk by chunk."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    num_tokens = hidden.shape[0]
    out = [hidden.new_empty(num_tokens, dtype=compute) for _ in range(3)]
    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, num_tokens))
        logits = _chunk_logits(hidden[rows], weight, bias, temperature)
        lse, logprobs, entropy, _ = _chunk_stats(logits, target[rows])
        out[0][rows], out[1][rows], out[2][rows] = lse, logprobs, entropy
    return out[0], out[1], out[2]


def logprob_grads_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    needs: tuple[bool, bool, bool],
    chunk_size: int,
) -> dict:
    """Backward of ``logprob_stats_torch``: recompute each chunk's logits, then the gradients."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grads = _new_grads(hidden, weight, bias, needs, compute)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, hidden.shape[0]))
        logits = _chunk_logits(hidden[rows], weight, bias, temperature)
        probs = torch.sub(logits, lse[rows, None]).exp_()
        grad_logits = _grad_logits_(
            logits,
            probs,
            target[rows],
            lse[rows],
            entropy[rows],
            grad_logprobs[rows].to(compute),
            None if grad_entropy is None else grad_entropy[rows].to(compute),
            temperature,
        )
        _accumulate_param_grads(grad_logits, hidden, weight, rows, grads)
    return grads


# ---------------------------------------------------------------------------------------------------
# autograd


class _FusedPolicyLoss(torch.autograd.Function):
    """Loss from hidden states; gradients computed in the forward pass, scaled by grad_output later."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, inputs, options, backend, chunk_size, needs, metrics_out):
        if backend == "triton":
            from duca_fast.ops.policy_loss_triton import fused_loss_triton

            head, _, _, grads = fused_loss_triton(hidden, weight, bias, inputs, options, needs, chunk_size)
        else:
            head, _, _, grads = fused_loss_torch(hidden, weight, bias, inputs, options, needs, chunk_size)
        metrics_out.update(head.metrics)
        ctx.save_for_backward(grads["hidden"], grads["weight"], grads["bias"])
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return head.loss.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        out = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            out.append(None if grad is None else (grad * grad_loss.to(grad.dtype)).to(dtype))
        return (*out, None, None, None, None, None, None)


class _TokenLogprobs(torch.autograd.Function):
    """Log-probs and entropies from hidden states; backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, temperature, backend, chunk_size):
        if backend == "triton":
            from duca_fast.ops.policy_loss_triton import logprob_stats_triton

            lse, logprobs, entropy = logprob_stats_triton(hidden, weight, bias, target, temperature)
        else:
            lse, logprobs, entropy = logprob_stats_torch(
                hidden, weight, bias, target, temperature, chunk_size
            )
        ctx.save_for_backward(hidden, weight, bias, target, lse, entropy)
        ctx.config = (temperature, backend, chunk_size)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, target, lse, entropy = ctx.saved_tensors
        temperature, backend, chunk_size = ctx.config
        needs = tuple(ctx.needs_input_grad[:3])
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        args = (hidden, weight, bias, target, lse, entropy, grad_logprobs, grad_entropy, temperature, needs)
        if backend == "triton":
            from duca_fast.ops.policy_loss_triton import logprob_grads_triton

            grads = logprob_grads_triton(*args)
        else:
            grads = logprob_grads_torch(*args, chunk_size)
        out = [
            None if grads[name] is None else grads[name].to(tensor.dtype)
            for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias))
        ]
        return (*out, None, None, None, None)


class _LogitsPolicyLoss(torch.autograd.Function):
    """Loss from given logits; backward writes d loss / d logits in one pass over them."""

    @staticmethod
    def forward(ctx, logits, inputs, options, backend, chunk_size, metrics_out):
        if backend == "triton":
            from duca_fast.ops.policy_loss_triton import logits_stats_triton

            lse, logprobs, entropy = logits_stats_triton(logits, inputs.target, options.temperature)
        else:
            lse, logprobs, entropy = _logits_stats_torch(
                logits, inputs.target, options.temperature, chunk_size
            )
        head = policy_head(logprobs, entropy, inputs, options)
        metrics_out.update(head.metrics)
        ctx.save_for_backward(logits, inputs.target, lse, entropy, head.grad_logprobs, head.grad_entropy)
        ctx.config = (options.temperature, backend, chunk_size)
        return head.loss.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse, entropy, grad_logprobs, grad_entropy = ctx.saved_tensors
        temperature, backend, chunk_size = ctx.config
        grad_logprobs = grad_logprobs * grad_loss.to(grad_logprobs.dtype)
        if grad_entropy is not None:
            grad_entropy = grad_entropy * grad_loss.to(grad_entropy.dtype)
        if backend == "triton":
            from duca_fast.ops.policy_loss_triton import logits_grad_triton

            grad = logits_grad_triton(logits, target, lse, entropy, grad_logprobs, grad_entropy, temperature)
        else:
            grad = torch.empty_like(logits)
            for start in range(0, logits.shape[0], chunk_size):
                rows = slice(start, min(start + chunk_size, logits.shape[0]))
                chunk = logits[rows].to(lse.dtype) / temperature
                probs = torch.sub(chunk, lse[rows, None]).exp_()
                grad[rows] = _grad_logits_(
                    chunk,
                    probs,
                    target[rows],
                    lse[rows],
                    entropy[rows],
                    grad_logprobs[rows],
                    None if grad_entropy is None else grad_entropy[rows],
                    temperature,
                ).to(logits.dtype)
        return grad, None, None, None, None, None


def _logits_stats_torch(
    logits: torch.Tensor, target: torch.Tensor, temperature: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    num_tokens = logits.shape[0]
    out = [logits.new_empty(num_tokens, dtype=compute) for _ in range(3)]
    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, num_tokens))
        lse, logprobs, entropy, _ = _chunk_stats(logits[rows].to(compute) / temperature, target[rows])
        out[0][rows], out[1][rows], out[2][rows] = lse, logprobs, entropy
    return out[0], out[1], out[2]


# ---------------------------------------------------------------------------------------------------
# public API


def _check_projection(hidden, weight, bias) -> None:
    check_tensor("hidden", hidden, ndims=(2,), kind="float")
    check_tensor("weight", weight, ndims=(2,), kind="float")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden width {hidden.shape[1]} != weight width {weight.shape[1]} "
            f"(weight must be the lm_head [V, H], got {tuple(weight.shape)})"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (0 rows)")
    if bias is not None:
        check_tensor("bias", bias, ndims=(1,), kind="float")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} rows")


def _choose_backend(backend: str, tensor: torch.Tensor) -> str:
    chosen = select_backend(backend, tensor.device)
    # The kernels take 16/32-bit floats; float64 on CUDA (tests, debugging) goes through torch.
    if backend == "auto" and chosen == "triton" and tensor.dtype == torch.float64:
        return "torch"
    return chosen


def _check_chunk_size(chunk_size: int | None, num_tokens: int, vocab_size: int) -> int:
    if chunk_size is None:
        return default_chunk_size(num_tokens, vocab_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size


def _prepare_loss_call(
    rows_input: tuple[str, torch.Tensor],
    vocab_size: int,
    projection: dict[str, torch.Tensor | None],
    target: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    *,
    mask: torch.Tensor | None,
    seq_ids: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    behavior_logprobs: torch.Tensor | None,
    options: PolicyLossOptions,
) -> TokenInputs:
    """Checks shared by the hidden-state and the logits entry points, then the per-token inputs."""
    name, values = rows_input
    check_tensor("target", target, ndims=(1,), kind="int")
    if values.shape[0] != target.shape[0]:
        raise ValueError(f"{name} has {values.shape[0]} rows but target has {target.shape[0]} tokens")
    check_same_device(
        {
            name: values,
            **projection,
            "target": target,
            "advantages": advantages,
            "old_logprobs": old_logprobs,
            "mask": mask,
            "seq_ids": seq_ids,
            "ref_logprobs": ref_logprobs,
            "behavior_logprobs": behavior_logprobs,
        }
    )
    return prepare_token_inputs(
        target,
        advantages,
        old_logprobs,
        vocab_size=vocab_size,
        mask=mask,
        seq_ids=seq_ids,
        ref_logprobs=ref_logprobs,
        behavior_logprobs=behavior_logprobs,
        options=options,
        compute_dtype=torch.float64 if values.dtype == torch.float64 else torch.float32,
    )


def fused_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    behavior_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token_mean",
    max_tokens: int | None = None,
    tis_cap: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss straight from hidden states and the lm_head, never holding ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` final hidden states of the packed tokens whose next token is ``target``.
        weight: ``[V, H]`` lm_head weight (same dtype as hidden). Gradients flow to hidden, weight, bias.
        target: ``[N]`` int token ids.
        advantages: ``[N]`` per-token advantages (multi-turn needs them per token).
        old_logprobs: ``[N]`` log-probs under the policy that generated the data; None = on-policy.
        bias: optional ``[V]`` lm_head bias.
        mask: optional ``[N]`` bool, False = no loss (targets there may be anything, e.g. -100).
        seq_ids: ``[N]`` int sequence of each token (needed by the seq_* aggregations).
        ref_logprobs: ``[N]`` reference-model log-probs for the KL penalty (and the kl_ref metric).
        behavior_logprobs: ``[N]`` the engine's sampler log-probs, for truncated importance sampling.
        clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, temperature, loss_agg,
        max_tokens, tis_cap: see ``PolicyLossOptions``.
        chunk_size: tokens per chunk on the torch path (default: chunk x V <= 2^24 elements).
        backend: "auto" (CUDA -> triton, else torch), "torch", "triton" or "reference".

    Returns:
        ``(loss, metrics)``: scalar float32 loss (float64 for float64 inputs) and detached scalar
        diagnostics: clip_frac, clip_frac_low, clip_frac_high, approx_kl, ratio_mean, entropy, pg_loss,
        plus kl_ref (with ref_logprobs), tis_frac_capped (with tis_cap), dual_clip_frac (with dual_clip),
        behavior_logprob_gap (mean |logp - behavior_logprobs|, with behavior_logprobs).
    """
    options = PolicyLossOptions(
        clip_low,
        clip_high,
        dual_clip,
        kl_coef,
        kl_type,
        entropy_coef,
        temperature,
        loss_agg,
        max_tokens,
        tis_cap,
    )
    _check_projection(hidden, weight, bias)
    inputs = _prepare_loss_call(
        ("hidden", hidden),
        weight.shape[0],
        {"weight": weight, "bias": bias},
        target,
        advantages,
        old_logprobs,
        mask=mask,
        seq_ids=seq_ids,
        ref_logprobs=ref_logprobs,
        behavior_logprobs=behavior_logprobs,
        options=options,
    )
    chunk = _check_chunk_size(chunk_size, hidden.shape[0], weight.shape[0])
    chosen = _choose_backend(backend, hidden)
    if chosen == "reference":
        return policy_loss_reference(hidden, weight, bias, inputs, options)
    metrics: dict[str, torch.Tensor] = {}
    # Grad mode is off inside Function.forward, so whether gradients are wanted is decided here.
    needs = tuple(
        torch.is_grad_enabled() and tensor is not None and tensor.requires_grad
        for tensor in (hidden, weight, bias)
    )
    loss = _FusedPolicyLoss.apply(hidden, weight, bias, inputs, options, chosen, chunk, needs, metrics)
    return loss, metrics


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax((h @ W.T + b) / temperature)[target]`` per token, ``[N]`` float32, differentiable.

    With ``return_entropy=True`` also the entropy of each token's tempered distribution. Never holds
    ``[N, V]`` logits: forward keeps the log-sum-exp, backward recomputes the logits chunk by chunk.
    """
    _check_projection(hidden, weight, bias)
    check_tensor("target", target, ndims=(1,), kind="int")
    if hidden.shape[0] != target.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but target has {target.shape[0]} tokens")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    check_same_device({"hidden": hidden, "weight": weight, "target": target, "bias": bias})
    checks = ValueChecks()
    vocab = weight.shape[0]
    checks.forbid(
        (target < 0) | (target >= vocab),
        lambda i: f"target[{i}] = {int(target[i])} is outside [0, {vocab}) (vocabulary of weight)",
    )
    checks.raise_if_failed()
    chunk = _check_chunk_size(chunk_size, hidden.shape[0], vocab)
    chosen = _choose_backend(backend, hidden)
    if chosen == "reference":
        logprobs, entropy = _reference_logprobs(hidden, weight, bias, target.long(), temperature)
    else:
        logprobs, entropy = _TokenLogprobs.apply(
            hidden, weight, bias, target.long(), temperature, chosen, chunk
        )
    return (logprobs, entropy) if return_entropy else logprobs


def policy_loss_from_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    behavior_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token_mean",
    max_tokens: int | None = None,
    tis_cap: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fused_policy_loss`` for stacks that already hold ``[N, V]`` logits; gradient flows to logits.

    One pass over the logits forward (log-sum-exp, target, entropy) and one backward (writes the
    gradient); no ``log_softmax`` copy of the logits is made.
    """
    options = PolicyLossOptions(
        clip_low,
        clip_high,
        dual_clip,
        kl_coef,
        kl_type,
        entropy_coef,
        temperature,
        loss_agg,
        max_tokens,
        tis_cap,
    )
    check_tensor("logits", logits, ndims=(2,), kind="float")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary (0 columns)")
    inputs = _prepare_loss_call(
        ("logits", logits),
        logits.shape[1],
        {},
        target,
        advantages,
        old_logprobs,
        mask=mask,
        seq_ids=seq_ids,
        ref_logprobs=ref_logprobs,
        behavior_logprobs=behavior_logprobs,
        options=options,
    )
    chunk = _check_chunk_size(chunk_size, logits.shape[0], logits.shape[1])
    chosen = _choose_backend(backend, logits)
    if chosen == "reference":
        return _reference_loss_from_logits(logits.double() / temperature, inputs, options)
    metrics: dict[str, torch.Tensor] = {}
    loss = _LogitsPolicyLoss.apply(logits, inputs, options, chosen, chunk, metrics)
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# float64 reference: materialized logits, autograd, the formulas as written in DESIGN.md


def _reference_logprobs(hidden, weight, bias, target, temperature):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(1, target[:, None])[:, 0], entropy


def policy_loss_reference(hidden, weight, bias, inputs: TokenInputs, options: PolicyLossOptions):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return _reference_loss_from_logits(logits / options.temperature, inputs, options)


def _reference_loss_from_logits(logits: torch.Tensor, inputs: TokenInputs, options: PolicyLossOptions):
    log_probs = torch.log_softmax(logits, dim=-1)
    logprobs = log_probs.gather(1, inputs.target[:, None])[:, 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    advantages = inputs.advantages.double()
    old = logprobs.detach() if inputs.old_logprobs is None else inputs.old_logprobs.double()
    ratio = torch.exp((logprobs - old).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    pg = torch.maximum(
        -advantages * ratio, -advantages * ratio.clamp(1 - options.clip_low, 1 + options.clip_high)
    )
    if options.dual_clip is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -options.dual_clip * advantages), pg)
    if options.tis_cap is not None:
        pg = pg * torch.exp((old - inputs.behavior_logprobs.double()).clamp(max=LOG_RATIO_LIMIT)).clamp(
            max=options.tis_cap
        )
    loss = pg
    if options.kl_coef != 0:
        d = logprobs - inputs.ref_logprobs.double()
        kl = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp((-d).clamp(max=LOG_RATIO_LIMIT)) + d - 1}[
            options.kl_type
        ]
        loss = loss + options.kl_coef * kl
    loss = loss - options.entropy_coef * entropy
    active = inputs.active
    total = torch.where(active, inputs.token_weights.double() * loss, torch.zeros_like(loss)).sum()
    metrics = {"entropy": _masked_mean(entropy.detach(), active).float()}
    return total, metrics
