"""Token layout of multi-turn rows shared by the adapters (torch only)."""

from __future__ import annotations

import torch


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
