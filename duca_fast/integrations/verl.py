"""verl adapter: HIAN as advantage estimator ``"duca_hian"``, our clipped loss as policy loss "duca_fused".

Importing this module registers both in verl's registries (``verl.trainer.ppo.core_algos``). verl must
import it in every process that looks them up: the driver (advantages) and the actor workers (loss).
Either of
- ``VERL_USE_EXTERNAL_MODULES=duca_fast.integrations.verl`` in the environment (read by ``import verl``;
  a local Ray cluster started by the driver inherits it, a ``ray start`` cluster needs it set there), or
- the ``verl.plugins`` entry point ``duca_fast = "duca_fast.integrations.verl"`` in duca_fast's package
  metadata (``import verl`` loads every such entry point unless ``VERL_USE_EXTERNAL_PLUGINS=none``).

Then ``algorithm.adv_estimator=duca_hian`` and ``actor_rollout_ref.actor.policy_loss.loss_mode=duca_fused``.

**Where the two reward horizons come from.** verl 0.9.1 calls a registered estimator with
``token_level_rewards``, ``response_mask``, ``config`` and ``index`` (the group uid) only (it hands the
whole batch to its own ``gdpo`` estimator alone, and the v1 trainer fetches only those fields). So the
estimator reads both horizons out of ``token_level_rewards``, one row per session (a whole multi-turn
trajectory; user/tool tokens have ``response_mask`` 0):
- an **agent turn** is a maximal run of ``response_mask == 1`` tokens in the row;
- the **turn reward** of a turn is ``token_level_rewards`` at the turn's *first* token;
- the **session reward** is the sum of every other entry of the row. verl's reward managers write the
  score at the last response token, so a stock reward function becomes the session horizon; write turn
  rewards at turn starts. (A final agent turn of a single token cannot carry both: give it none.)
- ``algorithm.use_kl_in_reward`` must be False (a per-token KL in the rewards would land in the session
  horizon); use the actor's ``use_kl_loss`` instead.

Callers that pass ``batch=`` (a mapping of tensors, e.g. ``data.batch``) may set the horizons explicitly:
``duca_turn_rewards`` ``[B, max_turns]`` float (NaN past a row's last turn), ``duca_session_rewards``
``[B]`` or ``[B, Ks]`` float and ``duca_token_turn`` ``[B, L]`` int (turn of each response token within
its row, -1 = no loss). Stock verl 0.9.1 does not pass ``batch`` to a registered estimator.

HIAN options: a ``duca_hian`` mapping in ``config`` when it is a dict/DictConfig (keys ``turn_weight``,
``session_weight``, ``turn_scope``, ``eps``, ``std``, ``clip``: ``std: population, clip: 10`` is Dual-Track
GRPO), else the environment variables ``DUCA_HIAN_<KEY>`` (verl's ``AlgoConfig`` dataclass takes no
extra keys). ``algorithm.norm_adv_by_std_in_grpo=False`` centers without scaling (``scale="none"``).

More estimators (``duca_gopo``, ``duca_otb``, ``duca_tir_otb``, ``duca_proxmo``): ``verl_estimators``.

**What "duca_fused" fuses here.** verl's actor computes ``log_prob`` from its own logits, so the
hidden-state fusion of ``ops.fused_policy_loss`` (no ``[N, V]`` logits) does not apply. The loss runs
duca_fast's per-token objective through the public ``ops.policy_loss_from_logprobs`` (ratio,
asymmetric clip, dual clip, per-token weights; analytic gradient in one pass) with the numbers of
verl's ``vanilla`` loss (clip_ratio_low/high, clip_ratio_c dual clip, rollout IS weights, every
``loss_agg_mode`` with ``global_batch_info``). For the logits-free path use ``ops.fused_policy_loss``
in a custom actor, or verl's own fused-kernel path with our backend
(``actor_rollout_ref.model.use_fused_kernels=True`` and ``fused_kernel_options.impl_backend=duca``:
``verl_kernels``), which also gives the optimal-token-baseline estimators their ``sum_pi_squared``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from duca_fast import ops
from duca_fast.integrations import verl_estimators, verl_kernels
from duca_fast.integrations._layout import batch_field, dense_uids, turn_layout

try:
    from verl.trainer.ppo.core_algos import (
        ADV_ESTIMATOR_REGISTRY,
        POLICY_LOSS_REGISTRY,
        register_adv_est,
        register_policy_loss,
    )
except ImportError as error:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "duca_fast.integrations.verl needs verl (its core_algos module); "
        "see duca_fast/integrations/INSTALL.txt for the install lines"
    ) from error

ADV_ESTIMATOR_NAME = "duca_hian"
POLICY_LOSS_NAME = "duca_fused"
ENV_PREFIX = "DUCA_HIAN_"
VERL_LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-mean-token-mean",
)


# ---------------------------------------------------------------------------------------------------
# advantage estimator


def group_ids(index: Any) -> torch.Tensor:
    """Map verl's group uids (strings or any hashable objects) to ints 0..G-1 in order of appearance."""
    if index is None:
        raise ValueError(
            "duca_hian needs the group uid of each row (verl passes non_tensor_batch['uid'] as index)"
        )
    return dense_uids(index)


def hian_options(config: Any) -> dict[str, Any]:
    """HIAN keyword options from ``config['duca_hian']`` (dict/DictConfig) or ``DUCA_HIAN_*`` variables."""
    scale = "group"
    section = None
    if config is not None:
        if not config.get("norm_adv_by_std_in_grpo", True):
            scale = "none"
        try:
            section = config.get("duca_hian", None)
        except (AttributeError, KeyError):
            section = None
    options: dict[str, Any] = {"scale": scale}
    for key, cast in (
        ("turn_weight", float),
        ("session_weight", float),
        ("turn_scope", str),
        ("eps", float),
        ("std", str),
        ("clip", float),
    ):
        value = section.get(key, None) if hasattr(section, "get") else None
        if value is None:
            value = os.environ.get(ENV_PREFIX + key.upper())
        if value is not None:
            try:
                options[key] = cast(value)
            except ValueError as error:
                raise ValueError(
                    f"duca_hian option {key} must be a {cast.__name__}, got {value!r}"
                ) from error
    return options


def compute_duca_hian_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    batch: Any = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HIAN advantages for verl: ``(advantages, returns)``, both ``[B, L]`` and 0 where the mask is 0.

    Each row is one session, ``index`` its group uid; turns and rewards as in the module docstring.
    Extra keyword arguments verl may pass (``reward_baselines``, ...) are ignored.
    """
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be [batch, response_length]"
        )
    num_rows = token_level_rewards.shape[0]
    session_group = group_ids(index).to(token_level_rewards.device)
    if session_group.numel() != num_rows:
        raise ValueError(f"index has {session_group.numel()} uids but the batch has {num_rows} rows")

    rewards = token_level_rewards.float()
    token_turn = batch_field(batch, "duca_token_turn")
    derived_turn, starts = turn_layout(response_mask)
    if token_turn is None:
        token_turn = derived_turn
        turns_per_row = starts.sum(dim=1)
    else:
        token_turn = token_turn.long().to(rewards.device)
        if token_turn.shape != rewards.shape:
            raise ValueError(f"duca_token_turn must be {tuple(rewards.shape)}, got {tuple(token_turn.shape)}")
        token_turn = torch.where(response_mask.bool(), token_turn, torch.full_like(token_turn, -1))
        turns_per_row = token_turn.max(dim=1).values.clamp_min(-1) + 1

    explicit_turn_rewards = batch_field(batch, "duca_turn_rewards")
    if explicit_turn_rewards is None:
        if batch_field(batch, "duca_token_turn") is not None:
            raise ValueError("duca_token_turn needs duca_turn_rewards (turn starts are not defined by it)")
        turn_rewards = rewards[starts]
    else:
        explicit_turn_rewards = explicit_turn_rewards.float().to(rewards.device)
        if explicit_turn_rewards.dim() != 2 or explicit_turn_rewards.shape[0] != num_rows:
            raise ValueError(
                f"duca_turn_rewards must be [{num_rows}, max_turns], got {tuple(explicit_turn_rewards.shape)}"
            )
        too_few = turns_per_row > explicit_turn_rewards.shape[1]
        if too_few.any():
            row = int(too_few.nonzero()[0])
            raise ValueError(
                f"row {row} has {int(turns_per_row[row])} agent turns but duca_turn_rewards has only "
                f"{explicit_turn_rewards.shape[1]} columns"
            )
        columns = torch.arange(explicit_turn_rewards.shape[1], device=rewards.device)
        turn_rewards = explicit_turn_rewards[columns[None, :] < turns_per_row[:, None]]

    session_rewards = batch_field(batch, "duca_session_rewards")
    if session_rewards is None:
        # Everything that is not a turn reward is the session's: verl writes its score at the last token.
        at_starts = starts if explicit_turn_rewards is None else torch.zeros_like(starts)
        session_rewards = torch.where(at_starts, 0.0, rewards).sum(dim=1)
    else:
        session_rewards = session_rewards.float().to(rewards.device)

    turn_session = torch.repeat_interleave(torch.arange(num_rows, device=rewards.device), turns_per_row)
    turn_offsets = turns_per_row.cumsum(0) - turns_per_row
    global_turn = torch.where(token_turn >= 0, token_turn + turn_offsets[:, None], token_turn)
    local_turn_index = torch.arange(turn_session.numel(), device=rewards.device) - turn_offsets[turn_session]
    advantages = ops.hian_advantages(
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        turn_index=local_turn_index,
        token_turn=global_turn.reshape(-1),
        num_groups=int(session_group.max()) + 1 if num_rows else 0,
        **hian_options(config),
    ).reshape(rewards.shape)
    advantages = advantages * response_mask.to(advantages.dtype)
    return advantages, advantages


# ---------------------------------------------------------------------------------------------------
# policy loss


def aggregation_weights(
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    global_batch_info: Mapping[str, Any] | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights ``w`` with ``sum(w * loss_mat) == verl's agg_loss(loss_mat, ...)`` (it is linear)."""
    if loss_agg_mode not in VERL_LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {VERL_LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    info = dict(global_batch_info or {})
    dp_size = info.get("dp_size", 1)
    mask = response_mask.to(dtype)
    if loss_agg_mode == "token-mean":
        num_tokens = info.get("batch_num_tokens")
        if num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            num_tokens = mask.sum()
        return mask / num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return mask * dp_size
    token_counts = mask.sum(dim=-1, keepdim=True)
    num_sequences = info.get("global_batch_size")
    if num_sequences is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        num_sequences = (token_counts > 0).float().sum()
    if loss_agg_mode == "seq-mean-token-mean":
        return mask / (token_counts + 1e-8) / num_sequences * dp_size
    weights = mask / num_sequences * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = info.get("loss_scale_factor")
        weights = weights / (mask.shape[-1] if scale is None else scale)
    return weights


def _clip_range(config: Any) -> tuple[float, float]:
    clip_ratio = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    return low, high


def _dro_beta(config: Any) -> float:
    policy_loss = config.get("policy_loss", None)
    beta = None if policy_loss is None else policy_loss.get("dro_beta", None)
    if beta is None or beta <= 0:
        raise ValueError("duca_dro needs actor.policy_loss.dro_beta > 0 (as verl's dro)")
    return beta


# verl loss mode -> (our objective from the actor config as verl's function of that name reads it,
# the aggregation verl uses regardless of loss_agg_mode or None for loss_agg_mode).
VERL_OBJECTIVES: dict[str, tuple[Any, str | None]] = {
    "vanilla": (
        lambda c: ops.objectives.PPOClip(*_clip_range(c), dual_clip=c.get("clip_ratio_c", 3.0)),
        None,
    ),
    "gspo": (lambda c: ops.objectives.GSPO(*_clip_range(c)), None),
    "geo_mean": (lambda c: ops.objectives.GeoMean(*_clip_range(c)), "rows-mean"),
    "cispo": (lambda c: ops.objectives.CISPO(*_clip_range(c)), None),
    "sapo": (lambda c: ops.objectives.SAPO(c.tau_pos, c.tau_neg), "seq-mean-token-mean"),
    "gpg": (lambda c: ops.objectives.GPG(), None),
    "dro": (lambda c: ops.objectives.DRO(beta=_dro_beta(c)), None),
    "dppo_tv": (
        lambda c: ops.objectives.DPPO("tv", *_clip_range(c), ratio_cap=c.get("clip_ratio_c", 20.0)),
        None,
    ),
    "dppo_kl": (
        lambda c: ops.objectives.DPPO("kl", *_clip_range(c), ratio_cap=c.get("clip_ratio_c", 20.0)),
        None,
    ),
}
"""Every verl 0.9.1 loss with a duca_fast objective; each is registered as ``duca_<name>``."""


def weighted_policy_loss(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    old_log_prob: torch.Tensor,
    token_weights: torch.Tensor,
    active: torch.Tensor,
    *,
    objective: Any,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum(token_weights * l)`` of an objective's per-token loss ``l`` on log-probs (flat ``[N]``
    inputs; the gradient flows to ``log_prob`` only; ``active`` bool). The one place this adapter calls
    the loss: ``ops.policy_loss_from_logprobs``, whose "token_sum_norm" with ``max_tokens=1`` leaves the
    aggregation to ``token_weights``. Returns the loss and its metrics (``clip_frac``, ...)."""
    return ops.policy_loss_from_logprobs(
        log_prob,
        advantages.detach(),
        old_log_prob.detach(),
        mask=active,
        seq_ids=seq_ids,
        token_weights=token_weights.detach(),
        objective=objective,
        loss_agg="token_sum_norm",
        max_tokens=1,
    )


def _verl_metrics(
    mode: str, metrics: dict[str, torch.Tensor], ppo_kl: torch.Tensor, extra
) -> dict[str, float]:
    """Our metrics under the names and meanings verl's loss ``mode`` reports."""
    if mode == "gpg":
        return {}
    if mode == "dro":
        return {"actor/ppo_kl": ppo_kl.item()}
    zero = torch.zeros(())
    clipfrac, lower = {
        "vanilla": (metrics["clip_frac"], metrics.get("dual_clip_frac", zero)),
        "gspo": (metrics["clip_frac"], zero),
        "geo_mean": (metrics["clip_frac_high"], metrics["clip_frac_low"]),
        "cispo": (metrics["clip_frac"], zero),
        "sapo": (zero, zero),
        "dppo_tv": (metrics["clip_frac"], extra),
        "dppo_kl": (metrics["clip_frac"], extra),
    }[mode]
    return {
        "actor/pg_clipfrac": float(clipfrac),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": float(lower),
    }


def make_verl_policy_loss(mode: str):
    """The verl policy-loss function ``duca_<mode>``: verl's loss ``mode`` computed by duca_fast's
    objective (same config fields, aggregations, rollout IS weights and metric names)."""
    make_objective, forced_agg = VERL_OBJECTIVES[mode]

    def compute_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if config is None:
            raise ValueError(f"duca_{mode} needs the actor config (clip_ratio, clip_ratio_low/high, ...)")
        for name, tensor in (
            ("old_log_prob", old_log_prob),
            ("advantages", advantages),
            ("response_mask", response_mask),
        ):
            if tensor.shape != log_prob.shape:
                raise ValueError(f"{name} is {tuple(tensor.shape)} but log_prob is {tuple(log_prob.shape)}")
        objective = make_objective(config)
        compute = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
        active = response_mask.bool()
        if forced_agg == "rows-mean":
            # verl's geo_mean: torch.mean over the rows of the per-sequence losses, whatever loss_agg_mode.
            counts = active.sum(-1, keepdim=True).to(compute)
            weights = active.to(compute) / counts.clamp_min(1) / active.shape[0]
        else:
            weights = aggregation_weights(
                response_mask, forced_agg or loss_agg_mode, config.get("global_batch_info", None), compute
            )
        if rollout_is_weights is not None:
            if not objective.takes_correction_weights:
                raise ValueError(
                    f"duca_{mode}: rollout IS weights are not supported (verl averages them geometrically "
                    "per sequence; duca_fast has no such correction for this objective yet)"
                )
            weights = weights * rollout_is_weights.detach()
        rows = torch.arange(log_prob.shape[0], device=log_prob.device)[:, None].expand_as(log_prob)
        loss, head_metrics = weighted_policy_loss(
            log_prob.reshape(-1),
            advantages.reshape(-1),
            old_log_prob.reshape(-1),
            weights.reshape(-1),
            active.reshape(-1),
            objective=objective,
            seq_ids=rows.reshape(-1),
        )
        with torch.no_grad():
            log_ratio = (log_prob.detach() - old_log_prob).reshape(-1)
            flat = active.reshape(-1)
            if mode in ("vanilla", "cispo", "sapo", "dppo_tv", "dppo_kl"):
                log_ratio = log_ratio.clamp(-20.0, 20.0)
            ppo_kl = torch.where(flat, -log_ratio, 0.0).sum() / flat.sum().clamp_min(1)
            extra = None
            if mode.startswith("dppo"):
                # verl's "pg_clipfrac_lower" for DPPO: ratio past its cap among the valid tokens.
                ratio = torch.exp(log_ratio)
                valid = objective.within_trust_region(log_prob.detach(), old_log_prob, advantages).reshape(-1)
                extra = torch.where(flat, ((ratio > objective.ratio_cap) & valid).to(compute), 0.0).sum()
                extra = extra / flat.sum().clamp_min(1)
        return loss, _verl_metrics(mode, head_metrics, ppo_kl, extra)

    compute_policy_loss.__name__ = f"compute_policy_loss_duca_{mode}"
    compute_policy_loss.__doc__ = f"verl policy loss ``duca_{mode}``: verl's ``{mode}`` through duca_fast."
    return compute_policy_loss


VERL_POLICY_LOSSES = {f"duca_{mode}": make_verl_policy_loss(mode) for mode in VERL_OBJECTIVES}
compute_policy_loss_duca_fused = VERL_POLICY_LOSSES["duca_vanilla"]
"""``duca_fused`` (the name of earlier releases) is ``duca_vanilla``."""


def _register() -> None:
    # Idempotent: the same function may be imported twice (env var and entry point both set).
    if ADV_ESTIMATOR_REGISTRY.get(ADV_ESTIMATOR_NAME) is not compute_duca_hian_advantage:
        ADV_ESTIMATOR_REGISTRY.pop(ADV_ESTIMATOR_NAME, None)
        register_adv_est(ADV_ESTIMATOR_NAME)(compute_duca_hian_advantage)
    for name, function in {POLICY_LOSS_NAME: compute_policy_loss_duca_fused, **VERL_POLICY_LOSSES}.items():
        if POLICY_LOSS_REGISTRY.get(name) is not function:
            POLICY_LOSS_REGISTRY.pop(name, None)
            register_policy_loss(name)(function)
    for name, function in verl_estimators.ESTIMATORS.items():
        if ADV_ESTIMATOR_REGISTRY.get(name) is not function:
            ADV_ESTIMATOR_REGISTRY.pop(name, None)
            register_adv_est(name)(function)
    verl_estimators.install()  # compute_advantage hands duca_otb / duca_tir_otb / duca_proxmo the batch
    verl_kernels.install()  # actor_rollout_ref.model.fused_kernel_options.impl_backend=duca


_register()
