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
        divisor = len(members) - 1 if options.std == "unbiased" else len(members)
        std = math.sqrt(sum((values[i] - mean) ** 2 for i in members) / divisor)
        for i in members:
            centered[i] = values[i] - mean
            if options.scale == "group":
                out[i] = (values[i] - mean) / (std + options.eps)
            elif options.scale == "none":
                out[i] = values[i] - mean
    if options.scale == "batch" and centered:
        count = len(centered)
        mean = sum(centered.values()) / count
        divisor = count - 1 if options.std == "unbiased" else count
        std = math.sqrt(sum((c - mean) ** 2 for c in centered.values()) / divisor) if count > 1 else 0.0
        for i, c in centered.items():
            out[i] = c / (std + options.eps)
    if options.clip is not None:
        out = [min(max(value, -options.clip), options.clip) for value in out]
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


def reference_proxmo_advantages(
    turn_rewards,
    turn_session,
    session_rewards,
    session_group,
    turn_features,
    *,
    options,
    turn_index=None,
    token_turn=None,
    turn_component_weights=None,
    session_component_weights=None,
) -> torch.Tensor:
    """ProxMO in plain float64 loops: per session the discounted returns, per group the episode mean,
    PSC and the softmax-weighted baseline (``ops.advantages.proxmo``)."""
    turn_values = _combined(turn_rewards, turn_component_weights)
    session_values = _combined(session_rewards, session_component_weights)
    sessions = turn_session.tolist()
    groups = session_group.tolist()
    positions = list(range(len(sessions))) if turn_index is None else turn_index.tolist()
    rows = turn_features.double().tolist()
    live = [
        not math.isnan(session_values[s]) and not math.isnan(turn_values[t]) for t, s in enumerate(sessions)
    ]
    turns_of_session: dict[int, list[int]] = {}
    for t, s in enumerate(sessions):
        turns_of_session.setdefault(s, []).append(t)
    returns = [0.0] * len(sessions)
    for turns in turns_of_session.values():
        ordered = sorted(turns, key=lambda t: (positions[t], t))
        following = 0.0
        for t in reversed(ordered):
            following = (turn_values[t] if live[t] else 0.0) + options.gamma * following
            returns[t] = following

    def unit(row: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in row))
        return [x / (norm + 1e-8) for x in row]

    units = [unit(row) for row in rows]
    members_of: dict[int, list[int]] = {}
    for t, s in enumerate(sessions):
        if live[t]:
            members_of.setdefault(groups[s], []).append(t)
    out = [0.0] * len(sessions)
    for members in members_of.values():
        scores = {t: session_values[sessions[t]] for t in members}
        mean = sum(scores.values()) / len(members) if len(members) > 1 else 0.0
        p = min(max(mean, 0.0), 1.0)
        for t in members:
            episode = scores[t] - mean
            if options.psc:
                sigmoid = (
                    (1.0 - p) ** options.psc_alpha
                    if scores[t] > options.success_threshold
                    else -(p**options.psc_alpha)
                )
                episode *= 1.0 + options.psc_beta * (1.0 / (1.0 + math.exp(-sigmoid)) - 0.5)
            logits = {
                j: sum(a * b for a, b in zip(units[t], units[j])) / options.temperature for j in members
            }
            top = max(logits.values())
            exps = {j: math.exp(value - top) for j, value in logits.items()}
            total = sum(exps.values())
            baseline = sum(exps[j] / total * returns[j] for j in members)
            out[t] = episode + options.step_weight * (returns[t] - baseline)
    if token_turn is not None:
        out = [out[t] if t >= 0 else 0.0 for t in token_turn.tolist()]
    float64_in = torch.float64 in (turn_rewards.dtype, session_rewards.dtype)
    out_dtype = torch.float64 if float64_in else torch.float32
    return torch.tensor(out, dtype=torch.float64).to(device=turn_rewards.device, dtype=out_dtype)


def reference_optimal_token_baseline(
    token_rewards,
    old_logprobs,
    sum_p2,
    seq_ids,
    seq_group,
    *,
    mask=None,
    is_weights=None,
    positions: str = "loss_tokens",
    handle_zero_tail: bool = True,
    eps: float = 1e-8,
) -> tuple[list[float], list[float]]:
    """The optimal token baseline in plain float64 loops over sequences, groups and positions
    (``ops.advantages.optimal_baseline``, verl 0.9.1's two OTB estimators): ``(advantages, returns)``."""
    rewards = token_rewards.double().tolist()
    probs = [math.exp(x) for x in old_logprobs.double().tolist()]
    squares = sum_p2.double().tolist()
    sequence = seq_ids.tolist()
    loss = [True] * len(rewards) if mask is None else [bool(x) for x in mask.tolist()]
    rho = [1.0] * len(rewards) if is_weights is None else is_weights.double().tolist()
    tokens_of: dict[int, list[int]] = {}
    for i, s in enumerate(sequence):
        tokens_of.setdefault(s, []).append(i)
    returns, weight = [0.0] * len(rewards), [0.0] * len(rewards)
    for tokens in tokens_of.values():
        following = 0.0
        for i in reversed(tokens):
            following += rewards[i] if loss[i] else 0.0
            returns[i] = following
        path = 0.0
        for i in tokens:
            if loss[i]:
                path += (1.0 - 2.0 * probs[i] + squares[i]) * rho[i] ** 2
            weight[i] = path
    # The position of each token: its index in the sequence ("all") or among the sequence's loss tokens.
    position: dict[int, int] = {}
    for tokens in tokens_of.values():
        counted = tokens if positions == "all" else [i for i in tokens if loss[i]]
        for k, i in enumerate(counted):
            position[i] = k
    length = {s: sum(loss[i] for i in tokens) for s, tokens in tokens_of.items()}
    members_of: dict[int, list[int]] = {}
    for s in sorted(tokens_of):
        if positions == "all" or length[s] > 0:
            members_of.setdefault(int(seq_group[s]), []).append(s)
    baseline = [0.0] * len(rewards)
    for members in members_of.values():
        if len(members) == 1:
            continue
        numerator: dict[int, float] = {}
        denominator: dict[int, float] = {}
        for s in members:
            for i in tokens_of[s]:
                if loss[i]:
                    k = position[i]
                    numerator[k] = numerator.get(k, 0.0) + returns[i] * weight[i]
                    denominator[k] = denominator.get(k, 0.0) + weight[i]
        lengths = sorted(length[s] for s in members)
        longest = [s for s in members if length[s] == lengths[-1]]
        for s in members:
            for i in tokens_of[s]:
                if i not in position:
                    continue
                k = position[i]
                value = numerator.get(k, 0.0) / (denominator.get(k, 0.0) + eps)
                zero_tail = (
                    handle_zero_tail and longest == [s] and lengths[-1] > lengths[-2] and k >= lengths[-2]
                )
                baseline[i] = 0.0 if zero_tail else value
    advantages = [(returns[i] - baseline[i]) if loss[i] else 0.0 for i in range(len(rewards))]
    return advantages, returns
