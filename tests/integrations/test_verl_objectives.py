"""Every duca_fast objective against verl 0.9.1's own loss of that name, called in the test.

verl's function and ours (registered as ``duca_<name>``) get the same float64 ``[B, L]`` inputs and the
same actor config; loss, d loss / d log_prob and verl's three metrics must agree for every aggregation
verl honours for that loss.
"""

import pytest
import torch
from verl.trainer.ppo import core_algos

from duca_fast.integrations import verl as duca_verl
from tests.integrations.test_verl_adapter import actor_config

MODES = sorted(duca_verl.VERL_OBJECTIVES)
# verl ignores loss_agg_mode for geo_mean (mean over rows) and sapo (seq-mean-token-mean).
FIXED_AGGREGATION = {"geo_mean", "sapo"}


def verl_inputs(seed=3, rows=6, length=9, *, empty_row=True):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 2.5 - 0.05
    log_prob = (old + 0.45 * torch.randn(rows, length, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    advantages = torch.randn(rows, 1, generator=gen, dtype=torch.float64).expand(rows, length).clone()
    advantages += 0.3 * torch.randn(rows, length, generator=gen, dtype=torch.float64)  # per-token credit
    mask = (torch.rand(rows, length, generator=gen) > 0.25).to(torch.int64)
    mask[:, 0] = 1
    # One token with a ratio past the dual-clip constant (2.5) and a negative advantage.
    log_prob[1, 2], advantages[1, 2], mask[1, 2] = old[1, 2] + 1.2, -1.0, 1
    if empty_row:
        mask[-1] = 0
    return old, log_prob.requires_grad_(), advantages, mask


def config_for(mode):
    fields = dict(tau_pos=1.0, tau_neg=1.05)
    if mode == "dro":
        from verl.workers.config.actor import PolicyLossConfig

        fields["policy_loss"] = PolicyLossConfig(loss_mode="dro", dro_beta=0.3)
    if mode.startswith("dppo"):
        fields.update(clip_ratio_c=1.6)  # a ratio cap that bites
    if mode == "gspo":
        fields.update(clip_ratio_low=0.05, clip_ratio_high=0.08)  # sequence ratios are closer to 1
    config = actor_config(**fields)
    if mode == "dro":
        assert config.policy_loss.dro_beta == 0.3
    return config


def run(name, mode, loss_agg_mode, inputs, is_weights):
    old, log_prob, advantages, mask = inputs
    log_prob.grad = None
    loss, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=old,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=mask,
        loss_agg_mode=loss_agg_mode,
        config=config_for(mode),
        rollout_is_weights=is_weights,
    )
    loss.backward()
    return loss.detach(), log_prob.grad.clone(), metrics


CASES = [
    (mode, agg, weights)
    for mode in MODES
    for agg in (["token-mean"] if mode in FIXED_AGGREGATION else duca_verl.VERL_LOSS_AGG_MODES)
    for weights in ([False] if mode == "geo_mean" else [False, True])
]


@pytest.mark.parametrize(
    "mode,loss_agg_mode,with_is_weights", CASES, ids=[f"{m}-{a}-{w}" for m, a, w in CASES]
)
def test_objective_matches_verls_own_loss(mode, loss_agg_mode, with_is_weights):
    # geo_mean: verl averages over all rows (an empty one included), so every row has tokens here.
    inputs = verl_inputs(empty_row=mode != "geo_mean")
    is_weights = torch.rand(inputs[3].shape, dtype=torch.float64) * 2 if with_is_weights else None
    ref_loss, ref_grad, ref_metrics = run(mode, mode, loss_agg_mode, inputs, is_weights)
    loss, grad, metrics = run(f"duca_{mode}", mode, loss_agg_mode, inputs, is_weights)
    # verl divides by int64 token counts + 1e-8 in seq-mean-token-mean / geo_mean (float32 promotion).
    rtol = 1e-7 if (loss_agg_mode == "seq-mean-token-mean" or mode in FIXED_AGGREGATION) else 1e-10
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=1e-12)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=1e-6), key
    assert grad.abs().sum() > 0


def test_inputs_exercise_each_objectives_branches():
    """The comparison above would be weak if no clip, gate or trust region were ever active."""
    inputs = verl_inputs()
    for mode in ("vanilla", "gspo", "geo_mean", "cispo", "dppo_tv", "dppo_kl"):
        _, _, metrics = run(mode, mode, "token-mean", verl_inputs(empty_row=mode != "geo_mean"), None)
        assert metrics["actor/pg_clipfrac"] > 0, mode
    _, _, metrics = run("vanilla", "vanilla", "token-mean", inputs, None)
    assert metrics["actor/pg_clipfrac_lower"] > 0  # the dual clip
    for mode in ("dppo_tv", "dppo_kl"):
        _, _, metrics = run(mode, mode, "token-mean", inputs, None)
        assert metrics["actor/pg_clipfrac_lower"] > 0, mode  # the ratio cap


def test_geo_mean_refuses_rollout_is_weights():
    inputs = verl_inputs(empty_row=False)
    with pytest.raises(ValueError, match="duca_geo_mean: rollout IS weights are not supported"):
        run(
            "duca_geo_mean",
            "geo_mean",
            "token-mean",
            inputs,
            torch.ones(inputs[3].shape, dtype=torch.float64),
        )


def test_dro_without_beta_is_refused_like_verl():
    inputs = verl_inputs()
    with pytest.raises(ValueError, match="dro_beta"):
        core_algos.get_policy_loss_fn("duca_dro")(
            old_log_prob=inputs[0],
            log_prob=inputs[1],
            advantages=inputs[2],
            response_mask=inputs[3],
            config=actor_config(),
        )
