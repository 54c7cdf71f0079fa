"""Multi-rank training on torch.distributed (launched by torchrun): FSDP2 sharding and the collectives.

Layout of a step across K ranks: every rank draws the same B scenarios (the scenario cursor is global,
so checkpoints resume at any world size) and rolls out its own B/K groups with its own colocated
engine. Groups never span ranks; the rewards of all ranks are gathered and advantages are computed
over the global batch on every rank (identical results), so group statistics and batch-scale
statistics are exact. Token and sequence counts for the loss aggregation are summed over ranks;
FSDP2 averages gradients over ranks, so each rank scales its loss by K.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A rank disagreed, died or timed out; the message says which and what to do."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    """This process's rank."""
    world_size: int = 1
    """Number of ranks."""
    local_rank: int = 0
    """Rank on this host (selects the CUDA device)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int) -> DistContext:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a no-op for one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        # A rank that dies leaves the others blocked in a collective; the timeout turns that into an error.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def all_gather_objects(ctx: DistContext, value: Any) -> list[Any]:
    if not ctx.enabled:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    try:
        dist.all_gather_object(gathered, value)
    except RuntimeError as error:
        raise DistributedError(
            f"rank {ctx.rank}: a collective failed ({error}); another rank probably died or hung. "
            "Check the other ranks' logs; the last complete checkpoint can be resumed."
        ) from error
    return gathered


def all_reduce_sum(ctx: DistContext, value: float) -> float:
    return float(sum(all_gather_objects(ctx, float(value))))


def check_same_config(ctx: DistContext, resolved_yaml: str) -> None:
    """Every rank must run the same resolved config (a mismatch would silently desynchronize them)."""
    digest = hashlib.sha256(resolved_yaml.encode()).hexdigest()[:12]
    digests = all_gather_objects(ctx, digest)
    if len(set(digests)) > 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise DistributedError(
            f"ranks {differing} run a different config than rank 0; launch all ranks alike"
        )


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shard_policy(module: torch.nn.Module, decoder_layers: list[torch.nn.Module]) -> None:
    """FSDP2: each decoder layer is its own unit, the root takes embeddings, norm and the (tied) head."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers:
        fully_shard(layer)
    fully_shard(module)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
