"""The native CUDA row kernels against the native CPU ones (GPU only; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from duca_fast import native
from tests.native.test_native_policy import OPTION_SETS, make_batch, native_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_chain_matches_cpu(options, dtype):
    assert native.has_cuda(), "the native library was built without CUDA on a CUDA machine"
    batch = make_batch(dtype, seed=OPTION_SETS.index(options), num_tokens=300, vocab_size=5003)
    cpu_sums, cpu_grad = native_loss(*batch, options)
    cuda_sums, cuda_grad = native_loss(*(t.cuda() for t in batch), options)
    again_sums, again_grad = native_loss(*(t.cuda() for t in batch), options)
    assert torch.equal(cuda_grad, again_grad) and cuda_sums == again_sums
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cuda_grad.cpu(), cpu_grad, **tol)
    for name, value in cpu_sums.items():
        assert cuda_sums[name] == pytest.approx(value, rel=tol["rtol"] * 10, abs=1e-6), name
