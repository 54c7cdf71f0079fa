"""Triton path of GOPO's ranks: one launch, no host synchronisation.

Sessions are sorted by group on the device (stable ``argsort``); each sorted session knows where its group's
run starts and ends (from the changes between neighbours, ``cummax``: no ids are renumbered, so sparse
group ids cost nothing). One program per block of sessions walks each session's run once and counts the
members ranked above it (a higher reward, or an equal one earlier in the batch): that count is its rank - 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from duca_fast.ops.advantages.runs import run_bounds

BLOCK = 64


@triton.jit
def _gopo_kernel(out_ptr, rewards_ptr, order_ptr, start_ptr, end_ptr, num_rows, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    in_range = rows < num_rows
    starts = tl.load(start_ptr + rows, mask=in_range, other=0)
    ends = tl.load(end_ptr + rows, mask=in_range, other=0)
    own = tl.load(order_ptr + rows, mask=in_range, other=0)
    reward = tl.load(rewards_ptr + own, mask=in_range, other=0.0).to(tl.float64)
    above = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    span = tl.max(tl.where(in_range, ends - starts, 0), axis=0)
    for step in range(0, span):
        cols = starts + step
        inside = in_range & (cols < ends)
        other = tl.load(order_ptr + cols, mask=inside, other=0)
        value = tl.load(rewards_ptr + other, mask=inside, other=0.0).to(tl.float64)
        better = (value > reward) | ((value == reward) & (other < own))
        above += tl.where(inside & better, 1.0, 0.0)
    size = (ends - starts).to(tl.float64)
    advantage = tl.where(size > 1.0, 2.0 - 4.0 * above / tl.maximum(size - 1.0, 1.0), 0.0)
    tl.store(out_ptr + own, advantage.to(out_ptr.dtype.element_ty), mask=in_range)


def gopo_advantages_triton(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    count = rewards.shape[0]
    out = torch.zeros(count, dtype=torch.float32, device=rewards.device)
    if count == 0:
        return out
    order = torch.argsort(group.long(), stable=True)
    starts, ends = run_bounds(group.long()[order])
    _gopo_kernel[(triton.cdiv(count, BLOCK),)](
        out, rewards.contiguous(), order.contiguous(), starts.contiguous(), ends.contiguous(), count,
        BLOCK_SIZE=BLOCK,
    )  # fmt: skip
    return out
