"""torch.ops.duca.*: opcheck (schema, fake kernels, autograd registration), the same numbers and
gradients as the float64 references, and torch.compile(fullgraph=True) over them."""

import pytest
import torch

from duca_fast import ops
from duca_fast.ops.library import METRIC_KEYS, fused_policy_loss_op
from tests.conftest import KERNEL_DEVICE
from tests.native import ensure_native_library
from tests.test_advantages import make_batch
from tests.test_policy_loss import make_problem

HIAN = torch.ops.duca.hian_advantages.default
LOSS = torch.ops.duca.fused_policy_loss.default
LOGPROBS = torch.ops.duca.token_logprobs.default


def hian_args(dtype=torch.float32, components=(1, 1)):
    batch = make_batch([4, 1, 3], [3, 1, 4, 2, 2, 5, 1, 2], components=components, seed=11)
    num_turns = batch["turn_session"].numel()
    token_turn = torch.tensor([-1, *range(num_turns), -1, 3, 3])
    return dict(
        turn_rewards=batch["turn_rewards"].to(dtype),
        turn_session=batch["turn_session"],
        session_rewards=batch["session_rewards"].to(dtype),
        session_group=batch["session_group"],
        turn_index=batch["turn_index"],
        token_turn=token_turn,
    )


HIAN_CASES = {
    "per-turn": dict(token_turn=None),
    "tokens": dict(),
    "group_turn-batch": dict(turn_scope="group_turn", scale="batch", turn_weight=0.5, session_weight=2.0),
    "none-float64": dict(scale="none", dtype=torch.float64),
    "components": dict(components=(3, 2), turn_component_weights=[1.0, -0.5, 2.0]),
}


def split_hian_case(case):
    case = dict(case)
    tensors = hian_args(case.pop("dtype", torch.float32), case.pop("components", (1, 1)))
    if "token_turn" in case:
        tensors["token_turn"] = case.pop("token_turn")
    if "turn_component_weights" in case:
        case["turn_component_weights"] = torch.tensor(case["turn_component_weights"], dtype=torch.float64)
    return tensors, case


def call_hian_op(tensors, options):
    return torch.ops.duca.hian_advantages(
        tensors["turn_rewards"],
        tensors["turn_session"],
        tensors["session_rewards"],
        tensors["session_group"],
        3,
        turn_index=tensors["turn_index"],
        token_turn=tensors["token_turn"],
        **options,
    )


@pytest.mark.parametrize("case", HIAN_CASES.values(), ids=HIAN_CASES.keys())
def test_hian_opcheck_and_the_op_matches_the_reference(case):
    tensors, options = split_hian_case(case)
    args = tuple(tensors[k] for k in ("turn_rewards", "turn_session", "session_rewards", "session_group"))
    kwargs = dict(turn_index=tensors["turn_index"], token_turn=tensors["token_turn"], **options)
    torch.library.opcheck(HIAN, (*args, 3), kwargs)
    # The op against the float64 reference (plain loops, no op code): not the public function, which
    # calls this very op.
    expected = ops.hian_advantages(*args, num_groups=3, backend="reference", **kwargs)
    got = call_hian_op(tensors, options)
    assert got.shape == expected.shape
    assert got.dtype == (torch.float64 if tensors["turn_rewards"].dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("case", HIAN_CASES.values(), ids=HIAN_CASES.keys())
def test_hian_opcheck_per_backend(case, backend):
    ensure_native_library()
    tensors, options = split_hian_case(case)
    args = tuple(tensors[k] for k in ("turn_rewards", "turn_session", "session_rewards", "session_group"))
    kwargs = dict(turn_index=tensors["turn_index"], token_turn=tensors["token_turn"], **options)
    torch.library.opcheck(HIAN, (*args, 3), dict(kwargs, backend=backend))
    expected = ops.hian_advantages(*args, backend="reference", **kwargs)
    got = call_hian_op(tensors, dict(options, backend=backend))
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_grpo_opcheck_per_backend(backend):
    ensure_native_library()
    rewards = torch.tensor([[1.0, 0.5], [2.0, 0.0], [4.0, 1.0], [10.0, 2.0], [10.0, 3.0], [7.0, 1.0]])
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    weights = torch.tensor([1.0, -2.0], dtype=torch.float64)
    grpo = torch.ops.duca.grpo_advantages.default
    torch.library.opcheck(grpo, (rewards, group, 3, weights), dict(scale="batch", backend=backend))
    expected = ops.grpo_advantages(
        rewards, group, component_weights=weights, scale="batch", backend="reference"
    )
    got = grpo(rewards, group, 3, weights, scale="batch", backend=backend)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_weights", [False, True])
def test_policy_loss_from_logprobs_opcheck(with_weights):
    gen = torch.Generator().manual_seed(3)
    num_tokens = 9
    logprobs = (-torch.rand(num_tokens, generator=gen) * 2).requires_grad_()
    entropy = torch.rand(num_tokens, generator=gen).requires_grad_()
    advantages = torch.randn(num_tokens, generator=gen)
    old = logprobs.detach() + 0.5 * torch.randn(num_tokens, generator=gen)
    mask = torch.rand(num_tokens, generator=gen) > 0.2
    weights = torch.rand(num_tokens, generator=gen) if with_weights else None
    args = (logprobs, advantages, old, entropy, mask)
    kwargs = dict(dual_clip=2.0, entropy_coef=0.1, token_weights=weights)
    torch.library.opcheck(torch.ops.duca.policy_loss_from_logprobs.default, args, kwargs)


def test_hian_output_is_a_constant():
    tensors, options = split_hian_case(HIAN_CASES["tokens"])
    tensors["turn_rewards"].requires_grad_()
    tensors["session_rewards"].requires_grad_()
    got = call_hian_op(tensors, options)
    assert not got.requires_grad


def test_hian_validates_values_in_the_real_kernel():
    tensors, options = split_hian_case(HIAN_CASES["per-turn"])
    tensors["session_group"] = tensors["session_group"].clone()
    tensors["session_group"][2] = 7
    with pytest.raises(ValueError, match=r"session_group\[2\] = 7 must be in \[0, 3\)"):
        call_hian_op(tensors, options)
    with pytest.raises(ValueError, match="scale must be one of"):
        call_hian_op(split_hian_case(HIAN_CASES["per-turn"])[0], dict(scale="std"))


LOSS_CASES = {
    "default": dict(),
    "kl-entropy-temperature": dict(kl_coef=0.1, kl_type="k2", entropy_coef=0.01, temperature=0.7),
    "dual-tis-seq": dict(dual_clip=3.0, tis_cap=2.0, loss_agg="seq_mean_token_mean", clip_high=0.28),
    "no-bias-on-policy": dict(use_bias=False, no_old=True, loss_agg="token_sum_norm", max_tokens=64),
    "float64-chunked": dict(dtype=torch.float64, chunk_size=5, entropy_coef=0.02),
}


def loss_inputs(case, device="cpu"):
    case = dict(case)
    problem = make_problem(dtype=case.pop("dtype", torch.float32))
    use_bias = case.pop("use_bias", True)
    no_old = case.pop("no_old", False)
    leaves = {
        name: problem[name].clone().to(device).requires_grad_() for name in ("hidden", "weight", "bias")
    }
    if not use_bias:
        leaves["bias"] = None
    rest = {
        name: problem[name].to(device)
        for name in ("target", "advantages", "old_logprobs", "mask", "seq_ids", "ref_logprobs")
    }
    if no_old:
        rest["old_logprobs"] = None
    if case.get("tis_cap") is not None:
        rest["behavior_logprobs"] = problem["behavior_logprobs"].to(device)
    return leaves, rest, case


def raw_op_and_reference(case, backend="auto", device="cpu"):
    """``torch.ops.duca.fused_policy_loss`` itself (schema, dispatcher, registered autograd) and the
    float64 reference (``backend="reference"``: autograd through plain torch), loss, metrics, gradients."""
    leaves, rest, options = loss_inputs(case, device)
    extra = {k: options.pop(k) for k in ("chunk_size",) if k in options}
    loss, metrics, *_ = torch.ops.duca.fused_policy_loss(
        leaves["hidden"],
        leaves["weight"],
        rest["target"],
        rest["advantages"],
        rest["old_logprobs"],
        leaves["bias"],
        mask=rest["mask"],
        seq_ids=rest["seq_ids"],
        ref_logprobs=rest["ref_logprobs"],
        behavior_logprobs=rest.get("behavior_logprobs"),
        backend=backend,
        fp32_matmul="ieee",
        needs_bias_grad=leaves["bias"] is not None,
        **extra,
        **options,
    )
    (loss * 1.7).backward()
    got = (loss.detach(), metrics, {n: leaf.grad for n, leaf in leaves.items() if leaf is not None})

    leaves, rest, options = loss_inputs(case, "cpu")
    ref_loss, ref_metrics = ops.fused_policy_loss(
        leaves["hidden"],
        leaves["weight"],
        rest.pop("target"),
        rest.pop("advantages"),
        rest.pop("old_logprobs"),
        bias=leaves["bias"],
        backend="reference",
        **rest,
        **options,
    )
    (ref_loss * 1.7).backward()
    expected = (
        ref_loss.detach(),
        ref_metrics,
        {n: leaf.grad for n, leaf in leaves.items() if leaf is not None},
    )
    return got, expected


def assert_op_matches_reference(got, expected, tolerance):
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = got, expected
    close = dict(rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(loss.cpu().double(), ref_loss.double(), **close)
    for key, value in ref_metrics.items():
        got_metric = metrics[METRIC_KEYS.index(key)].cpu().double()
        torch.testing.assert_close(got_metric, value.double(), **close, msg=key)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name].cpu().double(), ref_grads[name].double(), **close, msg=name)


@pytest.mark.parametrize("case", LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_fused_policy_loss_op_matches_the_reference(case):
    got, expected = raw_op_and_reference(case)
    assert got[0].dtype == (torch.float64 if case.get("dtype") == torch.float64 else torch.float32)
    assert_op_matches_reference(got, expected, 1e-10 if case.get("dtype") == torch.float64 else 2e-5)


@pytest.mark.parametrize("case", LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_fused_policy_loss_opcheck(case):
    leaves, rest, options = loss_inputs(case)
    args = (leaves["hidden"], leaves["weight"], rest.pop("target"), rest.pop("advantages"))
    kwargs = dict(old_logprobs=rest.pop("old_logprobs"), bias=leaves["bias"], **rest, **options)
    torch.library.opcheck(LOSS, args, kwargs)
    # Also with only some gradients asked for (e.g. a frozen lm_head).
    leaves["weight"].requires_grad_(False)
    torch.library.opcheck(LOSS, args, dict(kwargs, needs_weight_grad=False))


def test_fused_policy_loss_metrics_tensor_order():
    leaves, rest, options = loss_inputs(LOSS_CASES["dual-tis-seq"])
    loss, metrics_tensor, grad_hidden, grad_weight, grad_bias = torch.ops.duca.fused_policy_loss(
        leaves["hidden"],
        leaves["weight"],
        rest["target"],
        rest["advantages"],
        rest["old_logprobs"],
        leaves["bias"],
        seq_ids=rest["seq_ids"],
        behavior_logprobs=rest["behavior_logprobs"],
        needs_weight_grad=False,
        **options,
    )
    _, metrics = fused_policy_loss_op(
        leaves["hidden"],
        leaves["weight"],
        rest["target"],
        rest["advantages"],
        rest["old_logprobs"],
        bias=leaves["bias"],
        seq_ids=rest["seq_ids"],
        behavior_logprobs=rest["behavior_logprobs"],
        **options,
    )
    assert metrics_tensor.shape == (len(METRIC_KEYS),) and metrics_tensor.dtype == torch.float32
    assert metrics_tensor[METRIC_KEYS.index("kl_ref")] == 0 and "kl_ref" not in metrics
    for key, value in metrics.items():
        assert torch.equal(metrics_tensor[METRIC_KEYS.index(key)], value), key
    assert grad_hidden.shape == leaves["hidden"].shape and grad_bias.shape == leaves["bias"].shape
    assert grad_weight.shape == (0,)
    with pytest.raises(RuntimeError, match="needs_weight_grad=False but weight needs a gradient"):
        loss.backward()


def test_fused_policy_loss_validates():
    leaves, rest, _ = loss_inputs(LOSS_CASES["default"])
    target = rest["target"].clone()
    target[4] = 10_000
    with pytest.raises(ValueError, match=r"target\[4\] = 10000 is outside \[0, 101\)"):
        fused_policy_loss_op(leaves["hidden"], leaves["weight"], target, rest["advantages"])
    with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logprobs"):
        fused_policy_loss_op(
            leaves["hidden"], leaves["weight"], rest["target"], rest["advantages"], kl_coef=0.1
        )
    with pytest.raises(ValueError, match="hidden width 24 != weight width 23"):
        fused_policy_loss_op(leaves["hidden"], leaves["weight"][:, :23], rest["target"], rest["advantages"])


def test_fused_policy_loss_triton_dispatch():
    """backend='triton' through the op: the Triton kernels (interpreted without a GPU), against float64."""
    got, expected = raw_op_and_reference(dict(kl_coef=0.05, entropy_coef=0.01), "triton", KERNEL_DEVICE)
    assert_op_matches_reference(got, expected, 2e-5)


@pytest.mark.parametrize("backend,device", [("auto", "cpu"), ("triton", KERNEL_DEVICE)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_token_logprobs_op_matches_float64_autograd(backend, device, use_bias):
    problem = make_problem(num_tokens=13, vocab=37)
    target = problem["target"].clamp_min(0)
    upstream = (torch.linspace(-1, 1, 13, dtype=torch.float64), torch.full((13,), 0.3, dtype=torch.float64))
    leaves = {n: problem[n].clone().to(device).requires_grad_() for n in ("hidden", "weight", "bias")}
    logprobs, entropy, _, _ = torch.ops.duca.token_logprobs(
        leaves["hidden"],
        leaves["weight"],
        target.to(device),
        leaves["bias"] if use_bias else None,
        temperature=0.8,
        chunk_size=4,
        fp32_matmul="ieee",
        backend=backend,
    )
    torch.autograd.backward((logprobs, entropy), tuple(g.float().to(device) for g in upstream))

    ref = {n: problem[n].double().clone().requires_grad_() for n in ("hidden", "weight", "bias")}
    logits = ref["hidden"] @ ref["weight"].T + (ref["bias"] if use_bias else 0)
    log_probs = torch.log_softmax(logits / 0.8, -1)
    ref_logprobs = log_probs.gather(1, target[:, None])[:, 0]
    ref_entropy = -(log_probs.exp() * log_probs).sum(-1)
    torch.autograd.backward((ref_logprobs, ref_entropy), upstream)
    close = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(logprobs.detach().cpu().double(), ref_logprobs.detach(), **close)
    torch.testing.assert_close(entropy.detach().cpu().double(), ref_entropy.detach(), **close)
    for name in ("hidden", "weight") + (("bias",) if use_bias else ()):
        torch.testing.assert_close(leaves[name].grad.cpu().double(), ref[name].grad, **close, msg=name)
    assert use_bias or leaves["bias"].grad is None


def test_token_logprobs_opcheck():
    problem = make_problem(num_tokens=11, vocab=29)
    leaves = {n: problem[n].clone().requires_grad_() for n in ("hidden", "weight", "bias")}
    args = (leaves["hidden"], leaves["weight"], problem["target"])
    torch.library.opcheck(LOGPROBS, args, dict(bias=leaves["bias"], temperature=0.9, chunk_size=4))
    torch.library.opcheck(LOGPROBS, args)
    float64 = make_problem(num_tokens=5, vocab=29, dtype=torch.float64)
    torch.library.opcheck(
        LOGPROBS, (float64["hidden"].requires_grad_(), float64["weight"], float64["target"])
    )


def test_token_logprobs_backward_opcheck():
    problem = make_problem(num_tokens=7, vocab=19)
    hidden, weight, bias, target = (problem[n] for n in ("hidden", "weight", "bias", "target"))
    _, entropy, lse, _ = torch.ops.duca.token_logprobs(hidden, weight, target, bias)
    grad_logprobs, grad_entropy = torch.randn(7), torch.randn(7)
    for grad_entropy_arg, needs in ((grad_entropy, (True, True, True)), (None, (False, True, False))):
        args = (
            hidden,
            weight,
            bias,
            target,
            lse,
            entropy,
            grad_logprobs,
            grad_entropy_arg,
            0.9,
            3,
            "float32",
            "ieee",
            "auto",
        )
        torch.library.opcheck(torch.ops.duca.token_logprobs_backward.default, (*args, *needs))


def test_fake_kernels_check_shapes_and_options():
    """Under FakeTensorMode (what torch.compile traces) bad shapes and options fail with the op's message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    leaves, rest, _ = loss_inputs(LOSS_CASES["default"])
    tensors, _ = split_hian_case(HIAN_CASES["tokens"])
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match="advantages has 28 entries but target has 29 tokens"):
            torch.ops.duca.fused_policy_loss(
                leaves["hidden"], leaves["weight"], rest["target"], rest["advantages"][:-1]
            )
        with pytest.raises(ValueError, match="needs seq_ids"):
            torch.ops.duca.fused_policy_loss(
                leaves["hidden"],
                leaves["weight"],
                rest["target"],
                rest["advantages"],
                loss_agg="seq_mean_token_sum",
            )
        with pytest.raises(ValueError, match="turn_session has 19 rows but turn_rewards has 20"):
            torch.ops.duca.hian_advantages(
                tensors["turn_rewards"],
                tensors["turn_session"][:-1],
                tensors["session_rewards"],
                tensors["session_group"],
                3,
            )
        with pytest.raises(ValueError, match="hidden width 24 != weight width 23"):
            torch.ops.duca.token_logprobs(leaves["hidden"], leaves["weight"][:, :23], rest["target"])
        # Shapes and dtypes of the fake results.
        out = torch.ops.duca.hian_advantages(
            tensors["turn_rewards"],
            tensors["turn_session"],
            tensors["session_rewards"],
            tensors["session_group"],
            3,
            token_turn=tensors["token_turn"],
        )
        assert out.shape == tensors["token_turn"].shape and out.dtype == torch.float32


def train_step(
    turn_rewards, turn_session, session_rewards, session_group, token_turn, hidden, weight, bias, target, old
):
    """Advantages -> per-token loss, as a trainer would write it with the custom ops."""
    advantages = torch.ops.duca.hian_advantages(
        turn_rewards, turn_session, session_rewards, session_group, 3, token_turn=token_turn
    )
    loss, metrics = fused_policy_loss_op(
        hidden,
        weight,
        target,
        advantages,
        old,
        bias=bias,
        mask=token_turn >= 0,
        kl_coef=0.0,
        entropy_coef=0.01,
    )
    return loss, advantages, metrics["clip_frac"]


def step_inputs():
    tensors = hian_args()
    problem = make_problem(num_tokens=tensors["token_turn"].numel(), vocab=53)
    leaves = {name: problem[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")}
    args = (
        tensors["turn_rewards"],
        tensors["turn_session"],
        tensors["session_rewards"],
        tensors["session_group"],
        tensors["token_turn"],
        leaves["hidden"],
        leaves["weight"],
        leaves["bias"],
        problem["target"],
        problem["old_logprobs"],
    )
    return args, leaves


def eager_step():
    args, leaves = step_inputs()
    (
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        token_turn,
        hidden,
        weight,
        bias,
        target,
        old,
    ) = args
    advantages = ops.hian_advantages(
        turn_rewards, turn_session, session_rewards, session_group, token_turn=token_turn, num_groups=3
    )
    loss, metrics = ops.fused_policy_loss(
        hidden, weight, target, advantages, old, bias=bias, mask=token_turn >= 0, entropy_coef=0.01
    )
    loss.backward()
    return loss.detach(), advantages, metrics["clip_frac"], {n: leaf.grad for n, leaf in leaves.items()}


@pytest.mark.parametrize("backend,dynamic", [("aot_eager", True), ("inductor", False)])
def test_torch_compile_fullgraph_forward_and_backward(backend, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(train_step, fullgraph=True, backend=backend, dynamic=dynamic)
    expected_loss, expected_advantages, expected_clip, expected_grads = eager_step()
    args, leaves = step_inputs()
    loss, advantages, clip_frac = compiled(*args)
    loss.backward()
    assert torch.equal(advantages, expected_advantages)
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=0, atol=0)
    assert torch.equal(clip_frac, expected_clip)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(leaves[name].grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "op_name, skipped",
    [
        ("fused_policy_loss", ()),
        ("policy_loss_from_logits", ()),
        ("policy_loss_from_logprobs", ("temperature",)),
    ],
)
def test_op_schemas_carry_every_option_with_its_default(op_name, skipped):
    """The options travel as schema arguments: each PolicyLossOptions field must be one, same name, same
    default, in the dataclass's order (the public functions pass them by position)."""
    import dataclasses

    schema = getattr(torch.ops.duca, op_name).default._schema
    arguments = [a.name for a in schema.arguments]
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    fields = [f for f in dataclasses.fields(ops.PolicyLossOptions) if f.name not in skipped]
    positions = [arguments.index(f.name) for f in fields if f.name in arguments]
    missing = [f.name for f in fields if f.name not in arguments]
    assert not missing, f"{op_name} lacks options {missing}"
    assert positions == sorted(positions) and positions == list(
        range(positions[0], positions[0] + len(fields))
    )
    for field in fields:
        assert defaults[field.name] == field.default, (op_name, field.name)
