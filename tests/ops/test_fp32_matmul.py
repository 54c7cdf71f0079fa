"""fp32 inputs multiply on TF32 tensor cores by default: the ops switch cuBLAS around their own GEMMs
and leave the caller's setting exactly as it was, through whichever torch API the caller used."""

import pytest
import torch

from duca_fast import ops
from duca_fast.ops.policy_loss import custom_ops, triton_path
from duca_fast.ops.policy_loss.precision import fp32_matmul_precision
from tests.conftest import KERNEL_DEVICE

MATMUL = torch.backends.cuda.matmul


def _read(getter):
    try:
        return getter()
    except RuntimeError:
        return "raises"


def caller_view() -> tuple:
    """What a caller (or a library such as transformers) reads back: each read, or that it raises."""
    return (
        _read(lambda: MATMUL.fp32_precision),
        _read(lambda: MATMUL.allow_tf32),
        _read(torch.get_float32_matmul_precision),
    )


def effective() -> str:
    return "tf32" if MATMUL.fp32_precision == "tf32" else "ieee"


@pytest.fixture(autouse=True)
def pristine_flags():
    """Each test starts and ends with nothing set (the new API's "none" also frees the legacy reads)."""
    torch.backends.fp32_precision = "none"
    MATMUL.fp32_precision = "none"
    yield
    torch.backends.fp32_precision = "none"
    MATMUL.fp32_precision = "none"


CALLER_SETTINGS = {
    "nothing set": lambda: None,
    "legacy allow_tf32=True": lambda: setattr(MATMUL, "allow_tf32", True),
    "legacy allow_tf32=False": lambda: setattr(MATMUL, "allow_tf32", False),
    "new fp32_precision=tf32": lambda: setattr(MATMUL, "fp32_precision", "tf32"),
    "new fp32_precision=ieee": lambda: setattr(MATMUL, "fp32_precision", "ieee"),
    "generic backends.fp32_precision=tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
    "set_float32_matmul_precision(high)": lambda: torch.set_float32_matmul_precision("high"),
}


@pytest.mark.parametrize("wanted", ["tf32", "ieee"])
@pytest.mark.parametrize("setting", CALLER_SETTINGS.values(), ids=CALLER_SETTINGS.keys())
def test_context_switches_and_restores_every_caller_setting(setting, wanted):
    setting()
    before = caller_view()
    with fp32_matmul_precision(wanted, torch.float32):
        assert effective() == wanted
    assert caller_view() == before
    # An exception inside restores too.
    with pytest.raises(KeyError), fp32_matmul_precision(wanted, torch.float32):
        raise KeyError
    assert caller_view() == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_context_leaves_other_dtypes_alone(dtype):
    MATMUL.allow_tf32 = True
    with fp32_matmul_precision("ieee", dtype):
        assert effective() == "tf32"
    assert MATMUL.allow_tf32 is True


def problem(dtype=torch.float32, device=KERNEL_DEVICE):
    gen = torch.Generator().manual_seed(0)
    num_tokens, hidden_dim, vocab = 11, 8, 23
    return dict(
        hidden=torch.randn(num_tokens, hidden_dim, generator=gen).to(device, dtype).requires_grad_(),
        weight=torch.randn(vocab, hidden_dim, generator=gen).to(device, dtype).requires_grad_(),
        target=torch.randint(0, vocab, (num_tokens,), generator=gen).to(device),
        advantages=torch.randn(num_tokens, generator=gen).to(device),
    )


def spy_paths(monkeypatch) -> list[tuple[str, str]]:
    """Record the precision in force whenever an op enters a path launcher (where its GEMMs run)."""
    seen = []
    targets = [
        (custom_ops, "fused_loss_torch"),
        (custom_ops, "logprob_stats_torch"),
        (custom_ops, "logprob_grads_torch"),
        (triton_path, "fused_loss_triton"),
        (triton_path, "logprob_stats_triton"),
        (triton_path, "logprob_grads_triton"),
    ]
    for module, name in targets:
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, effective()))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fp32_matmul", [None, "tf32", "ieee"])
def test_every_gemm_launcher_runs_under_the_requested_precision(monkeypatch, backend, fp32_matmul):
    MATMUL.allow_tf32 = False  # the caller asked for exact fp32 (legacy API); the op's option wins
    wanted = fp32_matmul or "tf32"  # the default
    chosen = {} if fp32_matmul is None else {"fp32_matmul": fp32_matmul}
    seen = spy_paths(monkeypatch)
    device = "cpu" if backend == "torch" else KERNEL_DEVICE
    inputs = problem(device=device)
    loss, _ = ops.fused_policy_loss(**inputs, backend=backend, **chosen)
    loss.backward()
    logprobs, entropy = ops.token_logprobs(
        inputs["hidden"], inputs["weight"], inputs["target"], return_entropy=True, backend=backend, **chosen
    )
    (logprobs.sum() + entropy.sum()).backward()
    launchers = ("fused_loss", "logprob_stats", "logprob_grads")
    assert [name for name, _ in seen] == [f"{launcher}_{backend}" for launcher in launchers]
    assert all(precision == wanted for _, precision in seen), seen
    assert MATMUL.allow_tf32 is False and _read(lambda: MATMUL.allow_tf32) is False


def test_sixteen_bit_inputs_keep_the_callers_setting(monkeypatch):
    MATMUL.allow_tf32 = True
    seen = spy_paths(monkeypatch)
    loss, _ = ops.fused_policy_loss(**problem(torch.bfloat16, "cpu"), backend="torch", fp32_matmul="ieee")
    loss.backward()
    assert seen == [("fused_loss_torch", "tf32")]


def test_bad_fp32_matmul_is_refused_everywhere():
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = problem(device="cpu")
    for backend in ("torch", "reference"):
        with pytest.raises(ValueError, match="fp32_matmul must be one of"):
            ops.fused_policy_loss(**inputs, backend=backend, fp32_matmul="fast")
        with pytest.raises(ValueError, match="fp32_matmul must be one of"):
            ops.token_logprobs(inputs["hidden"], inputs["weight"], inputs["target"], fp32_matmul="TF32")
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match="fp32_matmul"):
        torch.ops.duca.fused_policy_loss(
            inputs["hidden"], inputs["weight"], inputs["target"], inputs["advantages"], fp32_matmul="fast"
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tf32 exists on CUDA only")
def test_tf32_stays_close_to_exact_fp32_on_cuda():
    gen = torch.Generator().manual_seed(1)
    tokens, hidden_dim, vocab = 512, 1024, 8192
    hidden = torch.randn(tokens, hidden_dim, generator=gen).cuda()
    weight = (torch.randn(vocab, hidden_dim, generator=gen) / hidden_dim**0.5).cuda()
    target = torch.randint(0, vocab, (tokens,), generator=gen).cuda()
    results = {}
    for fp32_matmul in ("ieee", "tf32"):
        results[fp32_matmul] = ops.token_logprobs(hidden, weight, target, fp32_matmul=fp32_matmul)
    reference = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, target[:, None])[:, 0]
    exact_err = (results["ieee"].double() - reference).abs().max().item()
    tf32_err = (results["tf32"].double() - reference).abs().max().item()
    assert exact_err < 1e-4
    # tf32 rounds both operands to a 10-bit mantissa: ~1e-3 relative per product, ~1e-2 at this width.
    assert tf32_err < 5e-2
    assert tf32_err > exact_err  # tf32 was really in force (the switch reached cuBLAS)
