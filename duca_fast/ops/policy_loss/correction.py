"""Rollout correction: importance weights and rejection for the gap between the sampler and the trainer.

Vocabulary and semantics of verl 0.9.1's ``rollout_corr_helper.py``
(``compute_rollout_correction_and_rejection_mask``), on packed tokens. With ``d = old_logprobs -
behavior_logprobs`` (the trainer's log-prob of the sampled token minus the engine's sampler's):

- ``rollout_is="token"``: weight ``exp(clamp(d, -20, 20))`` per token; ``"sequence"``: the exp of the
  clamped sum of ``d`` over the sequence's loss tokens, for each of its tokens. ``rollout_is_threshold``
  a number truncates the weight above it (TIS); ``"lower_upper"`` zeroes it outside ``[lower, upper]``
  (IcePop). ``rollout_is_batch_normalize`` divides by the batch mean (per token, or of the per-sequence
  means). The weight multiplies the objective's term of each token (not KL or entropy), detached.
- ``rollout_rs``: comma-separated rejection rules ``token_k1|k2|k3``, ``seq_sum_k1|k2|k3``,
  ``seq_mean_k1|k2|k3``, ``seq_max_k2|k3`` with ``k1 = -d``, ``k2 = d^2 / 2``, ``k3 = exp(d) - 1 - d``
  (d clamped at +-20); ``rollout_rs_threshold`` one value per rule (or one for all): an upper bound, or
  for the k1 rules ``"lower_upper"`` ratio bounds (a single number u means ``1/u_u``), compared in log
  space. A rejected token leaves the loss and its normalizer (it becomes masked).

The weights and the rejection depend on inputs only (old and behavior log-probs), so they are computed
once for the whole batch before the chunked loop, and rejected tokens never enter the lm_head GEMMs.
``tis_cap=c`` is the shorthand the ops had before: ``RolloutCorrection("token", c)`` with its own metric.
"""

from __future__ import annotations

import ast
import functools
import math
from dataclasses import dataclass, fields

import torch

SAFETY_BOUND = 20.0
"""verl's clamp of log-ratios before exp()."""
RS_RULES = (
    *("token_k1", "token_k2", "token_k3"),
    *("seq_sum_k1", "seq_sum_k2", "seq_sum_k3"),
    *("seq_mean_k1", "seq_mean_k2", "seq_mean_k3"),
    *("seq_max_k2", "seq_max_k3"),
)
CORRECTION_METRICS = (
    "correction_weight_mean",
    "correction_weight_min",
    "correction_weight_max",
    "correction_ess",
    "correction_rejected_frac",
)


@dataclass(frozen=True)
class RolloutCorrection:
    """Importance weighting and/or rejection from ``old_logprobs - behavior_logprobs`` (verl's names)."""

    rollout_is: str | None = None
    """"token", "sequence" or None (no weights)."""
    rollout_is_threshold: float | str = 2.0
    """Upper truncation (TIS), or "lower_upper" (IcePop: weights outside are 0)."""
    rollout_is_batch_normalize: bool = False
    """Divide the weights by their batch mean."""
    rollout_rs: str | None = None
    """Comma-separated rejection rules (``RS_RULES``), or None."""
    rollout_rs_threshold: float | str | None = None
    """Thresholds of the rules, comma-separated (one for all, or one each)."""

    def __post_init__(self) -> None:
        if self.rollout_is is not None and self.rollout_is not in ("token", "sequence"):
            raise ValueError(f"rollout_is must be 'token', 'sequence' or None, got {self.rollout_is!r}")
        if self.rollout_is is None and self.rollout_rs is None:
            raise ValueError("RolloutCorrection needs rollout_is or rollout_rs (or both)")
        self.is_bounds()
        self.rs_bounds()

    def is_bounds(self) -> tuple[float, float | None]:
        """``(upper, lower or None)`` of the weight threshold."""
        spec = self.rollout_is_threshold
        if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
            raise ValueError(f"rollout_is_threshold must be a number or 'lower_upper', got {spec!r}")
        try:
            if isinstance(spec, str) and "_" in spec:
                lower_text, upper_text = spec.split("_", 1)
                lower, upper = float(lower_text), float(upper_text)
            else:
                lower, upper = None, float(spec)
        except ValueError as error:
            raise ValueError(f"rollout_is_threshold {spec!r} is not a number or 'lower_upper'") from error
        if not (math.isfinite(upper) and upper > 0) or (lower is not None and not 0 < lower <= upper):
            raise ValueError(f"rollout_is_threshold {spec!r}: need 0 < lower <= upper")
        return upper, lower

    def rs_bounds(self) -> list[tuple[str, float | None, float]]:
        """``[(rule, lower or None, upper)]``; k1 bounds are log-ratio bounds, the others plain."""
        if self.rollout_rs is None:
            return []
        rules = [rule.strip() for rule in self.rollout_rs.split(",") if rule.strip()]
        unknown = [rule for rule in rules if rule not in RS_RULES]
        if not rules or unknown:
            raise ValueError(f"rollout_rs rules must be among {', '.join(RS_RULES)}, got {self.rollout_rs!r}")
        if self.rollout_rs_threshold is None:
            raise ValueError("rollout_rs needs rollout_rs_threshold")
        specs = [part.strip() for part in str(self.rollout_rs_threshold).split(",") if part.strip()]
        if len(specs) not in (1, len(rules)):
            raise ValueError(f"rollout_rs_threshold: one value for all rules or one per rule ({len(rules)})")
        specs = specs * len(rules) if len(specs) == 1 else specs
        bounds = []
        for rule, spec in zip(rules, specs):
            try:
                if rule.endswith("k1"):
                    lower_text, _, upper_text = spec.partition("_") if "_" in spec else (None, "", spec)
                    upper = float(upper_text)
                    lower = float(lower_text) if lower_text is not None else 1.0 / upper
                    if not 0 < lower <= upper:
                        raise ValueError
                    bounds.append((rule, math.log(lower), math.log(upper)))
                else:
                    if "_" in spec:
                        raise ValueError
                    upper = float(spec)
                    if not upper > 0:
                        raise ValueError
                    bounds.append((rule, None, upper))
            except ValueError as error:
                raise ValueError(f"rollout_rs_threshold {spec!r} does not fit rule {rule!r}") from error
        return bounds

    def needs_seq_ids(self) -> bool:
        return self.rollout_is == "sequence" or any(rule.startswith("seq") for rule, _, _ in self.rs_bounds())

    def spec(self) -> str:
        """How the custom ops carry it (``parse_correction`` reads it back)."""
        return ";".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))


@functools.lru_cache(maxsize=64)
def parse_correction(spec: str) -> RolloutCorrection | None:
    if not spec:
        return None
    values = {}
    for item in spec.split(";"):
        key, _, text = item.partition("=")
        values[key] = ast.literal_eval(text)
    return RolloutCorrection(**values)


def as_correction_spec(correction: RolloutCorrection | str | None) -> str:
    if correction is None or (isinstance(correction, str) and not correction):
        return ""  # before any parsing: the wrappers run this under torch.compile's tracer
    if isinstance(correction, RolloutCorrection):
        return correction.spec()
    if isinstance(correction, str):
        parse_correction(correction)
        return correction
    raise ValueError(f"correction must be a RolloutCorrection, got {type(correction).__name__}")


def _per_sequence(values: torch.Tensor, seq: torch.Tensor, size: int, reduce: str) -> torch.Tensor:
    out = values.new_zeros(size)
    if reduce == "sum":
        return out.index_add_(0, seq, values)
    return out.fill_(-math.inf).scatter_reduce_(0, seq, values, reduce="amax")


@torch.no_grad()
def apply_correction(
    correction: RolloutCorrection,
    old_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    active: torch.Tensor,
    seq_ids: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """``(weights [N] or None, keep [N] bool, metrics)`` over the tokens with ``active`` True."""
    dtype = old_logprobs.dtype
    zero = torch.zeros((), dtype=dtype, device=old_logprobs.device)
    log_ratio = torch.where(active, old_logprobs - behavior_logprobs, zero)
    count = active.sum().clamp_min(1)
    loss = active.to(dtype)
    seq = None if seq_ids is None else seq_ids.long()
    size = 0 if seq is None or seq.numel() == 0 else int(seq.max()) + 1
    metrics: dict[str, torch.Tensor] = {}
    weights = None
    if correction.rollout_is is not None:
        upper, lower = correction.is_bounds()
        if correction.rollout_is == "token":
            raw = torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))
        else:
            sums = _per_sequence(log_ratio, seq, size, "sum")[seq] if size else log_ratio
            raw = torch.exp(sums.clamp(-SAFETY_BOUND, SAFETY_BOUND))
        raw = raw * loss
        if lower is None:
            weights = raw.clamp(max=upper)
        else:
            weights = torch.where((raw >= lower) & (raw <= upper), raw, zero)
        metrics["correction_weight_mean"] = (weights * loss).sum() / count
        any_active = bool(active.any())
        metrics["correction_weight_min"] = (
            torch.where(active, weights, math.inf).min() if any_active else zero
        )
        metrics["correction_weight_max"] = (
            torch.where(active, weights, -math.inf).max() if any_active else zero
        )
        capped = weights.clamp(0.0, upper)
        normalized = capped / ((capped * loss).sum() / count + 1e-8)
        metrics["correction_ess"] = 1.0 / ((normalized.square() * loss).sum() / count).clamp_min(1e-30)
        if correction.rollout_is_batch_normalize:
            # verl's masked means divide by (count + 1e-8); kept for exact agreement.
            if correction.rollout_is == "token":
                mean = (weights * loss).sum() / (loss.sum() + 1e-8)
            else:
                lengths = _per_sequence(loss, seq, size, "sum")
                seq_means = _per_sequence(weights * loss, seq, size, "sum") / (lengths + 1e-8)
                nonempty = (lengths > 0).to(dtype)
                mean = (seq_means * nonempty).sum() / nonempty.sum().clamp_min(1e-8)
            weights = torch.where(mean > 1e-8, weights / mean, weights)
    keep = active.clone()
    for rule, lower, upper in correction.rs_bounds():
        clamped = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
        estimator = rule[-2:]
        token = {"k1": -clamped, "k2": 0.5 * clamped**2, "k3": torch.exp(clamped) - 1.0 - clamped}[estimator]
        if rule.startswith("token"):
            stat = token
        elif rule.startswith("seq_max"):
            maxima = _per_sequence(torch.where(active, token, -math.inf), seq, size, "max")
            stat = torch.where(torch.isinf(maxima), zero, maxima)[seq]
        else:
            sums = _per_sequence(token * loss, seq, size, "sum")
            if rule.startswith("seq_mean"):
                sums = sums / (_per_sequence(loss, seq, size, "sum") + 1e-8)
            stat = sums[seq]
        passed = stat <= upper if lower is None else (stat >= lower) & (stat <= upper)
        keep &= passed
    metrics["correction_rejected_frac"] = ((active & ~keep).to(dtype)).sum() / count
    return weights, keep, metrics
