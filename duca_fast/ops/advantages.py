"""Horizon-Independent Advantage Normalization (HIAN) and the one-horizon GRPO baseline.

Turn-level rewards (one per agent turn) and session-level rewards (one per session) are each
normalized within their rollout group, then fused into one advantage per agent turn:

    A_t = turn_weight * A^turn_t + session_weight * A^sess_{session(t)}

so that a large sparse session reward cannot drown the small dense turn signals.

Three implementations sit behind one API and give the same numbers:
- ``reference``: float64, a plain Python loop over groups; the ground truth for tests.
- ``torch``: vectorized (``index_add_`` scatters, no loop over groups), float64 statistics; CPU default.
- ``triton``: three kernel launches whatever the number of groups, float64 atomics; CUDA default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from duca_fast.ops._checks import (
    ValueChecks,
    check_choice,
    check_length,
    check_same_device,
    check_tensor,
    select_backend,
)

TURN_SCOPES = ("group", "group_turn")
SCALES = ("group", "batch", "none")
NAN_POLICIES = ("raise", "omit")


@dataclass(frozen=True)
class AdvantageOptions:
    """How rewards become advantages (one frozen object instead of many positional flags)."""

    turn_weight: float = 1.0
    """Weight of the normalized turn-level advantage in the fused advantage."""
    session_weight: float = 1.0
    """Weight of the normalized session-level advantage in the fused advantage."""
    turn_scope: str = "group"
    """"group": turn statistics over all turns of the group; "group_turn": only over the turns of the
    group at the same position in their session (needs ``turn_index``)."""
    scale: str = "group"
    """"group": divide by the group's unbiased std + eps; "batch": divide by the unbiased std (+ eps) of
    all centered values of the horizon; "none": center only (Dr.GRPO)."""
    eps: float = 1e-6
    """Added to the std; must be > 0 so that zero-variance groups give 0, not noise."""
    nan_policy: str = "raise"
    """"raise": NaN rewards are an error; "omit": they leave the statistics and get 0 in their horizon."""

    def __post_init__(self) -> None:
        check_choice("turn_scope", self.turn_scope, TURN_SCOPES)
        check_choice("scale", self.scale, SCALES)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        for name in ("turn_weight", "session_weight", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.eps <= 0:
            raise ValueError(
                f"eps must be > 0 (it keeps zero-variance groups at 0), got {self.eps}; "
                "use scale='none' to center without scaling"
            )


@dataclass(frozen=True)
class HorizonInput:
    """One horizon's rewards, validated: ``rewards [M, K]`` combined with ``weights [K]`` (float64)."""

    rewards: torch.Tensor
    weights: torch.Tensor

    def combined(self) -> torch.Tensor:
        """Weighted sum of the components in float64 ([M]); NaN when any component is NaN."""
        return (self.rewards.double() * self.weights).sum(dim=1)


@dataclass(frozen=True)
class HianProblem:
    """Validated inputs of ``hian_advantages``."""

    turns: HorizonInput
    sessions: HorizonInput
    turn_session: torch.Tensor
    session_group: torch.Tensor
    turn_index: torch.Tensor | None
    token_turn: torch.Tensor | None
    num_groups: int
    num_turn_positions: int
    out_dtype: torch.dtype


def _component_weights(
    name: str, weights: Sequence[float] | torch.Tensor | None, rewards: torch.Tensor
) -> torch.Tensor:
    num_components = rewards.shape[1]
    if weights is None:
        return torch.ones(num_components, dtype=torch.float64, device=rewards.device)
    tensor = torch.as_tensor(weights, dtype=torch.float64).to(rewards.device)
    if tensor.dim() != 1 or tensor.shape[0] != num_components:
        raise ValueError(
            f"{name} must have one weight per reward component ({num_components}), "
            f"got shape {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite, got {tensor.tolist()}")
    return tensor


def _check_rewards(checks: ValueChecks, name: str, rewards: torch.Tensor, nan_policy: str) -> None:
    if rewards.numel() == 0:
        return
    flat = rewards.reshape(-1)
    columns = max(rewards.shape[1], 1)
    if nan_policy == "raise":
        # min and max propagate NaN and see inf: one reduction instead of a mask over every reward.
        smallest, largest = torch.aminmax(flat)
        checks.forbid_flagged(
            ~(torch.isfinite(smallest) & torch.isfinite(largest)),
            lambda: ~torch.isfinite(flat),
            lambda i: (
                f"{name} has a non-finite value at flat index {i} "
                f"(row {i // columns}); pass nan_policy='omit' to leave NaN rewards out"
            ),
        )
    else:
        checks.forbid(
            torch.isinf(flat),
            lambda i: f"{name} has an infinite value at flat index {i} (row {i // columns})",
        )


def prepare_hian_problem(
    turn_rewards: torch.Tensor,
    turn_session: torch.Tensor,
    session_rewards: torch.Tensor,
    session_group: torch.Tensor,
    *,
    options: AdvantageOptions,
    turn_index: torch.Tensor | None,
    token_turn: torch.Tensor | None,
    num_groups: int | None,
    num_turn_positions: int | None,
    turn_component_weights: Sequence[float] | torch.Tensor | None,
    session_component_weights: Sequence[float] | torch.Tensor | None,
    validate: bool,
) -> HianProblem:
    """Check every argument (names in the messages) and bring rewards to ``[M, K]``."""
    check_tensor("turn_rewards", turn_rewards, ndims=(1, 2), kind="float")
    check_tensor("session_rewards", session_rewards, ndims=(1, 2), kind="float")
    check_tensor("turn_session", turn_session, ndims=(1,), kind="int")
    check_tensor("session_group", session_group, ndims=(1,), kind="int")
    num_turns, num_sessions = turn_rewards.shape[0], session_rewards.shape[0]
    check_length("turn_session", turn_session, num_turns, "turn_rewards")
    check_length("session_group", session_group, num_sessions, "session_rewards")
    if turn_index is not None:
        check_tensor("turn_index", turn_index, ndims=(1,), kind="int")
        check_length("turn_index", turn_index, num_turns, "turn_rewards")
    if options.turn_scope == "group_turn" and turn_index is None:
        raise ValueError("turn_scope='group_turn' needs turn_index (position of each turn in its session)")
    if token_turn is not None:
        check_tensor("token_turn", token_turn, ndims=(1,), kind="int")
    check_same_device(
        {
            "turn_rewards": turn_rewards,
            "turn_session": turn_session,
            "session_rewards": session_rewards,
            "session_group": session_group,
            "turn_index": turn_index,
            "token_turn": token_turn,
        }
    )
    turn_rewards_2d = turn_rewards if turn_rewards.dim() == 2 else turn_rewards[:, None]
    session_rewards_2d = session_rewards if session_rewards.dim() == 2 else session_rewards[:, None]
    if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int)):
        raise ValueError(f"num_groups must be an int, got {num_groups!r}")
    if num_groups is not None and num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    if num_turn_positions is not None and (
        isinstance(num_turn_positions, bool)
        or not isinstance(num_turn_positions, int)
        or num_turn_positions < 0
    ):
        raise ValueError(f"num_turn_positions must be an int >= 0, got {num_turn_positions!r}")

    if validate:
        checks = ValueChecks()
        checks.forbid_outside("turn_session", turn_session, 0, num_sessions, "number of sessions")
        checks.forbid_outside("session_group", session_group, 0, num_groups, "num_groups")
        if turn_index is not None:
            checks.forbid_outside("turn_index", turn_index, 0, num_turn_positions, "num_turn_positions")
        if token_turn is not None:
            checks.forbid_outside("token_turn", token_turn, -1, num_turns, "-1 = no loss, else a turn")
        _check_rewards(checks, "turn_rewards", turn_rewards_2d, options.nan_policy)
        _check_rewards(checks, "session_rewards", session_rewards_2d, options.nan_policy)
        checks.raise_if_failed()

    if num_groups is None:
        num_groups = int(session_group.max().item()) + 1 if num_sessions else 0
    if num_turn_positions is None:
        needs_positions = options.turn_scope == "group_turn" and num_turns > 0
        num_turn_positions = int(turn_index.max().item()) + 1 if needs_positions else 1

    dtypes = (turn_rewards.dtype, session_rewards.dtype)
    out_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    return HianProblem(
        turns=HorizonInput(
            turn_rewards_2d,
            _component_weights("turn_component_weights", turn_component_weights, turn_rewards_2d),
        ),
        sessions=HorizonInput(
            session_rewards_2d,
            _component_weights("session_component_weights", session_component_weights, session_rewards_2d),
        ),
        turn_session=turn_session,
        session_group=session_group,
        turn_index=turn_index,
        token_turn=token_turn,
        num_groups=num_groups,
        num_turn_positions=num_turn_positions,
        out_dtype=out_dtype,
    )


def hian_advantages(
    turn_rewards: torch.Tensor,
    turn_session: torch.Tensor,
    session_rewards: torch.Tensor,
    session_group: torch.Tensor,
    *,
    turn_weight: float = 1.0,
    session_weight: float = 1.0,
    turn_scope: str = "group",
    turn_index: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-6,
    token_turn: torch.Tensor | None = None,
    num_groups: int | None = None,
    nan_policy: str = "raise",
    turn_component_weights: Sequence[float] | torch.Tensor | None = None,
    session_component_weights: Sequence[float] | torch.Tensor | None = None,
    num_turn_positions: int | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused dual-horizon advantages, one per agent turn (``[T]``) or per token (``[N]``).

    Args:
        turn_rewards: ``[T]`` or ``[T, Kt]`` turn-level rewards of every agent turn in the batch.
        turn_session: ``[T]`` int, the session of each turn (index into ``session_rewards``).
        session_rewards: ``[S]`` or ``[S, Ks]`` session-level rewards.
        session_group: ``[S]`` int, the rollout group of each session.
        turn_weight, session_weight: weights of the two normalized horizons in the fusion.
        turn_scope: "group" or "group_turn" (statistics per group and turn position; needs turn_index).
        turn_index: ``[T]`` int, position of each turn within its session.
        scale: "group", "batch" or "none" (see ``AdvantageOptions``).
        eps: added to the std.
        token_turn: ``[N]`` int, the turn of each token (-1: no loss, advantage 0); returns ``[N]``.
        num_groups: number of groups; inferred from ``session_group`` when None (one host sync).
        nan_policy: "raise" or "omit" (NaN rewards leave the statistics and get 0 in their horizon).
        turn_component_weights, session_component_weights: weights of the reward components
            (columns) before they are summed per horizon; default 1 each.
        num_turn_positions: bound on ``turn_index`` for "group_turn"; inferred when None (one sync).
        validate: check id ranges and NaN/inf on the values (one host sync). With ``validate=False``,
            ``num_groups`` (and ``num_turn_positions`` for "group_turn") given, the CUDA path does not
            synchronise with the host; out-of-range ids are then undefined behaviour.
        backend: "auto" (CUDA -> triton, else torch), "torch", "triton" or "reference".

    Returns:
        float32 advantages (float64 when a reward tensor is float64): ``[T]``, or ``[N]`` with
        ``token_turn``. A horizon statistic over fewer than 2 members gives 0 to those members.
    """
    options = AdvantageOptions(turn_weight, session_weight, turn_scope, scale, eps, nan_policy)
    problem = prepare_hian_problem(
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        options=options,
        turn_index=turn_index,
        token_turn=token_turn,
        num_groups=num_groups,
        num_turn_positions=num_turn_positions,
        turn_component_weights=turn_component_weights,
        session_component_weights=session_component_weights,
        validate=validate,
    )
    chosen = select_backend(backend, turn_rewards.device)
    if chosen == "triton":
        from duca_fast.ops.advantages_triton import hian_advantages_triton

        return hian_advantages_triton(problem, options)
    if chosen == "reference":
        return hian_advantages_reference(problem, options)
    return hian_advantages_torch(problem, options)


def grpo_advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    num_groups: int | None = None,
    nan_policy: str = "raise",
    component_weights: Sequence[float] | torch.Tensor | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """One-horizon GRPO advantages: ``(R - mean_g R) / (std_g R + eps)`` per group, ``[S]``.

    ``rewards`` is ``[S]`` or ``[S, K]`` (components summed with ``component_weights``); ``group``
    ``[S]`` int. Same conventions as ``hian_advantages`` (unbiased std, groups of one give 0).
    """
    check_tensor("rewards", rewards, ndims=(1, 2), kind="float")
    num_sessions = rewards.shape[0]
    # One zero-weighted dummy turn per session: the fused per-turn output is the session advantage.
    return hian_advantages(
        rewards.new_zeros(num_sessions),
        torch.arange(num_sessions, device=rewards.device),
        rewards,
        group,
        turn_weight=0.0,
        session_weight=1.0,
        scale=scale,
        eps=eps,
        num_groups=num_groups,
        nan_policy=nan_policy,
        session_component_weights=component_weights,
        validate=validate,
        backend=backend,
    )


# ---------------------------------------------------------------------------------------------------
# torch paths


def turn_keys(problem: HianProblem, options: AdvantageOptions) -> tuple[torch.Tensor, int]:
    """Statistic bucket of each turn and the number of buckets."""
    group_of_turn = problem.session_group[problem.turn_session].long()
    if options.turn_scope == "group":
        return group_of_turn, problem.num_groups
    positions = problem.num_turn_positions
    return group_of_turn * positions + problem.turn_index.long(), problem.num_groups * positions


def _finish(
    problem: HianProblem,
    options: AdvantageOptions,
    turn_advantages: torch.Tensor,
    session_advantages: torch.Tensor,
) -> torch.Tensor:
    fused = options.turn_weight * turn_advantages
    if problem.turn_session.numel():
        fused = fused + options.session_weight * session_advantages[problem.turn_session.long()]
    fused = fused.to(problem.out_dtype)
    if problem.token_turn is None:
        return fused
    has_loss = problem.token_turn >= 0
    if fused.numel() == 0:
        return torch.zeros(problem.token_turn.shape, dtype=problem.out_dtype, device=fused.device)
    return torch.where(has_loss, fused[problem.token_turn.long().clamp_min(0)], fused.new_zeros(()))


def normalize_horizon_torch(
    values: torch.Tensor, keys: torch.Tensor, num_keys: int, options: AdvantageOptions
) -> torch.Tensor:
    """Vectorized grouped normalization in float64: two passes (mean, then centered squares)."""
    if options.nan_policy == "omit":
        valid = ~torch.isnan(values)
        x = torch.where(valid, values, 0.0)
        counts = x.new_zeros(num_keys).index_add_(0, keys, valid.double())
    else:
        # Validated (or promised) NaN-free: no masks to build (a third of this function's time).
        valid = None
        x = values
        counts = torch.bincount(keys, minlength=num_keys).to(x.dtype)
    means = x.new_zeros(num_keys).index_add_(0, keys, x) / counts.clamp_min(1.0)
    member_counts = counts[keys]
    has_stats = member_counts >= 2 if valid is None else valid & (member_counts >= 2)
    centered = torch.where(has_stats, x - means[keys], 0.0)
    if options.scale == "none":
        return centered
    squared = centered * centered
    if options.scale == "group":
        sq_dev = x.new_zeros(num_keys).index_add_(0, keys, squared)
        std = torch.sqrt(sq_dev / (counts - 1.0).clamp_min(1.0))[keys]
    else:
        num_members = has_stats.sum()
        std = torch.sqrt(squared.sum() / (num_members - 1).clamp_min(1))
    return centered / (std + options.eps)


def hian_advantages_torch(problem: HianProblem, options: AdvantageOptions) -> torch.Tensor:
    """Vectorized path: ``index_add_`` scatters, no Python loop over groups."""
    keys, num_keys = turn_keys(problem, options)
    if options.turn_scope == "group_turn" and keys.numel():
        # Compact the (group, position) buckets so the scatter tables stay small.
        _, keys = torch.unique(keys, return_inverse=True)
        num_keys = int(keys.max().item()) + 1
    turn_adv = normalize_horizon_torch(problem.turns.combined(), keys, num_keys, options)
    session_adv = normalize_horizon_torch(
        problem.sessions.combined(), problem.session_group.long(), problem.num_groups, options
    )
    return _finish(problem, options, turn_adv, session_adv)


def _normalize_horizon_reference(
    values: torch.Tensor, keys: torch.Tensor, options: AdvantageOptions
) -> torch.Tensor:
    advantages = torch.zeros_like(values)
    centered_parts, member_parts = [], []
    for key in torch.unique(keys).tolist():
        members = ((keys == key) & ~torch.isnan(values)).nonzero().flatten()
        if members.numel() < 2:
            continue
        group_values = values[members]
        centered = group_values - group_values.mean()
        centered_parts.append(centered)
        member_parts.append(members)
        if options.scale == "group":
            advantages[members] = centered / (group_values.std(correction=1) + options.eps)
        else:
            advantages[members] = centered
    if options.scale == "batch" and centered_parts:
        batch_std = torch.cat(centered_parts).std(correction=1)
        for members, centered in zip(member_parts, centered_parts):
            advantages[members] = centered / (batch_std + options.eps)
    return advantages


def hian_advantages_reference(problem: HianProblem, options: AdvantageOptions) -> torch.Tensor:
    """Ground truth: float64, one Python loop over groups, written to be obviously right."""
    keys, _ = turn_keys(problem, options)
    turn_adv = _normalize_horizon_reference(problem.turns.combined(), keys, options)
    session_adv = _normalize_horizon_reference(
        problem.sessions.combined(), problem.session_group.long(), options
    )
    return _finish(problem, options, turn_adv, session_adv)
