"""The Triton backend runs at the GEMM floor: three passes over [N_loss, H] x [H, V], nothing more."""

import inspect

import pytest
import torch
import triton
from torch.utils.flop_counter import FlopCounterMode

from duca_fast import ops
from duca_fast.ops.policy_loss import PolicyLossOptions, triton_path
from duca_fast.ops.policy_loss.checks import prepare_loss_call
from duca_fast.ops.policy_loss.head import compact
from tests.conftest import KERNEL_DEVICE


def _addmm_flops(self_shape, a_shape, b_shape, *overload_args, out_shape=None, **kwargs) -> int:
    """torch's own addmm formula (2.11) cannot take the ``out_dtype`` overload the bf16 CUDA path calls."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_triton_backend_gemm_flops_are_six_n_loss_h_v(dtype, chunk_size):
    """FLOPs of what the custom op runs (its launcher: a dispatch mode does not see inside a custom op)."""
    gen = torch.Generator().manual_seed(0)
    num_tokens, hidden_dim, vocab = 21, 16, 40
    hidden = torch.randn(num_tokens, hidden_dim, generator=gen).to(KERNEL_DEVICE, dtype)
    weight = torch.randn(vocab, hidden_dim, generator=gen).to(KERNEL_DEVICE, dtype)
    bias = torch.randn(vocab, generator=gen).to(KERNEL_DEVICE, dtype)
    target = torch.randint(0, vocab, (num_tokens,), generator=gen).to(KERNEL_DEVICE)
    advantages = torch.randn(num_tokens, generator=gen).to(KERNEL_DEVICE)
    mask = (torch.rand(num_tokens, generator=gen) > 0.4).to(KERNEL_DEVICE)
    n_loss = int(mask.sum())
    assert 0 < n_loss < num_tokens
    options = PolicyLossOptions(entropy_coef=0.1)
    inputs = prepare_loss_call(
        ("hidden", hidden),
        vocab,
        {"weight": weight, "bias": bias},
        target,
        advantages,
        None,
        mask=mask,
        seq_ids=None,
        ref_logprobs=None,
        behavior_logprobs=None,
        options=options,
    )
    rows, inputs = compact(inputs)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm: _addmm_flops}) as counter:
        head, _, _, grads = triton_path.fused_loss_triton(
            hidden[rows], weight, bias, inputs, options, (True, True, True), chunk_size
        )
    assert counter.get_total_flops() == 6 * n_loss * hidden_dim * vocab
    # And it is the computation the public op returns.
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, _ = ops.fused_policy_loss(
        leaves[0],
        leaves[1],
        target,
        advantages,
        bias=leaves[2],
        mask=mask,
        entropy_coef=0.1,
        chunk_size=chunk_size,
        fp32_matmul="ieee",  # as the launcher above ran (no tf32 switch around it)
        backend="triton",
    )
    loss.backward()
    assert float(loss) == pytest.approx(float(head.loss), rel=1e-6)
    torch.testing.assert_close(leaves[1].grad, grads["weight"].to(dtype))


def test_no_triton_kernel_multiplies_over_hidden():
    kernels = {
        name: obj
        for name, obj in inspect.getmembers(triton_path)
        if isinstance(obj, triton.runtime.KernelInterface)
    }
    assert {"_row_partials_kernel", "_logits_grad_kernel"} <= set(kernels)
    for name, kernel in kernels.items():
        assert "tl.dot" not in inspect.getsource(kernel.fn), f"{name} multiplies tiles (tl.dot)"
