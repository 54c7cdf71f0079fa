"""Backwards that honour the incoming gradient, checked against float64 autograd; metrics over masks.

Every op test elsewhere calls ``loss.backward()`` (an upstream gradient of exactly 1), where a backward
that ignored ``grad_output`` would pass. Here the upstream gradient is a random scale (for the losses)
or a random vector on every differentiable output (``token_logprobs``), and the float64 reference is
scaled the same way; ``gradcheck`` differentiates each custom op numerically in float64.
"""

import pytest
import torch

from duca_fast import ops
from duca_fast.ops.policy_loss import METRIC_KEYS
from duca_fast.ops.policy_loss.correction import CORRECTION_METRICS
from duca_fast.ops.policy_loss.options import MASK_METRICS
from tests.conftest import KERNEL_DEVICE
from tests.ops.test_loss_math import FULL, assert_close, logprob_inputs, make_problem

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]
SCALE = -2.75  # negative and not 1: a backward that drops grad_output (or its sign) is off by 3.75x


def scaled_backward(loss: torch.Tensor, scale: float = SCALE) -> None:
    (loss * scale).backward()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_policy_loss_scales_its_gradients_by_the_upstream_gradient(backend, device):
    problem = make_problem(seed=5)
    grads = {}
    for name, dev in ((backend, device), ("reference", "cpu")):
        leaves = {k: problem[k].detach().to(dev).requires_grad_() for k in ("hidden", "weight", "bias")}
        rest = {k: v.to(dev) for k, v in problem.items() if k not in leaves}
        loss, _ = ops.fused_policy_loss(
            leaves["hidden"],
            leaves["weight"],
            bias=leaves["bias"],
            backend=name,
            fp32_matmul="ieee",
            **rest,
            **FULL,
        )
        scaled_backward(loss)
        grads[name] = {k: v.grad.cpu().double() for k, v in leaves.items()}
    for key in ("hidden", "weight", "bias"):
        assert_close(grads[backend][key], grads["reference"][key], f"grad {key}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_policy_loss_from_logits_scales_its_gradient(backend, device):
    problem = make_problem(seed=6)
    logits = (problem["hidden"].double() @ problem["weight"].double().T + problem["bias"].double()).float()
    rest = {
        k: problem[k] for k in ("target", "advantages", "old_logprobs", "mask", "seq_ids", "ref_logprobs")
    }
    rest["behavior_logprobs"] = problem["behavior_logprobs"]
    grads = {}
    for name, dev in ((backend, device), ("reference", "cpu")):
        leaf = logits.clone().to(dev).requires_grad_()
        loss, _ = ops.policy_loss_from_logits(
            leaf, backend=name, **{k: v.to(dev) for k, v in rest.items()}, **FULL
        )
        scaled_backward(loss)
        grads[name] = leaf.grad.cpu().double()
    assert_close(grads[backend], grads["reference"], "grad logits")


def test_policy_loss_from_logprobs_scales_both_gradients():
    problem = make_problem(seed=7)
    logprobs, entropy = logprob_inputs(problem)
    options = {k: v for k, v in FULL.items() if k != "temperature"}
    rest = {k: problem[k] for k in ("advantages", "old_logprobs", "mask", "seq_ids", "ref_logprobs")}
    rest["behavior_logprobs"] = problem["behavior_logprobs"]
    grads = {}
    for backend in ("torch", "reference"):
        leaf, ent = logprobs.float().clone().requires_grad_(), entropy.float().clone().requires_grad_()
        loss, _ = ops.policy_loss_from_logprobs(leaf, entropy=ent, backend=backend, **rest, **options)
        scaled_backward(loss)
        grads[backend] = (leaf.grad.double(), ent.grad.double())
    assert_close(grads["torch"][0], grads["reference"][0], "grad logprobs")
    assert_close(grads["torch"][1], grads["reference"][1], "grad entropy")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_token_logprobs_backward_takes_random_gradients_on_both_outputs(backend, device):
    problem = make_problem(num_tokens=13, vocab=37, seed=8)
    gen = torch.Generator().manual_seed(1)
    grad_logprobs = torch.randn(13, generator=gen, dtype=torch.float64)
    grad_entropy = torch.randn(13, generator=gen, dtype=torch.float64)
    target = problem["target"].clamp_min(0)

    leaves = {n: problem[n].clone().to(device).requires_grad_() for n in ("hidden", "weight", "bias")}
    logprobs, entropy = ops.token_logprobs(
        leaves["hidden"],
        leaves["weight"],
        target.to(device),
        bias=leaves["bias"],
        temperature=0.8,
        return_entropy=True,
        chunk_size=4,
        backend=backend,
        fp32_matmul="ieee",
    )
    torch.autograd.backward(
        (logprobs, entropy), (grad_logprobs.float().to(device), grad_entropy.float().to(device))
    )

    # Independent float64 autograd of log_softmax (no duca_fast code).
    ref = {n: problem[n].double().clone().requires_grad_() for n in ("hidden", "weight", "bias")}
    log_probs = torch.log_softmax((ref["hidden"] @ ref["weight"].T + ref["bias"]) / 0.8, -1)
    ref_logprobs = log_probs.gather(1, target[:, None])[:, 0]
    ref_entropy = -(log_probs.exp() * log_probs).sum(-1)
    torch.autograd.backward((ref_logprobs, ref_entropy), (grad_logprobs, grad_entropy))
    assert_close(logprobs.detach().cpu().double(), ref_logprobs.detach(), "logprobs")
    assert_close(entropy.detach().cpu().double(), ref_entropy.detach(), "entropy")
    for name in ("hidden", "weight", "bias"):
        assert_close(leaves[name].grad.cpu().double(), ref[name].grad, f"grad {name}")


# --- gradcheck: each custom op's backward against finite differences, float64 -----------------------


def small_problem():
    problem = make_problem(num_tokens=9, hidden_dim=4, vocab=7, seed=9)
    return {k: v.double() if v.is_floating_point() else v for k, v in problem.items()}


def test_gradcheck_fused_policy_loss():
    problem = small_problem()
    rest = {k: v for k, v in problem.items() if k not in ("hidden", "weight", "bias")}
    leaves = [problem[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]

    def loss(hidden, weight, bias):
        return ops.fused_policy_loss(
            hidden, weight, bias=bias, backend="torch", chunk_size=4, **rest, **FULL
        )[0]

    assert torch.autograd.gradcheck(loss, leaves)


def test_gradcheck_policy_loss_from_logits_and_logprobs():
    problem = small_problem()
    logits = (problem["hidden"] @ problem["weight"].T + problem["bias"]).clone().requires_grad_()
    rest = {k: problem[k] for k in ("advantages", "old_logprobs", "mask", "seq_ids", "ref_logprobs")}
    rest["behavior_logprobs"] = problem["behavior_logprobs"]

    def from_logits(values):
        return ops.policy_loss_from_logits(values, problem["target"], backend="torch", **rest, **FULL)[0]

    assert torch.autograd.gradcheck(from_logits, (logits,))
    logprobs, entropy = logprob_inputs(problem)
    options = {k: v for k, v in FULL.items() if k != "temperature"}

    def from_logprobs(values, ent):
        return ops.policy_loss_from_logprobs(values, entropy=ent, backend="torch", **rest, **options)[0]

    assert torch.autograd.gradcheck(
        from_logprobs, (logprobs.clone().requires_grad_(), entropy.clone().requires_grad_())
    )


def test_gradcheck_token_logprobs():
    problem = small_problem()
    target = problem["target"].clamp_min(0)
    leaves = [problem[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]

    def logprobs_and_entropy(hidden, weight, bias):
        return ops.token_logprobs(
            hidden, weight, target, bias=bias, temperature=0.8, return_entropy=True, backend="torch"
        )

    assert torch.autograd.gradcheck(logprobs_and_entropy, leaves)


# --- metrics over masked batches ---------------------------------------------------------------------


def masked_problem():
    """A mask whose masked tokens would move every metric if they were counted: extreme ratios, KL,
    behavior gaps and TIS weights, and one sign of advantage."""
    problem = make_problem(seed=10)
    masked = ~problem["mask"]
    assert masked.sum() >= 3
    problem["old_logprobs"] = torch.where(masked, problem["old_logprobs"] - 3.0, problem["old_logprobs"])
    problem["ref_logprobs"] = torch.where(masked, problem["ref_logprobs"] + 4.0, problem["ref_logprobs"])
    problem["behavior_logprobs"] = torch.where(
        masked, problem["behavior_logprobs"] - 5.0, problem["behavior_logprobs"]
    )
    problem["advantages"] = torch.where(
        masked, torch.full_like(problem["advantages"], 3.0), problem["advantages"]
    )
    return problem


def metrics_of(fn_name, problem, backend, device):
    options = dict(FULL)
    if fn_name == "fused":
        leaves = {k: problem[k].to(device) for k in ("hidden", "weight", "bias")}
        rest = {k: None if v is None else v.to(device) for k, v in problem.items() if k not in leaves}
        return ops.fused_policy_loss(
            leaves["hidden"],
            leaves["weight"],
            bias=leaves["bias"],
            backend=backend,
            fp32_matmul="ieee",
            **rest,
            **options,
        )[1]
    rest = {k: problem[k] for k in ("advantages", "old_logprobs", "mask", "seq_ids", "ref_logprobs")}
    rest["behavior_logprobs"] = problem["behavior_logprobs"]
    if fn_name == "logits":
        logits = problem["hidden"].double() @ problem["weight"].double().T + problem["bias"].double()
        rest = {k: None if v is None else v.to(device) for k, v in rest.items()}
        return ops.policy_loss_from_logits(
            logits.float().to(device), problem["target"].to(device), backend=backend, **rest, **options
        )[1]
    logprobs, entropy = logprob_inputs(problem)
    options.pop("temperature")
    backend = "torch" if backend == "triton" else backend
    return ops.policy_loss_from_logprobs(
        logprobs.float(), entropy=entropy.float(), backend=backend, **rest, **options
    )[1]


@pytest.mark.parametrize("fn_name", ["fused", "logits", "logprobs"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_every_metric_counts_only_unmasked_tokens(fn_name, backend, device):
    problem = masked_problem()
    got = {k: v.cpu().double() for k, v in metrics_of(fn_name, problem, backend, device).items()}
    reference = metrics_of(fn_name, problem, "reference", "cpu")
    # The same metrics from a batch that holds only the unmasked tokens (no mask at all).
    keep = problem["mask"]
    unmasked_only = {k: (v[keep] if v.shape[:1] == keep.shape else v) for k, v in problem.items()}
    unmasked_only["mask"] = None
    subset = metrics_of(fn_name, unmasked_only, "reference", "cpu")
    # And with the mask dropped: the masked tokens counted, which must move every per-token metric.
    counted = dict(problem, mask=None, target=problem["target"].clamp_min(0))
    everything = metrics_of(fn_name, counted, "reference", "cpu")
    assert set(got) == set(METRIC_KEYS) - set(CORRECTION_METRICS) - set(MASK_METRICS)
    for name in got:
        assert_close(got[name], reference[name].double(), f"{name} vs reference")
        assert_close(got[name], subset[name].double(), f"{name} vs the unmasked tokens alone")
        if name != "pg_loss":  # pg_loss is a weighted sum whose weights also change with the count
            moved = abs(float(everything[name]) - float(subset[name]))
            assert moved > 1e-3, f"{name}: counting the masked tokens would not change it ({moved:.2g})"
