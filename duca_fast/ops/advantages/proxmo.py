"""ProxMO: a success-weighted episode advantage plus a proximity-baselined step advantage.

Source: "Proximity-Based Multi-Turn Optimization" (arXiv 2602.19225), official code ``GithubX-F/ProxMO-RL``
(commit 7f40b65, ``proxmo/core_proxmo.py``: ``episode_norm_reward``, ``compute_psc_weights``,
``step_soft_reward``, ``compute_step_discounted_returns``; run script ``examples/proxmo_trainer/
run_alfworld.sh``: mode ``soft_grouping``, gamma 0.95, step weight 1.0, ``psc_alpha`` 4.0,
``psc_target_range`` 0.05, groups of 8). Their rows are agent steps; here they are agent turns. For turn
``t`` of session ``i`` in group ``g`` (the statistics run over the group's *turns*, as theirs run over
step rows, so a longer session weighs more):

- episode: ``E_t = R_i - mu_g`` with ``R_i`` the session reward and ``mu_g`` its mean over the group's
  turns (0 when the group has a single turn); with PSC, ``p = clamp(mu_g, 0, 1)`` and
  ``E_t *= 1 + beta (sigmoid((1 - p)^alpha) - 1/2)`` when ``R_i > success_threshold`` (0.5, their
  ``rewards > 0.5``), else ``E_t *= 1 + beta (sigmoid(-p^alpha) - 1/2)``;
- step: ``G_t = sum_{k >= t} gamma^(k - t) r_k`` over the session's turn rewards in turn order, and the
  soft baseline ``b_t = sum_j softmax_j(cos(f_t, f_j) / temperature) G_j`` over the turns ``j`` of the
  same group, ``t`` itself included (features L2-normalized here, ``f / (|f| + 1e-8)``: a zero vector has
  cosine 0 with everything);
- ``A_t = E_t + step_weight (G_t - b_t)``.

Mapping to the two horizons (ours, by design): the session reward is the episode reward and the turn
rewards are the step rewards, so each horizon enters once (in their environments both are the terminal
success reward). ``beta`` defaults to their ``psc_target_range / (sigmoid(1) - 1/2)`` with range 0.05.
With ``nan_policy="omit"``, a session with a NaN session reward leaves every statistic and its turns get
0; so does a turn with a NaN turn reward (its reward counts as 0 in the returns of the turns before it).
No gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duca_fast.ops._checks import ValueChecks, check_choice, check_same_device, check_tensor, select_backend
from duca_fast.ops.advantages.options import NAN_POLICIES, AdvantageOptions, HianProblem
from duca_fast.ops.advantages.prepare import prepare_hian_problem

PSC_BETA = 0.05 / (1.0 / (1.0 + math.exp(-1.0)) - 0.5)
"""Their run script's ``psc_target_range`` 0.05 as ``beta = range / (sigmoid(1) - 0.5)`` (~0.2164)."""

FEATURE_EPS = 1e-8
"""Added to a feature row's norm before dividing (theirs)."""

BACKENDS = ("auto", "torch", "triton", "reference")


@dataclass(frozen=True)
class ProxmoOptions:
    """ProxMO's parameters (defaults: the official run script's)."""

    gamma: float = 0.95
    """Discount of the turn rewards in the step return ``G_t``."""
    step_weight: float = 1.0
    """``omega``: weight of the step advantage (their ``step_advantage_w``)."""
    temperature: float = 0.1
    """Softmax temperature of the proximity weights (their ``step_soft_reward`` default)."""
    psc: bool = True
    """Polarized Signal Controller: scale the episode advantage by the group's success rate."""
    psc_alpha: float = 4.0
    """PSC steepness ``alpha``."""
    psc_beta: float = PSC_BETA
    """PSC scale ``beta`` (weights stay within ``1 +- beta (sigmoid(1) - 1/2)``)."""
    success_threshold: float = 0.5
    """A session reward above it is a success for PSC (theirs: 0/1 rewards, ``> 0.5``)."""
    nan_policy: str = "raise"
    """"raise": NaN rewards are an error; "omit": sessions with a NaN session reward leave the statistics
    and their turns get 0."""

    def __post_init__(self) -> None:
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        for name in ("gamma", "step_weight", "temperature", "psc_alpha", "psc_beta", "success_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.psc_alpha <= 0:
            raise ValueError(f"psc_alpha must be > 0, got {self.psc_alpha}")
        if not isinstance(self.psc, bool):
            raise ValueError(f"psc must be True or False, got {self.psc!r}")


@dataclass(frozen=True)
class ProxmoProblem:
    """Validated inputs: the HIAN problem (rewards, ids, token_turn) plus ordering and features."""

    base: HianProblem
    features: torch.Tensor
    """[T, D] float32 features, L2-normalized (``f / (|f| + 1e-8)``)."""
    order_in_session: torch.Tensor
    """[T] int64 sort key of each turn within its session (``turn_index`` or the packed position)."""


def prepare_proxmo_problem(
    turn_rewards: torch.Tensor,
    turn_session: torch.Tensor,
    session_rewards: torch.Tensor,
    session_group: torch.Tensor,
    turn_features: torch.Tensor,
    *,
    options: ProxmoOptions,
    turn_index: torch.Tensor | None,
    token_turn: torch.Tensor | None,
    num_groups: int | None,
    turn_component_weights,
    session_component_weights,
    validate: bool,
) -> ProxmoProblem:
    base = prepare_hian_problem(
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        options=AdvantageOptions(nan_policy=options.nan_policy),
        turn_index=turn_index,
        token_turn=token_turn,
        num_groups=num_groups,
        num_turn_positions=None,
        turn_component_weights=turn_component_weights,
        session_component_weights=session_component_weights,
        validate=validate,
    )
    check_tensor("turn_features", turn_features, ndims=(2,), kind="float")
    num_turns = base.turn_session.shape[0]
    if turn_features.shape[0] != num_turns:
        raise ValueError(f"turn_features has {turn_features.shape[0]} rows but turn_rewards has {num_turns}")
    check_same_device({"turn_rewards": turn_rewards, "turn_features": turn_features})
    if validate:
        checks = ValueChecks()
        flat = turn_features.reshape(-1)
        columns = max(turn_features.shape[1], 1)
        checks.forbid(
            ~torch.isfinite(flat),
            lambda i: f"turn_features has a non-finite value at row {i // columns}, column {i % columns}",
        )
        checks.raise_if_failed()
    features = turn_features.float()
    features = features / (features.norm(dim=1, keepdim=True) + FEATURE_EPS)
    if base.turn_index is not None:
        order = base.turn_index
    else:
        order = torch.arange(num_turns, device=base.turn_session.device)
    return ProxmoProblem(base=base, features=features.contiguous(), order_in_session=order)


def session_sorted(problem: ProxmoProblem) -> torch.Tensor:
    """Turn permutation ordering turns by (session, position): two stable sorts, no host sync."""
    by_position = torch.argsort(problem.order_in_session, stable=True)
    return by_position[torch.argsort(problem.base.turn_session[by_position], stable=True)]


def group_sorted(problem: ProxmoProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(permutation by group, group of each turn)``; stable, no host sync."""
    group_of_turn = problem.base.session_group[problem.base.turn_session]
    return torch.argsort(group_of_turn, stable=True), group_of_turn


def valid_turns(problem: ProxmoProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(valid [T], session reward of each turn [T] float64, turn reward [T] float64)``; NaN sessions
    (``nan_policy="omit"``) are invalid and their values 0."""
    base = problem.base
    session_values = base.sessions.combined()
    session_of_turn = session_values[base.turn_session]
    turn_values = base.turns.combined()
    valid = ~torch.isnan(session_of_turn) & ~torch.isnan(turn_values)
    return valid, torch.where(valid, session_of_turn, 0.0), torch.where(valid, turn_values, 0.0)


def psc_weights(scores: torch.Tensor, mean: torch.Tensor, options: ProxmoOptions) -> torch.Tensor:
    p = mean.clamp(0.0, 1.0)
    success = 1.0 + options.psc_beta * (torch.sigmoid((1.0 - p) ** options.psc_alpha) - 0.5)
    failure = 1.0 + options.psc_beta * (torch.sigmoid(-(p**options.psc_alpha)) - 0.5)
    return torch.where(scores > options.success_threshold, success, failure)


def proxmo_advantages_torch(problem: ProxmoProblem, options: ProxmoOptions) -> torch.Tensor:
    """Vectorized: padded per-session return matrix, padded per-group similarity blocks (one host sync
    for each padding size)."""
    base = problem.base
    num_turns = base.turn_session.shape[0]
    device = base.turn_session.device
    valid, scores, rewards = valid_turns(problem)
    per_turn = torch.zeros(num_turns, dtype=torch.float64, device=device)
    if num_turns:
        returns = _discounted_returns_torch(problem, rewards, options.gamma)
        per_turn = _combine_torch(problem, options, valid, scores, returns)
    return _to_output(base, per_turn)


def _discounted_returns_torch(problem: ProxmoProblem, rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    order = session_sorted(problem)
    session = problem.base.turn_session[order]
    num_sessions = problem.base.session_group.shape[0]
    counts = torch.zeros(num_sessions, dtype=torch.long, device=rewards.device).index_add_(
        0, session, torch.ones_like(session)
    )
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(session.shape[0], device=rewards.device) - starts[session]
    length = int(counts.max().item())
    table = rewards.new_zeros(num_sessions, length)
    table[session, rank] = rewards[order]
    steps = torch.arange(length, device=rewards.device, dtype=torch.float64)
    distance = steps[:, None] - steps[None, :]  # [k, t] = k - t
    discount = torch.where(
        distance >= 0, torch.tensor(gamma, dtype=torch.float64) ** distance.clamp_min(0), 0.0
    )
    returns = torch.empty_like(rewards)
    returns[order] = (table @ discount)[session, rank]
    return returns


def _combine_torch(
    problem: ProxmoProblem,
    options: ProxmoOptions,
    valid: torch.Tensor,
    scores: torch.Tensor,
    returns: torch.Tensor,
) -> torch.Tensor:
    order, group_of_turn = group_sorted(problem)
    num_groups = problem.base.num_groups
    device = scores.device
    group = group_of_turn[order]
    counts = torch.zeros(num_groups, dtype=torch.long, device=device).index_add_(
        0, group, torch.ones_like(group)
    )
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(group.shape[0], device=device) - starts[group]
    width = int(counts.max().item())
    # Padded blocks [groups, width, ...]; padding and invalid turns are masked out of every statistic.
    live = torch.zeros(num_groups, width, dtype=torch.bool, device=device)
    live[group, rank] = valid[order]
    features = problem.features.new_zeros(num_groups, width, problem.features.shape[1])
    features[group, rank] = problem.features[order]
    block_returns = returns.new_zeros(num_groups, width)
    block_returns[group, rank] = returns[order]
    block_scores = scores.new_zeros(num_groups, width)
    block_scores[group, rank] = scores[order]

    members = live.sum(dim=1).double()
    mean = torch.where(members > 1, block_scores.sum(dim=1) / members.clamp_min(1.0), 0.0)
    episode = block_scores - mean[:, None]
    if options.psc:
        episode = episode * psc_weights(block_scores, mean[:, None], options)
    logits = (features @ features.transpose(1, 2)).double() / options.temperature
    logits = logits.masked_fill(~live[:, None, :], float("-inf"))
    # A row without live columns (only in groups without any live turn) would be NaN: give it a zero.
    logits = torch.where(live.any(dim=1)[:, None, None], logits, 0.0)
    weights = torch.softmax(logits, dim=2)
    baseline = (weights * block_returns[:, None, :]).sum(dim=2)
    fused = episode + options.step_weight * (block_returns - baseline)
    out = torch.zeros_like(scores)
    out[order] = torch.where(live, fused, 0.0)[group, rank]
    return out


def _to_output(base: HianProblem, per_turn: torch.Tensor) -> torch.Tensor:
    per_turn = per_turn.to(base.out_dtype)
    if base.token_turn is None:
        return per_turn
    if per_turn.numel() == 0:
        return per_turn.new_zeros(base.token_turn.shape)
    return torch.where(base.token_turn >= 0, per_turn[base.token_turn.clamp_min(0)], 0.0).to(base.out_dtype)


def proxmo_advantages(
    turn_rewards: torch.Tensor,
    turn_session: torch.Tensor,
    session_rewards: torch.Tensor,
    session_group: torch.Tensor,
    turn_features: torch.Tensor,
    *,
    gamma: float = 0.95,
    step_weight: float = 1.0,
    temperature: float = 0.1,
    psc: bool = True,
    psc_alpha: float = 4.0,
    psc_beta: float = PSC_BETA,
    success_threshold: float = 0.5,
    nan_policy: str = "raise",
    turn_index: torch.Tensor | None = None,
    token_turn: torch.Tensor | None = None,
    num_groups: int | None = None,
    turn_component_weights=None,
    session_component_weights=None,
    validate: bool = True,
    backend: str = "auto",
    options: ProxmoOptions | None = None,
) -> torch.Tensor:
    """ProxMO advantages (see the module docstring), one per turn ``[T]`` or per token ``[N]``.

    Args:
        turn_rewards: ``[T]`` or ``[T, Kt]`` turn rewards (the step rewards of ``G_t``).
        turn_session: ``[T]`` int, session of each turn.
        session_rewards: ``[S]`` or ``[S, Ks]`` session rewards (the episode reward).
        session_group: ``[S]`` int, rollout group of each session.
        turn_features: ``[T, D]`` float, a feature vector of the state each turn acted in (the twin's
            observation; TF-IDF of the customer's last message for text).
        turn_index: ``[T]`` int, position of each turn in its session; None: the packed order is the
            turn order.
        token_turn: ``[N]`` int, the turn of each token (-1: no loss, 0); returns ``[N]``.
        options: a ``ProxmoOptions`` instead of the option keywords (not both).
        backend: "auto" (CUDA -> triton, else torch), "torch", "triton" or "reference" (float64 loops).

    Returns float32 advantages (float64 when a reward tensor is float64).
    """
    keywords = dict(
        gamma=gamma,
        step_weight=step_weight,
        temperature=temperature,
        psc=psc,
        psc_alpha=psc_alpha,
        psc_beta=psc_beta,
        success_threshold=success_threshold,
        nan_policy=nan_policy,
    )
    if options is None:
        options = ProxmoOptions(**keywords)
    elif not isinstance(options, ProxmoOptions):
        raise ValueError(f"options must be a ProxmoOptions, got {type(options).__name__}")
    elif any(value != getattr(ProxmoOptions(), name) for name, value in keywords.items()):
        raise ValueError("give ProxMO's parameters either as options= or as keywords, not both")
    check_choice("backend", backend, BACKENDS)
    problem = prepare_proxmo_problem(
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        turn_features,
        options=options,
        turn_index=turn_index,
        token_turn=token_turn,
        num_groups=num_groups,
        turn_component_weights=turn_component_weights,
        session_component_weights=session_component_weights,
        validate=validate,
    )
    if backend == "reference":
        from duca_fast.ops.advantages.reference import reference_proxmo_advantages

        return reference_proxmo_advantages(
            turn_rewards,
            turn_session,
            session_rewards,
            session_group,
            turn_features,
            options=options,
            turn_index=turn_index,
            token_turn=token_turn,
            turn_component_weights=turn_component_weights,
            session_component_weights=session_component_weights,
        )
    if select_backend(backend, problem.base.turn_session.device) == "triton":
        from duca_fast.ops.advantages.proxmo_triton import proxmo_advantages_triton

        return proxmo_advantages_triton(problem, options)
    return proxmo_advantages_torch(problem, options)
