"""The policy-loss fast paths against the independent float64 reference: loss, gradients and every metric.

Inputs are chosen so that each branch of the math is live: ratios on both sides of the clip range,
both advantage signs, dual clip and TIS caps that bite, uneven sequences with masked tokens.
"""

import pytest
import torch

from duca_fast import ops
from duca_fast.ops.policy_loss import METRIC_KEYS
from duca_fast.ops.policy_loss.correction import CORRECTION_METRICS
from duca_fast.ops.policy_loss.options import MASK_METRICS
from tests.conftest import KERNEL_DEVICE

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]
AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"]
# Every option on: each metric exists and each term of the loss contributes.
FULL = dict(
    clip_low=0.15,
    clip_high=0.25,
    dual_clip=1.3,
    kl_coef=0.3,
    kl_type="k3",
    entropy_coef=0.05,
    temperature=0.8,
    tis_cap=1.2,
)


def make_problem(num_tokens=23, hidden_dim=8, vocab=37, *, seed=2):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_dim, generator=gen, dtype=torch.float64) * 0.4
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.2
    target = torch.randint(0, vocab, (num_tokens,), generator=gen)
    with torch.no_grad():
        logits = (hidden @ weight.T + bias) / FULL["temperature"]
        current = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]
    # Log-ratios up to +-0.9: clipped low and high, and ratios above the dual-clip constant.
    old = current + 0.9 * (2 * torch.rand(num_tokens, generator=gen, dtype=torch.float64) - 1)
    # Uneven sequences: lengths 1, 2, 3, ... and one sequence fully masked.
    seq_ids = torch.repeat_interleave(torch.arange(7), torch.tensor([1, 2, 3, 4, 5, 3, 5]))[:num_tokens]
    mask = torch.rand(num_tokens, generator=gen) > 0.3
    mask[seq_ids == 2] = False
    mask[0] = True
    target = torch.where(mask, target, torch.full_like(target, -100))
    return dict(
        hidden=hidden.float(),
        weight=weight.float(),
        bias=bias.float(),
        target=target,
        advantages=torch.randn(num_tokens, generator=gen),
        old_logprobs=old.float(),
        ref_logprobs=(current + 0.4 * torch.randn(num_tokens, generator=gen, dtype=torch.float64)).float(),
        behavior_logprobs=(old + 0.6 * torch.randn(num_tokens, generator=gen, dtype=torch.float64)).float(),
        mask=mask,
        seq_ids=seq_ids,
    )


def run(problem, backend, device, **options):
    leaves = {k: problem[k].detach().to(device).requires_grad_() for k in ("hidden", "weight", "bias")}
    rest = {k: v.to(device) for k, v in problem.items() if k not in leaves}
    # Exact fp32 GEMMs: on a GPU the default (tf32) would differ from the float64 reference by ~1e-3.
    options.setdefault("fp32_matmul", "ieee")
    loss, metrics = ops.fused_policy_loss(
        leaves["hidden"], leaves["weight"], bias=leaves["bias"], backend=backend, **rest, **options
    )
    loss.backward()
    grads = {k: v.grad.cpu().double() for k, v in leaves.items()}
    return loss.detach().cpu().double(), grads, {k: v.cpu().double() for k, v in metrics.items()}


def assert_close(got, expected, name, rtol=2e-5, atol=1e-6):
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= atol + rtol * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_loss_gradients_and_every_metric_match_reference(backend, device, loss_agg):
    problem = make_problem()
    options = dict(FULL, loss_agg=loss_agg, max_tokens=40 if loss_agg == "token_sum_norm" else None)
    loss, grads, metrics = run(problem, backend, device, **options)
    ref_loss, ref_grads, ref_metrics = run(problem, "reference", "cpu", **options)
    assert set(metrics) == set(METRIC_KEYS) - set(CORRECTION_METRICS) - set(MASK_METRICS) == set(ref_metrics)
    assert_close(loss, ref_loss, "loss")
    for name in grads:
        assert_close(grads[name], ref_grads[name], f"grad {name}")
    for name in ref_metrics:
        assert_close(metrics[name], ref_metrics[name], f"metric {name}")
    # The inputs really exercise the branches (else a metric bug could hide behind a zero).
    for name in ("clip_frac_low", "clip_frac_high", "tis_frac_capped", "dual_clip_frac"):
        assert 0 < ref_metrics[name] < 1, f"{name} = {float(ref_metrics[name])} does not exercise the branch"
    assert float(ref_metrics["clip_frac"]) == pytest.approx(
        float(ref_metrics["clip_frac_low"] + ref_metrics["clip_frac_high"])
    )


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_estimators_match_reference(kl_type):
    problem = make_problem(seed=1)
    options = dict(kl_coef=0.5, kl_type=kl_type, loss_agg="seq_mean_token_mean")
    loss, grads, metrics = run(problem, "torch", "cpu", **options)
    ref_loss, ref_grads, ref_metrics = run(problem, "reference", "cpu", **options)
    assert_close(loss, ref_loss, "loss")
    assert_close(grads["hidden"], ref_grads["hidden"], "grad hidden")
    assert_close(metrics["kl_ref"], ref_metrics["kl_ref"], "kl_ref")
    assert ref_metrics["kl_ref"] != 0


def test_on_policy_gradient_is_the_advantage_weighted_score():
    """old_logprobs=None: ratio 1, nothing clipped, approx_kl 0, and the reference agrees."""
    problem = make_problem(seed=2)
    problem.pop("old_logprobs")
    _, grads, metrics = run(problem, "torch", "cpu")
    _, ref_grads, _ = run(problem, "reference", "cpu")
    assert_close(grads["weight"], ref_grads["weight"], "grad weight")
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0)
    assert float(metrics["approx_kl"]) == pytest.approx(0.0, abs=1e-7)
    assert float(metrics["clip_frac"]) == 0.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compaction_is_exact(backend, device):
    """A masked call equals the call on the loss tokens only (masked rows: zero hidden gradient)."""
    problem = make_problem(seed=3)
    options = dict(FULL, loss_agg="seq_mean_token_sum")
    loss, grads, metrics = run(problem, backend, device, **options)
    kept = problem["mask"]
    compacted = {k: (v[kept] if k not in ("weight", "bias") else v) for k, v in problem.items()}
    compacted.pop("mask")
    loss_c, grads_c, metrics_c = run(compacted, backend, device, **options)
    assert_close(loss, loss_c, "loss", rtol=1e-6)
    assert_close(grads["weight"], grads_c["weight"], "grad weight", rtol=1e-6)
    assert_close(grads["hidden"][kept], grads_c["hidden"], "grad hidden", rtol=1e-6)
    assert torch.all(grads["hidden"][~kept] == 0)
    assert metrics.keys() == metrics_c.keys()
    for name in metrics:
        assert_close(metrics[name], metrics_c[name], name, rtol=1e-6)


@pytest.mark.parametrize("backend,device", [*BACKENDS, ("reference", "cpu")])
def test_empty_batch(backend, device):
    problem = make_problem()
    empty = {k: (v[:0] if k not in ("weight", "bias") else v) for k, v in problem.items()}
    loss, grads, metrics = run(empty, backend, device, **dict(FULL, loss_agg="seq_mean_token_mean"))
    assert float(loss) == 0.0
    assert grads["hidden"].shape == (0, 8) and torch.all(grads["weight"] == 0)
    assert all(float(v) == 0.0 for v in metrics.values())


def test_fully_masked_batch_gives_zero_loss_and_gradients():
    problem = make_problem()
    problem["mask"] = torch.zeros_like(problem["mask"])
    loss, grads, metrics = run(problem, "torch", "cpu", **FULL)
    assert float(loss) == 0.0 and all(torch.all(g == 0) for g in grads.values())
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("loss_agg", AGGS)
def test_from_logprobs_matches_reference_and_fused(loss_agg):
    problem = make_problem(seed=4)
    options = dict(FULL, loss_agg=loss_agg, max_tokens=40 if loss_agg == "token_sum_norm" else None)
    temperature = options.pop("temperature")
    with torch.no_grad():
        logits = problem["hidden"].double() @ problem["weight"].double().T + problem["bias"].double()
        log_probs = torch.log_softmax(logits / temperature, -1)
    target = problem["target"].clamp_min(0)
    logprobs = log_probs.gather(1, target[:, None])[:, 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    rest = {k: problem[k] for k in ("advantages", "mask", "seq_ids", "ref_logprobs", "behavior_logprobs")}
    results = {}
    for backend in ("torch", "reference"):
        leaf = logprobs.float().clone().requires_grad_()
        ent = entropy.float().clone().requires_grad_()
        loss, metrics = ops.policy_loss_from_logprobs(
            leaf, old_logprobs=problem["old_logprobs"], entropy=ent, backend=backend, **rest, **options
        )
        loss.backward()
        results[backend] = (loss.detach().double(), leaf.grad.double(), ent.grad.double(), metrics)
    (loss, g_lp, g_ent, metrics), (r_loss, r_lp, r_ent, r_metrics) = results["torch"], results["reference"]
    assert_close(loss, r_loss, "loss")
    assert_close(g_lp, r_lp, "grad logprobs")
    assert_close(g_ent, r_ent, "grad entropy")
    assert set(metrics) == set(r_metrics) == set(METRIC_KEYS) - set(CORRECTION_METRICS) - set(MASK_METRICS)
    for name in r_metrics:
        assert_close(metrics[name].double(), r_metrics[name].double(), name)
    fused_loss, _, fused_metrics = run(problem, "torch", "cpu", **dict(options, temperature=temperature))
    assert_close(loss, fused_loss, "from_logprobs vs fused", rtol=1e-5)
    assert_close(metrics["clip_frac"].double(), fused_metrics["clip_frac"], "clip_frac vs fused")


def logprob_inputs(problem):
    """Exact float64 log-probs and entropies of the problem's tokens (at FULL's temperature)."""
    with torch.no_grad():
        logits = problem["hidden"].double() @ problem["weight"].double().T + problem["bias"].double()
        log_probs = torch.log_softmax(logits / FULL["temperature"], -1)
    logprobs = log_probs.gather(1, problem["target"].clamp_min(0)[:, None])[:, 0]
    return logprobs, -(log_probs.exp() * log_probs).sum(-1)


@pytest.mark.parametrize("loss_agg", AGGS)
def test_from_logprobs_token_weights_match_reference(loss_agg):
    problem = make_problem(seed=6)
    gen = torch.Generator().manual_seed(1)
    token_weights = torch.rand(problem["target"].shape[0], generator=gen) * 3
    token_weights[~problem["mask"]] = float("nan")  # masked tokens may carry anything
    options = dict(FULL, loss_agg=loss_agg, max_tokens=40 if loss_agg == "token_sum_norm" else None)
    options.pop("temperature")
    logprobs, entropy = logprob_inputs(problem)
    rest = {k: problem[k] for k in ("advantages", "old_logprobs", "mask", "seq_ids", "ref_logprobs")}
    rest["behavior_logprobs"] = problem["behavior_logprobs"]
    results = {}
    for backend in ("torch", "reference"):
        leaf = logprobs.float().clone().requires_grad_()
        ent = entropy.float().clone().requires_grad_()
        loss, metrics = ops.policy_loss_from_logprobs(
            leaf, entropy=ent, token_weights=token_weights, backend=backend, **rest, **options
        )
        loss.backward()
        results[backend] = (loss.detach().double(), leaf.grad.double(), ent.grad.double(), metrics)
    (loss, g_lp, g_ent, metrics), (r_loss, r_lp, r_ent, r_metrics) = results["torch"], results["reference"]
    assert_close(loss, r_loss, "loss")
    assert_close(g_lp, r_lp, "grad logprobs")
    assert_close(g_ent, r_ent, "grad entropy")
    assert metrics["dual_clip_frac"] > 0, "the dual clip must bite in this problem"
    for name in r_metrics:
        assert_close(metrics[name].double(), r_metrics[name].double(), name)
    plain, plain_metrics = ops.policy_loss_from_logprobs(
        logprobs.float(), entropy=entropy.float(), **rest, **options
    )
    assert not torch.allclose(loss.float(), plain), "the weights must change the loss"
    assert_close(metrics["clip_frac"].double(), plain_metrics["clip_frac"].double(), "clip_frac unweighted")


def test_from_logprobs_token_weights_scale_each_token():
    logprobs = torch.tensor([-1.0, -2.0, -0.5, -1.5])
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0])
    seq_ids = torch.tensor([0, 0, 1, 1])
    common = dict(seq_ids=seq_ids, loss_agg="seq_mean_token_mean")
    doubled, _ = ops.policy_loss_from_logprobs(
        logprobs, advantages, token_weights=torch.full((4,), 2.0), **common
    )
    plain, _ = ops.policy_loss_from_logprobs(logprobs, advantages, **common)
    torch.testing.assert_close(doubled, 2 * plain)
    # On-policy the ratio is 1: token t contributes -A_t * w_t / (len(seq) * num_seqs).
    weights = torch.tensor([1.0, 0.0, 0.5, 2.0])
    loss, metrics = ops.policy_loss_from_logprobs(logprobs, advantages, token_weights=weights, **common)
    expected = -(1.0 * 1.0 / 2 + 0.5 * 0.5 / 2 + 3.0 * 2.0 / 2) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(metrics["pg_loss"], torch.tensor(expected))


@pytest.mark.parametrize(
    "token_weights,message",
    [
        (torch.ones(3), "token_weights has 3 entries but target has 4 tokens"),
        (torch.tensor([1.0, float("nan"), 1.0, 1.0]), r"token_weights\[1\] = nan is not finite"),
        (torch.ones(4, dtype=torch.long), "token_weights must have a floating dtype"),
        (torch.ones(4, 1), "token_weights must be 1-D"),
    ],
)
def test_from_logprobs_bad_token_weights(token_weights, message):
    with pytest.raises(ValueError, match=message):
        ops.policy_loss_from_logprobs(torch.zeros(4), torch.ones(4), token_weights=token_weights)


def test_from_logprobs_needs_entropy_for_the_entropy_bonus():
    with pytest.raises(ValueError, match="entropy_coef != 0 needs entropy"):
        ops.policy_loss_from_logprobs(torch.zeros(3), torch.zeros(3), entropy_coef=0.1)
    _, metrics = ops.policy_loss_from_logprobs(torch.zeros(3), torch.ones(3))
    assert "entropy" not in metrics


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_from_logits_matches_reference(backend, device):
    problem = make_problem(seed=5)
    logits = (problem["hidden"] @ problem["weight"].T + problem["bias"]).detach()
    rest = {k: problem[k] for k in ("target", "advantages", "old_logprobs", "mask", "seq_ids")}
    rest.update(ref_logprobs=problem["ref_logprobs"], behavior_logprobs=problem["behavior_logprobs"])
    options = dict(FULL, loss_agg="seq_mean_token_mean")
    out = {}
    for name, (b, d) in {"fast": (backend, device), "reference": ("reference", "cpu")}.items():
        leaf = logits.clone().to(d).requires_grad_()
        loss, metrics = ops.policy_loss_from_logits(
            leaf, backend=b, **{k: v.to(d) for k, v in rest.items()}, **options
        )
        loss.backward()
        out[name] = (loss.detach().cpu().double(), leaf.grad.cpu().double(), metrics)
    assert_close(out["fast"][0], out["reference"][0], "loss")
    assert_close(out["fast"][1], out["reference"][1], "grad logits")
    assert out["fast"][2].keys() == out["reference"][2].keys()
    for name in out["reference"][2]:
        assert_close(out["fast"][2][name].cpu().double(), out["reference"][2][name].double(), name)


def test_options_object_and_keywords_agree_and_keywords_override():
    problem = make_problem(seed=6)
    options = ops.PolicyLossOptions(**FULL, loss_agg="seq_mean_token_sum")
    by_object = run(problem, "torch", "cpu", options=options)
    by_keywords = run(problem, "torch", "cpu", **FULL, loss_agg="seq_mean_token_sum")
    assert torch.equal(by_object[0], by_keywords[0])
    # A keyword overrides the object's field, even back to the dataclass default.
    overridden = run(problem, "torch", "cpu", options=options, clip_low=0.3, kl_coef=0.0)
    by_hand = run(
        problem, "torch", "cpu", **{**FULL, "clip_low": 0.3, "kl_coef": 0.0}, loss_agg="seq_mean_token_sum"
    )
    assert torch.equal(overridden[0], by_hand[0]) and not torch.equal(overridden[0], by_object[0])
    with pytest.raises(TypeError, match="unexpected keyword argument 'clip_lo'"):
        run(problem, "torch", "cpu", clip_lo=0.3)
