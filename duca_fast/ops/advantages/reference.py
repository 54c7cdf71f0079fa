"""Float64 ground truth of the advantage ops, written from the raw inputs as DESIGN.md states them.

Plain Python loops over groups and turns; it shares no helper with the fast paths (no ``HianProblem``,
no bucket keys, no fusion code), so a bug there shows up as a difference in the tests.
"""

from __future__ import annotations

import math

import torch

from duca_fast.ops.advantages.options import AdvantageOptions


def _combined(rewards: torch.Tensor, weights) -> list[float]:
    rows = (rewards.double() if rewards.dim() == 2 else rewards.double()[:, None]).tolist()
    if weights is None:
        weights = [1.0] * (len(rows[0]) if rows else 0)
    weights = [float(w) for w in torch.as_tensor(weights, dtype=torch.float64).tolist()]
    return [sum(w * x for w, x in zip(weights, row)) for row in rows]


def _normalize(values: list[float], keys: list, options: AdvantageOptions) -> list[float]:
    """Per-key normalization: (x - mean) / (unbiased std + eps); fewer than 2 members (or NaN) give 0."""
    out = [0.0] * len(values)
    members_of: dict = {}
    for i, (key, value) in enumerate(zip(keys, values)):
        if not math.isnan(value):
            members_of.setdefault(key, []).append(i)
    centered: dict[int, float] = {}
    for members in members_of.values():
        if len(members) < 2:
            continue
        mean = sum(values[i] for i in members) / len(members)
        std = math.sqrt(sum((values[i] - mean) ** 2 for i in members) / (len(members) - 1))
        for i in members:
            centered[i] = values[i] - mean
            if options.scale == "group":
                out[i] = (values[i] - mean) / (std + options.eps)
            elif options.scale == "none":
                out[i] = values[i] - mean
    if options.scale == "batch" and centered:
        count = len(centered)
        mean = sum(centered.values()) / count
        std = math.sqrt(sum((c - mean) ** 2 for c in centered.values()) / (count - 1)) if count > 1 else 0.0
        for i, c in centered.items():
            out[i] = c / (std + options.eps)
    return out


def reference_hian_advantages(
    turn_rewards: torch.Tensor,
    turn_session: torch.Tensor,
    session_rewards: torch.Tensor,
    session_group: torch.Tensor,
    *,
    options: AdvantageOptions,
    turn_index: torch.Tensor | None = None,
    token_turn: torch.Tensor | None = None,
    turn_component_weights=None,
    session_component_weights=None,
) -> torch.Tensor:
    session_values = _combined(session_rewards, session_component_weights)
    turn_values = _combined(turn_rewards, turn_component_weights)
    groups = session_group.tolist()
    sessions_of_turn = turn_session.tolist()
    session_adv = _normalize(session_values, groups, options)
    if options.turn_scope == "group":
        turn_keys = [groups[s] for s in sessions_of_turn]
    else:
        turn_keys = [(groups[s], p) for s, p in zip(sessions_of_turn, turn_index.tolist())]
    turn_adv = _normalize(turn_values, turn_keys, options)
    fused = [
        options.turn_weight * turn_adv[t] + options.session_weight * session_adv[sessions_of_turn[t]]
        for t in range(len(turn_values))
    ]
    if token_turn is not None:
        fused = [fused[t] if t >= 0 else 0.0 for t in token_turn.tolist()]
    float64_in = torch.float64 in (turn_rewards.dtype, session_rewards.dtype)
    out_dtype = torch.float64 if float64_in else torch.float32
    return torch.tensor(fused, dtype=torch.float64).to(device=turn_rewards.device, dtype=out_dtype)


def reference_grpo_advantages(rewards, group, *, options: AdvantageOptions, component_weights=None):
    values = _combined(rewards, component_weights)
    out = _normalize(values, group.tolist(), options)
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return torch.tensor(out, dtype=torch.float64).to(device=rewards.device, dtype=out_dtype)
