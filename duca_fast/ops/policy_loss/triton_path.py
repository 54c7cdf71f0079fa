"""Triton path of the policy loss: cuBLAS for every product over H, Triton only for the row work.

Per token chunk (DESIGN.md, "How it runs"):
1. GEMM1 ``logits = h_c @ W.T`` into a reused ``[chunk, V]`` buffer (fp32; the input dtype with
   ``logits_dtype="bfloat16"``/``"float16"``, which halves the row passes' traffic);
2. ``_row_partials_kernel``: the vocabulary is split across programs (so a chunk of a few thousand
   rows still fills the GPU); each keeps an online max / sum-exp / sum p z / target logit over its
   columns (bias and 1/temperature applied on load); a tiny torch combine merges the splits into
   log-sum-exp, target log-prob and entropy per row;
3. the per-token policy head on ``[chunk]`` vectors (``head.policy_head``);
4. ``_logits_grad_kernel`` turns the buffer into d loss / d logits (in place when the logits buffer has
   the input dtype, into a buffer of the input dtype otherwise);
5. GEMM2 ``dH_c = G @ W`` and GEMM3 ``dW += G.T @ h_c``, accumulated in fp32 (no bf16 round trip),
   on a side stream when G has its own buffer, overlapping steps 1-3 of the next chunk.
Three GEMM passes in all: 6 N_loss H V FLOPs. No Triton kernel multiplies over H.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from duca_fast.ops.policy_loss.chunks import run_chunks
from duca_fast.ops.policy_loss.head import fixed_chunks, policy_head
from duca_fast.ops.policy_loss.options import HeadOutput, PolicyLossOptions, TokenInputs
from duca_fast.ops.policy_loss.torch_path import head_derivatives, incoming_derivatives, mm_fp32

# Logits buffer budget on CUDA: 1.25 GiB = 2,176 fp32 rows at V=151,936 (a multiple of 128 rows; 4,352
# bf16 rows); with the bf16 d-logits and the fp32 dW accumulator the extra memory stays under 4.5 GiB.
LOGIT_BUFFER_BYTES = 1280 << 20
MIN_CUDA_CHUNK = 2048


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _row_blocks() -> dict[str, int]:
    """Row-kernel tiles: memory-bound, wide vocabulary tiles. The interpreter gets small ones."""
    # 16 x 256 fp32 tiles: 16 x 512 spilled 64-320 bytes on sm_90 (make check-kernels).
    return dict(BLOCK_N=16, BLOCK_V=32) if _interpreted() else dict(BLOCK_N=16, BLOCK_V=256)


def _multiprocessors(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _vocab_splits(num_rows: int, vocab_size: int, device: torch.device) -> int:
    """Programs per row block along the vocabulary: about two waves of programs over the SMs."""
    blocks = _row_blocks()
    max_splits = triton.cdiv(vocab_size, blocks["BLOCK_V"])
    sms = _multiprocessors(device)
    if sms is None:
        return min(2, max_splits)  # the interpreter exercises the combine
    row_programs = triton.cdiv(num_rows, blocks["BLOCK_N"])
    return max(1, min(max_splits, triton.cdiv(2 * sms, row_programs)))


def chunk_rows(
    num_tokens: int, vocab_size: int, chunk_size: int | None, device: torch.device, logit_bytes: int = 4
) -> int:
    if chunk_size is not None:
        return max(1, min(chunk_size, max(num_tokens, 1)))
    if device.type != "cuda":
        return max(1, min(num_tokens, 64))
    rows = max(MIN_CUDA_CHUNK, LOGIT_BUFFER_BYTES // (logit_bytes * vocab_size) // 128 * 128)
    return max(1, min(num_tokens, rows))


def _check_triton_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"the Triton path takes float32, bfloat16 or float16 {name}, got {tensor.dtype}; "
            "use backend='torch' for float64"
        )


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in fp32 whatever the operand dtype (the dW accumulation)."""
    if a.dtype == torch.float32:
        torch.addmm(acc, a, b, out=acc)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        torch.addmm(acc, a.float(), b.float(), out=acc)


# ---------------------------------------------------------------------------------------------------
# kernels


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
def _row_partials_kernel(
    logits_ptr,
    bias_ptr,
    target_ptr,
    partials_ptr,
    num_rows,
    vocab_size,
    cols_per_split,
    stride_logits_n,
    stride_logits_v,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Online max / sum-exp / sum exp*z / target logit of rows over one vocabulary split.

    ``partials`` is ``[4, splits, num_rows]`` fp32; the combine in ``_combine`` merges the splits.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    num_splits = tl.num_programs(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < num_rows
    targets = tl.load(target_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_N], tl.float32)
    weighted = tl.zeros([BLOCK_N], tl.float32)
    target_logit = tl.zeros([BLOCK_N], tl.float32)
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, vocab_size)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < v_end
        z = tl.load(
            logits_ptr + rows[:, None] * stride_logits_n + cols[None, :] * stride_logits_v,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        # -inf logits (masked vocabulary entries) to a finite floor: exp() is still 0, 0 * z is not NaN.
        z = tl.maximum(z * inv_temperature, -1e30)
        running_max, sum_exp, weighted, target_logit = _online_update(
            z, cols, col_mask, targets, running_max, sum_exp, weighted, target_logit
        )
    base = partials_ptr + pid_s * num_rows + rows
    plane = num_splits * num_rows
    tl.store(base, running_max, mask=row_mask)
    tl.store(base + plane, sum_exp, mask=row_mask)
    tl.store(base + 2 * plane, weighted, mask=row_mask)
    tl.store(base + 3 * plane, target_logit, mask=row_mask)


@triton.jit
def _logits_grad_kernel(
    logits_ptr,
    bias_ptr,
    target_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    num_rows,
    vocab_size,
    stride_logits_n,
    stride_logits_v,
    stride_grad_n,
    stride_grad_v,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One read of a logit tile, one write of its gradient (the same buffer may be both)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_mask = rows < num_rows
    col_mask = cols < vocab_size
    z = tl.load(
        logits_ptr + rows[:, None] * stride_logits_n + cols[None, :] * stride_logits_v,
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
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


def _combine(partials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the vocabulary splits: ``(lse, target log-prob, entropy)`` per row."""
    maxes, sum_exp, weighted, target_logit = partials.unbind(0)
    row_max = maxes.amax(0)
    rescale = torch.exp(maxes - row_max)
    total = (sum_exp * rescale).sum(0)
    lse = row_max + torch.log(total)
    entropy = lse - (weighted * rescale).sum(0) / total
    return lse, target_logit.sum(0) - lse, entropy


def row_stats(
    logits: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-sum-exp, target log-prob and entropy (fp32) of every row of ``(logits + bias) / temperature``."""
    num_rows, vocab_size = logits.shape
    blocks = _row_blocks()
    splits = _vocab_splits(num_rows, vocab_size, logits.device)
    cols_per_split = triton.cdiv(triton.cdiv(vocab_size, splits), blocks["BLOCK_V"]) * blocks["BLOCK_V"]
    partials = logits.new_empty(4, splits, num_rows, dtype=torch.float32)
    _row_partials_kernel[(triton.cdiv(num_rows, blocks["BLOCK_N"]), splits)](
        logits,
        bias if bias is not None else logits,
        target,
        partials,
        num_rows,
        vocab_size,
        cols_per_split,
        logits.stride(0),
        logits.stride(1),
        1.0 / temperature,
        HAS_BIAS=bias is not None,
        **blocks,
    )
    return _combine(partials)


def logits_to_grad(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """d loss / d logits into ``out`` (may be ``logits`` itself: each tile is read before it is written)."""
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return out
    blocks = _row_blocks()
    grad_logprobs = grad_logprobs.float().contiguous()
    grad_entropy_arg = grad_entropy.float().contiguous() if grad_entropy is not None else grad_logprobs
    grid = (triton.cdiv(num_rows, blocks["BLOCK_N"]), triton.cdiv(vocab_size, blocks["BLOCK_V"]))
    _logits_grad_kernel[grid](
        logits,
        bias if bias is not None else logits,
        target,
        lse,
        entropy,
        grad_logprobs,
        grad_entropy_arg,
        out,
        num_rows,
        vocab_size,
        logits.stride(0),
        logits.stride(1),
        out.stride(0),
        out.stride(1),
        1.0 / temperature,
        HAS_BIAS=bias is not None,
        HAS_ENTROPY_GRAD=grad_entropy is not None,
        **blocks,
    )
    return out


class _ChunkBuffers:
    """The reused ``[chunk, V]`` buffers: logits (fp32, or the input dtype with ``input_dtype_logits``),
    and d-logits in the input dtype (the logits buffer itself when the dtypes agree)."""

    def __init__(
        self, hidden: torch.Tensor, vocab_size: int, rows: int, with_grad: bool, input_dtype_logits: bool
    ) -> None:
        self.logits = hidden.new_empty(
            rows, vocab_size, dtype=hidden.dtype if input_dtype_logits else torch.float32
        )
        self.grad = None
        if with_grad:
            same = self.logits.dtype == hidden.dtype
            self.grad = self.logits if same else hidden.new_empty(rows, vocab_size, dtype=hidden.dtype)

    def gemm1(self, hidden_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``hidden_rows @ W.T`` into the logits buffer (cuBLAS accumulates in fp32 either way)."""
        out = self.logits[: hidden_rows.shape[0]]
        if out.dtype == hidden_rows.dtype:
            return torch.mm(hidden_rows, weight.T, out=out)
        return mm_fp32(hidden_rows, weight.T, out=out)


def chunk_rows_for(
    hidden: torch.Tensor, vocab_size: int, chunk_size: int | None, input_dtype_logits: bool
) -> int:
    """Rows per chunk as ``fused_loss_triton`` will choose them."""
    logit_bytes = hidden.element_size() if input_dtype_logits else 4
    return chunk_rows(hidden.shape[0], vocab_size, chunk_size, hidden.device, logit_bytes)


def _chunking(
    hidden: torch.Tensor, vocab_size: int, chunk_size: int | None, with_grad: bool, input_dtype_logits: bool
) -> tuple[int, _ChunkBuffers]:
    """Rows per chunk (from the logits buffer's element size) and the chunk buffers."""
    rows = chunk_rows_for(hidden, vocab_size, chunk_size, input_dtype_logits)
    return rows, _ChunkBuffers(hidden, vocab_size, rows, with_grad, input_dtype_logits)


def _new_grads(hidden, weight, bias, needs) -> dict[str, torch.Tensor | None]:
    return {
        "hidden": hidden.new_empty(hidden.shape, dtype=torch.float32) if needs[0] else None,
        "weight": torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None,
        "bias": torch.zeros_like(bias, dtype=torch.float32) if bias is not None and needs[2] else None,
    }


def _backward_gemms(grad_logits, hidden_rows, weight, rows, grads) -> None:
    if grads["hidden"] is not None:
        mm_fp32(grad_logits, weight, out=grads["hidden"][rows])
    if grads["weight"] is not None:
        _addmm_fp32_(grads["weight"], grad_logits.T, hidden_rows)
    if grads["bias"] is not None:
        grads["bias"] += grad_logits.sum(0, dtype=torch.float32)


# GEMM2/GEMM3 of chunk i on a side stream while GEMM1 and the row kernel of chunk i+1 run on the main
# one (CUDA, separate logits and d-logits buffers). A module switch so the GPU tests can compare both.
OVERLAP_BACKWARD_GEMMS = True
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device, buffers: _ChunkBuffers) -> torch.cuda.Stream | None:
    """The side stream for the backward GEMMs, or None where they must stay in order on the main one."""
    if not OVERLAP_BACKWARD_GEMMS or device.type != "cuda" or buffers.grad is None:
        return None
    if buffers.grad is buffers.logits:
        # One buffer: GEMM1 of the next chunk would overwrite the d-logits GEMM2/GEMM3 still read.
        return None
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class TritonRows:
    """``chunks.RowPrimitives`` of the CUDA path: GEMM1 into the reused buffer (raw logits; bias and
    1/temperature are applied on load by the row kernels), the row kernels, GEMM2/GEMM3 in cuBLAS.

    ``overlap``: on CUDA with a separate d-logits buffer (16-bit inputs, fp32 logits), GEMM2/GEMM3 of
    chunk i run on a side stream, so GEMM1, the row kernel and the head of chunk i+1 overlap them; the
    d-logits kernel of chunk i+1 waits for them (it overwrites the buffer they read).
    """

    stats_dtype = torch.float32

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        temperature: float,
        chunk_size: int | None,
        input_dtype_logits: bool,
        with_grad: bool,
        overlap: bool = False,
    ) -> None:
        _check_triton_dtype("hidden", hidden)
        self.weight, self.bias, self.temperature = weight, bias, temperature
        self.rows_per_chunk, self.buffers = _chunking(
            hidden, weight.shape[0], chunk_size, with_grad, input_dtype_logits
        )
        self.side = _side_stream(hidden.device, self.buffers) if overlap and with_grad else None
        self.main = torch.cuda.current_stream(hidden.device) if self.side is not None else None

    def logits(self, hidden_rows):
        return self.buffers.gemm1(hidden_rows, self.weight)

    def stats(self, logits, target, keep_logits, with_sum_p2):
        lse, logprobs, entropy = row_stats(logits, self.bias, target, self.temperature)
        sum_p2 = None
        if with_sum_p2:
            # sum p^2 = exp(LSE(2z) - 2 LSE(z)): one more read of the buffer, an fp32 temporary of the chunk.
            scaled = logits.float() if self.bias is None else logits.float() + self.bias.float()
            sum_p2 = torch.exp(2.0 * (scaled / self.temperature - lse[:, None])).sum(-1)
        return lse, logprobs, entropy, None, sum_p2

    def probs(self, logits, lse):
        return None  # the d-logits kernel recomputes them from the logits tile it reads

    def grad(self, logits, probs, target, lse, entropy, grad_logprobs, grad_entropy):
        if self.side is not None:
            self.main.wait_stream(self.side)
        out = self.buffers.grad[: logits.shape[0]]
        return logits_to_grad(
            logits, self.bias, target, lse, entropy, grad_logprobs, grad_entropy, self.temperature, out=out
        )

    def backward_gemms(self, grad_logits, hidden_rows, rows, grads) -> None:
        if self.side is None:
            _backward_gemms(grad_logits, hidden_rows, self.weight, rows, grads)
            return
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            _backward_gemms(grad_logits, hidden_rows, self.weight, rows, grads)

    def finish(self) -> None:
        if self.side is not None:
            # Every buffer the side stream used was allocated on the main stream and is alive until here.
            self.main.wait_stream(self.side)


def fused_loss_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inputs: TokenInputs,
    options: PolicyLossOptions,
    needs: tuple[bool, bool, bool],
    chunk_size: int | None,
    input_dtype_logits: bool = False,
    chunks: list[slice] | None = None,
    precomputed: HeadOutput | None = None,
) -> tuple[HeadOutput, torch.Tensor, torch.Tensor, dict]:
    """Three GEMM passes per chunk around the row kernels; gradients computed in the forward (backward
    GEMMs on a side stream where ``TritonRows`` can overlap them)."""
    grads = _new_grads(hidden, weight, bias, needs)
    want_grads = any(g is not None for g in grads.values())
    primitives = TritonRows(
        hidden, weight, bias, options.temperature, chunk_size, input_dtype_logits, want_grads, overlap=True
    )
    results = run_chunks(
        primitives,
        hidden,
        inputs.target,
        fixed_chunks(hidden.shape[0], primitives.rows_per_chunk) if chunks is None else chunks,
        grads,
        derivatives=head_derivatives(inputs, options, precomputed),
    )
    head = precomputed
    if head is None:
        head = policy_head(results.logprobs, results.entropy, inputs, options)
    return head, results.logprobs, results.entropy, grads


def logprob_stats_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    temperature: float,
    chunk_size: int | None = None,
    input_dtype_logits: bool = False,
    with_sum_p2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-sum-exp, target log-prob and entropy per token (fp32): GEMM1 + row kernel per chunk; with
    ``with_sum_p2`` also sum p^2 from the chunk's logits buffer (no extra GEMM)."""
    primitives = TritonRows(hidden, weight, bias, temperature, chunk_size, input_dtype_logits, False)
    chunks = fixed_chunks(hidden.shape[0], primitives.rows_per_chunk)
    results = run_chunks(primitives, hidden, target, chunks, {}, with_sum_p2=with_sum_p2)
    return results.lse, results.logprobs, results.entropy, results.sum_p2


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
    chunk_size: int | None = None,
    input_dtype_logits: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Backward of ``logprob_stats_triton``: GEMM1 recomputed, d-logits (in place), GEMM2 and GEMM3."""
    grads = _new_grads(hidden, weight, bias, needs)
    if hidden.shape[0] == 0 or not any(g is not None for g in grads.values()):
        return grads
    primitives = TritonRows(hidden, weight, bias, temperature, chunk_size, input_dtype_logits, True)
    run_chunks(
        primitives,
        hidden,
        target,
        fixed_chunks(hidden.shape[0], primitives.rows_per_chunk),
        grads,
        derivatives=incoming_derivatives(grad_logprobs, grad_entropy, torch.float32),
        saved=(lse, entropy),
    )
    return grads


def logits_stats_triton(
    logits: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_triton_dtype("logits", logits)
    if logits.shape[0] == 0:
        return tuple(logits.new_empty(0, dtype=torch.float32) for _ in range(3))
    return row_stats(logits, None, target, temperature)


def logits_grad_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    _check_triton_dtype("logits", logits)
    return logits_to_grad(
        logits, None, target, lse, entropy, grad_logprobs, grad_entropy, temperature, torch.empty_like(logits)
    )
