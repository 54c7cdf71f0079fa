"""From two-horizon rewards to per-turn (and per-token) advantages: DuCA and its baselines.

- ``duca``: HIAN (``ops.hian_advantages``). Turn rewards and session rewards are normalized separately
  within each group, then fused: every turn gets its own advantage.
- ``grpo``, ``gdpo``, ``mt_grpo``, ``session_only``, ``ppo_gae``: the estimators of
  ``train/estimators.py`` (formulas and sources in their docstrings and ``docs/algorithms.md``), with
  ``algo.turn_agg``, ``advantage.turn_weight`` / ``session_weight`` and ``advantage.eps``.
  ``advantage.scale`` / ``turn_scope`` / ``nan_policy`` are DuCA's (the baselines always omit NaN sessions).

Sessions whose session rewards are missing (NaN: cut or failed) are left out of the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from duca_fast import ops
from duca_fast.train import estimators
from duca_fast.train.config import ALGORITHMS, AlgoConfig
from duca_fast.train.estimators import TwoHorizonBatch


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


def advantage_weights(algo: AlgoConfig, rewards: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The turn and session component weights of ``algo`` for a batch with reward names."""
    return (
        component_weights(
            rewards.turn_reward_names, algo.turn_component_weights, "algo.turn_component_weights"
        ),
        component_weights(
            rewards.session_reward_names, algo.session_component_weights, "algo.session_component_weights"
        ),
    )


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
    values: torch.Tensor | None = None,
) -> Advantages:
    """Advantages of every agent turn of a batch (and of every token with ``token_turn``).

    ``values`` (``[T]``, the critic's value of each turn) is needed by ``ppo_gae`` only."""
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
        batch = TwoHorizonBatch(
            turn_rewards=turn_rewards.float(),
            turn_session=turn_session.long(),
            turn_index=turn_index.long(),
            session_rewards=session_rewards.float(),
            session_group=session_group.long(),
            turn_component_weights=turn_w,
            session_component_weights=session_w,
        )
        if algo.name == "ppo_gae":
            if values is None:
                raise ValueError("algo.name=ppo_gae needs values (the critic's [T] value of each turn)")
            raw, _ = gae_targets(algo, batch, values)
            # Normalized over the batch's valid turns, as PPO does, so every estimator feeds the loss
            # advantages of unit scale whatever the reward scale.
            include = batch.valid_sessions()[turn_session.long().cpu()]
            per_turn = estimators.batch_normalize(raw, include, options.eps).float()
            metrics.update(_stats("advantage/gae_raw", raw))
            metrics.update(_stats("value/mean_prediction", values.detach().float()))
        else:
            weights = dict(
                turn_weight=options.turn_weight, session_weight=options.session_weight, eps=options.eps
            )
            if algo.name == "grpo":
                per_turn = estimators.grpo(batch, turn_agg=algo.turn_agg, **weights)
            elif algo.name == "gdpo":
                per_turn = estimators.gdpo(batch, turn_agg=algo.turn_agg, **weights)
            elif algo.name == "mt_grpo":
                weights["turn_weight"] = options.turn_weight * algo.mt_grpo_lambda
                per_turn = estimators.mt_grpo(batch, **weights)
            elif algo.name == "session_only":
                per_turn = estimators.session_only(batch, eps=options.eps)
            elif algo.name == "gopo":
                weights.pop("eps")
                per_turn = estimators.gopo(batch, turn_agg=algo.turn_agg, **weights)
            else:
                raise ValueError(f"algo.name must be one of {ALGORITHMS}, got {algo.name!r}")
            if algo.name != "mt_grpo":
                # One advantage per session (shared by its turns): its statistics over sessions.
                per_session = torch.zeros(session_rewards.shape[0])
                per_session[turn_session.long().cpu()] = per_turn.float().cpu()
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


def gae_targets(
    algo: AlgoConfig, batch: TwoHorizonBatch, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ppo_gae``: raw GAE advantages and critic targets ``[T]`` from the critic's ``values``.

    Per-turn rewards are ``estimators.turn_level_rewards`` (turn totals aggregated by ``algo.turn_agg``,
    the session total on the last turn, weights from ``algo.advantage``); dropped sessions get target
    0 and advantage 0."""
    options = algo.advantage
    rewards = estimators.turn_level_rewards(
        batch, turn_agg=algo.turn_agg, turn_weight=options.turn_weight, session_weight=options.session_weight
    )
    raw, returns = estimators.gae(
        rewards,
        values.detach().float(),
        batch.turn_session,
        batch.turn_index,
        gamma=algo.critic.gamma,
        lam=algo.critic.lam,
    )
    valid = batch.valid_sessions()[batch.turn_session.long().cpu()].to(raw.device)
    return torch.where(valid, raw, 0.0), torch.where(valid, returns, 0.0)


def critic_targets(algo: AlgoConfig, rewards: Any) -> torch.Tensor:
    """``ppo_gae``: ``[T]`` critic targets of a batch's turns from its rewards and ``rewards.values`` (the
    values the batch was played with, a ``task.CriticRewards``); NaN for turns of dropped sessions, which
    get no critic loss."""
    if rewards.values is None:
        raise ValueError("critic_targets needs rewards.values (the critic's [T] value of each turn)")
    batch = TwoHorizonBatch(
        rewards.turn_rewards.float(),
        rewards.turn_session.long(),
        rewards.turn_index.long(),
        rewards.session_rewards.float(),
        rewards.session_group.long(),
        *advantage_weights(algo, rewards),
    )
    _, returns = gae_targets(algo, batch, rewards.values)
    valid = batch.valid_sessions()[batch.turn_session.cpu()].to(returns.device)
    return torch.where(valid, returns, float("nan"))
