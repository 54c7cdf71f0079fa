"""Runs of equal keys in a sorted (or packed) vector, found on the device without a host sync."""

from __future__ import annotations

import torch


def run_bounds(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each element of ``keys`` (equal keys adjacent): ``(start, end)`` of its run, ``end`` exclusive.

    The starts are a running maximum of the positions where the key changes, the ends a running minimum
    of the next run's start taken from the right: no ids are renumbered, so sparse keys cost nothing."""
    count = keys.shape[0]
    index = torch.arange(count, device=keys.device)
    first = torch.ones(count, dtype=torch.bool, device=keys.device)
    first[1:] = keys[1:] != keys[:-1]
    starts = torch.cummax(torch.where(first, index, 0), 0).values
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    ends = torch.flip(torch.cummin(torch.flip(torch.where(last, index + 1, count), [0]), 0).values, [0])
    return starts, ends
