"""What every objective provides, and the small helpers they share.

An objective is the policy-gradient term of the loss: a per-token loss ``l_t`` (the term is
``sum_t w_t * l_t`` with the aggregation weights ``w``), the derivative of that sum with respect to each
token's log-prob, and its own metrics. A token-level objective's derivative at token t depends on token t
alone (``w_t * dl_t/dlogp_t``); a sequence-level one (``sequence_level = True``) also on the other tokens
of t's sequence, so the fused op runs it on chunks that hold whole sequences (or in two passes).

KL penalty, entropy bonus and the rollout correction's importance weights are applied around the
objective by ``head.policy_head`` (the weights it is given already include the correction), so they
compose with every objective. Each objective also carries ``reference``: the same term written plainly
for float64 autograd, sharing no code with ``terms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

LOG_RATIO_LIMIT = 20.0
"""exp() arguments are clamped at +-20 (as verl does for log-ratios): a stale old log-prob cannot overflow."""


@dataclass(frozen=True)
class ObjectiveBatch:
    """What an objective sees (compute dtype, no autograd)."""

    logprobs: torch.Tensor
    """[N] current log-probs."""
    old_logprobs: torch.Tensor
    """[N] log-probs of the policy that sampled (the current ones, detached, when on-policy)."""
    advantages: torch.Tensor
    weights: torch.Tensor
    """[N] aggregation weight of each token (times the rollout-correction weight); 0 when masked."""
    active: torch.Tensor
    """bool [N]: the token carries loss."""
    seq_ids: torch.Tensor | None
    """int64 [N] sequence of each token; sequence-level objectives get whole sequences."""


@dataclass(frozen=True)
class ObjectiveTerms:
    loss: torch.Tensor
    """[N] per-token loss l_t; the objective's part of the loss is ``sum(weights * loss)``."""
    grad: torch.Tensor
    """[N] d sum(weights * loss) / d logprobs_t."""
    metrics: dict[str, torch.Tensor]
    """Scalars named as in ``options.METRIC_KEYS`` (clip_frac_low, clip_frac_high, dual_clip_frac)."""


class Objective:
    """Base of the frozen parameter dataclasses in this package (one file each, registered by name).

    ``inherits`` names fields that, left at None, take the value of the ``PolicyLossOptions`` field of the
    same name (clip_low, clip_high, dual_clip): ``objective="gspo"`` with ``clip_low=3e-4`` reads like
    verl's actor config, where every loss mode takes ``clip_ratio_low``/``clip_ratio_high``.
    """

    name: ClassVar[str] = ""
    sequence_level: ClassVar[bool] = False
    inherits: ClassVar[tuple[str, ...]] = ()
    takes_correction_weights: ClassVar[bool] = True
    """False when the objective has no token-level place for importance weights (GeoMean)."""

    def validate(self) -> None:
        """Raise ValueError naming the parameter (called once the inherited values are filled in)."""

    def needs_seq_ids(self) -> bool:
        return self.sequence_level

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        raise NotImplementedError

    def reference(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        active: torch.Tensor,
        seq_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Float64 per-token loss, differentiable through ``logprobs`` (masked entries may be anything),
        and the metrics, written plainly from the formula's source."""
        raise NotImplementedError

    def spec(self) -> str:
        """``name`` or ``name:field=value,...`` (fields that are not None): how the custom ops carry it."""
        given = [(f.name, getattr(self, f.name)) for f in fields(self)]
        values = [f"{name}={value!r}" for name, value in given if value is not None]
        return self.name + (":" + ",".join(values) if values else "")


def masked_mean(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    count = active.sum().clamp_min(1)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(active, values, zero).sum() / count


def reference_share(selected: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Float64 share of the active tokens where ``selected`` (0 when none is active), for the references'
    metrics; the fast paths use ``masked_mean``."""
    chosen = selected[active]
    return chosen.double().mean() if chosen.numel() else torch.zeros((), dtype=torch.float64)


def sequence_sums(values: torch.Tensor, seq_ids: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """[N]: for each token, the sum of ``values`` over the active tokens of its sequence."""
    if seq_ids.numel() == 0:
        return values.clone()
    seq = seq_ids.long()
    size = int(seq.max()) + 1
    kept = torch.where(active, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values.new_zeros(size).index_add_(0, seq, kept)[seq]


def check_number(
    owner: str, name: str, value, *, minimum: float | None = None, above: float | None = None, below=None
) -> None:
    """``owner.name`` must be a finite number (>= minimum, > above, < below when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ValueError(f"{owner}.{name} must be > {above}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{owner}.{name} must be < {below}, got {value}")
