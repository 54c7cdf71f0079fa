"""Options and validated problem types of the advantage ops (a leaf module)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duca_fast.ops._checks import check_choice

TURN_SCOPES = ("group", "group_turn")


SCALES = ("group", "batch", "none")


NAN_POLICIES = ("raise", "omit")


STDS = ("unbiased", "population")


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
    std: str = "unbiased"
    """The std of ``scale`` ("group" or "batch"): "unbiased" (divide the squared deviations by n - 1, as
    GRPO's ``torch.std``) or "population" (by n, as ``numpy.std``; Dual-Track GRPO's)."""
    clip: float | None = None
    """When set (> 0), each horizon's normalized advantage is clamped to ``[-clip, clip]`` before the
    fusion (Dual-Track GRPO clamps its z-scores to +-10)."""

    def __post_init__(self) -> None:
        check_choice("turn_scope", self.turn_scope, TURN_SCOPES)
        check_choice("scale", self.scale, SCALES)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        check_choice("std", self.std, STDS)
        if self.clip is not None and (
            isinstance(self.clip, bool)
            or not isinstance(self.clip, (int, float))
            or not math.isfinite(self.clip)
            or self.clip <= 0
        ):
            raise ValueError(f"clip must be None or a finite number > 0, got {self.clip!r}")
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
