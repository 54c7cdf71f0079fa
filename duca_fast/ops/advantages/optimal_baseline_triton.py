"""Triton path of the optimal token baseline's per-(group, position) sums: one launch, no host sync.

The per-sequence scans (returns ``G``, path weights ``W``, positions) and the zero-tail cut stay in torch
(``optimal_baseline.py``: cumulative sums, no host synchronisation). Here the tokens are sorted by their
(group, position) key on the device (stable ``argsort``) and each sorted token knows its bucket's run
(``run_bounds``: no ids renumbered). One program per block of tokens walks each token's bucket once,
summing ``G W`` and ``W`` over the bucket's loss tokens in token order (float64, deterministic: no
atomics), and writes ``A = (G - B) * loss`` with ``B = sum G W / (sum W + eps)``, 0 for a sequence without
peers in its group or past the zero-tail cut. A bucket holds at most one token per sequence of the group,
so a token's walk is at most the group size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from duca_fast.ops.advantages.runs import run_bounds

BLOCK = 64


@triton.jit
def _otb_kernel(
    out_ptr,
    returns_ptr,
    path_ptr,
    loss_ptr,
    baseline_on_ptr,
    order_ptr,
    start_ptr,
    end_ptr,
    num_rows,
    eps,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    in_range = rows < num_rows
    starts = tl.load(start_ptr + rows, mask=in_range, other=0)
    ends = tl.load(end_ptr + rows, mask=in_range, other=0)
    own = tl.load(order_ptr + rows, mask=in_range, other=0)
    numerator = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    denominator = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    span = tl.max(tl.where(in_range, ends - starts, 0), axis=0)
    for step in range(0, span):
        cols = starts + step
        inside = in_range & (cols < ends)
        other = tl.load(order_ptr + cols, mask=inside, other=0)
        weight = tl.load(path_ptr + other, mask=inside, other=0.0) * tl.load(
            loss_ptr + other, mask=inside, other=0.0
        )
        numerator += tl.load(returns_ptr + other, mask=inside, other=0.0) * weight
        denominator += weight
    baseline = numerator / (denominator + eps)
    baseline_on = tl.load(baseline_on_ptr + own, mask=in_range, other=0) != 0
    baseline = tl.where(baseline_on, baseline, 0.0)
    value = tl.load(returns_ptr + own, mask=in_range, other=0.0)
    loss = tl.load(loss_ptr + own, mask=in_range, other=0.0)
    tl.store(out_ptr + own, (value - baseline) * loss, mask=in_range)


def otb_advantages_triton(
    key: torch.Tensor,
    returns: torch.Tensor,
    path: torch.Tensor,
    loss: torch.Tensor,
    baseline_on: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``[N]`` float64 advantages from the tokens' (group, position) ``key``, their float64 ``returns``,
    ``path`` weights and ``loss`` mask (0/1), and ``baseline_on`` (bool: the token's sequence has peers
    and the token is not past the zero-tail cut)."""
    count = key.shape[0]
    out = torch.zeros(count, dtype=torch.float64, device=key.device)
    if count == 0:
        return out
    order = torch.argsort(key, stable=True)
    starts, ends = run_bounds(key[order])
    _otb_kernel[(triton.cdiv(count, BLOCK),)](
        out,
        returns.contiguous(),
        path.contiguous(),
        loss.contiguous(),
        baseline_on.to(torch.int8).contiguous(),
        order.contiguous(),
        starts.contiguous(),
        ends.contiguous(),
        count,
        float(eps),
        BLOCK_SIZE=BLOCK,
    )
    return out
