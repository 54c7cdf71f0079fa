"""Op input validation (issue 14 item 8): each case here failed silently or badly before the fix."""

import time

import pytest
import torch

from duca_fast import ops
from tests.conftest import KERNEL_DEVICE

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]


def small_problem(seed=0, num_tokens=6, hidden_dim=4, vocab=9):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(num_tokens, hidden_dim, generator=gen),
        weight=torch.randn(vocab, hidden_dim, generator=gen),
        target=torch.randint(0, vocab, (num_tokens,), generator=gen),
        advantages=torch.randn(num_tokens, generator=gen),
    )


@pytest.mark.parametrize("name", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_finite_projection_inputs_raise_naming_the_argument(name, bad, backend, device):
    problem = small_problem()
    problem["bias"] = torch.zeros(problem["weight"].shape[0])
    problem[name] = problem[name].clone()
    problem[name].view(-1)[3] = bad
    problem = {k: v.to(device) for k, v in problem.items()}
    with pytest.raises(ValueError, match=rf"^{name}\[.*is not finite"):
        ops.fused_policy_loss(**problem, backend=backend)
    with pytest.raises(ValueError, match=rf"^{name}\[.*is not finite"):
        ops.token_logprobs(problem["hidden"], problem["weight"], problem["target"], bias=problem["bias"])


def test_validate_false_skips_the_check():
    problem = small_problem()
    problem["hidden"] = problem["hidden"].clone()
    problem["hidden"][0, 0] = float("nan")
    loss, _ = ops.fused_policy_loss(**problem, validate=False)
    assert torch.isnan(loss)


def test_masked_rows_of_hidden_are_not_checked():
    """Rows without loss never enter the GEMMs (compaction), so garbage there is harmless."""
    problem = small_problem()
    problem["hidden"] = problem["hidden"].clone()
    problem["hidden"][2] = float("nan")
    mask = torch.ones(6, dtype=torch.bool)
    mask[2] = False
    loss, metrics = ops.fused_policy_loss(**problem, mask=mask)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_finite_logits_raise(bad, backend, device):
    logits = torch.randn(4, 7)
    logits[2, 5] = bad
    target = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"^logits\[2, 5\] = .* is not finite"):
        ops.policy_loss_from_logits(
            logits.to(device), target.to(device), torch.ones(4).to(device), backend=backend
        )


def test_a_row_of_only_minus_inf_logits_is_rejected():
    logits = torch.randn(3, 5)
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match=r"logits\[1, 0\]: every entry of this row is -inf"):
        ops.policy_loss_from_logits(logits, torch.tensor([0, 1, 2]), torch.ones(3))


@pytest.mark.parametrize("entropy_coef", [0.0, 0.1])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_minus_inf_logits_are_exact(entropy_coef, backend, device):
    """A masked vocabulary entry (-inf) is probability 0: 0 log 0 = 0 in the entropy, no NaN anywhere."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 11, generator=gen)
    logits[:, 7:] = float("-inf")
    logits[3, 2] = float("-inf")
    target = torch.tensor([0, 1, 2, 3, 4])
    advantages = torch.randn(5, generator=gen)
    old = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0] + 0.1
    out = {}
    for name, (b, d) in {"fast": (backend, device), "reference": ("reference", "cpu")}.items():
        leaf = logits.clone().to(d).requires_grad_()
        loss, metrics = ops.policy_loss_from_logits(
            leaf, target.to(d), advantages.to(d), old.to(d), entropy_coef=entropy_coef, backend=b
        )
        loss.backward()
        out[name] = (loss.detach().cpu(), leaf.grad.cpu(), metrics["entropy"].cpu())
    for got, expected in zip(out["fast"], out["reference"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=1e-6)
    assert torch.all(out["fast"][1][:, 7:] == 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_minus_inf_bias_masks_vocabulary_entries(backend, device):
    problem = small_problem()
    bias = torch.zeros(9)
    bias[5:] = float("-inf")
    problem["target"] = problem["target"] % 5
    out = {}
    for name, (b, d) in {"fast": (backend, device), "reference": ("reference", "cpu")}.items():
        leaves = {k: problem[k].clone().to(d).requires_grad_() for k in ("hidden", "weight")}
        loss, metrics = ops.fused_policy_loss(
            **leaves,
            target=problem["target"].to(d),
            advantages=problem["advantages"].to(d),
            bias=bias.to(d),
            entropy_coef=0.2,
            fp32_matmul="ieee",  # exact fp32 on a GPU too: compared with float64 at 1e-5
            backend=b,
        )
        loss.backward()
        out[name] = (loss.detach().cpu(), leaves["hidden"].grad.cpu(), metrics["entropy"].cpu())
    for got, expected in zip(out["fast"], out["reference"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("largest", [10**8, 10**12, 2**62])
def test_sparse_group_ids_are_renumbered_without_a_large_allocation(largest):
    rewards = torch.tensor([1.0, 2.0, 5.0, 9.0])
    started = time.perf_counter()
    got = ops.grpo_advantages(rewards, torch.tensor([0, 0, largest, largest]))
    assert time.perf_counter() - started < 5  # an id-sized table took 7 s at 1e8 and OOM beyond
    expected = ops.grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_sparse_ids_with_num_groups_given_and_in_hian():
    turn_rewards = torch.tensor([0.1, 0.4, 0.2, 0.9, 0.3])
    turn_session = torch.tensor([0, 0, 1, 2, 3])
    session_rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    dense = ops.hian_advantages(turn_rewards, turn_session, session_rewards, torch.tensor([0, 0, 1, 1]))
    sparse_group = torch.tensor([7, 7, 10**9, 10**9])
    for kwargs in (dict(), dict(num_groups=10**9 + 1)):
        got = ops.hian_advantages(turn_rewards, turn_session, session_rewards, sparse_group, **kwargs)
        torch.testing.assert_close(got, dense, rtol=0, atol=0)
    positions = torch.tensor([0, 10**10, 0, 0, 0])
    got = ops.hian_advantages(
        turn_rewards,
        turn_session,
        session_rewards,
        sparse_group,
        turn_scope="group_turn",
        turn_index=positions,
    )
    expected = ops.hian_advantages(
        turn_rewards,
        turn_session,
        session_rewards,
        sparse_group,
        turn_scope="group_turn",
        turn_index=torch.tensor([0, 1, 0, 0, 0]),
        backend="reference",
    )
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_any_integer_id_dtype(dtype, backend, device):
    rewards = torch.tensor([1.0, 2.0, 5.0, 9.0, 4.0])
    expected = ops.grpo_advantages(rewards, torch.tensor([0, 0, 1, 1, 1]), backend="reference")
    group = torch.tensor([0, 0, 1, 1, 1], dtype=dtype)
    got = ops.grpo_advantages(rewards.to(device), group.to(device), backend=backend)
    torch.testing.assert_close(got.cpu(), expected)
    turn = torch.tensor([0, 1, 2, 3, 4], dtype=dtype)
    token_turn = torch.tensor([0, 1, 4, 4], dtype=dtype)
    got = ops.hian_advantages(
        rewards.to(device),
        turn.to(device),
        rewards.to(device),
        group.to(device),
        token_turn=token_turn.to(device),
    )
    assert got.shape == (4,) and torch.isfinite(got).all()
