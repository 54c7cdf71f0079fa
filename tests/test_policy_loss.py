"""fused_policy_loss / token_logprobs / policy_loss_from_logits against the float64 reference."""

import pytest
import torch

from duca_fast import ops
from tests.conftest import KERNEL_DEVICE

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]


def make_problem(num_tokens=29, hidden_dim=24, vocab=101, *, seed=0, dtype=torch.float32, num_seqs=4):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_dim, generator=gen, dtype=torch.float64) * 0.3
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.1
    target = torch.randint(0, vocab, (num_tokens,), generator=gen)
    # Old/ref/behavior log-probs near the current ones, so ratios straddle the clip range.
    with torch.no_grad():
        current = torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, target[:, None])[:, 0]
    old = current + 0.3 * torch.randn(num_tokens, generator=gen, dtype=torch.float64)
    return dict(
        hidden=hidden.to(dtype),
        weight=weight.to(dtype),
        bias=bias.to(dtype),
        target=target,
        advantages=torch.randn(num_tokens, generator=gen),
        old_logprobs=old.float(),
        ref_logprobs=(current + 0.2 * torch.randn(num_tokens, generator=gen, dtype=torch.float64)).float(),
        behavior_logprobs=(old + 0.5 * torch.randn(num_tokens, generator=gen, dtype=torch.float64)).float(),
        mask=torch.rand(num_tokens, generator=gen) > 0.25,
        seq_ids=torch.sort(torch.randint(0, num_seqs, (num_tokens,), generator=gen)).values,
    )


def loss_and_grads(problem, backend, device, *, use_bias=True, **options):
    leaves = {
        name: problem[name].detach().to(device).requires_grad_()
        for name in (("hidden", "weight", "bias") if use_bias else ("hidden", "weight"))
    }
    rest = {
        k: v.to(device)
        for k, v in problem.items()
        if k not in ("hidden", "weight", "bias") and (k != "old_logprobs" or "no_old" not in options)
    }
    options = {k: v for k, v in options.items() if k != "no_old"}
    if options.get("tis_cap") is None:
        rest.pop("behavior_logprobs")
    # Exact fp32 GEMMs: on a GPU the default (tf32) would differ from the float64 reference by ~1e-3.
    options.setdefault("fp32_matmul", "ieee")
    loss, metrics = ops.fused_policy_loss(
        leaves["hidden"], leaves["weight"], bias=leaves.get("bias"), backend=backend, **rest, **options
    )
    loss.backward()
    return loss.detach().cpu(), {k: v.grad.cpu() for k, v in leaves.items()}, metrics


def assert_close_scaled(got, expected, rtol, name=""):
    """Max error relative to the largest magnitude of the expected tensor (gradients vary in scale)."""
    scale = max(expected.abs().max().item(), 1e-12)
    err = (got.double() - expected.double()).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:.1g} x scale {scale:.3g}"


OPTION_CASES = [
    dict(),
    dict(no_old=True),
    dict(loss_agg="seq_mean_token_mean"),
    dict(loss_agg="seq_mean_token_sum", kl_coef=0.1, kl_type="k1"),
    dict(loss_agg="token_sum_norm", max_tokens=64, kl_coef=0.2, kl_type="k2"),
    dict(kl_coef=0.1, kl_type="k3", entropy_coef=0.01),
    dict(dual_clip=3.0, clip_low=0.1, clip_high=0.28),
    dict(tis_cap=2.0),
    dict(temperature=0.7, entropy_coef=0.05),
    dict(
        dual_clip=2.0,
        tis_cap=1.5,
        kl_coef=0.05,
        entropy_coef=0.02,
        temperature=1.3,
        loss_agg="seq_mean_token_mean",
    ),
    dict(use_bias=False, entropy_coef=0.03, loss_agg="seq_mean_token_sum"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "options", OPTION_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_loss_and_grads_match_reference(backend, device, options):
    problem = make_problem(seed=len(str(options)))
    ref_loss, ref_grads, _ = loss_and_grads(problem, "reference", "cpu", **options)
    loss, grads, metrics = loss_and_grads(problem, backend, device, chunk_size=8, **options)
    assert loss.dtype == torch.float32
    assert_close_scaled(loss, ref_loss, 1e-5, "loss")
    for name, grad in grads.items():
        assert grad.dtype == problem[name].dtype
        assert_close_scaled(grad, ref_grads[name], 1e-4, name)
    for key in ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "entropy"):
        assert torch.isfinite(metrics[key]) and metrics[key].dim() == 0 and not metrics[key].requires_grad


def test_float64_torch_path_is_exact():
    problem = make_problem(dtype=torch.float64, seed=3)
    options = dict(kl_coef=0.1, entropy_coef=0.02, dual_clip=3.0, tis_cap=2.0, loss_agg="seq_mean_token_mean")
    ref_loss, ref_grads, _ = loss_and_grads(problem, "reference", "cpu", **options)
    loss, grads, _ = loss_and_grads(problem, "torch", "cpu", chunk_size=5, **options)
    assert loss.dtype == torch.float64
    assert_close_scaled(loss, ref_loss, 1e-10, "loss")
    for name in grads:
        assert_close_scaled(grads[name], ref_grads[name], 1e-9, name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 16, 33), (17, 20, 7), (40, 3, 65)], ids=str)
def test_odd_shapes(backend, device, shape):
    problem = make_problem(*shape, seed=sum(shape))
    problem["mask"][:] = True
    ref_loss, ref_grads, _ = loss_and_grads(problem, "reference", "cpu", entropy_coef=0.01)
    loss, grads, _ = loss_and_grads(problem, backend, device, entropy_coef=0.01, chunk_size=3)
    assert_close_scaled(loss, ref_loss, 1e-5, "loss")
    for name in grads:
        assert_close_scaled(grads[name], ref_grads[name], 1e-4, name)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fully_masked_sequences(backend, device):
    problem = make_problem(seed=5)
    problem["mask"][problem["seq_ids"] == 1] = False
    # Masked tokens may carry any target (e.g. -100 from an ignore index): they are never gathered.
    problem["target"][~problem["mask"]] = -100
    for agg in ("seq_mean_token_mean", "seq_mean_token_sum", "token_mean"):
        ref_loss, ref_grads, _ = loss_and_grads(problem, "reference", "cpu", loss_agg=agg)
        loss, grads, _ = loss_and_grads(problem, backend, device, loss_agg=agg)
        assert_close_scaled(loss, ref_loss, 1e-5, agg)
        assert_close_scaled(grads["hidden"], ref_grads["hidden"], 1e-4, agg)
        assert (grads["hidden"][~problem["mask"]] == 0).all()
    problem["mask"][:] = False
    loss, grads, metrics = loss_and_grads(problem, backend, device)
    assert loss.item() == 0.0 and (grads["weight"] == 0).all() and metrics["clip_frac"].item() == 0.0


def test_seq_mean_token_mean_weights_sequences_equally():
    """A 1-token sequence weighs as much as a 10-token one under seq_mean_token_mean."""
    problem = make_problem(num_tokens=11, seed=9)
    problem["mask"][:] = True
    problem["seq_ids"] = torch.tensor([0] * 10 + [1])
    problem["advantages"] = torch.tensor([0.0] * 10 + [1.0])
    loss, _, _ = loss_and_grads(problem, "torch", "cpu", no_old=True, loss_agg="seq_mean_token_mean")
    # On-policy, ratio 1: the lone token's loss is -A = -1, averaged over two sequences.
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)
    loss, _, _ = loss_and_grads(problem, "torch", "cpu", no_old=True, loss_agg="token_mean")
    assert loss.item() == pytest.approx(-1 / 11, abs=1e-6)


def test_clip_metrics_on_crafted_ratios():
    problem = make_problem(num_tokens=4, seed=1)
    problem["mask"][:] = True
    with torch.no_grad():
        current = ops.token_logprobs(
            problem["hidden"], problem["weight"], problem["target"], bias=problem["bias"]
        ).double()
    ratios = torch.tensor([2.0, 0.5, 1.0, 0.5], dtype=torch.float64)
    problem["old_logprobs"] = (current - ratios.log()).float()
    problem["advantages"] = torch.tensor([1.0, -1.0, 1.0, 1.0])
    _, _, metrics = loss_and_grads(problem, "torch", "cpu")
    # Token 0: ratio 2 > 1.2 with A > 0 (high); token 1: 0.5 < 0.8 with A < 0 (low); token 3: not clipped.
    assert metrics["clip_frac_high"].item() == pytest.approx(0.25)
    assert metrics["clip_frac_low"].item() == pytest.approx(0.25)
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)


def test_bfloat16_error_is_no_worse_than_plain_torch_bfloat16():
    problem = make_problem(num_tokens=64, hidden_dim=32, vocab=300, seed=4)
    problem["mask"][:] = True
    ref_loss, ref_grads, _ = loss_and_grads(problem, "reference", "cpu", kl_coef=0.1)
    bf16 = dict(
        problem,
        hidden=problem["hidden"].bfloat16(),
        weight=problem["weight"].bfloat16(),
        bias=problem["bias"].bfloat16(),
    )
    loss, grads, _ = loss_and_grads(bf16, "torch", "cpu", kl_coef=0.1, chunk_size=16)
    # Plain torch in bfloat16: materialized bf16 logits, log_softmax in float32, autograd.
    hidden = bf16["hidden"].clone().requires_grad_()
    weight = bf16["weight"].clone().requires_grad_()
    logits = hidden @ weight.T + bf16["bias"]
    logprobs = torch.log_softmax(logits.float(), -1).gather(1, problem["target"][:, None])[:, 0]
    ratio = torch.exp(logprobs - problem["old_logprobs"])
    adv = problem["advantages"]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    d = logprobs - problem["ref_logprobs"]
    plain_loss = (pg + 0.1 * (torch.exp(-d) + d - 1)).mean()
    plain_loss.backward()
    assert (loss - ref_loss).abs() <= 2 * (plain_loss.detach().double() - ref_loss).abs() + 1e-3
    for name, plain_grad in (("hidden", hidden.grad), ("weight", weight.grad)):
        ours = (grads[name].double() - ref_grads[name]).abs().max()
        plain = (plain_grad.double() - ref_grads[name]).abs().max()
        assert ours <= 2 * plain + 1e-6, (name, ours.item(), plain.item())


def _bf16_problem(seed):
    problem = make_problem(num_tokens=48, hidden_dim=32, vocab=257, seed=seed)
    problem["mask"][:] = True
    # Logits of several units, as a trained lm_head gives: bf16 rounding of z then matters.
    problem["weight"] = problem["weight"] * 3
    for name in ("hidden", "weight", "bias"):
        problem[name] = problem[name].bfloat16()
    with torch.no_grad():
        logits = problem["hidden"].double() @ problem["weight"].double().T + problem["bias"].double()
        current = torch.log_softmax(logits, -1).gather(1, problem["target"][:, None])[:, 0]
    gen = torch.Generator().manual_seed(seed)
    problem["old_logprobs"] = (
        current + 0.2 * torch.randn(current.shape, generator=gen, dtype=torch.float64)
    ).float()
    problem["ref_logprobs"] = (
        current + 0.2 * torch.randn(current.shape, generator=gen, dtype=torch.float64)
    ).float()
    return problem


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_logits_dtype_bfloat16_rounds_the_logits_as_a_bf16_lm_head_does(backend, device):
    problem = _bf16_problem(seed=6)
    options = dict(kl_coef=0.1, entropy_coef=0.01, chunk_size=16)
    fp32_loss, fp32_grads, fp32_metrics = loss_and_grads(problem, backend, device, **options)
    bf16_loss, bf16_grads, bf16_metrics = loss_and_grads(
        problem, backend, device, logits_dtype="bfloat16", **options
    )
    # The float64 loss of the bf16-rounded logits: what logits_dtype="bfloat16" must compute.
    double = {
        k: v.double() if v.is_floating_point() and k in ("hidden", "weight", "bias") else v
        for k, v in problem.items()
    }
    logits = (double["hidden"] @ double["weight"].T).to(torch.bfloat16).double() + double["bias"]
    logprobs = torch.log_softmax(logits, -1).gather(1, problem["target"][:, None])[:, 0]
    ratio = torch.exp(logprobs - problem["old_logprobs"].double())
    adv = problem["advantages"].double()
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    d = logprobs - problem["ref_logprobs"].double()
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    rounded_loss = (pg + 0.1 * (torch.exp(-d) + d - 1) - 0.01 * entropy).mean()
    ref_loss, ref_grads, _ = loss_and_grads(problem, "reference", "cpu", **options)
    assert abs(bf16_loss.double() - rounded_loss) < 2e-5
    assert abs(fp32_loss.double() - ref_loss) < 2e-5
    # The rounding is visible (the option is not ignored) and of the size docs/ops.md states.
    assert abs(bf16_loss.double() - ref_loss) > 10 * abs(fp32_loss.double() - ref_loss)
    assert abs(bf16_metrics["entropy"] - fp32_metrics["entropy"]) < 0.02
    for name in ("hidden", "weight", "bias"):
        assert_close_scaled(bf16_grads[name], ref_grads[name], 0.05, name)
        assert_close_scaled(fp32_grads[name], ref_grads[name], 0.02, name)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_token_logprobs_with_bf16_logits_match_the_loss_on_policy(backend, device):
    """Old log-probs from token_logprobs(logits_dtype="bfloat16") are what the loss with bf16 logits
    computes: on-policy ratios are exactly 1 (with fp32-logit old log-probs they are not), and the
    log-probs and their gradients are those of the bf16-rounded logits."""
    problem = _bf16_problem(seed=9)
    leaves = {k: problem[k].detach().to(device).requires_grad_() for k in ("hidden", "weight", "bias")}
    target = problem["target"].to(device)
    ratios = {}
    for logits_dtype in ("bfloat16", "float32"):
        old = ops.token_logprobs(
            leaves["hidden"].detach(),
            leaves["weight"].detach(),
            target,
            bias=leaves["bias"].detach(),
            logits_dtype=logits_dtype,
            backend=backend,
            chunk_size=16,
        )
        _, metrics = ops.fused_policy_loss(
            **{k: v.detach() for k, v in leaves.items()},
            target=target,
            advantages=problem["advantages"].to(device),
            old_logprobs=old,
            logits_dtype="bfloat16",
            backend=backend,
            chunk_size=16,
        )
        ratios[logits_dtype] = metrics
    assert ratios["bfloat16"]["ratio_mean"].item() == 1.0 and ratios["bfloat16"]["approx_kl"].item() == 0.0
    assert ratios["float32"]["approx_kl"].item() > 1e-6  # the rounding is visible in the ratio
    # Against float64 autograd through the bf16-rounded logits (rounding as the identity in backward).
    logp, entropy = ops.token_logprobs(
        leaves["hidden"],
        leaves["weight"],
        target,
        bias=leaves["bias"],
        return_entropy=True,
        logits_dtype="bfloat16",
        backend=backend,
        chunk_size=16,
    )
    upstream = torch.linspace(-1, 1, logp.shape[0], dtype=torch.float64)
    (logp.double().cpu() @ upstream + entropy.double().cpu().sum()).backward()
    double = {k: problem[k].detach().double().requires_grad_() for k in ("hidden", "weight", "bias")}
    product = double["hidden"] @ double["weight"].T
    logits = product + (product.to(torch.bfloat16).double() - product).detach() + double["bias"]
    ref_logp = torch.log_softmax(logits, -1).gather(1, problem["target"][:, None])[:, 0]
    ref_entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    (ref_logp @ upstream + ref_entropy.sum()).backward()
    assert_close_scaled(logp.detach().cpu(), ref_logp.detach(), 1e-5, "logp")
    assert_close_scaled(entropy.detach().cpu(), ref_entropy.detach(), 1e-5, "entropy")
    for name in ("hidden", "weight", "bias"):
        assert_close_scaled(leaves[name].grad.cpu(), double[name].grad, 2e-2, name)


def test_logits_dtype_is_validated():
    problem = make_problem()
    with pytest.raises(ValueError, match="logits_dtype='bfloat16' needs bfloat16 hidden"):
        loss_and_grads(problem, "torch", "cpu", logits_dtype="bfloat16")
    with pytest.raises(ValueError, match="logits_dtype must be one of"):
        loss_and_grads(problem, "reference", "cpu", logits_dtype="fp8")
    with pytest.raises(ValueError, match="logits_dtype='bfloat16' needs bfloat16 hidden"):
        ops.token_logprobs(problem["hidden"], problem["weight"], problem["target"], logits_dtype="bfloat16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream exists on CUDA only")
def test_backward_gemms_on_the_side_stream_give_the_serial_result(monkeypatch):
    from duca_fast.ops.policy_loss import triton_path

    problem = make_problem(num_tokens=700, hidden_dim=64, vocab=3000, seed=8, dtype=torch.bfloat16)
    streams = []
    choose = triton_path._side_stream
    monkeypatch.setattr(
        triton_path, "_side_stream", lambda *args: streams.append(choose(*args)) or streams[-1]
    )
    runs = []
    for overlap in (False, True):
        monkeypatch.setattr(triton_path, "OVERLAP_BACKWARD_GEMMS", overlap)
        runs.append(loss_and_grads(problem, "triton", "cuda", kl_coef=0.1, chunk_size=128))
    assert streams[0] is None and isinstance(streams[1], torch.cuda.Stream), "the overlap really ran"
    (serial_loss, serial_grads, _), (loss, grads, _) = runs
    assert torch.equal(loss, serial_loss)
    for name in serial_grads:
        torch.testing.assert_close(grads[name], serial_grads[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_token_logprobs_and_entropy_with_gradients(backend, device):
    problem = make_problem(seed=12)
    hidden = problem["hidden"].to(device).requires_grad_()
    weight = problem["weight"].to(device).requires_grad_()
    bias = problem["bias"].to(device).requires_grad_()
    target = problem["target"].to(device)
    upstream_logp = torch.randn(hidden.shape[0], dtype=torch.float64)
    upstream_entropy = torch.randn(hidden.shape[0], dtype=torch.float64)
    results = {}
    for name in ("reference", backend):
        for leaf in (hidden, weight, bias):
            leaf.grad = None
        logp, entropy = ops.token_logprobs(
            hidden,
            weight,
            target,
            temperature=0.9,
            bias=bias,
            return_entropy=True,
            backend=name,
            chunk_size=7,
            fp32_matmul="ieee",  # exact fp32 on a GPU too: compared with float64 at 1e-4
        )
        (logp.double().cpu() @ upstream_logp + entropy.double().cpu() @ upstream_entropy).backward()
        results[name] = [t.detach().cpu() for t in (logp, entropy, hidden.grad, weight.grad, bias.grad)]
    for got, expected, label in zip(
        results[backend], results["reference"], ["logp", "entropy", "dh", "dw", "db"]
    ):
        assert_close_scaled(got, expected, 1e-4, label)
    # Log-probs alone (no entropy gradient) take the cheaper backward.
    logp = ops.token_logprobs(hidden, weight, target, backend=backend)
    logp.sum().backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("options", OPTION_CASES[2:6] + OPTION_CASES[8:10], ids=str)
def test_policy_loss_from_logits(backend, device, options):
    problem = make_problem(seed=21)
    options = {k: v for k, v in options.items() if k != "use_bias"}
    logits = (problem["hidden"].double() @ problem["weight"].double().T + problem["bias"].double()).float()
    rest = {k: v for k, v in problem.items() if k not in ("hidden", "weight", "bias")}
    if options.get("tis_cap") is None:
        rest.pop("behavior_logprobs")
    results = {}
    for name, dev in (("reference", "cpu"), (backend, device)):
        leaf = logits.clone().to(dev).requires_grad_()
        loss, _ = ops.policy_loss_from_logits(
            leaf, backend=name, chunk_size=6, **{k: v.to(dev) for k, v in rest.items()}, **options
        )
        loss.backward()
        results[name] = (loss.detach().cpu(), leaf.grad.cpu())
    assert_close_scaled(results[backend][0], results["reference"][0], 1e-5, "loss")
    assert_close_scaled(results[backend][1], results["reference"][1], 1e-4, "grad")


def test_no_grad_mode_and_chunk_size_invariance():
    problem = make_problem(seed=2)
    base = dict(
        target=problem["target"], advantages=problem["advantages"], old_logprobs=problem["old_logprobs"]
    )
    with torch.no_grad():
        loss_a, _ = ops.fused_policy_loss(problem["hidden"], problem["weight"], chunk_size=1, **base)
        loss_b, _ = ops.fused_policy_loss(problem["hidden"], problem["weight"], chunk_size=1000, **base)
    assert not loss_a.requires_grad
    torch.testing.assert_close(loss_a, loss_b)


# --- bad input --------------------------------------------------------------------------------------


def bad_call(**override):
    problem = make_problem(num_tokens=6, hidden_dim=4, vocab=9, seed=0)
    args = dict(
        hidden=problem["hidden"],
        weight=problem["weight"],
        target=problem["target"],
        advantages=problem["advantages"],
        old_logprobs=problem["old_logprobs"],
    )
    args.update(override)
    return ops.fused_policy_loss(**args)


BAD_INPUTS = [
    (r"target\[2\] = 9 is outside \[0, 9\)", dict(target=torch.tensor([0, 1, 9, 2, 3, 4]))),
    (r"target\[0\] = -1 is outside", dict(target=torch.tensor([-1, 1, 2, 2, 3, 4]))),
    ("hidden has 6 rows but target has 5", dict(target=torch.tensor([0, 1, 2, 3, 4]))),
    ("advantages has 5 entries but target has 6", dict(advantages=torch.zeros(5))),
    ("old_logprobs has 7 entries", dict(old_logprobs=torch.zeros(7))),
    ("mask has 2 entries", dict(mask=torch.tensor([True, False]))),
    ("seq_ids has 3 entries", dict(seq_ids=torch.tensor([0, 0, 1]), loss_agg="seq_mean_token_mean")),
    ("hidden width 5 != weight width 4", dict(hidden=torch.randn(6, 5))),
    ("weight dtype torch.float64 differs", dict(weight=torch.randn(9, 4, dtype=torch.float64))),
    ("bias has 3 entries", dict(bias=torch.zeros(3))),
    (r"advantages\[1\] = nan is not finite", dict(advantages=torch.tensor([0.0, float("nan"), 0, 0, 0, 0]))),
    (
        r"old_logprobs\[3\] = -inf is not finite",
        dict(old_logprobs=torch.tensor([0.0, 0, 0, float("-inf"), 0, 0])),
    ),
    ("temperature must be > 0", dict(temperature=0.0)),
    ("clip_low and clip_high must be >= 0", dict(clip_high=-0.1)),
    ("clip_low must be < 1", dict(clip_low=1.0)),
    ("loss_agg must be one of", dict(loss_agg="mean")),
    ("kl_type must be one of", dict(kl_type="k4", kl_coef=0.1)),
    ("token_sum_norm' needs max_tokens", dict(loss_agg="token_sum_norm")),
    ("needs seq_ids", dict(loss_agg="seq_mean_token_sum")),
    ("kl_coef != 0 needs ref_logprobs", dict(kl_coef=0.1)),
    ("tis_cap needs behavior_logprobs", dict(tis_cap=2.0)),
    ("dual_clip must be a finite number > 1", dict(dual_clip=0.5)),
    ("target must have an integer dtype", dict(target=torch.zeros(6))),
    ("hidden must be 2-D", dict(hidden=torch.randn(6))),
    ("chunk_size must be an int >= 1", dict(chunk_size=0)),
    ("advantages is on meta but hidden is on cpu", dict(advantages=torch.zeros(6, device="meta"))),
]


@pytest.mark.parametrize("message,override", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_argument(message, override):
    with pytest.raises(ValueError, match=message):
        bad_call(**override)


def test_bad_logits_and_logprob_inputs():
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ops.policy_loss_from_logits(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match=r"target\[1\] = 5 is outside \[0, 5\)"):
        ops.policy_loss_from_logits(torch.zeros(2, 5), torch.tensor([0, 5]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"target\[0\] = 7 is outside \[0, 3\)"):
        ops.token_logprobs(torch.zeros(1, 2), torch.zeros(3, 2), torch.tensor([7]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ops.token_logprobs(torch.zeros(1, 2), torch.zeros(3, 2), torch.tensor([0]), temperature=-1.0)
