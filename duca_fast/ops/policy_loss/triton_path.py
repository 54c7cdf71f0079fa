"""Triton kernels for the policy loss: log-prob statistics from hidden states without logits in HBM.

- ``_logprob_fwd_kernel``: per block of tokens, loops over vocabulary blocks; each ``[BLOCK_N, BLOCK_V]``
  logit tile is a ``tl.dot`` over the hidden dimension kept on chip, folded into an online
  log-sum-exp, the target logit and the entropy accumulator. Writes three fp32 numbers per token.
- ``_logprob_grad_logits_kernel``: recomputes the tiles of one token chunk and writes d loss / d logits
  for that chunk (``[chunk, V]``, the op's only vocabulary-sized buffer); cuBLAS turns it into the
  gradients of hidden and weight.
- ``_logits_fwd_kernel`` / ``_logits_grad_kernel``: the same statistics and gradient when the caller
  already holds logits (one read forward, one read and one write backward: HBM-bound).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from duca_fast.ops.policy_loss.head import policy_head
from duca_fast.ops.policy_loss.options import HeadOutput, PolicyLossOptions, TokenInputs

# Bytes of the per-chunk logit-gradient buffer in backward: bounds peak extra memory independent of N.
GRAD_CHUNK_BYTES = 1 << 29


def _blocks(dtype: torch.dtype) -> dict[str, int]:
    """Tile shape. The interpreter runs numpy per program: small tiles keep CPU tests fast."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16)
    # Untuned starting point for Hopper: 64 x 128 tiles, 64-wide K steps (bf16 operands fit in SMEM).
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64 if dtype != torch.float32 else 32)


def _logits_blocks() -> dict[str, int]:
    """Tile shape of the logits-level kernels (memory-bound: wide vocabulary tiles, few rows)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BLOCK_N=16, BLOCK_V=32)
    return dict(BLOCK_N=16, BLOCK_V=512)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products; TF32 would cost ~1e-3 relative error in the logits.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _logit_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    row_mask,
    cols,
    col_mask,
    hidden_dim,
    stride_hidden_n,
    stride_hidden_h,
    stride_weight_v,
    stride_weight_h,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``(h[rows] @ W[cols].T + b[cols]) / temperature`` as an fp32 tile, accumulated on chip."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h_start in range(0, hidden_dim, BLOCK_H):
        h_offsets = h_start + tl.arange(0, BLOCK_H)
        h_mask = h_offsets < hidden_dim
        h_tile = tl.load(
            hidden_ptr + rows[:, None] * stride_hidden_n + h_offsets[None, :] * stride_hidden_h,
            mask=row_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        w_tile = tl.load(
            weight_ptr + cols[None, :] * stride_weight_v + h_offsets[:, None] * stride_weight_h,
            mask=col_mask[None, :] & h_mask[:, None],
            other=0.0,
        )
        acc = tl.dot(h_tile, w_tile, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temperature


@triton.jit
def _grad_tile(
    z, cols, col_mask, targets, lse, entropy, grad_logp, grad_entropy, HAS_ENTROPY_GRAD: tl.constexpr
):
    """d loss / d z of a tile: ``g_logp (onehot - p) - g_H p (z - lse + H)``; 0 outside the vocabulary."""
    z_safe = tl.where(col_mask[None, :], z, 0.0)
    probs = tl.where(col_mask[None, :], tl.exp(z_safe - lse[:, None]), 0.0)
    coefficient = grad_logp[:, None] + tl.zeros_like(z_safe)
    if HAS_ENTROPY_GRAD:
        coefficient += grad_entropy[:, None] * (z_safe - lse[:, None] + entropy[:, None])
    grad = -probs * coefficient
    return grad + tl.where(cols[None, :] == targets[:, None], grad_logp[:, None], 0.0)


@triton.jit
def _online_update(z, cols, col_mask, targets, running_max, sum_exp, weighted, target_logit):
    """Fold one ``[BLOCK_N, BLOCK_V]`` logit tile into the running statistics of its rows.

    ``weighted`` is ``sum exp(z - max) * z``, rescaled like ``sum_exp``: entropy = lse - weighted / sum_exp.
    """
    z_masked = tl.where(col_mask[None, :], z, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(z_masked, axis=1))
    rescale = tl.exp(running_max - new_max)
    exps = tl.exp(z_masked - new_max[:, None])
    sum_exp = sum_exp * rescale + tl.sum(exps, axis=1)
    weighted = weighted * rescale + tl.sum(exps * tl.where(col_mask[None, :], z, 0.0), axis=1)
    target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    return new_max, sum_exp, weighted, target_logit


@triton.jit
def _store_statistics(
    lse_ptr, logprob_ptr, entropy_ptr, rows, row_mask, running_max, sum_exp, weighted, target_logit
):
    lse = running_max + tl.log(sum_exp)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logprob_ptr + rows, target_logit - lse, mask=row_mask)
    tl.store(entropy_ptr + rows, lse - weighted / sum_exp, mask=row_mask)


@triton.jit
def _logprob_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    target_ptr,
    lse_ptr,
    logprob_ptr,
    entropy_ptr,
    num_tokens,
    vocab_size,
    hidden_dim,
    stride_hidden_n,
    stride_hidden_h,
    stride_weight_v,
    stride_weight_h,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online log-sum-exp, target logit and entropy over vocabulary blocks; logits stay on chip."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < num_tokens
    targets = tl.load(target_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_N], tl.float32)
    weighted = tl.zeros([BLOCK_N], tl.float32)
    target_logit = tl.zeros([BLOCK_N], tl.float32)
    for v_start in range(0, vocab_size, BLOCK_V):
        cols = (v_start + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < vocab_size
        z = _logit_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            rows,
            row_mask,
            cols,
            col_mask,
            hidden_dim,
            stride_hidden_n,
            stride_hidden_h,
            stride_weight_v,
            stride_weight_h,
            inv_temperature,
            HAS_BIAS,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            DOT_PRECISION,
        )
        running_max, sum_exp, weighted, target_logit = _online_update(
            z, cols, col_mask, targets, running_max, sum_exp, weighted, target_logit
        )
    _store_statistics(
        lse_ptr, logprob_ptr, entropy_ptr, rows, row_mask, running_max, sum_exp, weighted, target_logit
    )


@triton.jit
def _logprob_grad_logits_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    target_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    num_tokens,
    vocab_size,
    hidden_dim,
    stride_hidden_n,
    stride_hidden_h,
    stride_weight_v,
    stride_weight_h,
    stride_grad_n,
    stride_grad_v,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Recompute one logit tile and write d loss / d (h @ W.T + b) for it (the chunk's buffer)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_mask = rows < num_tokens
    col_mask = cols < vocab_size
    z = _logit_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        rows,
        row_mask,
        cols,
        col_mask,
        hidden_dim,
        stride_hidden_n,
        stride_hidden_h,
        stride_weight_v,
        stride_weight_h,
        inv_temperature,
        HAS_BIAS,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
        DOT_PRECISION,
    )
    targets = tl.load(target_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
    grad_logp = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0)
    grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)
    grad = _grad_tile(z, cols, col_mask, targets, lse, entropy, grad_logp, grad_entropy, HAS_ENTROPY_GRAD)
    grad = grad * inv_temperature
    tl.store(
        grad_logits_ptr + rows[:, None] * stride_grad_n + cols[None, :] * stride_grad_v,
        grad.to(grad_logits_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _logits_fwd_kernel(
    logits_ptr,
    target_ptr,
    lse_ptr,
    logprob_ptr,
    entropy_ptr,
    num_tokens,
    vocab_size,
    stride_logits_n,
    stride_logits_v,
    inv_temperature,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One read of the logits: online log-sum-exp, target log-prob and entropy per token."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < num_tokens
    targets = tl.load(target_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_N], tl.float32)
    weighted = tl.zeros([BLOCK_N], tl.float32)
    target_logit = tl.zeros([BLOCK_N], tl.float32)
    for v_start in range(0, vocab_size, BLOCK_V):
        cols = (v_start + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < vocab_size
        z = tl.load(
            logits_ptr + rows[:, None] * stride_logits_n + cols[None, :] * stride_logits_v,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        # -inf logits (masked vocabulary entries) to a finite floor: exp() is still 0, 0 * z is not NaN.
        z = tl.maximum(z * inv_temperature, -1e30)
        running_max, sum_exp, weighted, target_logit = _online_update(
            z, cols, col_mask, targets, running_max, sum_exp, weighted, target_logit
        )
    _store_statistics(
        lse_ptr, logprob_ptr, entropy_ptr, rows, row_mask, running_max, sum_exp, weighted, target_logit
    )


@triton.jit
def _logits_grad_kernel(
    logits_ptr,
    target_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    num_tokens,
    vocab_size,
    stride_logits_n,
    stride_logits_v,
    stride_grad_n,
    stride_grad_v,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One read of a logit tile, one write of its gradient."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_mask = rows < num_tokens
    col_mask = cols < vocab_size
    z = tl.load(
        logits_ptr + rows[:, None] * stride_logits_n + cols[None, :] * stride_logits_v,
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    z = tl.maximum(z * inv_temperature, -1e30)
    targets = tl.load(target_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
    grad_logp = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0)
    grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)
    grad = _grad_tile(z, cols, col_mask, targets, lse, entropy, grad_logp, grad_entropy, HAS_ENTROPY_GRAD)
    tl.store(
        grad_logits_ptr + rows[:, None] * stride_grad_n + cols[None, :] * stride_grad_v,
        (grad * inv_temperature).to(grad_logits_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


# ---------------------------------------------------------------------------------------------------
# launchers


def _check_triton_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"the Triton path takes float32, bfloat16 or float16 {name}, got {tensor.dtype}; "
            "use backend='torch' for float64"
        )


def logprob_stats_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-sum-exp, target log-prob and entropy per token (fp32), without logits in global memory."""
    _check_triton_dtype("hidden", hidden)
    num_tokens, hidden_dim = hidden.shape
    lse, logprobs, entropy = (hidden.new_empty(num_tokens, dtype=torch.float32) for _ in range(3))
    if num_tokens == 0:
        return lse, logprobs, entropy
    blocks = _blocks(hidden.dtype)
    _logprob_fwd_kernel[(triton.cdiv(num_tokens, blocks["BLOCK_N"]),)](
        hidden,
        weight,
        bias if bias is not None else weight,
        target,
        lse,
        logprobs,
        entropy,
        num_tokens,
        weight.shape[0],
        hidden_dim,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        1.0 / temperature,
        HAS_BIAS=bias is not None,
        DOT_PRECISION=_dot_precision(hidden.dtype),
        **blocks,
    )
    return lse, logprobs, entropy


def logprob_grads_triton(
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
) -> dict[str, torch.Tensor | None]:
    """Gradients of hidden, weight and bias, one token chunk of logit gradients at a time."""
    num_tokens, hidden_dim = hidden.shape
    vocab_size = weight.shape[0]
    grads: dict[str, torch.Tensor | None] = {
        "hidden": torch.empty_like(hidden) if needs[0] else None,
        "weight": torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None,
        "bias": torch.zeros_like(bias, dtype=torch.float32) if bias is not None and needs[2] else None,
    }
    if num_tokens == 0 or not any(g is not None for g in grads.values()):
        return grads
    blocks = _blocks(hidden.dtype)
    chunk = max(blocks["BLOCK_N"], GRAD_CHUNK_BYTES // (vocab_size * hidden.element_size()))
    chunk = min(num_tokens, chunk)
    grad_logits_buffer = hidden.new_empty(chunk, vocab_size)
    grad_logprobs = grad_logprobs.float().contiguous()
    grad_entropy_arg = grad_entropy.float().contiguous() if grad_entropy is not None else grad_logprobs
    for start in range(0, num_tokens, chunk):
        rows = slice(start, min(start + chunk, num_tokens))
        count = rows.stop - rows.start
        grad_logits = grad_logits_buffer[:count]
        hidden_rows = hidden[rows]
        grid = (triton.cdiv(count, blocks["BLOCK_N"]), triton.cdiv(vocab_size, blocks["BLOCK_V"]))
        _logprob_grad_logits_kernel[grid](
            hidden_rows,
            weight,
            bias if bias is not None else weight,
            target[rows],
            lse[rows],
            entropy[rows],
            grad_logprobs[rows],
            grad_entropy_arg[rows],
            grad_logits,
            count,
            vocab_size,
            hidden_dim,
            hidden_rows.stride(0),
            hidden_rows.stride(1),
            weight.stride(0),
            weight.stride(1),
            grad_logits.stride(0),
            grad_logits.stride(1),
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            HAS_ENTROPY_GRAD=grad_entropy is not None,
            DOT_PRECISION=_dot_precision(hidden.dtype),
            **blocks,
        )
        if grads["hidden"] is not None:
            grads["hidden"][rows] = grad_logits @ weight
        if grads["weight"] is not None:
            grads["weight"] += (grad_logits.T @ hidden_rows).float()
        if grads["bias"] is not None:
            grads["bias"] += grad_logits.float().sum(0)
    return grads


def fused_loss_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inputs: TokenInputs,
    options: PolicyLossOptions,
    needs: tuple[bool, bool, bool],
    chunk_size: int,
) -> tuple[HeadOutput, torch.Tensor, torch.Tensor, dict]:
    """Statistics kernel, the objective on ``[N]`` vectors, then the gradient kernels when needed."""
    del chunk_size  # the Triton path sizes its own chunks (GRAD_CHUNK_BYTES)
    lse, logprobs, entropy = logprob_stats_triton(hidden, weight, bias, inputs.target, options.temperature)
    head = policy_head(logprobs, entropy, inputs, options)
    grads = logprob_grads_triton(
        hidden,
        weight,
        bias,
        inputs.target,
        lse,
        entropy,
        head.grad_logprobs,
        head.grad_entropy,
        options.temperature,
        needs,
    )
    return head, logprobs, entropy, grads


def logits_stats_triton(
    logits: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_triton_dtype("logits", logits)
    num_tokens, vocab_size = logits.shape
    lse, logprobs, entropy = (logits.new_empty(num_tokens, dtype=torch.float32) for _ in range(3))
    if num_tokens == 0:
        return lse, logprobs, entropy
    blocks = _logits_blocks()
    _logits_fwd_kernel[(triton.cdiv(num_tokens, blocks["BLOCK_N"]),)](
        logits,
        target,
        lse,
        logprobs,
        entropy,
        num_tokens,
        vocab_size,
        logits.stride(0),
        logits.stride(1),
        1.0 / temperature,
        **blocks,
    )
    return lse, logprobs, entropy


def logits_grad_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    num_tokens, vocab_size = logits.shape
    grad = torch.empty_like(logits)
    if num_tokens == 0:
        return grad
    _check_triton_dtype("logits", logits)
    blocks = _logits_blocks()
    grad_logprobs = grad_logprobs.float().contiguous()
    grad_entropy_arg = grad_entropy.float().contiguous() if grad_entropy is not None else grad_logprobs
    grid = (triton.cdiv(num_tokens, blocks["BLOCK_N"]), triton.cdiv(vocab_size, blocks["BLOCK_V"]))
    _logits_grad_kernel[grid](
        logits,
        target,
        lse,
        entropy,
        grad_logprobs,
        grad_entropy_arg,
        grad,
        num_tokens,
        vocab_size,
        logits.stride(0),
        logits.stride(1),
        grad.stride(0),
        grad.stride(1),
        1.0 / temperature,
        HAS_ENTROPY_GRAD=grad_entropy is not None,
        **blocks,
    )
    return grad
