"""Public advantage functions: thin wrappers over ``torch.ops.duca.hian_advantages`` / ``grpo_advantages``.

Options come as keywords or as one ``AdvantageOptions`` (``options=``); ``backend="reference"`` runs
the float64 ground truth of ``reference.py`` after the same validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from duca_fast.ops._checks import check_choice, check_tensor
from duca_fast.ops.advantages import reference
from duca_fast.ops.advantages.custom_ops import BACKENDS
from duca_fast.ops.advantages.options import AdvantageOptions
from duca_fast.ops.advantages.prepare import prepare_hian_problem

_DEFAULTS = AdvantageOptions()


def resolve_options(options: AdvantageOptions | None, **keywords) -> AdvantageOptions:
    """One options object from ``options=`` or the keywords; both at once only when they agree."""
    if options is None:
        return AdvantageOptions(**keywords)
    if not isinstance(options, AdvantageOptions):
        raise ValueError(f"options must be an AdvantageOptions, got {type(options).__name__}")
    for name, value in keywords.items():
        if value != getattr(_DEFAULTS, name) and value != getattr(options, name):
            raise ValueError(f"{name}={value!r} conflicts with options.{name}={getattr(options, name)!r}")
    return options


def _weights_tensor(name: str, weights, like: torch.Tensor) -> torch.Tensor | None:
    if weights is None or isinstance(weights, torch.Tensor):
        return weights
    try:
        return torch.as_tensor(weights, dtype=torch.float64, device=like.device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a sequence of numbers, got {weights!r}") from error


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
    std: str = "unbiased",
    clip: float | None = None,
    turn_component_weights: Sequence[float] | torch.Tensor | None = None,
    session_component_weights: Sequence[float] | torch.Tensor | None = None,
    num_turn_positions: int | None = None,
    validate: bool = True,
    backend: str = "auto",
    options: AdvantageOptions | None = None,
) -> torch.Tensor:
    """Fused dual-horizon advantages, one per agent turn (``[T]``) or per token (``[N]``).

    Args:
        turn_rewards: ``[T]`` or ``[T, Kt]`` turn-level rewards of every agent turn in the batch.
        turn_session: ``[T]`` int, the session of each turn (index into ``session_rewards``).
        session_rewards: ``[S]`` or ``[S, Ks]`` session-level rewards.
        session_group: ``[S]`` int (any integer dtype), the rollout group of each session. Ids need
            not be dense: when they exceed the number of sessions they are renumbered (exact; one
            host sync), so statistics are never sized by the largest id.
        turn_weight, session_weight: weights of the two normalized horizons in the fusion.
        turn_scope: "group" or "group_turn" (statistics per group and turn position; needs turn_index).
        turn_index: ``[T]`` int, position of each turn within its session.
        scale: "group", "batch" or "none" (see ``AdvantageOptions``).
        eps: added to the std.
        token_turn: ``[N]`` int, the turn of each token (-1: no loss, advantage 0); returns ``[N]``.
        num_groups: number of groups; inferred from ``session_group`` when None (one host sync).
        nan_policy: "raise" or "omit" (NaN rewards leave the statistics and get 0 in their horizon).
        std: "unbiased" (n - 1) or "population" (n) standard deviation for ``scale``.
        clip: clamp each horizon's normalized advantage to ``[-clip, clip]`` before the fusion (None: no
            clamp). ``std="population", clip=10.0`` with one horizon per track is Dual-Track GRPO
            (``docs/algorithms.md``).
        turn_component_weights, session_component_weights: weights of the reward components
            (columns) before they are summed per horizon; default 1 each.
        num_turn_positions: bound on ``turn_index`` for "group_turn"; inferred when None (one sync).
        validate: check id ranges and NaN/inf on the values (one host sync). With ``validate=False``,
            ``num_groups`` (<= number of sessions) and ``num_turn_positions`` given, the CUDA path does
            not synchronise with the host; out-of-range ids are then undefined behaviour.
        backend: "auto" (CUDA -> triton; CPU -> native when the library is built, else torch), "torch",
            "triton", "native" (the C++/CUDA library of ``kernels/``; an error when it is not built) or
            "reference".
        options: an ``AdvantageOptions`` instead of the option keywords.

    Returns:
        float32 advantages (float64 when a reward tensor is float64): ``[T]``, or ``[N]`` with
        ``token_turn``. A horizon statistic over fewer than 2 members gives 0 to those members.
    """
    options = resolve_options(
        options,
        turn_weight=turn_weight,
        session_weight=session_weight,
        turn_scope=turn_scope,
        scale=scale,
        eps=eps,
        nan_policy=nan_policy,
        std=std,
        clip=clip,
    )
    check_choice("backend", backend, BACKENDS)
    # Type checks before the dispatcher, whose own message would not name the argument.
    check_tensor("turn_rewards", turn_rewards, ndims=(1, 2), kind="float")
    check_tensor("session_rewards", session_rewards, ndims=(1, 2), kind="float")
    check_tensor("turn_session", turn_session, ndims=(1,), kind="int")
    check_tensor("session_group", session_group, ndims=(1,), kind="int")
    for name, ids in (("turn_index", turn_index), ("token_turn", token_turn)):
        if ids is not None:
            check_tensor(name, ids, ndims=(1,), kind="int")
    turn_weights = _weights_tensor("turn_component_weights", turn_component_weights, turn_rewards)
    session_weights = _weights_tensor("session_component_weights", session_component_weights, session_rewards)
    if backend == "reference":
        # Same validation as the fast paths; the arithmetic is the reference's own.
        prepare_hian_problem(
            turn_rewards,
            turn_session,
            session_rewards,
            session_group,
            options=options,
            turn_index=turn_index,
            token_turn=token_turn,
            num_groups=num_groups,
            num_turn_positions=num_turn_positions,
            turn_component_weights=turn_weights,
            session_component_weights=session_weights,
            validate=validate,
        )
        return reference.reference_hian_advantages(
            turn_rewards,
            turn_session,
            session_rewards,
            session_group,
            options=options,
            turn_index=turn_index,
            token_turn=token_turn,
            turn_component_weights=turn_weights,
            session_component_weights=session_weights,
        )
    return torch.ops.duca.hian_advantages(
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        num_groups,
        turn_index,
        token_turn,
        turn_weights,
        session_weights,
        *(getattr(options, field.name) for field in dataclasses.fields(AdvantageOptions)),
        num_turn_positions,
        validate,
        backend,
    )


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
    ``[S]`` int (any integer dtype; sparse ids are renumbered). Same conventions as
    ``hian_advantages`` (unbiased std, groups of one give 0).
    """
    check_tensor("rewards", rewards, ndims=(1, 2), kind="float")
    check_choice("backend", backend, BACKENDS)
    check_tensor("group", group, ndims=(1,), kind="int")
    weights = _weights_tensor("component_weights", component_weights, rewards)
    if backend == "reference":
        options = AdvantageOptions(0.0, 1.0, "group", scale, eps, nan_policy)
        num_sessions = rewards.shape[0]
        prepare_hian_problem(
            rewards.new_zeros(num_sessions),
            torch.arange(num_sessions, device=rewards.device),
            rewards,
            group,
            options=options,
            turn_index=None,
            token_turn=None,
            num_groups=num_groups,
            num_turn_positions=None,
            turn_component_weights=None,
            session_component_weights=weights,
            validate=validate,
        )
        return reference.reference_grpo_advantages(rewards, group, options=options, component_weights=weights)
    return torch.ops.duca.grpo_advantages(
        rewards, group, num_groups, weights, scale, eps, nan_policy, validate, backend
    )
