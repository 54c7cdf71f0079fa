"""Validation of the advantage inputs: every message names the argument; ids become dense int64."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from duca_fast.ops._checks import ValueChecks, check_length, check_same_device, check_tensor
from duca_fast.ops.advantages.options import AdvantageOptions, HianProblem, HorizonInput


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
    # Ids of any integer dtype (uint8 included: uint8 indexing would mean a boolean mask) become int64.
    turn_session, session_group = turn_session.long(), session_group.long()
    turn_index = None if turn_index is None else turn_index.long()
    token_turn = None if token_turn is None else token_turn.long()
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
    if num_groups > num_sessions:
        # Sparse ids (e.g. hashes): statistics only need equal ids to match, so renumber them densely
        # instead of sizing the statistics by the largest id. Exact; one host sync.
        session_group, num_groups = _dense_ids(session_group)
    if options.turn_scope == "group_turn":
        if num_turn_positions is None:
            num_turn_positions = int(turn_index.max().item()) + 1 if num_turns else 1
        if num_turn_positions > num_turns:
            turn_index, num_turn_positions = _dense_ids(turn_index)
    elif num_turn_positions is None:
        num_turn_positions = 1

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


def _dense_ids(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Renumber ids to 0..k-1 keeping their order (ties stay ties): ``(dense ids, k)``."""
    if ids.numel() == 0:
        return ids, 0
    unique, dense = torch.unique(ids, return_inverse=True)
    return dense, int(unique.numel())
