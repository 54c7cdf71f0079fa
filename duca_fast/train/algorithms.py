"""From two-horizon rewards to per-turn (and per-token) advantages: DuCA and the estimators beside it.

The estimator of ``algo.name`` comes from one table, ``ESTIMATORS``: each entry is a function of an
``EstimatorInputs`` returning ``[T]`` per-turn advantages and its own metrics, registered with
``@estimator(name, ...)`` (what it needs beyond the rewards, whether it is a group estimator). Adding an
estimator is one function here (plus, when it has options, their field in ``AlgoConfig``).

- ``duca``: HIAN (``ops.hian_advantages``); ``dual_track``: HIAN with the population std and each
  horizon clamped to ``algo.dual_track_clip`` (Dual-Track GRPO, TRUST-SQL).
- ``grpo``, ``gdpo``, ``mt_grpo``, ``session_only``, ``gopo``, ``ppo_gae``: ``train/estimators.py``.
- ``proxmo``: ``ops.proxmo_advantages`` over the turns' state features (``algo.proxmo``).
- ``otb``: ``ops.optimal_token_baseline_advantages`` (verl's multi-turn form) over the agent's tokens: one
  token per turn on the twin, every sampled token on the text task (``Advantages.per_agent_token``); their
  log-probs and sum p^2 from the policy's own ``token_logprobs``.

Formulas and sources: ``docs/algorithms.md``. Sessions whose session rewards are missing (NaN: cut or
failed) are left out of the statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from duca_fast import ops
from duca_fast.train import estimators
from duca_fast.train.estimators import TwoHorizonRewards

if TYPE_CHECKING:
    from duca_fast.train.config import AlgoConfig


@dataclass
class Advantages:
    per_turn: torch.Tensor
    """[T] fused advantage of each agent turn."""
    per_token: torch.Tensor | None
    """[N] advantage of each token (0 where token_turn is -1), when token_turn was given."""
    metrics: dict[str, float]
    """Reward and advantage statistics per horizon and component."""
    per_agent_token: torch.Tensor | None = None
    """[M] advantage of each agent token, from a token-level estimator (``otb`` given the ``agent_token_*``
    fields; ``per_turn`` is then each turn's mean over its tokens)."""


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


OPTIONAL_INPUTS = {
    "values": "the critic's [T] value of each turn",
    "turn_features": "a [T, D] feature vector of the state each turn acted in",
    "turn_logprobs": "the [T] log-prob of each turn's action under the sampling policy",
    "turn_sum_p2": "the [T] sum of squared probabilities of each turn's action distribution",
    "agent_token_turn": "the [M] turn of each agent token (with agent_token_logprobs and agent_token_sum_p2)",
}
"""What an estimator may need beyond the rewards (``Estimator.needs``): fields of ``TwoHorizonRewards``."""


@dataclass
class EstimatorInputs:
    """One batch as every estimator takes it: the config and the rewards, with the config's component
    weights in ``rewards`` (validated when built)."""

    algo: AlgoConfig
    rewards: TwoHorizonRewards

    @property
    def num_groups(self) -> int:
        group = self.rewards.session_group
        return int(group.max().item()) + 1 if group.numel() else 0

    def hian(self, options: ops.AdvantageOptions, turn_weight: float, session_weight: float) -> torch.Tensor:
        rewards = self.rewards
        return ops.hian_advantages(
            rewards.turn_rewards,
            rewards.turn_session,
            rewards.session_rewards,
            rewards.session_group,
            options=dataclasses.replace(options, turn_weight=turn_weight, session_weight=session_weight),
            turn_index=rewards.turn_index,
            turn_component_weights=rewards.turn_component_weights,
            session_component_weights=rewards.session_component_weights,
            num_groups=self.num_groups,
        )


@dataclass(frozen=True)
class Estimator:
    compute: Callable[[EstimatorInputs], tuple[torch.Tensor, dict[str, float]]]
    """``[T]`` per-turn advantages and the estimator's metrics; a token-level estimator may add a third
    item, the ``[M]`` advantage of every agent token (``Advantages.per_agent_token``)."""
    grouped: bool
    """Needs ``rollout.group_size >= 2``."""
    needs: tuple[str, ...]
    """Inputs of ``OPTIONAL_INPUTS`` it cannot run without."""
    per_session: bool
    """Every turn of a session gets the session's advantage (its metrics are over sessions)."""


ESTIMATORS: dict[str, Estimator] = {}
"""``algo.name`` -> estimator."""


def estimator(name: str, *, grouped: bool = True, needs: tuple[str, ...] = (), per_session: bool = False):
    """Register the decorated function as the estimator ``algo.name = name``."""
    unknown = sorted(set(needs) - set(OPTIONAL_INPUTS))
    if unknown:
        raise ValueError(f"estimator {name!r} needs unknown inputs {unknown}; known: {OPTIONAL_INPUTS}")

    def register(compute):
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is registered twice")
        ESTIMATORS[name] = Estimator(compute, grouped, needs, per_session)
        return compute

    return register


@estimator("duca")
def _duca(inputs: EstimatorInputs) -> tuple[torch.Tensor, dict[str, float]]:
    return _two_horizons(inputs, inputs.algo.advantage)


@estimator("dual_track")
def _dual_track(inputs: EstimatorInputs) -> tuple[torch.Tensor, dict[str, float]]:
    # Dual-Track GRPO: each track z-scored with the population std, clamped (docs/algorithms.md).
    options = dataclasses.replace(inputs.algo.advantage, std="population", clip=inputs.algo.dual_track_clip)
    return _two_horizons(inputs, options)


def _two_horizons(inputs: EstimatorInputs, options: ops.AdvantageOptions):
    # Each horizon once (they are logged too); the fusion is then a weighted sum.
    turn_horizon, session_horizon = inputs.hian(options, 1.0, 0.0), inputs.hian(options, 0.0, 1.0)
    per_turn = options.turn_weight * turn_horizon + options.session_weight * session_horizon
    metrics = {
        **_stats("advantage/turn_horizon", turn_horizon),
        **_stats("advantage/session_horizon", session_horizon),
    }
    return per_turn, metrics


def _weights(inputs: EstimatorInputs) -> dict[str, float]:
    options = inputs.algo.advantage
    return dict(turn_weight=options.turn_weight, session_weight=options.session_weight, eps=options.eps)


@estimator("grpo", per_session=True)
def _grpo(inputs: EstimatorInputs):
    return estimators.grpo(inputs.rewards, turn_agg=inputs.algo.turn_agg, **_weights(inputs)), {}


@estimator("gdpo", per_session=True)
def _gdpo(inputs: EstimatorInputs):
    return estimators.gdpo(inputs.rewards, turn_agg=inputs.algo.turn_agg, **_weights(inputs)), {}


@estimator("mt_grpo")
def _mt_grpo(inputs: EstimatorInputs):
    weights = _weights(inputs)
    weights["turn_weight"] *= inputs.algo.mt_grpo_lambda
    return estimators.mt_grpo(inputs.rewards, **weights), {}


@estimator("session_only", per_session=True)
def _session_only(inputs: EstimatorInputs):
    return estimators.session_only(inputs.rewards, eps=inputs.algo.advantage.eps), {}


@estimator("gopo", per_session=True)
def _gopo(inputs: EstimatorInputs):
    weights = _weights(inputs)
    weights.pop("eps")
    return estimators.gopo(inputs.rewards, turn_agg=inputs.algo.turn_agg, **weights), {}


@estimator("ppo_gae", grouped=False, needs=("values",))
def _ppo_gae(inputs: EstimatorInputs):
    batch = inputs.rewards
    raw, _ = gae_targets(inputs.algo, batch, batch.values)
    # Normalized over the batch's valid turns, as PPO does, so every estimator feeds the loss
    # advantages of unit scale whatever the reward scale.
    include = batch.valid_sessions()[batch.turn_session.cpu()]
    per_turn = estimators.batch_normalize(raw, include, inputs.algo.advantage.eps).float()
    metrics = {
        **_stats("advantage/gae_raw", raw),
        **_stats("value/mean_prediction", batch.values.detach().float()),
    }
    return per_turn, metrics


@estimator("proxmo", needs=("turn_features",))
def _proxmo(inputs: EstimatorInputs):
    rewards = inputs.rewards
    per_turn = ops.proxmo_advantages(
        rewards.turn_rewards,
        rewards.turn_session,
        rewards.session_rewards,
        rewards.session_group,
        rewards.turn_features.float(),
        options=inputs.algo.proxmo,
        turn_index=rewards.turn_index,
        turn_component_weights=rewards.turn_component_weights,
        session_component_weights=rewards.session_component_weights,
        num_groups=inputs.num_groups,
    )
    return per_turn, {}


@estimator("otb")
def _otb(inputs: EstimatorInputs):
    # verl's multi-turn optimal token baseline over the agent's tokens (positions counted over them only),
    # the turn's weighted reward on its last token, the session's added on the session's last.
    batch = inputs.rewards
    if batch.agent_token_turn is not None:
        return _otb_tokens(inputs)
    if batch.turn_logprobs is None or batch.turn_sum_p2 is None:
        raise ValueError(
            "algo.name=otb needs turn_logprobs and turn_sum_p2 (one action per turn) or agent_token_turn, "
            "agent_token_logprobs and agent_token_sum_p2 (text: one entry per agent token)"
        )
    # One action per turn: each turn is one token.
    turn = torch.arange(batch.turn_rewards.shape[0])
    advantages, valid = _otb_over(inputs, turn, batch.turn_logprobs, batch.turn_sum_p2)
    return advantages.float(), _stats("advantage/otb_raw", advantages[valid])


def _otb_tokens(inputs: EstimatorInputs):
    batch = inputs.rewards
    turn = batch.agent_token_turn.long().cpu()
    per_token, valid = _otb_over(inputs, turn, batch.agent_token_logprobs, batch.agent_token_sum_p2)
    # A turn's advantage (metrics, samples): the mean over its tokens; a turn without tokens gets 0.
    num_turns = batch.turn_rewards.shape[0]
    sums = torch.zeros(num_turns, dtype=torch.float64).index_add_(0, turn, per_token)
    counts = torch.bincount(turn, minlength=num_turns).double()
    per_turn = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)
    return per_turn.float(), _stats("advantage/otb_raw", per_token[valid]), per_token.float()


def _otb_over(inputs: EstimatorInputs, token_turn, logprobs, sum_p2) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 advantages of the tokens ``token_turn`` (each the turn it belongs to, a turn's tokens in
    sampling order) and which of them count (their session was not dropped)."""
    batch, options = inputs.rewards, inputs.algo.advantage
    session_of_turn = batch.turn_session.long().cpu()
    turn_index = batch.turn_index.long().cpu()
    # Stable sort by (session, turn): every session's tokens contiguous and in time order, as the op wants.
    key = session_of_turn[token_turn] * (int(turn_index.max()) + 1) + turn_index[token_turn]
    order = torch.sort(key, stable=True).indices
    turn = token_turn[order]
    session = session_of_turn[turn]
    valid = batch.valid_sessions()[session]
    last_of_turn = torch.ones_like(valid)
    last_of_turn[:-1] = turn[1:] != turn[:-1]
    last_of_session = torch.ones_like(valid)
    last_of_session[:-1] = session[1:] != session[:-1]
    rewards = torch.where(last_of_turn, options.turn_weight * batch.turn_totals()[turn], 0.0)
    session_reward = options.session_weight * batch.session_totals()[session]
    rewards = rewards + torch.where(last_of_session, session_reward, 0.0)
    advantages, _ = ops.optimal_token_baseline_advantages(
        rewards,
        logprobs.detach().double().cpu()[order],
        sum_p2.detach().double().cpu()[order],
        session,
        batch.session_group.long().cpu(),
        mask=valid,
        positions="loss_tokens",
    )
    out = torch.zeros_like(advantages)
    out[order] = advantages
    kept = torch.zeros_like(valid)
    kept[order] = valid
    return out, kept


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
    **optional: torch.Tensor | None,
) -> Advantages:
    """Advantages of every agent turn of a batch (and of every token with ``token_turn``).

    The estimator is ``ESTIMATORS[algo.name]``; ``optional`` holds the optional fields of
    ``TwoHorizonRewards`` it ``needs`` (``values`` for ``ppo_gae``, ``turn_features`` for ``proxmo``;
    for ``otb`` ``turn_logprobs`` and ``turn_sum_p2``, or the three ``agent_token_*`` fields)."""
    if algo.name not in ESTIMATORS:
        raise ValueError(f"algo.name must be one of {tuple(ESTIMATORS)}, got {algo.name!r}")
    unknown = sorted(set(optional) - set(estimators.OPTIONAL_FIELDS + estimators.TOKEN_FIELDS))
    if unknown:
        raise TypeError(f"compute_advantages got unknown inputs {unknown}")
    chosen = ESTIMATORS[algo.name]
    turn_weights = component_weights(
        turn_reward_names, algo.turn_component_weights, "algo.turn_component_weights"
    )
    session_weights = component_weights(
        session_reward_names, algo.session_component_weights, "algo.session_component_weights"
    )
    rewards = TwoHorizonRewards(
        turn_rewards=turn_rewards.float(),
        turn_session=turn_session.long(),
        turn_index=turn_index.long(),
        session_rewards=session_rewards.float(),
        session_group=session_group.long(),
        turn_component_weights=turn_weights,
        session_component_weights=session_weights,
        turn_reward_names=tuple(turn_reward_names),
        session_reward_names=tuple(session_reward_names),
        **optional,
    )
    for name in chosen.needs:
        if getattr(rewards, name) is None:
            raise ValueError(f"algo.name={algo.name} needs {name} ({OPTIONAL_INPUTS[name]})")
    metrics: dict[str, float] = {}
    for k, name in enumerate(turn_reward_names):
        metrics.update({f"reward/turn/{name}": turn_rewards[:, k].mean().item()} if len(turn_rewards) else {})
    for k, name in enumerate(session_reward_names):
        column = session_rewards[:, k]
        finite = column[torch.isfinite(column)]
        if finite.numel():
            metrics[f"reward/session/{name}"] = finite.mean().item()
    metrics.update(_stats("reward/turn_total", rewards.turn_rewards @ turn_weights.to(turn_rewards.device)))
    metrics.update(
        _stats("reward/session_total", rewards.session_rewards @ session_weights.to(session_rewards.device))
    )
    per_turn, own_metrics, *per_agent_token = chosen.compute(EstimatorInputs(algo, rewards))
    metrics.update(own_metrics)
    if chosen.per_session:
        # One advantage per session (shared by its turns): its statistics over sessions.
        per_session = torch.zeros(session_rewards.shape[0])
        per_session[turn_session.long().cpu()] = per_turn.float().cpu()
        metrics.update(_stats("advantage/session_horizon", per_session))
    metrics.update(_stats("advantage/fused", per_turn))
    per_token = None if token_turn is None else broadcast_to_tokens(per_turn, token_turn)
    return Advantages(per_turn, per_token, metrics, per_agent_token[0] if per_agent_token else None)


def broadcast_to_tokens(per_turn: torch.Tensor, token_turn: torch.Tensor) -> torch.Tensor:
    """``[N]`` advantage of each token from its turn's; 0 where ``token_turn`` is -1 (no loss)."""
    per_token = torch.zeros(token_turn.shape, dtype=per_turn.dtype)
    if per_turn.numel():
        per_token = torch.where(token_turn >= 0, per_turn[token_turn.clamp_min(0)], per_token)
    return per_token


def gae_targets(
    algo: AlgoConfig, batch: TwoHorizonRewards, values: torch.Tensor
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
    values the batch was played with, a ``task.TwoHorizonRewards``); NaN for turns of dropped sessions, which
    get no critic loss."""
    if rewards.values is None:
        raise ValueError("critic_targets needs rewards.values (the critic's [T] value of each turn)")
    batch = TwoHorizonRewards(
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
