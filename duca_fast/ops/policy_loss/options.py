"""Options and per-token types of the policy loss (a leaf module: kernels and paths import it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duca_fast.ops._checks import check_choice
from duca_fast.ops.policy_loss.correction import CORRECTION_METRICS, parse_correction
from duca_fast.ops.policy_loss.objectives.base import LOG_RATIO_LIMIT

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")


KL_TYPES = ("k1", "k2", "k3")


__all__ = ["LOG_RATIO_LIMIT", "MASK_METRICS", "METRIC_KEYS", "HeadOutput", "PolicyLossOptions", "TokenInputs"]
# -inf logits (a masked vocabulary entry or bias) are raised to this floor: exp() still gives exactly 0,
# and 0 * floor is 0 where 0 * -inf would be NaN (entropy, d-logits).
NEG_LOGIT_FLOOR = -1e30


# Default token-chunk budget for the torch path: chunk x V logits of at most this many elements.
CHUNK_ELEMENTS = 1 << 24
MASK_METRICS = ("entropy_mask_kept", "off_policy_masked")
"""Metrics of top_entropy_quantile and off_policy_mask (present only with them)."""
METRIC_KEYS = (
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "approx_kl",
    "ratio_mean",
    "entropy",
    "pg_loss",
    "kl_ref",
    "tis_frac_capped",
    "dual_clip_frac",
    "behavior_logprob_gap",
    *CORRECTION_METRICS,
    *MASK_METRICS,
)
"""Order of the custom ops' metrics tensor; absent metrics are 0 there and left out of the dicts."""


@dataclass(frozen=True)
class PolicyLossOptions:
    """Everything that shapes the per-token objective (one frozen object through autograd)."""

    clip_low: float = 0.2
    """PPO clip below 1: ratios under ``1 - clip_low`` stop pushing (for A < 0)."""
    clip_high: float = 0.2
    """PPO clip above 1 (DAPO's clip-higher uses a larger value than clip_low)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: for A < 0 the loss is capped at ``-c * A``."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to ``ref_logprobs``."""
    kl_type: str = "k3"
    """KL estimator with ``d = logp - ref``: "k1" d, "k2" d^2/2, "k3" exp(-d) + d - 1."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    temperature: float = 1.0
    """Logits are divided by this before the softmax (match the sampler's temperature)."""
    loss_agg: str = "token_mean"
    """"token_mean", "seq_mean_token_mean", "seq_mean_token_sum" or "token_sum_norm"."""
    max_tokens: int | None = None
    """Divisor of "token_sum_norm" (sequences x max length for Dr.GRPO)."""
    tis_cap: float | None = None
    """Truncated importance sampling cap on ``exp(old - behavior)``; needs ``behavior_logprobs``."""
    objective: str = "ppo_clip"
    """The policy objective (``duca_fast.ops.objectives``): a name ("ppo_clip", "gspo", "geo_mean",
    "cispo", "sapo", "gpg", "dro", "dppo") or a spec such as "sapo:tau_pos=1.0,tau_neg=1.05". Objectives
    with clip ranges take clip_low / clip_high (and PPOClip dual_clip) from these options unless the spec
    sets them."""
    correction: str = ""
    """Rollout correction (``ops.RolloutCorrection``, verl's vocabulary) as its spec string; "" = none.
    Needs ``old_logprobs`` and ``behavior_logprobs``; not together with ``tis_cap`` (its shorthand)."""
    top_entropy_quantile: float = 1.0
    """Keep the policy-gradient term only on tokens whose entropy is at or above the ``1 - q`` quantile
    (``torch.quantile``, linear) of the loss tokens' entropies in this call (TRL's top_entropy_quantile,
    after arXiv 2506.01939); KL and the entropy bonus stay on every token, the normalizer is unchanged.
    1.0 = off. A statistic of the whole batch: the fused op then runs two passes (8 N H V FLOPs)."""
    off_policy_mask: float | None = None
    """Off-policy sequence masking (DeepSeek-V3.2, TRL's off_policy_mask_threshold): a token's
    policy-gradient term is dropped when its advantage is negative and its sequence's mean of
    ``behavior_logprobs - logp`` (``old_logprobs`` without behavior ones) over the loss tokens exceeds
    this. Needs ``seq_ids``; sequence-level: the fused op cuts chunks on sequence boundaries."""

    def __post_init__(self) -> None:
        check_choice("loss_agg", self.loss_agg, LOSS_AGGS)
        check_choice("kl_type", self.kl_type, KL_TYPES)
        for name in ("clip_low", "clip_high", "kl_coef", "entropy_coef", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"clip_low and clip_high must be >= 0, got {self.clip_low}, {self.clip_high}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1 (the lower bound is 1 - clip_low), got {self.clip_low}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.dual_clip is not None and not (math.isfinite(self.dual_clip) and self.dual_clip > 1):
            raise ValueError(f"dual_clip must be a finite number > 1, got {self.dual_clip}")
        if self.tis_cap is not None and not (math.isfinite(self.tis_cap) and self.tis_cap > 0):
            raise ValueError(f"tis_cap must be a finite number > 0, got {self.tis_cap}")
        if isinstance(self.top_entropy_quantile, bool) or not (
            isinstance(self.top_entropy_quantile, (int, float)) and 0.0 < self.top_entropy_quantile <= 1.0
        ):
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile!r}")
        if self.off_policy_mask is not None and not (
            isinstance(self.off_policy_mask, (int, float))
            and not isinstance(self.off_policy_mask, bool)
            and math.isfinite(self.off_policy_mask)
        ):
            raise ValueError(f"off_policy_mask must be a finite number or None, got {self.off_policy_mask!r}")
        self._check_objective()
        if self.correction and self.tis_cap is not None:
            raise ValueError("tis_cap and correction both set: tis_cap=c is RolloutCorrection('token', c)")
        if not isinstance(self.correction, str):
            raise ValueError(f"correction must be a spec string here, got {type(self.correction).__name__}")
        parse_correction(self.correction)
        if self.loss_agg == "token_sum_norm":
            if self.max_tokens is None:
                raise ValueError("loss_agg='token_sum_norm' needs max_tokens (sequences x max length)")
            if (
                isinstance(self.max_tokens, bool)
                or not isinstance(self.max_tokens, int)
                or self.max_tokens < 1
            ):
                raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")

    @property
    def needs_whole_batch(self) -> bool:
        """A statistic over every loss token precedes the gradients (the fused op runs two passes)."""
        return self.top_entropy_quantile < 1.0

    @property
    def needs_whole_sequences(self) -> bool:
        """The per-token terms depend on whole sequences (chunks must end on sequence boundaries)."""
        return self.off_policy_mask is not None or self.resolved_objective().sequence_level

    def resolved_objective(self):
        """The objective instance, its inherited clip values filled in from these options (cached by
        ``objectives.resolve``; the checks ran once, when these options were made)."""
        from duca_fast.ops.policy_loss import objectives

        return objectives.resolve(self.objective, self.clip_low, self.clip_high, self.dual_clip)

    def _check_objective(self) -> None:
        """The objective exists, and the clip / correction options these options set apply to it."""
        from duca_fast.ops.policy_loss import objectives

        if not isinstance(self.objective, str):
            raise ValueError(f"objective must be a spec string here, got {type(self.objective).__name__}")
        objective = self.resolved_objective()
        given = objectives.parse(self.objective)
        for name, default in (("clip_low", 0.2), ("clip_high", 0.2), ("dual_clip", None)):
            value = getattr(self, name)
            if value == default:
                continue
            if name not in objective.inherits:
                raise ValueError(f"{name}={value!r} does not apply to objective {objective.name!r}")
            if getattr(given, name) is not None and getattr(given, name) != value:
                raise ValueError(
                    f"{name}={value!r} conflicts with the objective's own {name}={getattr(given, name)!r}"
                )
        weighted = self.tis_cap is not None or (
            isinstance(self.correction, str)
            and self.correction
            and parse_correction(self.correction).rollout_is is not None
        )
        if weighted and not objective.takes_correction_weights:
            raise ValueError(
                f"objective {objective.name!r} has no token-level place for tis_cap's or the rollout "
                "correction's importance weights"
            )


@dataclass(frozen=True)
class TokenInputs:
    """Validated per-token tensors (compute dtype) that the objective needs besides the log-probs."""

    target: torch.Tensor
    """int64 [N]; masked tokens point at 0 so they can be gathered safely."""
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    behavior_logprobs: torch.Tensor | None
    token_weights: torch.Tensor
    """Aggregation weight of each token (times the caller's per-token weights, when given): the loss is
    ``sum(token_weights * l)``; 0 when masked."""
    active: torch.Tensor
    """bool [N]: the token counts (mask)."""
    seq_ids: torch.Tensor | None = None
    """int64 [N] sequence of each token (sequence-level objectives), None when not given."""
    correction_weights: torch.Tensor | None = None
    """[N] the rollout correction's importance weights (detached), None without weighting."""
    correction_metrics: dict | None = None
    """The rollout correction's metrics over the whole batch (computed before any chunking)."""


@dataclass(frozen=True)
class HeadOutput:
    """Per-token objective and its derivatives, from ``policy_head``."""

    loss: torch.Tensor
    """Scalar: ``sum(token_weights * l)``."""
    grad_logprobs: torch.Tensor
    """[N] d loss / d logp."""
    grad_entropy: torch.Tensor | None
    """[N] d loss / d H, None when entropy_coef is 0."""
    metrics: dict[str, torch.Tensor]
