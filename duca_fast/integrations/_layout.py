"""Token layout of multi-turn rows and batch lookups shared by the adapters (torch only)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def batch_field(batch: Any, key: str) -> torch.Tensor | None:
    """``batch[key]`` of a mapping or TensorDict (verl's ``data.batch``), None when absent or no batch."""
    if batch is None:
        return None
    try:
        # TensorDict refuses ``key in td``; ``keys()`` works for it and for plain mappings.
        return batch[key] if key in batch.keys() else None  # noqa: SIM118
    except (KeyError, AttributeError):
        return None


def dense_uids(values: Any) -> torch.Tensor:
    """Hashable ids (strings, uuids, ints) -> int64 0..k-1 in order of first appearance."""
    seen: dict[Any, int] = {}
    return torch.tensor(
        [seen.setdefault(v, len(seen)) for v in np.asarray(values).tolist()], dtype=torch.long
    )


def turn_layout(agent_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn of each token within its row (-1 where the mask is 0) and the first token of every turn.

    A turn is a maximal run of ``agent_mask == 1`` in a row of ``[B, L]``; returns ``(token_turn [B, L]
    int64, starts [B, L] bool)``.
    """
    mask = agent_mask.bool()
    before = torch.zeros_like(mask)
    before[:, 1:] = mask[:, :-1]
    starts = mask & ~before
    local = starts.long().cumsum(dim=1) - 1
    return torch.where(mask, local, torch.full_like(local, -1)), starts
