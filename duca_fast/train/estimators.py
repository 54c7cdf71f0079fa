"""Baseline advantage estimators over a packed two-horizon batch, beside DuCA (``ops.hian_advantages``).

Every estimator takes one ``TwoHorizonRewards`` and returns one float32 advantage per agent turn ``[T]``;
the trainer broadcasts it to tokens. Formulas and sources are in each docstring and in
``docs/algorithms.md``. Conventions shared with HIAN so that only the estimator differs in a comparison:

- Reward components are combined per horizon with the batch's component weights:
  ``r_t = sum_k w_k r_tk`` (turn total), ``R_i = sum_k v_k R_ik`` (session total).
- A group statistic is ``(x - mean_g x) / (std_g x + eps)`` with the unbiased (n-1) std; a statistic over
  fewer than 2 members gives 0 to those members (no signal, never NaN).
- A session with a NaN session reward (cut or failed) is left out of every statistic and all its turns
  get advantage 0. NaN turn rewards are an error.

``ppo_gae`` is not a group estimator: ``turn_level_rewards`` gives the per-turn rewards, ``gae`` the
advantages and critic targets from a critic's per-turn values, ``ValueHead`` / ``value_loss`` the critic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from duca_fast import ops

TURN_AGGS = ("mean", "sum")
"""How a session's turn totals become one number: their mean (length-neutral) or their sum."""


def _check_int_vector(name: str, value: torch.Tensor, length: int | None = None) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got {getattr(value, 'shape', type(value).__name__)}")
    if value.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {value.dtype}")
    if length is not None and value.numel() != length:
        raise ValueError(f"{name} must have {length} entries, got {value.numel()}")


def _check_rewards(name: str, value: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [n, K], got {getattr(value, 'shape', value)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {value.dtype}")


def _check_weights(name: str, weights: torch.Tensor | None, num: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(num, dtype=torch.float64)
    if not isinstance(weights, torch.Tensor) or weights.shape != (num,):
        raise ValueError(f"{name} must have shape ({num},), got {getattr(weights, 'shape', weights)}")
    if not torch.isfinite(weights).all():
        raise ValueError(f"{name} must be finite, got {weights.tolist()}")
    return weights.detach().to("cpu", torch.float64)


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (zero-variance groups then give 0), got {eps}")


def _check_turn_agg(turn_agg: str) -> None:
    if turn_agg not in TURN_AGGS:
        raise ValueError(f"turn_agg must be one of {TURN_AGGS}, got {turn_agg!r}")


OPTIONAL_FIELDS = ("values", "turn_features", "turn_logprobs", "turn_sum_p2")
"""Per-turn inputs only some estimators need (``algorithms.OPTIONAL_INPUTS``)."""
TOKEN_FIELDS = ("agent_token_turn", "agent_token_logprobs", "agent_token_sum_p2")
"""Per-agent-token inputs of a token-level estimator (``otb`` on the text task): all three or none."""


@dataclass(frozen=True)
class TwoHorizonRewards:
    """The rewards of one training batch, packed over agent turns and sessions (validated on creation):
    the one rewards type of the trainer (rollouts hand it to the loop, the loop to ``compute_advantages``,
    the estimators read it)."""

    turn_rewards: torch.Tensor
    """[T, Kt] turn reward components of every agent turn (finite), columns in ``turn_reward_names``."""
    turn_session: torch.Tensor
    """[T] int: session of each agent turn, in [0, S)."""
    turn_index: torch.Tensor
    """[T] int: position of the turn in its session; each session's turns are exactly 0..n_i-1."""
    session_rewards: torch.Tensor
    """[S, Ks] session reward components (a NaN anywhere in a row drops that session: cut or failed)."""
    session_group: torch.Tensor
    """[S] int >= 0: group (scenario) of each session."""
    turn_component_weights: torch.Tensor | None = None
    """[Kt] weights of the turn components (None: all 1)."""
    session_component_weights: torch.Tensor | None = None
    """[Ks] weights of the session components (None: all 1)."""
    turn_reward_names: tuple[str, ...] = ()
    """Names of the turn reward columns (empty: unnamed; ``compute_advantages`` needs them)."""
    session_reward_names: tuple[str, ...] = ()
    """Names of the session reward columns."""
    values: torch.Tensor | None = None
    """[T] value of each turn under the critic that played (``ppo_gae``; None without a critic)."""
    turn_features: torch.Tensor | None = None
    """[T, D] a feature vector of the state each turn acted in (``proxmo``)."""
    turn_logprobs: torch.Tensor | None = None
    """[T] log-prob of each turn's action under the sampling policy (``otb`` on the twin)."""
    turn_sum_p2: torch.Tensor | None = None
    """[T] sum of squared probabilities of each turn's action distribution (``otb`` on the twin)."""
    agent_token_turn: torch.Tensor | None = None
    """[M] int: turn of each agent token (``otb`` on the text task), every turn's tokens contiguous and in
    the order they were sampled, the turns of a session in order."""
    agent_token_logprobs: torch.Tensor | None = None
    """[M] log-prob of each agent token under the policy that sampled it."""
    agent_token_sum_p2: torch.Tensor | None = None
    """[M] sum of squared probabilities of the distribution each agent token was sampled from."""

    @staticmethod
    def of(batch: Any, **extras: Any) -> TwoHorizonRewards:
        """The reward fields of a batch that has them (a rollout's ``RolloutBatch``), plus ``extras``."""
        names = (
            "turn_rewards", "turn_session", "turn_index", "session_rewards", "session_group",
            "turn_reward_names", "session_reward_names",
        )  # fmt: skip
        return TwoHorizonRewards(**{name: getattr(batch, name) for name in names}, **extras)

    def as_kwargs(self) -> dict[str, Any]:
        """The fields ``compute_advantages`` takes, by name (the component weights come from the config)."""
        skipped = ("turn_component_weights", "session_component_weights")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}

    @staticmethod
    def concat(parts: list[TwoHorizonRewards]) -> TwoHorizonRewards:
        """One batch from several: session ids offset, group ids kept (they are the step's global ones);
        an optional per-turn (or per-agent-token) field is kept when every part has it."""
        sessions, turns, turn_session, token_turn = 0, 0, [], []
        for part in parts:
            turn_session.append(part.turn_session + sessions)
            if part.agent_token_turn is not None:
                token_turn.append(part.agent_token_turn + turns)
            sessions += part.session_rewards.shape[0]
            turns += part.turn_rewards.shape[0]
        optional = {}
        for name in OPTIONAL_FIELDS + TOKEN_FIELDS[1:]:
            present = [getattr(p, name) for p in parts]
            if all(value is not None for value in present):
                optional[name] = torch.cat(present)
        if len(token_turn) == len(parts):
            optional["agent_token_turn"] = torch.cat(token_turn)
        return TwoHorizonRewards(
            turn_rewards=torch.cat([p.turn_rewards for p in parts]),
            turn_session=torch.cat(turn_session),
            turn_index=torch.cat([p.turn_index for p in parts]),
            session_rewards=torch.cat([p.session_rewards for p in parts]),
            session_group=torch.cat([p.session_group for p in parts]),
            turn_component_weights=parts[0].turn_component_weights,
            session_component_weights=parts[0].session_component_weights,
            turn_reward_names=parts[0].turn_reward_names,
            session_reward_names=parts[0].session_reward_names,
            **optional,
        )

    def __post_init__(self) -> None:
        _check_rewards("turn_rewards", self.turn_rewards)
        _check_rewards("session_rewards", self.session_rewards)
        num_turns, num_sessions = self.turn_rewards.shape[0], self.session_rewards.shape[0]
        _check_int_vector("turn_session", self.turn_session, num_turns)
        _check_int_vector("turn_index", self.turn_index, num_turns)
        _check_int_vector("session_group", self.session_group, num_sessions)
        bad = (~torch.isfinite(self.turn_rewards)).nonzero()
        if bad.numel():
            raise ValueError(f"turn_rewards has a non-finite value at [turn, component] {bad[0].tolist()}")
        if num_turns and not (
            int(self.turn_session.min()) >= 0 and int(self.turn_session.max()) < num_sessions
        ):
            raise ValueError(
                f"turn_session values must lie in [0, {num_sessions}) (S = session_rewards rows)"
            )
        if num_sessions and int(self.session_group.min()) < 0:
            raise ValueError("session_group values must be >= 0")
        if num_turns:
            if int(self.turn_index.min()) < 0:
                raise ValueError("turn_index values must be >= 0")
            length = torch.bincount(self.turn_session.long(), minlength=num_sessions)
            if bool((self.turn_index.long() >= length[self.turn_session.long()]).any()):
                raise ValueError("turn_index must run 0..n_i-1 over the n_i turns of each session")
            key = self.turn_session.long() * (int(length.max()) + 1) + self.turn_index.long()
            if key.unique().numel() != num_turns:
                raise ValueError("turn_index repeats a position within a session")
        _check_weights("turn_component_weights", self.turn_component_weights, self.turn_rewards.shape[1])
        _check_weights(
            "session_component_weights", self.session_component_weights, self.session_rewards.shape[1]
        )
        for what, names, rewards in (
            ("turn_reward_names", self.turn_reward_names, self.turn_rewards),
            ("session_reward_names", self.session_reward_names, self.session_rewards),
        ):
            if names and len(names) != rewards.shape[1]:
                raise ValueError(f"{what} has {len(names)} names for {rewards.shape[1]} reward columns")
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None and value.shape[0] != num_turns:
                raise ValueError(f"{name} has {value.shape[0]} rows but there are {num_turns} turns")
        self._check_token_fields(num_turns)

    def _check_token_fields(self, num_turns: int) -> None:
        given = [name for name in TOKEN_FIELDS if getattr(self, name) is not None]
        if not given:
            return
        if len(given) != len(TOKEN_FIELDS):
            missing = [name for name in TOKEN_FIELDS if name not in given]
            raise ValueError(f"{given} given without {missing}: the agent-token fields come together")
        _check_int_vector("agent_token_turn", self.agent_token_turn)
        count = self.agent_token_turn.shape[0]
        for name in TOKEN_FIELDS[1:]:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dim() != 1 or not value.is_floating_point():
                raise ValueError(f"{name} must be a 1-D float tensor")
            if value.shape[0] != count:
                raise ValueError(f"{name} has {value.shape[0]} entries but agent_token_turn has {count}")
        turn = self.agent_token_turn
        if count and not (int(turn.min()) >= 0 and int(turn.max()) < num_turns):
            raise ValueError(f"agent_token_turn values must lie in [0, {num_turns}) (T = turn_rewards rows)")

    @property
    def num_sessions(self) -> int:
        return self.session_rewards.shape[0]

    def valid_sessions(self) -> torch.Tensor:
        """[S] bool: sessions whose session rewards are all finite (the others enter no statistic)."""
        return torch.isfinite(self.session_rewards).all(dim=1).cpu()

    def turn_weights(self) -> torch.Tensor:
        """[Kt] float64 ``w_k``."""
        num = self.turn_rewards.shape[1]
        return _check_weights("turn_component_weights", self.turn_component_weights, num)

    def session_weights(self) -> torch.Tensor:
        """[Ks] float64 ``v_k``."""
        num = self.session_rewards.shape[1]
        return _check_weights("session_component_weights", self.session_component_weights, num)

    def session_columns(self) -> torch.Tensor:
        """[S, Ks] float64 unweighted session components (0 in dropped sessions)."""
        rewards = self.session_rewards.detach().cpu().double()
        return torch.where(self.valid_sessions()[:, None], rewards, 0.0)

    def turn_totals(self) -> torch.Tensor:
        """[T] float64 ``r_t = sum_k w_k r_tk``."""
        return self.turn_rewards.detach().cpu().double() @ self.turn_weights()

    def session_totals(self) -> torch.Tensor:
        """[S] float64 ``R_i = sum_k v_k R_ik`` (0 in dropped sessions)."""
        return self.session_columns() @ self.session_weights()

    def session_lengths(self) -> torch.Tensor:
        """[S] int64 number of agent turns of each session."""
        return torch.bincount(self.turn_session.cpu().long(), minlength=self.num_sessions)

    def aggregate_turns(self, per_turn: torch.Tensor, turn_agg: str) -> torch.Tensor:
        """Per-session sum or mean of per-turn values ``[T, ...] -> [S, ...]`` (no turns: 0)."""
        _check_turn_agg(turn_agg)
        out = per_turn.new_zeros((self.num_sessions, *per_turn.shape[1:]))
        out.index_add_(0, self.turn_session.cpu().long(), per_turn)
        if turn_agg == "mean":
            length = self.session_lengths().clamp_min(1).to(per_turn.dtype)
            out = out / length.reshape(-1, *([1] * (per_turn.dim() - 1)))
        return out

    def to_turns(self, per_session: torch.Tensor) -> torch.Tensor:
        """``[S]`` session values -> ``[T]`` float32 per-turn values (each turn gets its session's)."""
        session = self.turn_session.cpu().long()
        return per_session[session].float().to(self.turn_rewards.device)


TwoHorizonBatch = TwoHorizonRewards
"""The former name of ``TwoHorizonRewards`` (one type; kept for callers of the estimators)."""


def in_groups_of_two(group: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """[n] bool: members with ``include`` whose group has at least 2 members with ``include``."""
    group = group.cpu().long()
    num_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.int64).index_add_(0, group, include.long())
    return include & (count[group] >= 2)


def group_normalize(
    values: torch.Tensor, group: torch.Tensor, include: torch.Tensor, eps: float
) -> torch.Tensor:
    """``(x - mean_g) / (std_g + eps)`` per group over the members with ``include``; 0 elsewhere.

    ``std_g`` is the unbiased std; groups with fewer than 2 included members give 0. All of ``[n]``,
    float64. This is ``ops.grpo_advantages`` with the excluded members as NaN (``nan_policy="omit"``).
    """
    _check_eps(eps)
    masked = torch.where(include.cpu().bool(), values.detach().double().cpu(), float("nan"))
    return ops.grpo_advantages(masked, group.cpu().long(), eps=eps, nan_policy="omit")


def batch_normalize(values: torch.Tensor, include: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over the members with ``include`` (unbiased std); 0 elsewhere and when
    fewer than 2 members are included."""
    _check_eps(eps)
    values = values.double()
    if int(include.sum()) < 2:
        return torch.zeros_like(values)
    chosen = values[include]
    return torch.where(include, (values - chosen.mean()) / (chosen.std() + eps), 0.0)


def grpo(
    batch: TwoHorizonRewards,
    *,
    turn_agg: str = "mean",
    turn_weight: float = 1.0,
    session_weight: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO with one scalar reward per session; every turn of a session shares its advantage.

    ``X_i = session_weight * R_i + turn_weight * agg_{t in i} r_t`` with ``agg`` the mean (default, neutral
    to session length) or the sum of the session's turn totals; ``A_i = (X_i - mean_g X) / (std_g X + eps)``
    over the sessions of group g; ``A_t = A_{session(t)}``. Source: Shao et al. 2024, DeepSeekMath (GRPO
    outcome supervision), arXiv:2402.03300, eq. for Â_{i,t}; multi-turn use as in the DuCA paper's baseline.
    """
    valid = batch.valid_sessions()
    merged = session_weight * batch.session_totals() + turn_weight * batch.aggregate_turns(
        batch.turn_totals(), turn_agg
    )
    return batch.to_turns(group_normalize(merged, batch.session_group, valid, eps))


def gopo(
    batch: TwoHorizonRewards, *, turn_agg: str = "mean", turn_weight: float = 1.0, session_weight: float = 1.0
) -> torch.Tensor:
    """GOPO: the same per-session score as ``grpo`` (``X_i = session_weight * R_i + turn_weight *
    agg_t r_t``), ranked within its group instead of standardized: ``A_i = 2 - 4 (rank_i - 1) / (G - 1)``,
    rank 1 = the best session of the G valid sessions of the group (ties in batch order; a group with one
    valid session gives 0); ``A_t = A_{session(t)}``. Source: arXiv 2602.03876, ``friendshipkim/gopo``
    (``ops.gopo_advantages``). Sessions with a NaN session reward get 0 and are not ranked.
    """
    from duca_fast.ops import gopo_advantages

    valid = batch.valid_sessions()
    merged = session_weight * batch.session_totals() + turn_weight * batch.aggregate_turns(
        batch.turn_totals(), turn_agg
    )
    per_session = torch.zeros(merged.shape[0], dtype=torch.float32)
    if bool(valid.any()):
        per_session[valid] = gopo_advantages(merged[valid].float(), batch.session_group[valid])
    return batch.to_turns(per_session)


def session_only(batch: TwoHorizonRewards, *, eps: float = 1e-6) -> torch.Tensor:
    """Ablation: only the session horizon. ``A_i = (R_i - mean_g R) / (std_g R + eps)``, shared by the turns
    of session i; turn rewards are ignored (``grpo`` with ``turn_weight=0``)."""
    return grpo(batch, turn_weight=0.0, session_weight=1.0, eps=eps)


def gdpo(
    batch: TwoHorizonRewards,
    *,
    turn_agg: str = "mean",
    turn_weight: float = 1.0,
    session_weight: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GDPO: each reward component normalized per group on its own, weighted sum, batch renormalization.

    Components per session: ``c_ik = agg_{t in i} r_tk`` for every turn component (weight
    ``turn_weight * w_k``) and ``R_ik`` for every session component (weight ``session_weight * v_k``).
    ``A^k_i = (c_ik - mean_g c_k) / (std_g c_k + eps)``; ``S_i = sum_k weight_k A^k_i``;
    ``A_i = (S_i - mean_B S) / (std_B S + eps)`` over the batch's sessions in groups of >= 2 valid
    sessions; ``A_t = A_{session(t)}``. Source: "GDPO: Group reward-Decoupled Normalization Policy
    Optimization for Multi-reward RL Optimization" (NVIDIA, 2026), arXiv:2601.05242, and its reference
    code (NVlabs/GDPO, ``trl-GDPO`` ``grpo_trainer.py``: per-reward group mean/std, weighted ``nansum``,
    batch mean/std). The reference adds eps 1e-4; here eps is the same for every estimator.
    """
    valid = batch.valid_sessions()
    group = batch.session_group
    turn_columns = batch.aggregate_turns(batch.turn_rewards.detach().cpu().double(), turn_agg)
    columns = torch.cat([turn_columns, batch.session_columns()], dim=1)
    weights = torch.cat([turn_weight * batch.turn_weights(), session_weight * batch.session_weights()])
    summed = sum(
        (weights[k] * group_normalize(columns[:, k], group, valid, eps) for k in range(columns.shape[1])),
        torch.zeros(batch.num_sessions, dtype=torch.float64),
    )
    include = in_groups_of_two(group, valid)
    return batch.to_turns(batch_normalize(summed, include, eps))


def mt_grpo(
    batch: TwoHorizonRewards,
    *,
    turn_weight: float = 1.0,
    session_weight: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """MT-GRPO turn-level advantage estimation, generalized from 2 to T turns.

    ``A^O_i = (R_i - mean_g R) / (std_g R + eps)`` (outcome, over the sessions of group g);
    ``A^T_t = (r_t - mean r) / (std r + eps)`` over the turns of group g at the same position
    ``turn_index`` (fewer than 2 such turns: 0); ``A_t = session_weight * A^O_{session(t)} +
    turn_weight * A^T_t``. Source: Zeng et al. 2025, "Reinforcing Multi-Turn Reasoning in LLM Agents via
    Turn-Level Credit Assignment", arXiv:2505.11821, and its code (SiliangZeng/Multi-Turn-RL-Agent,
    ``mt_grpo_env_trainer.py``: turn-1 tokens get ``A^O + lambda A^T``, the final turn ``A^O``;
    ``turn_weight`` is that ``lambda``, ``turn_advantage_coef``, 1 in the paper). There only the first of
    two turns has a turn reward; here every turn has one, so every turn gets its position's ``A^T``.
    """
    valid = batch.valid_sessions()
    outcome = batch.to_turns(group_normalize(batch.session_totals(), batch.session_group, valid, eps))
    session = batch.turn_session.cpu().long()
    index = batch.turn_index.cpu().long()
    positions = int(index.max()) + 1 if index.numel() else 1
    # One "group" per (scenario group, turn position).
    group_position = batch.session_group.cpu().long()[session] * positions + index
    turn_level = group_normalize(batch.turn_totals(), group_position, valid[session], eps).float()
    return session_weight * outcome + turn_weight * turn_level.to(outcome.device)


def turn_level_rewards(
    batch: TwoHorizonRewards, *, turn_agg: str = "mean", turn_weight: float = 1.0, session_weight: float = 1.0
) -> torch.Tensor:
    """[T] float32 per-turn rewards for a critic: ``turn_weight * r_t / n_i`` (``turn_agg="mean"``, so the
    session's undiscounted return holds the mean turn total) or ``turn_weight * r_t`` (``"sum"``), plus
    ``session_weight * R_i`` on the session's last turn. Turns of dropped sessions get 0."""
    _check_turn_agg(turn_agg)
    session = batch.turn_session.cpu().long()
    length = batch.session_lengths()[session].double()
    turn_part = batch.turn_totals() / (length if turn_agg == "mean" else 1.0)
    last = batch.turn_index.cpu().long() == length.long() - 1
    rewards = turn_weight * turn_part + session_weight * batch.session_totals()[session] * last
    valid = batch.valid_sessions()[session]
    return torch.where(valid, rewards, 0.0).float().to(batch.turn_rewards.device)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    turn_session: torch.Tensor,
    turn_index: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the agent turns of each session; every session ends terminal.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` after the last turn is 0), ``A_t = delta_t + gamma lam
    A_{t+1}``, critic targets ``G_t = A_t + V_t``. Returns ``(advantages, returns)``, both ``[T]`` float32
    in the input's order (turns may be packed in any order; ``turn_index`` orders them). Source: Schulman et
    al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    arXiv:1506.02438, eq. 16; one step = one agent turn, as in turn-level critics for LLM agents (ArCHer,
    Zhou et al. 2024, arXiv:2402.19446).
    """
    if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    for name, tensor in (("rewards", rewards), ("values", values)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a 1-D float tensor, got {getattr(tensor, 'shape', tensor)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(
                f"{name} has a non-finite value at index {int((~torch.isfinite(tensor)).nonzero()[0])}"
            )
    num_turns = rewards.numel()
    if values.numel() != num_turns:
        raise ValueError(f"values must have {num_turns} entries like rewards, got {values.numel()}")
    _check_int_vector("turn_session", turn_session, num_turns)
    _check_int_vector("turn_index", turn_index, num_turns)
    if num_turns == 0:
        return rewards.new_zeros(0).float(), rewards.new_zeros(0).float()
    session, index = turn_session.cpu().long(), turn_index.cpu().long()
    if int(session.min()) < 0 or int(index.min()) < 0:
        raise ValueError("turn_session and turn_index must be >= 0")
    num_sessions, width = int(session.max()) + 1, int(index.max()) + 1
    present = torch.zeros(num_sessions, width + 1, dtype=torch.bool)
    present[session, index] = True
    if int(present.sum()) != num_turns or bool((present[:, 1:] & ~present[:, :-1]).any()):
        raise ValueError("turn_index must run 0..n_i-1 without repeats over the turns of each session")
    dense_reward = torch.zeros(num_sessions, width + 1, dtype=torch.float64)
    dense_value = torch.zeros(num_sessions, width + 1, dtype=torch.float64)
    dense_reward[session, index] = rewards.detach().cpu().double()
    dense_value[session, index] = values.detach().cpu().double()
    advantage = torch.zeros(num_sessions, width + 1, dtype=torch.float64)
    for position in range(width - 1, -1, -1):
        # Absent next turns hold value 0 and advantage 0: the terminal bootstrap.
        delta = dense_reward[:, position] + gamma * dense_value[:, position + 1] - dense_value[:, position]
        advantage[:, position] = delta + gamma * lam * advantage[:, position + 1]
        advantage[:, position] *= present[:, position]
    per_turn = advantage[session, index]
    returns = per_turn + dense_value[session, index]
    return per_turn.float().to(rewards.device), returns.float().to(rewards.device)


class ValueHead(nn.Module):
    """The critic of ``ppo_gae`` on the twin: an MLP from an observation vector to one value.

    ``observation [B, observation_size] -> value [B]``; tanh hidden layers (cleanrl's PPO critic), last
    layer initialized small so early values stay near 0.
    """

    def __init__(self, observation_size: int, hidden_size: int = 64, num_layers: int = 2) -> None:
        super().__init__()
        if observation_size < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"observation_size, hidden_size and num_layers must be >= 1, got "
                f"{observation_size}, {hidden_size}, {num_layers}"
            )
        layers: list[nn.Module] = []
        width = observation_size
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.Tanh()]
            width = hidden_size
        out = nn.Linear(width, 1)
        nn.init.normal_(out.weight, std=0.01)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)
        self.observation_size = observation_size

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        if observation.dim() != 2 or observation.shape[1] != self.observation_size:
            raise ValueError(
                f"observation must have shape [B, {self.observation_size}], got {tuple(observation.shape)}"
            )
        return self.net(observation).squeeze(-1)


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor | None = None,
    *,
    clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic loss ``0.5 * mean((V - G)^2)``; with ``clip`` and ``old_values`` the PPO clipped form
    ``0.5 * mean(max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2))``. Returns ``(loss, metrics)``."""
    if values.shape != returns.shape or values.dim() != 1:
        raise ValueError(
            f"values and returns must be 1-D of one shape, got {values.shape} and {returns.shape}"
        )
    if clip is not None and (old_values is None or old_values.shape != values.shape or not clip > 0):
        raise ValueError("clip needs old_values of the values' shape and clip > 0")
    if values.numel() == 0:
        raise ValueError("value_loss needs at least one value")
    returns = returns.detach()
    squared = (values - returns) ** 2
    if clip is not None:
        clipped = old_values.detach() + (values - old_values.detach()).clamp(-clip, clip)
        squared = torch.maximum(squared, (clipped - returns) ** 2)
    loss = 0.5 * squared.mean()
    with torch.no_grad():
        variance = returns.var(unbiased=False) if returns.numel() > 1 else returns.new_zeros(())
        explained = (
            1 - (returns - values).var(unbiased=False) / variance if variance > 0 else returns.new_zeros(())
        )
        metrics = {
            "value/loss": loss.item(),
            "value/mean": values.mean().item(),
            "value/explained_variance": float(explained),
        }
    return loss, metrics
