"""verl advantage estimators beside ``duca_hian``: duca_gopo, duca_otb, duca_tir_otb, duca_proxmo.

Registered by ``duca_fast.integrations.verl`` (``algorithm.adv_estimator=<name>``):

- ``duca_gopo``: GOPO's rank advantages (``ops.gopo_advantages``) of each row's summed
  ``token_level_rewards`` within its ``uid`` group, on every response token.
- ``duca_otb`` / ``duca_tir_otb``: verl's ``optimal_token_baseline`` / ``tir_optimal_token_baseline``
  (single-turn and multi-turn forms) through ``ops.optimal_token_baseline_advantages``, with the same
  inputs (``old_log_probs``, ``sum_pi_squared``: set ``actor.calculate_sum_pi_squared=True``, optional
  ``rollout_is_weights``) and the same result.
- ``duca_proxmo``: ProxMO (``ops.proxmo_advantages``) in the layout of ProxMO's official code (a verl
  fork): one row per agent *step*; ``non_tensor_batch`` has ``uid`` (group), ``traj_uid`` (trajectory)
  and ``anchor_obs`` (the state text, TF-IDF per batch as theirs), or ``batch['duca_turn_features']``
  ``[B, D]`` instead of the text; ``batch['step_rewards']`` ``[B]`` (the environment's step reward; 0
  when absent); a row's summed ``token_level_rewards`` is the episode reward, one per trajectory (the
  trajectory's last row's: per-row penalties on the episode score, which their code applies, are not
  mirrored: put them in ``step_rewards``). A trajectory's rows are in time order in the batch. Options:
  a ``duca_proxmo`` mapping in ``config`` with ``ProxmoOptions`` fields.

verl 0.9.1's ``compute_advantage`` gives a registered estimator only ``token_level_rewards``,
``response_mask``, ``config``, ``index`` (it hands ``sum_pi_squared`` and ``old_log_probs`` to its own
OTB names only, the batch to its own ``gdpo`` only). ``install()`` therefore wraps ``compute_advantage``
where verl defines and re-imports it (``verl.trainer.ppo.ray_trainer``, ``verl.trainer.ppo.v1.utils``,
``verl.experimental.separation.ray_trainer``; patched when already imported, else when they are
imported): for the three names that need more, the wrapper passes ``batch`` and ``non_tensor_batch``;
every other estimator goes to verl's function unchanged.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from typing import Any

import numpy as np
import torch

from duca_fast import ops
from duca_fast.integrations._layout import batch_field, dense_uids
from duca_fast.ops.advantages.proxmo import ProxmoOptions

GOPO_NAME = "duca_gopo"
OTB_NAME = "duca_otb"
TIR_OTB_NAME = "duca_tir_otb"
PROXMO_NAME = "duca_proxmo"
NEEDS_BATCH = (OTB_NAME, TIR_OTB_NAME, PROXMO_NAME)
PATCHED_MODULES = (
    "verl.trainer.ppo.ray_trainer",
    "verl.trainer.ppo.v1.utils",
    "verl.experimental.separation.ray_trainer",
)


def _check_shapes(name: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> None:
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"{name}: token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be [batch, response_length]"
        )


def _ids(name: str, what: str, values: Any, rows: int) -> torch.Tensor:
    """Hashable ids (strings, uuids, ints) -> int64 0..k-1 in order of first appearance."""
    if values is None:
        raise ValueError(f"{name} needs {what} for every row")
    ids = dense_uids(values)
    if ids.numel() != rows:
        raise ValueError(f"{name}: {what} has {ids.numel()} entries but the batch has {rows} rows")
    return ids


def compute_duca_gopo_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any = None, **unused: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """GOPO for verl: ``(advantages, returns)`` [B, L]: the row's rank advantage on its response tokens."""
    _check_shapes(GOPO_NAME, token_level_rewards, response_mask)
    group = _ids(GOPO_NAME, "index (the uid of each row's group)", index, token_level_rewards.shape[0])
    scores = token_level_rewards.sum(dim=-1)
    per_row = ops.gopo_advantages(scores.float(), group.to(scores.device)).to(token_level_rewards.dtype)
    advantages = per_row[:, None] * response_mask.to(token_level_rewards.dtype)
    return advantages, advantages


def _otb(
    name: str,
    positions: str,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    batch: Any,
    old_log_probs: torch.Tensor | None,
    sum_pi_squared: torch.Tensor | None,
    rollout_is_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_shapes(name, token_level_rewards, response_mask)
    old_log_probs = old_log_probs if old_log_probs is not None else batch_field(batch, "old_log_probs")
    sum_pi_squared = sum_pi_squared if sum_pi_squared is not None else batch_field(batch, "sum_pi_squared")
    if rollout_is_weights is None:
        rollout_is_weights = batch_field(batch, "rollout_is_weights")
    if sum_pi_squared is None:
        raise ValueError(
            f"{name} needs sum_pi_squared: set actor_rollout_ref.actor.calculate_sum_pi_squared=True"
        )
    if old_log_probs is None:
        raise ValueError(f"{name} needs old_log_probs (the actor's recomputed log-probs)")
    rows, length = token_level_rewards.shape
    group = _ids(name, "index (the uid of each row's group)", index, rows).to(token_level_rewards.device)
    advantages, returns = ops.optimal_token_baseline_advantages(
        token_level_rewards.reshape(-1),
        old_log_probs.reshape(-1).to(token_level_rewards.dtype),
        sum_pi_squared.reshape(-1).to(token_level_rewards.dtype),
        torch.arange(rows, device=token_level_rewards.device).repeat_interleave(length),
        group,
        mask=response_mask.reshape(-1).bool(),
        is_weights=None if rollout_is_weights is None else rollout_is_weights.reshape(-1),
        positions=positions,
    )
    return advantages.reshape(rows, length), returns.reshape(rows, length)


def compute_duca_otb_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    batch: Any = None,
    old_log_probs: torch.Tensor | None = None,
    sum_pi_squared: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's single-turn optimal token baseline (positions over every response token) through ops."""
    return _otb(
        OTB_NAME, "all", token_level_rewards, response_mask, index, batch, old_log_probs, sum_pi_squared,
        rollout_is_weights,
    )  # fmt: skip


def compute_duca_tir_otb_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    batch: Any = None,
    old_log_probs: torch.Tensor | None = None,
    sum_pi_squared: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's multi-turn optimal token baseline (positions over the loss tokens) through ops."""
    return _otb(
        TIR_OTB_NAME, "loss_tokens", token_level_rewards, response_mask, index, batch, old_log_probs,
        sum_pi_squared, rollout_is_weights,
    )  # fmt: skip


def proxmo_options(config: Any) -> ProxmoOptions:
    section = None
    if config is not None:
        try:
            section = config.get("duca_proxmo", None)
        except (AttributeError, KeyError):
            section = None
    if section is None:
        return ProxmoOptions()
    try:
        return ProxmoOptions(**dict(section))
    except TypeError as error:
        raise ValueError(f"duca_proxmo: {error}") from None


def compute_duca_proxmo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    batch: Any = None,
    non_tensor_batch: Any = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ProxMO for verl, one row per agent step (see the module docstring)."""
    from duca_fast.train.features import tfidf_features

    _check_shapes(PROXMO_NAME, token_level_rewards, response_mask)
    rows = token_level_rewards.shape[0]
    device = token_level_rewards.device
    extras = non_tensor_batch if non_tensor_batch is not None else {}
    group_of_row = _ids(PROXMO_NAME, "index (the uid of each row's group)", index, rows)
    trajectory = _ids(PROXMO_NAME, "non_tensor_batch['traj_uid']", extras.get("traj_uid"), rows)
    features = batch_field(batch, "duca_turn_features")
    if features is None:
        if extras.get("anchor_obs") is None:
            raise ValueError(
                f"{PROXMO_NAME} needs the state of each row: non_tensor_batch['anchor_obs'] (text) or "
                "batch['duca_turn_features'] [B, D]"
            )
        features = tfidf_features([str(text) for text in np.asarray(extras["anchor_obs"]).tolist()])
    step_rewards = batch_field(batch, "step_rewards")
    if step_rewards is None:
        step_rewards = torch.zeros(rows)
    num_trajectories = int(trajectory.max()) + 1 if rows else 0
    scores = token_level_rewards.sum(dim=-1).double().cpu()
    # One episode reward and group per trajectory: its last row's (rows are in time order).
    episode = torch.zeros(num_trajectories, dtype=torch.float64).index_copy_(0, trajectory, scores)
    trajectory_group = torch.zeros(num_trajectories, dtype=torch.long).index_copy_(
        0, trajectory, group_of_row
    )
    per_row = ops.proxmo_advantages(
        step_rewards.reshape(-1).double().cpu(),
        trajectory,
        episode,
        trajectory_group,
        features.float().cpu(),
        options=proxmo_options(config),
    )
    advantages = per_row.to(device=device, dtype=token_level_rewards.dtype)[:, None] * response_mask.to(
        token_level_rewards.dtype
    )
    return advantages, advantages


ESTIMATORS = {
    GOPO_NAME: compute_duca_gopo_advantage,
    OTB_NAME: compute_duca_otb_advantage,
    TIR_OTB_NAME: compute_duca_tir_otb_advantage,
    PROXMO_NAME: compute_duca_proxmo_advantage,
}


def _with_batch(original):
    """``compute_advantage`` handing ``batch`` and ``non_tensor_batch`` to the estimators that need them."""
    if getattr(original, "__duca_wrapped__", False):
        return original

    @functools.wraps(original)
    def compute_advantage(data, adv_estimator, *args, **kwargs):
        name = getattr(adv_estimator, "value", adv_estimator)
        if name not in NEEDS_BATCH:
            return original(data, adv_estimator, *args, **kwargs)
        config = kwargs.get("config", args[5] if len(args) > 5 else None)
        if "response_mask" not in data.batch.keys():  # noqa: SIM118 - TensorDict has no `in`
            from verl.trainer.ppo.ray_trainer import compute_response_mask

            data.batch["response_mask"] = compute_response_mask(data)
        advantages, returns = ESTIMATORS[name](
            token_level_rewards=data.batch["token_level_rewards"],
            response_mask=data.batch["response_mask"],
            index=data.non_tensor_batch.get("uid"),
            config=config,
            batch=data.batch,
            non_tensor_batch=data.non_tensor_batch,
        )
        data.batch["advantages"] = advantages
        data.batch["returns"] = returns
        return data

    compute_advantage.__duca_wrapped__ = True
    return compute_advantage


def _patch(module: Any) -> None:
    if hasattr(module, "compute_advantage"):
        module.compute_advantage = _with_batch(module.compute_advantage)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches ``compute_advantage`` in the modules of ``PATCHED_MODULES`` right after they execute."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHED_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_and_patch(module, exec_module=exec_module):
                    exec_module(module)
                    _patch(module)

                spec.loader.exec_module = exec_and_patch
                return spec
        return None


def install() -> None:
    """Patch the modules already imported; hook the rest (idempotent)."""
    for name in PATCHED_MODULES:
        if name in sys.modules:
            _patch(sys.modules[name])
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
