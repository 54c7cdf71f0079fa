"""Every objective through every loss function and backend, against the float64 reference.

The reference (``backend="reference"``) differentiates each objective's own plainly written float64
loss with autograd; the fast paths use the objective's analytic derivative inside the chunked loop.
Sequence-level objectives (GSPO, GeoMean) also run with chunks smaller than the batch: on chunks that
end on sequence boundaries (one pass, still 6 N H V FLOPs) and, when a sequence is longer than a chunk,
in two passes.
"""

import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from duca_fast import ops
from duca_fast.ops import objectives
from duca_fast.ops.policy_loss import METRIC_KEYS
from duca_fast.ops.policy_loss.checks import prepare_loss_call
from duca_fast.ops.policy_loss.custom_ops import fused_loss_rows
from tests.conftest import KERNEL_DEVICE
from tests.ops.test_loss_math import assert_close, logprob_inputs, make_problem

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]
OBJECTIVES = {
    "ppo_clip": objectives.PPOClip(clip_low=0.15, clip_high=0.25, dual_clip=1.3),
    "ppo_clip_delta": objectives.PPOClip(clip_low=0.2, clip_high=0.28, delta=1.5),
    # delta below 1 + clip_high: for A < 0 the clipped branch wins inside the clip range, gradient and all.
    "ppo_clip_delta_inside": objectives.PPOClip(clip_low=0.2, clip_high=0.28, delta=1.1),
    "gspo": objectives.GSPO(clip_low=0.05, clip_high=0.08),
    "geo_mean": objectives.GeoMean(clip_low=0.3, clip_high=0.4),
    "cispo": objectives.CISPO(clip_high=0.25),
    "cispo_both": objectives.CISPO(clip_low=0.2, clip_high=0.25),
    "sapo": objectives.SAPO(tau_pos=1.0, tau_neg=1.05),
    "gpg": objectives.GPG(),
    "dro": objectives.DRO(beta=0.3),
    "dppo_tv": objectives.DPPO("tv", clip_low=0.05, clip_high=0.08, ratio_cap=1.5),
    "dppo_kl": objectives.DPPO("kl", clip_low=0.02, clip_high=0.03, ratio_cap=1.5),
    "dgpo": objectives.DGPO(clip_low=0.2, clip_high=0.28, n=2.0, m=2.0),
    "maspo": objectives.MASPO(alpha=0.5, beta_pos=0.2, beta_neg=0.2, sigma_base=0.3),
}
# KL and entropy compose with every objective; TIS with all that have a token-level place for it.
EXTRAS = dict(kl_coef=0.3, kl_type="k3", entropy_coef=0.05, temperature=0.8)


def extras_for(objective):
    return dict(EXTRAS, tis_cap=1.2) if objective.takes_correction_weights else dict(EXTRAS)


def run_fused(problem, objective, backend, device, **options):
    leaves = {k: problem[k].detach().to(device).requires_grad_() for k in ("hidden", "weight", "bias")}
    rest = {k: None if v is None else v.to(device) for k, v in problem.items() if k not in leaves}
    options.setdefault("fp32_matmul", "ieee")
    loss, metrics = ops.fused_policy_loss(
        leaves["hidden"],
        leaves["weight"],
        bias=leaves["bias"],
        backend=backend,
        objective=objective,
        loss_agg="seq_mean_token_mean",
        **rest,
        **options,
    )
    (loss * 1.3).backward()
    grads = {k: v.grad.cpu().double() for k, v in leaves.items()}
    return loss.detach().cpu().double(), grads, {k: v.cpu().double() for k, v in metrics.items()}


def compare(got, expected):
    (loss, grads, metrics), (ref_loss, ref_grads, ref_metrics) = got, expected
    assert_close(loss, ref_loss, "loss")
    for name in grads:
        assert_close(grads[name], ref_grads[name], f"grad {name}")
    assert set(metrics) == set(ref_metrics)
    for name in metrics:
        assert_close(metrics[name], ref_metrics[name], f"metric {name}")


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_loss_matches_the_reference(backend, device, name):
    objective = OBJECTIVES[name]
    problem = make_problem(seed=11)
    options = extras_for(objective)
    got = run_fused(problem, objective, backend, device, chunk_size=4, **options)
    expected = run_fused(problem, objective, "reference", "cpu", **options)
    compare(got, expected)
    assert set(got[2]) <= set(METRIC_KEYS)
    assert got[1]["weight"].abs().sum() > 0


@pytest.mark.parametrize("name", OBJECTIVES)
def test_from_logits_and_logprobs_match_the_reference(name):
    objective = OBJECTIVES[name]
    problem = make_problem(seed=12)
    options = extras_for(objective)
    common = {k: problem[k] for k in ("advantages", "old_logprobs", "mask", "seq_ids", "ref_logprobs")}
    common["behavior_logprobs"] = problem["behavior_logprobs"]
    logits = (problem["hidden"].double() @ problem["weight"].double().T + problem["bias"].double()).float()
    results = {}
    for backend in ("torch", "reference"):
        leaf = logits.clone().requires_grad_()
        loss, metrics = ops.policy_loss_from_logits(
            leaf,
            problem["target"],
            objective=objective,
            backend=backend,
            loss_agg="seq_mean_token_mean",
            **common,
            **options,
        )
        (loss * -0.7).backward()
        results[backend] = (loss.detach().double(), {"logits": leaf.grad.double()}, metrics)
    compare(results["torch"], results["reference"])

    logprobs, entropy = logprob_inputs(problem)
    options.pop("temperature")
    results = {}
    for backend in ("torch", "reference"):
        leaf, ent = logprobs.float().clone().requires_grad_(), entropy.float().clone().requires_grad_()
        loss, metrics = ops.policy_loss_from_logprobs(
            leaf,
            entropy=ent,
            objective=objective,
            backend=backend,
            loss_agg="seq_mean_token_mean",
            **common,
            **options,
        )
        (loss * 2.1).backward()
        results[backend] = (
            loss.detach().double(),
            {"logprobs": leaf.grad.double(), "entropy": ent.grad.double()},
            metrics,
        )
    compare(results["torch"], results["reference"])


def packed_problem(lengths=(3, 5, 2, 6, 4), seed=13):
    """Sequences packed one after the other (the layout the one-pass sequence chunks need)."""
    problem = make_problem(num_tokens=sum(lengths), seed=seed)
    problem["seq_ids"] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    problem["mask"][:] = True
    problem["target"] = problem["target"].clamp_min(0)
    return problem


@pytest.mark.parametrize("name", ["gspo", "geo_mean"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sequence_level_objectives_with_chunks_smaller_than_the_batch(backend, device, name, caplog):
    objective = OBJECTIVES[name]
    problem = packed_problem()
    expected = run_fused(problem, objective, "reference", "cpu", **extras_for(objective))
    # chunk 6 holds the longest sequence: one pass, chunks on sequence boundaries.
    with caplog.at_level(logging.INFO, logger="duca_fast.ops.policy_loss.custom_ops"):
        compare(
            run_fused(problem, objective, backend, device, chunk_size=6, **extras_for(objective)), expected
        )
    assert "two passes" not in caplog.text
    # chunk 4 does not: two passes, one log line.
    with caplog.at_level(logging.INFO, logger="duca_fast.ops.policy_loss.custom_ops"):
        compare(
            run_fused(problem, objective, backend, device, chunk_size=4, **extras_for(objective)), expected
        )
    assert caplog.text.count("two passes") == 1
    # Sequences not contiguous (interleaved ids): two passes again, same numbers.
    shuffled = {k: v for k, v in problem.items()}
    order = torch.randperm(problem["seq_ids"].numel(), generator=torch.Generator().manual_seed(0))
    for key in (
        "hidden",
        "target",
        "advantages",
        "old_logprobs",
        "ref_logprobs",
        "behavior_logprobs",
        "mask",
        "seq_ids",
    ):
        shuffled[key] = problem[key][order]
    got = run_fused(shuffled, objective, backend, device, chunk_size=6, **extras_for(objective))
    assert_close(got[0], expected[0], "loss (interleaved)")
    assert_close(got[1]["weight"], expected[1]["weight"], "grad weight (interleaved)")


def launcher_flops(problem, objective, chunk_size, **extra):
    """FLOPs of the fused driver itself on the Triton backend, as test_gemm_floor counts them (a dispatch
    mode does not see inside the custom op)."""
    problem = {k: v.to(KERNEL_DEVICE) for k, v in problem.items()}
    options = ops.PolicyLossOptions(objective=objectives.as_spec(objective), **extra)
    inputs = prepare_loss_call(
        ("hidden", problem["hidden"]),
        problem["weight"].shape[0],
        {"weight": problem["weight"], "bias": problem["bias"]},
        problem["target"],
        problem["advantages"],
        problem["old_logprobs"],
        mask=None,
        seq_ids=problem["seq_ids"],
        ref_logprobs=None,
        behavior_logprobs=None,
        options=options,
    )
    with FlopCounterMode(display=False) as counter:
        fused_loss_rows(
            problem["hidden"],
            problem["weight"],
            None,
            inputs,
            options,
            (True, True, False),
            chunk_size,
            False,
            "triton",
        )
    return counter.get_total_flops()


def test_gspo_in_chunks_costs_exactly_six_n_h_v_flops():
    problem = packed_problem()
    num_tokens, hidden_dim = problem["hidden"].shape
    vocab = problem["weight"].shape[0]
    floor = 6 * num_tokens * hidden_dim * vocab
    assert launcher_flops(problem, OBJECTIVES["gspo"], 6) == floor  # chunks on sequence boundaries
    assert launcher_flops(problem, OBJECTIVES["gspo"], 4) == floor * 8 // 6  # a sequence of 6: two passes
    assert launcher_flops(problem, OBJECTIVES["ppo_clip"], 4) == floor


@pytest.mark.parametrize("name", OBJECTIVES)
def test_empty_batch_and_fully_masked_sequences(name):
    objective = OBJECTIVES[name]
    problem = make_problem(seed=14)
    empty = {k: (v[:0] if v.shape[:1] == problem["mask"].shape else v) for k, v in problem.items()}
    loss, grads, metrics = run_fused(empty, objective, "torch", "cpu", **extras_for(objective))
    assert float(loss) == 0.0 and all(torch.isfinite(m) for m in metrics.values())
    assert grads["weight"].abs().sum() == 0
    # Every token of sequences 0 and 2 masked: the same numbers as without those sequences at all.
    masked = dict(problem)
    masked["mask"] = problem["mask"] & (problem["seq_ids"] != 0) & (problem["seq_ids"] != 2)
    keep = masked["mask"]
    dropped = {k: (v[keep] if v.shape[:1] == keep.shape else v) for k, v in problem.items()}
    dropped["mask"] = None
    options = extras_for(objective)
    got = run_fused(masked, objective, "torch", "cpu", **options)
    want = run_fused(dropped, objective, "reference", "cpu", **options)
    assert_close(got[0], want[0], "loss")
    assert_close(got[1]["weight"], want[1]["weight"], "grad weight")
    for key in got[2]:
        assert_close(got[2][key], want[2][key], key)


def test_objective_names_specs_and_conflicts():
    assert sorted(objectives.OBJECTIVES) == [
        "cispo",
        "dgpo",
        "dppo",
        "dro",
        "geo_mean",
        "gpg",
        "gspo",
        "maspo",
        "ppo_clip",
        "sapo",
    ]
    assert objectives.parse("sapo:tau_pos=2.0") == objectives.SAPO(tau_pos=2.0)
    assert objectives.resolve("gspo", 3e-4, 4e-4, None) == objectives.GSPO(3e-4, 4e-4)
    assert objectives.parse(objectives.DPPO("kl", 0.1).spec()) == objectives.DPPO("kl", 0.1)
    problem = make_problem(seed=15)
    args = (problem["hidden"], problem["weight"], problem["target"], problem["advantages"])
    kwargs = dict(mask=problem["mask"])
    for objective, message in [
        ("nope", "objective 'nope' is not one of"),
        ("sapo:tau=1", "'tau=1' is not one of its fields"),
        ("gspo", "objective 'gspo' needs seq_ids"),
        (objectives.DRO(), r"DRO.beta is required"),
        (objectives.SAPO(tau_pos=0.0), r"SAPO.tau_pos must be > 0"),
        (objectives.DPPO("js"), "DPPO.divergence"),
    ]:
        with pytest.raises(ValueError, match=message):
            ops.fused_policy_loss(*args, objective=objective, **kwargs)
    with pytest.raises(ValueError, match=r"clip_high=0\.3 does not apply to objective 'sapo'"):
        ops.fused_policy_loss(*args, objective="sapo", clip_high=0.3, **kwargs)
    with pytest.raises(ValueError, match="conflicts with the objective's own clip_low"):
        ops.fused_policy_loss(*args, objective=objectives.GSPO(clip_low=0.01), clip_low=0.1, **kwargs)
    with pytest.raises(ValueError, match="no token-level place for tis_cap"):
        ops.fused_policy_loss(
            *args,
            objective="geo_mean",
            tis_cap=2.0,
            seq_ids=problem["seq_ids"],
            behavior_logprobs=problem["behavior_logprobs"],
            **kwargs,
        )
    # The old keywords still mean PPOClip.
    plain, _ = ops.fused_policy_loss(
        *args, clip_low=0.1, dual_clip=2.0, old_logprobs=problem["old_logprobs"], **kwargs
    )
    named, _ = ops.fused_policy_loss(
        *args,
        objective=objectives.PPOClip(0.1, 0.2, dual_clip=2.0),
        old_logprobs=problem["old_logprobs"],
        **kwargs,
    )
    assert torch.equal(plain, named)


NEW_OBJECTIVE = """
from dataclasses import dataclass
from duca_fast.ops.policy_loss.objectives import register
from duca_fast.ops.policy_loss.objectives.base import Objective, ObjectiveTerms


@register
@dataclass(frozen=True)
class Twice(Objective):
    name = "twice"

    def terms(self, batch):
        loss = -2 * batch.advantages * batch.logprobs
        return ObjectiveTerms(loss, batch.weights * -2 * batch.advantages, {})

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        return -2 * logprobs * advantages, {}
"""

USE_IT = """
import torch
from duca_fast import ops
from duca_fast.ops import objectives
gen = torch.Generator().manual_seed(0)
h, w = torch.randn(7, 4, generator=gen), torch.randn(11, 4, generator=gen)
t, a = torch.randint(0, 11, (7,), generator=gen), torch.randn(7, generator=gen)
twice = ops.fused_policy_loss(h, w, t, a, objective=objectives.Twice())[0]
once = ops.fused_policy_loss(h, w, t, a, objective="gpg")[0]
ref = ops.fused_policy_loss(h, w, t, a, objective="twice", backend="reference")[0]
print(float(twice / once), float(ref / once))
"""


def test_adding_an_objective_is_one_file(tmp_path):
    """A copy of the package plus one new file in objectives/: usable by name and class, no other edit."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "duca_fast", tmp_path / "duca_fast", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "duca_fast/ops/policy_loss/objectives/twice.py").write_text(NEW_OBJECTIVE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", USE_IT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ratio, reference_ratio = map(float, result.stdout.split())
    assert ratio == pytest.approx(2.0, rel=1e-6) and reference_ratio == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize(
    "backend,device", [("torch", "cpu"), ("triton", KERNEL_DEVICE), ("reference", "cpu")]
)
@pytest.mark.parametrize("use_bias", [True, False])
def test_token_logprobs_sum_p2_matches_float64(backend, device, use_bias):
    """sum_v p_v^2 = exp(LSE(2z) - 2 LSE(z)) per token from the log-prob pass, against float64 softmax."""
    problem = make_problem(num_tokens=13, vocab=37, seed=17)
    bias = problem["bias"].clone()
    bias[3] = float("-inf")  # a masked vocabulary entry contributes exactly 0
    target = problem["target"].clamp_min(0)
    target[target == 3] = 4
    hidden = problem["hidden"].to(device).requires_grad_()
    logprobs, entropy, sum_p2 = ops.token_logprobs(
        hidden,
        problem["weight"].to(device),
        target.to(device),
        bias=bias.to(device) if use_bias else None,
        temperature=0.8,
        return_entropy=True,
        return_sum_p2=True,
        chunk_size=5,
        fp32_matmul="ieee",
        backend=backend,
    )
    logits = problem["hidden"].double() @ problem["weight"].double().T + (bias.double() if use_bias else 0)
    probs = torch.softmax(logits / 0.8, -1)
    assert_close(sum_p2.detach().cpu().double(), probs.pow(2).sum(-1), "sum_p2")
    assert not sum_p2.requires_grad and sum_p2.shape == (13,)
    assert_close(logprobs.detach().cpu().double(), probs.log().gather(1, target[:, None])[:, 0], "logprobs")
    # The other outputs keep their gradients; the order is (logprobs, entropy, sum_p2).
    (logprobs.sum() + entropy.sum()).backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    only = ops.token_logprobs(
        hidden.detach(), problem["weight"].to(device), target.to(device), return_sum_p2=True, backend=backend
    )
    assert len(only) == 2


def test_token_logprobs_sum_p2_of_an_empty_batch():
    problem = make_problem(seed=18)
    logprobs, sum_p2 = ops.token_logprobs(
        problem["hidden"][:0], problem["weight"], problem["target"][:0].clamp_min(0), return_sum_p2=True
    )
    assert logprobs.shape == sum_p2.shape == (0,)


CORRECTIONS = {
    "token TIS": ops.RolloutCorrection("token", 1.3),
    "sequence IcePop + rejection": ops.RolloutCorrection(
        "sequence", "0.3_3.0", rollout_rs="token_k1,seq_max_k3", rollout_rs_threshold="0.6_1.6,0.4"
    ),
    "normalized + seq_mean rule": ops.RolloutCorrection(
        "token", 2.0, rollout_is_batch_normalize=True, rollout_rs="seq_mean_k2", rollout_rs_threshold=0.08
    ),
}


@pytest.mark.parametrize("correction", CORRECTIONS, ids=list(CORRECTIONS))
@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "cispo"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rollout_correction_composes_with_objectives(backend, device, name, correction):
    problem = make_problem(seed=19)
    options = dict(EXTRAS, correction=CORRECTIONS[correction])
    got = run_fused(problem, OBJECTIVES[name], backend, device, chunk_size=4, **options)
    expected = run_fused(problem, OBJECTIVES[name], "reference", "cpu", **options)
    compare(got, expected)
    rejected = float(expected[2]["correction_rejected_frac"])
    if CORRECTIONS[correction].rollout_rs is not None:
        assert 0 < rejected < 1, rejected


def test_rollout_correction_inputs_are_checked():
    problem = make_problem(seed=20)
    args = (problem["hidden"], problem["weight"], problem["target"], problem["advantages"])
    common = dict(
        mask=problem["mask"],
        old_logprobs=problem["old_logprobs"],
        behavior_logprobs=problem["behavior_logprobs"],
    )
    with pytest.raises(ValueError, match="tis_cap and correction both set"):
        ops.fused_policy_loss(*args, correction=ops.RolloutCorrection("token"), tis_cap=2.0, **common)
    with pytest.raises(ValueError, match="needs old_logprobs and behavior_logprobs"):
        ops.fused_policy_loss(*args, correction=ops.RolloutCorrection("token"), mask=problem["mask"])
    with pytest.raises(ValueError, match="needs seq_ids"):
        ops.fused_policy_loss(*args, correction=ops.RolloutCorrection("sequence"), **common)
    for kwargs, message in [
        (dict(rollout_is="tokens"), "rollout_is must be"),
        (dict(), "needs rollout_is or rollout_rs"),
        (dict(rollout_is="token", rollout_is_threshold="2_1"), "need 0 < lower <= upper"),
        (dict(rollout_rs="token_k4", rollout_rs_threshold=1.0), "rollout_rs rules must be among"),
        (dict(rollout_rs="token_k2"), "needs rollout_rs_threshold"),
        (dict(rollout_rs="token_k2,seq_max_k3", rollout_rs_threshold="1,2,3"), "one value for all rules"),
        (dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_2"), "does not fit rule"),
    ]:
        with pytest.raises(ValueError, match=message):
            ops.RolloutCorrection(**kwargs)


# ---------------------------------------------------------------------------------------------------
# Token masks on the policy-gradient term: TRL's top_entropy_quantile and off-policy sequence masking.

MASKS = {
    "top_entropy": dict(top_entropy_quantile=0.4),
    "off_policy": dict(off_policy_mask=0.02),
    "both": dict(top_entropy_quantile=0.6, off_policy_mask=0.0),
}


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("objective_name", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_token_masks_match_the_reference(backend, device, objective_name, mask_name):
    objective = OBJECTIVES[objective_name]
    problem = make_problem(seed=21)
    options = dict(extras_for(objective), **MASKS[mask_name])
    got = run_fused(problem, objective, backend, device, chunk_size=4, **options)
    expected = run_fused(problem, objective, "reference", "cpu", **options)
    compare(got, expected)
    without = run_fused(problem, objective, "reference", "cpu", **extras_for(objective))
    assert not torch.equal(got[1]["weight"], without[1]["weight"].float().double())  # the mask acts
    kept, masked = got[2].get("entropy_mask_kept"), got[2].get("off_policy_masked")
    if "top_entropy_quantile" in MASKS[mask_name]:
        assert 0 < float(kept) < 1
    if "off_policy_mask" in MASKS[mask_name]:
        assert 0 < float(masked) < 1


@pytest.mark.parametrize("mask_name", MASKS)
def test_token_masks_on_logprobs_match_the_reference(mask_name):
    problem = make_problem(seed=22)
    logprobs, entropy = logprob_inputs(problem)
    common = {k: problem[k] for k in ("advantages", "old_logprobs", "mask", "seq_ids", "behavior_logprobs")}
    results = {}
    for backend in ("torch", "reference"):
        leaf = logprobs.float().clone().requires_grad_()
        loss, metrics = ops.policy_loss_from_logprobs(
            leaf, entropy=entropy.float(), backend=backend, **common, **MASKS[mask_name]
        )
        loss.backward()
        results[backend] = (loss.detach().double(), {"logprobs": leaf.grad.double()}, metrics)
    compare(results["torch"], results["reference"])


def test_token_masks_cost_and_need_what_they_say():
    problem = packed_problem()
    num_tokens, hidden_dim = problem["hidden"].shape
    floor = 6 * num_tokens * hidden_dim * problem["weight"].shape[0]
    ppo = OBJECTIVES["ppo_clip"]
    # off_policy_mask is per sequence: chunks on sequence boundaries keep one pass...
    assert launcher_flops(problem, ppo, 6, off_policy_mask=0.01) == floor
    # ...top_entropy_quantile is a quantile over every token: two passes (GEMM1 twice).
    assert launcher_flops(problem, ppo, 6, top_entropy_quantile=0.5) == floor * 8 // 6
    with pytest.raises(ValueError, match="off_policy_mask needs seq_ids"):
        ops.fused_policy_loss(
            problem["hidden"],
            problem["weight"],
            problem["target"],
            problem["advantages"],
            off_policy_mask=0.1,
        )
    with pytest.raises(ValueError, match="top_entropy_quantile must be in"):
        ops.PolicyLossOptions(top_entropy_quantile=0.0)
    logprobs, _ = logprob_inputs(problem)
    with pytest.raises(ValueError, match="top_entropy_quantile < 1 needs entropy"):
        ops.policy_loss_from_logprobs(logprobs.float(), problem["advantages"], top_entropy_quantile=0.5)
