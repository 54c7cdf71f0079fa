"""From two-horizon rewards to per-turn (and per-token) advantages: DuCA, GRPO and GDPO.

- ``duca``: HIAN. Turn rewards and session rewards are normalized separately within each group,
  then fused: every turn gets its own advantage.
- ``grpo``: the paper's baseline. All rewards of a session (its turn rewards summed, plus its session
  rewards) become one scalar, normalized per group; every turn of a session shares its advantage.
- ``gdpo``: each reward component (per-session sums of turn components, and session components) is
  normalized per group on its own, then summed; every turn of a session shares the result.

Sessions whose session rewards are missing (NaN: cut or failed) are left out of the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duca_fast import ops
from duca_fast.train.config import AlgoConfig


@dataclass
class Advantages:
    per_turn: torch.Tensor
    """[T] fused advantage of each agent turn."""
    per_token: torch.Tensor | None
    """[N] advantage of each token (0 where token_turn is -1), when token_turn was given."""
    metrics: dict[str, float]
    """Reward and advantage statistics per horizon and component."""


def component_weights(names: tuple[str, ...], weights: dict[str, float], what: str) -> torch.Tensor:
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"{what} names unknown reward components {unknown}; known: {list(names)}")
    return torch.tensor([float(weights.get(name, 1.0)) for name in names], dtype=torch.float32)


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    values = values[torch.isfinite(values)].double()
    if values.numel() == 0:
        return {}
    return {
        f"{prefix}/mean": values.mean().item(),
        f"{prefix}/std": values.std().item() if values.numel() > 1 else 0.0,
        f"{prefix}/abs_max": values.abs().max().item(),
    }


def compute_advantages(
    algo: AlgoConfig,
    *,
    turn_rewards: torch.Tensor,
    turn_session: torch.Tensor,
    turn_index: torch.Tensor,
    session_rewards: torch.Tensor,
    session_group: torch.Tensor,
    turn_reward_names: tuple[str, ...],
    session_reward_names: tuple[str, ...],
    token_turn: torch.Tensor | None = None,
) -> Advantages:
    """Advantages of every agent turn of a batch (and of every token with ``token_turn``)."""
    turn_w = component_weights(turn_reward_names, algo.turn_component_weights, "algo.turn_component_weights")
    session_w = component_weights(
        session_reward_names, algo.session_component_weights, "algo.session_component_weights"
    )
    num_groups = int(session_group.max().item()) + 1 if session_group.numel() else 0
    options = algo.advantage
    common = dict(scale=options.scale, eps=options.eps, num_groups=num_groups, nan_policy=options.nan_policy)
    metrics: dict[str, float] = {}
    for k, name in enumerate(turn_reward_names):
        metrics.update({f"reward/turn/{name}": turn_rewards[:, k].mean().item()} if len(turn_rewards) else {})
    for k, name in enumerate(session_reward_names):
        column = session_rewards[:, k]
        finite = column[torch.isfinite(column)]
        if finite.numel():
            metrics[f"reward/session/{name}"] = finite.mean().item()
    turn_total = turn_rewards.float() @ turn_w.to(turn_rewards.device)
    session_total = session_rewards.float() @ session_w.to(session_rewards.device)
    metrics.update(_stats("reward/turn_total", turn_total))
    metrics.update(_stats("reward/session_total", session_total))

    def hian(turn_weight: float, session_weight: float) -> torch.Tensor:
        return ops.hian_advantages(
            turn_rewards.float(),
            turn_session,
            session_rewards.float(),
            session_group,
            turn_weight=turn_weight,
            session_weight=session_weight,
            turn_scope=options.turn_scope,
            turn_index=turn_index,
            turn_component_weights=turn_w,
            session_component_weights=session_w,
            **common,
        )

    if algo.name == "duca":
        # Each horizon once (they are logged too); the fusion is then a weighted sum.
        turn_horizon, session_horizon = hian(1.0, 0.0), hian(0.0, 1.0)
        per_turn = options.turn_weight * turn_horizon + options.session_weight * session_horizon
        metrics.update(_stats("advantage/turn_horizon", turn_horizon))
        metrics.update(_stats("advantage/session_horizon", session_horizon))
    else:
        num_sessions = session_rewards.shape[0]
        # Per-session sums of every turn component: [S, Kt].
        turn_sums = torch.zeros(num_sessions, turn_rewards.shape[1]).index_add_(
            0, turn_session.long(), turn_rewards.float()
        )
        if algo.name == "grpo":
            merged = (turn_sums @ turn_w) + session_total
            per_session = ops.grpo_advantages(merged, session_group, **common)
        else:
            columns = torch.cat([turn_sums * turn_w, session_rewards.float() * session_w], dim=1)
            per_session = sum(
                ops.grpo_advantages(columns[:, k].contiguous(), session_group, **common)
                for k in range(columns.shape[1])
            )
        per_turn = per_session[turn_session.long()] if turn_session.numel() else per_session.new_zeros(0)
        metrics.update(_stats("advantage/session_horizon", per_session))
    metrics.update(_stats("advantage/fused", per_turn))
    per_token = None if token_turn is None else broadcast_to_tokens(per_turn, token_turn)
    return Advantages(per_turn=per_turn, per_token=per_token, metrics=metrics)


def broadcast_to_tokens(per_turn: torch.Tensor, token_turn: torch.Tensor) -> torch.Tensor:
    """``[N]`` advantage of each token from its turn's; 0 where ``token_turn`` is -1 (no loss)."""
    per_token = torch.zeros(token_turn.shape, dtype=per_turn.dtype)
    if per_turn.numel():
        per_token = torch.where(token_turn >= 0, per_turn[token_turn.clamp_min(0)], per_token)
    return per_token
