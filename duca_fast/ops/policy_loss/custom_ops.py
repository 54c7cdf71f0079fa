"""The policy-loss custom operators ``torch.ops.duca.*``: the only autograd path of the loss ops.

- ``duca::fused_policy_loss``: ``(loss, metrics, grad_hidden, grad_weight, grad_bias)``; the parameter
  gradients are computed in the forward (that saves a second pass over the vocabulary), backward scales
  them by the incoming gradient. A gradient not asked for (``needs_*_grad=False``) is an empty ``[0]``.
- ``duca::token_logprobs``: ``(logprobs, entropy, lse)``; backward ``duca::token_logprobs_backward``.
- ``duca::policy_loss_from_logits``: ``(loss, metrics, lse, entropy, grad_logprobs, grad_entropy)``;
  backward ``duca::logits_grad`` writes d loss / d logits in one pass.
- ``duca::policy_loss_from_logprobs``: ``(loss, metrics, grad_logprobs, grad_entropy)``.

``metrics`` is float32 ``[len(METRIC_KEYS)]``, 0 where a metric does not apply. Real and fake kernels
run the same shape / dtype / option checks (``checks.py``); value checks (ranges, NaN) need the data
and run in the real kernel only.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from duca_fast.ops._checks import ValueChecks, check_same_device, check_tensor
from duca_fast.ops._custom_op import custom_op, custom_op_with_options, register_fake_with_options
from duca_fast.ops.policy_loss.checks import (
    check_chunk_size,
    check_finite,
    check_logits_dtype,
    check_logprob_args,
    check_loss_rows,
    check_loss_shapes,
    choose_backend,
    prepare_loss_call,
)
from duca_fast.ops.policy_loss.head import check_vector, compact, policy_head, sequence_chunks
from duca_fast.ops.policy_loss.options import METRIC_KEYS, NEG_LOGIT_FLOOR, PolicyLossOptions
from duca_fast.ops.policy_loss.precision import check_fp32_matmul, fp32_matmul_precision
from duca_fast.ops.policy_loss.torch_path import (
    fused_loss_torch,
    logits_grad_torch,
    logits_stats_torch,
    logprob_grads_torch,
    logprob_stats_torch,
)

logger = logging.getLogger(__name__)


def compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def kernel_backend(backend: str, tensor: Tensor) -> str:
    chosen = choose_backend(backend, tensor)
    if chosen == "reference":
        raise ValueError(
            "backend='reference' differentiates with autograd and is not offered by torch.ops.duca; "
            "use duca_fast.ops directly"
        )
    return chosen


def needs_input_grad(ctx, count: int) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` over ``count`` inputs: the dispatcher drops trailing defaulted arguments."""
    needs = tuple(ctx.needs_input_grad)
    return needs + (False,) * (count - len(needs))


def metrics_tensor(metrics: dict[str, Tensor], device: torch.device) -> Tensor:
    # Absent metrics are 0, not NaN: NaN would defeat output comparisons (opcheck, compile checks).
    absent = torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([metrics.get(key, absent).float() for key in METRIC_KEYS])


def metrics_dict(metrics: Tensor, present: dict[str, bool]) -> dict[str, Tensor]:
    return {key: metrics[i] for i, key in enumerate(METRIC_KEYS) if present.get(key, True)}


_DEFAULT_OPTIONS = PolicyLossOptions()


def fused_loss_rows(hidden, weight, bias, inputs, options, needs, chunk_size, input_dtype_logits, backend):
    """The fused loss over the loss rows (after compaction): the one driver over the backends' chunk
    loops. Returns ``(head, grads)`` with the parameter gradients unscaled."""
    if kernel_backend(backend, hidden) == "triton":
        from duca_fast.ops.policy_loss.triton_path import chunk_rows_for, fused_loss_triton

        run = functools.partial(fused_loss_triton, hidden, weight, bias, inputs, options)
        size = chunk_size
        per_chunk = chunk_rows_for(hidden, weight.shape[0], chunk_size, input_dtype_logits)
    else:
        run = functools.partial(fused_loss_torch, hidden, weight, bias, inputs, options)
        size = per_chunk = check_chunk_size(chunk_size, hidden.shape[0], weight.shape[0])
    chunks, precomputed = _sequence_plan(
        options, inputs, per_chunk, any(needs), run, size, input_dtype_logits
    )
    head, _, _, grads = run(needs, size, input_dtype_logits, chunks, precomputed)
    return head, grads


def _sequence_plan(options, inputs, rows_per_chunk, want_grads, run, size, input_dtype_logits):
    """``(chunks, precomputed)`` for the fused loop: a token-level objective takes the fixed chunks; a
    sequence-level one (or off_policy_mask) takes chunks that end on sequence boundaries (still 6 N H V
    FLOPs), or, when a sequence is longer than a chunk or not contiguous, the whole batch's head from a
    first forward pass (8 N H V FLOPs: the logits are computed twice); so does top_entropy_quantile
    (a quantile over every loss token)."""
    if not want_grads or not (options.needs_whole_batch or options.needs_whole_sequences):
        return None, None
    if not options.needs_whole_batch:
        chunks = sequence_chunks(inputs.seq_ids, rows_per_chunk)
        if chunks is not None:
            return chunks, None
        logger.info(
            "objective %r: a sequence is longer than a chunk of %d rows (or not contiguous); two passes",
            options.resolved_objective().name,
            rows_per_chunk,
        )
    head, _, _, _ = run((False, False, False), size, input_dtype_logits)
    return None, head


# ---------------------------------------------------------------------------------------------------
# duca::fused_policy_loss


@custom_op_with_options("duca::fused_policy_loss", PolicyLossOptions)
def _fused_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    seq_ids: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    behavior_logprobs: Tensor | None = None,
    options: PolicyLossOptions = _DEFAULT_OPTIONS,
    chunk_size: int | None = None,
    logits_dtype: str = "float32",
    fp32_matmul: str = "tf32",
    backend: str = "auto",
    needs_hidden_grad: bool = True,
    needs_weight_grad: bool = True,
    needs_bias_grad: bool = True,
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss, metrics and the (unscaled) gradients of hidden, weight and bias in the compute dtype."""
    check_loss_shapes(
        hidden, weight, target, advantages, old_logprobs, bias, mask, seq_ids, ref_logprobs, behavior_logprobs
    )
    input_dtype_logits = check_logits_dtype(logits_dtype, hidden)
    check_fp32_matmul(fp32_matmul)
    compute = compute_dtype(hidden)
    inputs = prepare_loss_call(
        ("hidden", hidden),
        weight.shape[0],
        {"weight": weight, "bias": bias},
        target,
        advantages,
        old_logprobs,
        mask=mask,
        seq_ids=seq_ids,
        ref_logprobs=ref_logprobs,
        behavior_logprobs=behavior_logprobs,
        options=options,
    )
    # Loss tokens first: masked rows never enter the lm_head GEMMs.
    rows, inputs = compact(inputs)
    hidden_loss = hidden if rows is None else hidden[rows]
    if validate:
        check_finite("hidden", hidden_loss)
        check_finite("weight", weight)
        if bias is not None:
            check_finite("bias", bias, allow_neg_inf=True)
    if bias is not None:
        bias = bias.clamp(min=NEG_LOGIT_FLOOR)
    check_chunk_size(chunk_size, hidden_loss.shape[0], weight.shape[0])
    needs = (needs_hidden_grad, needs_weight_grad, needs_bias_grad and bias is not None)
    with fp32_matmul_precision(fp32_matmul, hidden.dtype):
        head, grads = fused_loss_rows(
            hidden_loss, weight, bias, inputs, options, needs, chunk_size, input_dtype_logits, backend
        )
    grad_hidden = grads["hidden"]
    if grad_hidden is not None and rows is not None:
        grad_hidden = hidden.new_zeros(hidden.shape, dtype=grad_hidden.dtype).index_copy_(
            0, rows, grad_hidden
        )
    grads["hidden"] = grad_hidden
    return (
        head.loss.to(compute),
        metrics_tensor(head.metrics, hidden.device),
        *(
            hidden.new_empty(0, dtype=compute) if grads[name] is None else grads[name].to(compute)
            for name in ("hidden", "weight", "bias")
        ),
    )


@register_fake_with_options(_fused_policy_loss)
def _fused_policy_loss_fake(
    hidden,
    weight,
    target,
    advantages,
    old_logprobs=None,
    bias=None,
    mask=None,
    seq_ids=None,
    ref_logprobs=None,
    behavior_logprobs=None,
    options=_DEFAULT_OPTIONS,
    chunk_size=None,
    logits_dtype="float32",
    fp32_matmul="tf32",
    backend="auto",
    needs_hidden_grad=True,
    needs_weight_grad=True,
    needs_bias_grad=True,
    validate=True,
):
    check_loss_shapes(
        hidden,
        weight,
        target,
        advantages,
        old_logprobs,
        bias,
        mask,
        seq_ids,
        ref_logprobs,
        behavior_logprobs,
        options=options,
    )
    check_chunk_size(chunk_size, hidden.shape[0], weight.shape[0])
    check_logits_dtype(logits_dtype, hidden)
    check_fp32_matmul(fp32_matmul)
    compute = compute_dtype(hidden)

    def grad_like(tensor, needed):
        return tensor.new_empty(tensor.shape if needed else (0,), dtype=compute)

    return (
        hidden.new_empty((), dtype=compute),
        hidden.new_empty(len(METRIC_KEYS), dtype=torch.float32),
        grad_like(hidden, needs_hidden_grad),
        grad_like(weight, needs_weight_grad),
        grad_like(hidden, False) if bias is None else grad_like(bias, needs_bias_grad),
    )


# Positions of the differentiable inputs in the (generated) schema.
_LOSS_GRAD_INPUTS = {
    name: _fused_policy_loss.options_signature.names.index(name) for name in ("hidden", "weight", "bias")
}


def _fused_setup_context(ctx, inputs, output) -> None:
    _, metrics, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(metrics, grad_hidden, grad_weight, grad_bias)
    # Without this autograd hands backward a zero tensor per output it got no gradient for: a
    # full-size [V, H] (and [N, H]) zero buffer at every backward (measured: +113 MiB at V=49152, H=576).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.input_meta = [
        None if inputs[position] is None else (inputs[position].shape, inputs[position].dtype)
        for position in _LOSS_GRAD_INPUTS.values()
    ]


def _fused_backward(ctx, grad_loss, *unused_grads):
    needs = needs_input_grad(ctx, max(_LOSS_GRAD_INPUTS.values()) + 1)
    grads = [None] * len(ctx.needs_input_grad)
    if grad_loss is None:
        # Not materialized (see setup): the loss got no gradient, so no input gets one from it.
        return tuple(grads)
    for (name, position), saved, meta in zip(_LOSS_GRAD_INPUTS.items(), ctx.saved_tensors, ctx.input_meta):
        if not needs[position]:
            continue
        shape, dtype = meta
        if saved.shape != shape:
            # A [0] stand-in instead of the gradient: the forward was told not to compute it.
            raise RuntimeError(
                f"duca::fused_policy_loss was called with needs_{name}_grad=False but {name} needs a "
                "gradient; pass needs_*_grad from requires_grad (ops.fused_policy_loss does)"
            )
        # Scale and cast in one pass, straight into the input dtype: no full-size fp32 temporary.
        grads[position] = torch.mul(saved, grad_loss.to(saved.dtype), out=saved.new_empty(shape, dtype=dtype))
    return tuple(grads)


_fused_policy_loss.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ---------------------------------------------------------------------------------------------------
# duca::token_logprobs and its backward


@custom_op("duca::token_logprobs")
def _token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    logits_dtype: str = "float32",
    fp32_matmul: str = "tf32",
    backend: str = "auto",
    validate: bool = True,
    with_sum_p2: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logprobs, entropy, lse, sum_p2)`` per token; ``lse`` (the tempered log-sum-exp) is kept for
    backward; ``sum_p2`` (sum of squared probabilities, no gradient) is ``[0]`` unless ``with_sum_p2``."""
    check_logprob_args(hidden, weight, target, bias, temperature)
    input_dtype_logits = check_logits_dtype(logits_dtype, hidden)
    check_fp32_matmul(fp32_matmul)
    vocab = weight.shape[0]
    checks = ValueChecks()
    checks.forbid(
        (target < 0) | (target >= vocab),
        lambda i: f"target[{i}] = {int(target[i])} is outside [0, {vocab}) (vocabulary of weight)",
    )
    checks.raise_if_failed()
    if validate:
        check_finite("hidden", hidden)
        check_finite("weight", weight)
        if bias is not None:
            check_finite("bias", bias, allow_neg_inf=True)
    if bias is not None:
        bias = bias.clamp(min=NEG_LOGIT_FLOOR)
    chunk = check_chunk_size(chunk_size, hidden.shape[0], vocab)
    with fp32_matmul_precision(fp32_matmul, hidden.dtype):
        if kernel_backend(backend, hidden) == "triton":
            from duca_fast.ops.policy_loss.triton_path import logprob_stats_triton

            lse, logprobs, entropy, sum_p2 = logprob_stats_triton(
                hidden, weight, bias, target.long(), temperature, chunk_size, input_dtype_logits, with_sum_p2
            )
        else:
            lse, logprobs, entropy, sum_p2 = logprob_stats_torch(
                hidden, weight, bias, target.long(), temperature, chunk, input_dtype_logits, with_sum_p2
            )
    return logprobs, entropy, lse, lse.new_empty(0) if sum_p2 is None else sum_p2


@_token_logprobs.register_fake
def _token_logprobs_fake(
    hidden,
    weight,
    target,
    bias=None,
    temperature=1.0,
    chunk_size=None,
    logits_dtype="float32",
    fp32_matmul="tf32",
    backend="auto",
    validate=True,
    with_sum_p2=False,
):
    check_logprob_args(hidden, weight, target, bias, temperature)
    check_logits_dtype(logits_dtype, hidden)
    check_fp32_matmul(fp32_matmul)
    check_chunk_size(chunk_size, hidden.shape[0], weight.shape[0])
    # float32 statistics (float64 for float64 inputs, which always take the torch path).
    rows = hidden.shape[0]
    stats = tuple(hidden.new_empty(rows, dtype=compute_dtype(hidden)) for _ in range(3))
    return (*stats, hidden.new_empty(rows if with_sum_p2 else 0, dtype=compute_dtype(hidden)))


@custom_op("duca::token_logprobs_backward")
def _token_logprobs_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logprobs: Tensor,
    grad_entropy: Tensor | None,
    temperature: float,
    chunk_size: int | None,
    logits_dtype: str,
    fp32_matmul: str,
    backend: str,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden, weight, bias (input dtypes; empty ``[0]`` when not needed)."""
    chunk = check_chunk_size(chunk_size, hidden.shape[0], weight.shape[0])
    input_dtype_logits = check_logits_dtype(logits_dtype, hidden)
    needs = (needs_hidden_grad, needs_weight_grad, needs_bias_grad and bias is not None)
    clamped_bias = None if bias is None else bias.clamp(min=NEG_LOGIT_FLOOR)
    stats = (lse, entropy, grad_logprobs, grad_entropy)
    args = (hidden, weight, clamped_bias, target.long(), *stats, temperature, needs)
    with fp32_matmul_precision(fp32_matmul, hidden.dtype):
        if kernel_backend(backend, hidden) == "triton":
            from duca_fast.ops.policy_loss.triton_path import logprob_grads_triton

            grads = logprob_grads_triton(*args, chunk_size, input_dtype_logits)
        else:
            grads = logprob_grads_torch(*args, chunk, input_dtype_logits)
    return tuple(
        hidden.new_empty(0) if grads[name] is None else grads[name].to(tensor.dtype)
        for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias))
    )


@_token_logprobs_backward.register_fake
def _token_logprobs_backward_fake(
    hidden,
    weight,
    bias,
    target,
    lse,
    entropy,
    grad_logprobs,
    grad_entropy,
    temperature,
    chunk_size,
    logits_dtype,
    fp32_matmul,
    backend,
    needs_hidden_grad,
    needs_weight_grad,
    needs_bias_grad,
):
    check_logits_dtype(logits_dtype, hidden)
    check_fp32_matmul(fp32_matmul)
    return (
        torch.empty_like(hidden) if needs_hidden_grad else hidden.new_empty(0),
        torch.empty_like(weight) if needs_weight_grad else hidden.new_empty(0),
        torch.empty_like(bias) if bias is not None and needs_bias_grad else hidden.new_empty(0),
    )


def _logprobs_setup_context(ctx, inputs, output) -> None:
    hidden, weight, target, bias, temperature, chunk_size, logits_dtype, fp32_matmul, backend, *_ = inputs
    _, entropy, lse, sum_p2 = output
    ctx.mark_non_differentiable(lse, sum_p2)
    ctx.save_for_backward(hidden, weight, bias, target, lse, entropy)
    ctx.config = (temperature, chunk_size, logits_dtype, fp32_matmul, backend)
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, grad_logprobs, grad_entropy, _grad_lse, _grad_sum_p2):
    hidden, weight, bias, target, lse, entropy = ctx.saved_tensors
    temperature, chunk_size, logits_dtype, fp32_matmul, backend = ctx.config
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    needs = needs_input_grad(ctx, 4)
    grads = torch.ops.duca.token_logprobs_backward(
        hidden,
        weight,
        bias,
        target,
        lse,
        entropy,
        grad_logprobs,
        grad_entropy,
        temperature,
        chunk_size,
        logits_dtype,
        fp32_matmul,
        backend,
        needs[0],
        needs[1],
        needs[3],
    )
    by_input = (
        grads[0] if needs[0] else None,
        grads[1] if needs[1] else None,
        None,
        grads[2] if needs[3] else None,
    )
    return by_input[: len(ctx.needs_input_grad)] + (None,) * (len(ctx.needs_input_grad) - len(by_input))


_token_logprobs.register_autograd(_logprobs_backward, setup_context=_logprobs_setup_context)


# ---------------------------------------------------------------------------------------------------
# duca::policy_loss_from_logits and duca::logits_grad


@custom_op_with_options("duca::policy_loss_from_logits", PolicyLossOptions)
def _policy_loss_from_logits(
    logits: Tensor,
    target: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    seq_ids: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    behavior_logprobs: Tensor | None = None,
    options: PolicyLossOptions = _DEFAULT_OPTIONS,
    chunk_size: int | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metrics, lse, entropy, grad_logprobs, grad_entropy)``; the last four feed backward."""
    check_tensor("logits", logits, ndims=(2,), kind="float")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary (0 columns)")
    inputs = prepare_loss_call(
        ("logits", logits),
        logits.shape[1],
        {},
        target,
        advantages,
        old_logprobs,
        mask=mask,
        seq_ids=seq_ids,
        ref_logprobs=ref_logprobs,
        behavior_logprobs=behavior_logprobs,
        options=options,
    )
    if validate:
        check_finite("logits", logits, allow_neg_inf=True, rows=inputs.active)
    chunk = check_chunk_size(chunk_size, logits.shape[0], logits.shape[1])
    if kernel_backend(backend, logits) == "triton":
        from duca_fast.ops.policy_loss.triton_path import logits_stats_triton

        lse, logprobs, entropy = logits_stats_triton(logits, inputs.target, options.temperature)
    else:
        lse, logprobs, entropy = logits_stats_torch(logits, inputs.target, options.temperature, chunk)
    head = policy_head(logprobs, entropy, inputs, options)
    grad_entropy = head.grad_entropy if head.grad_entropy is not None else lse.new_empty(0)
    compute = compute_dtype(logits)
    return (
        head.loss.to(compute),
        metrics_tensor(head.metrics, logits.device),
        lse,
        entropy,
        head.grad_logprobs.to(lse.dtype),
        grad_entropy.to(lse.dtype),
    )


@register_fake_with_options(_policy_loss_from_logits)
def _policy_loss_from_logits_fake(
    logits,
    target,
    advantages,
    old_logprobs=None,
    mask=None,
    seq_ids=None,
    ref_logprobs=None,
    behavior_logprobs=None,
    options=_DEFAULT_OPTIONS,
    chunk_size=None,
    backend="auto",
    validate=True,
):
    check_tensor("logits", logits, ndims=(2,), kind="float")
    check_loss_rows(
        ("logits", logits),
        target,
        advantages,
        old_logprobs,
        mask,
        seq_ids,
        ref_logprobs,
        behavior_logprobs,
        options,
    )
    check_chunk_size(chunk_size, logits.shape[0], logits.shape[1])
    compute = compute_dtype(logits)
    rows = logits.shape[0]
    return (
        logits.new_empty((), dtype=compute),
        logits.new_empty(len(METRIC_KEYS), dtype=torch.float32),
        *(logits.new_empty(rows, dtype=compute) for _ in range(3)),
        logits.new_empty(rows if options.entropy_coef != 0 else 0, dtype=compute),
    )


@custom_op("duca::logits_grad")
def _logits_grad(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logprobs: Tensor,
    grad_entropy: Tensor | None,
    temperature: float,
    chunk_size: int | None,
    backend: str,
) -> Tensor:
    """d loss / d logits (dtype of logits) from the row statistics and d loss / d (logp, entropy)."""
    chunk = check_chunk_size(chunk_size, logits.shape[0], logits.shape[1])
    target = target.long().clamp(0, logits.shape[1] - 1)
    if kernel_backend(backend, logits) == "triton":
        from duca_fast.ops.policy_loss.triton_path import logits_grad_triton

        return logits_grad_triton(logits, target, lse, entropy, grad_logprobs, grad_entropy, temperature)
    return logits_grad_torch(logits, target, lse, entropy, grad_logprobs, grad_entropy, temperature, chunk)


@_logits_grad.register_fake
def _logits_grad_fake(logits, *args, **kwargs):
    return torch.empty_like(logits)


def _from_logits_setup_context(ctx, inputs, output) -> None:
    _, metrics, lse, entropy, grad_logprobs, grad_entropy = output
    ctx.mark_non_differentiable(metrics, lse, entropy, grad_logprobs, grad_entropy)
    named = _policy_loss_from_logits.options_signature.named(inputs)
    ctx.save_for_backward(named["logits"], named["target"], lse, entropy, grad_logprobs, grad_entropy)
    ctx.config = (named["temperature"], named["chunk_size"], named["backend"])


def _from_logits_backward(ctx, grad_loss, *unused_grads):
    logits, target, lse, entropy, grad_logprobs, grad_entropy = ctx.saved_tensors
    temperature, chunk_size, backend = ctx.config
    scale = grad_loss.to(lse.dtype)
    grad = torch.ops.duca.logits_grad(
        logits,
        target,
        lse,
        entropy,
        grad_logprobs * scale,
        grad_entropy * scale if grad_entropy.numel() else None,
        temperature,
        chunk_size,
        backend,
    )
    return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


_policy_loss_from_logits.register_autograd(_from_logits_backward, setup_context=_from_logits_setup_context)


# ---------------------------------------------------------------------------------------------------
# duca::policy_loss_from_logprobs


@custom_op_with_options("duca::policy_loss_from_logprobs", PolicyLossOptions, skip=("temperature",))
def _policy_loss_from_logprobs(
    logprobs: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    mask: Tensor | None = None,
    seq_ids: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    behavior_logprobs: Tensor | None = None,
    options: PolicyLossOptions = _DEFAULT_OPTIONS,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metrics, grad_logprobs, grad_entropy)``: the policy head on given log-probs.

    ``token_weights`` (``[N]``, no gradient) multiplies each token's loss before the aggregation.
    """
    check_logprob_inputs(logprobs, entropy, options)
    check_same_device({"logprobs": logprobs, "entropy": entropy})
    target = torch.zeros(logprobs.shape[0], dtype=torch.long, device=logprobs.device)
    inputs = prepare_loss_call(
        ("logprobs", logprobs[:, None]),
        1,
        {},
        target,
        advantages,
        old_logprobs,
        mask=mask,
        seq_ids=seq_ids,
        ref_logprobs=ref_logprobs,
        behavior_logprobs=behavior_logprobs,
        options=options,
        token_weights=token_weights,
    )
    compute = compute_dtype(logprobs)
    checks = ValueChecks()
    for name, values in (("logprobs", logprobs), ("entropy", entropy)):
        if values is not None:
            checks.forbid(
                inputs.active & ~torch.isfinite(values),
                lambda i, name=name, values=values: f"{name}[{i}] = {float(values[i])} is not finite",
            )
    checks.raise_if_failed()
    zeros = torch.zeros((), dtype=compute, device=logprobs.device)
    values = torch.where(inputs.active, logprobs.detach().to(compute), zeros)
    entropy_values = (
        zeros.expand_as(values) if entropy is None else torch.where(inputs.active, entropy.to(compute), zeros)
    )
    head = policy_head(values, entropy_values, inputs, options)
    metrics = dict(head.metrics)
    if entropy is None:
        metrics.pop("entropy")
    grad_entropy = head.grad_entropy if head.grad_entropy is not None else values.new_empty(0)
    return head.loss.to(compute), metrics_tensor(metrics, logprobs.device), head.grad_logprobs, grad_entropy


def check_logprob_inputs(logprobs: Tensor, entropy: Tensor | None, options: PolicyLossOptions) -> None:
    check_tensor("logprobs", logprobs, ndims=(1,), kind="float")
    if entropy is not None:
        check_tensor("entropy", entropy, ndims=(1,), kind="float")
        if entropy.shape[0] != logprobs.shape[0]:
            raise ValueError(f"entropy has {entropy.shape[0]} entries but logprobs has {logprobs.shape[0]}")
    if options.entropy_coef != 0 and entropy is None:
        raise ValueError(
            "entropy_coef != 0 needs entropy (the per-token entropies) in policy_loss_from_logprobs"
        )
    if options.top_entropy_quantile < 1.0 and entropy is None:
        raise ValueError("top_entropy_quantile < 1 needs entropy (the per-token entropies)")


@register_fake_with_options(_policy_loss_from_logprobs)
def _policy_loss_from_logprobs_fake(
    logprobs,
    advantages,
    old_logprobs=None,
    entropy=None,
    mask=None,
    seq_ids=None,
    ref_logprobs=None,
    behavior_logprobs=None,
    options=_DEFAULT_OPTIONS,
    token_weights=None,
):
    check_logprob_inputs(logprobs, entropy, options)
    check_vector("token_weights", token_weights, logprobs.shape[0], "float")
    compute = compute_dtype(logprobs)
    rows = logprobs.shape[0]
    return (
        logprobs.new_empty((), dtype=compute),
        logprobs.new_empty(len(METRIC_KEYS), dtype=torch.float32),
        logprobs.new_empty(rows, dtype=compute),
        logprobs.new_empty(rows if options.entropy_coef != 0 else 0, dtype=compute),
    )


def _from_logprobs_setup_context(ctx, inputs, output) -> None:
    _, metrics, grad_logprobs, grad_entropy = output
    ctx.mark_non_differentiable(metrics, grad_logprobs, grad_entropy)
    ctx.save_for_backward(grad_logprobs, grad_entropy)
    named = _policy_loss_from_logprobs.options_signature.named(inputs)
    ctx.dtypes = (named["logprobs"].dtype, None if named["entropy"] is None else named["entropy"].dtype)


def _from_logprobs_backward(ctx, grad_loss, *unused_grads):
    grad_logprobs, grad_entropy = ctx.saved_tensors
    names = _policy_loss_from_logprobs.options_signature.names
    logprobs_at, entropy_at = names.index("logprobs"), names.index("entropy")
    needs = needs_input_grad(ctx, entropy_at + 1)
    grads = [None] * len(ctx.needs_input_grad)
    if needs[logprobs_at]:
        grads[logprobs_at] = (grad_logprobs * grad_loss.to(grad_logprobs.dtype)).to(ctx.dtypes[0])
    if needs[entropy_at]:
        if grad_entropy.numel():
            grads[entropy_at] = (grad_entropy * grad_loss.to(grad_entropy.dtype)).to(ctx.dtypes[1])
        else:
            grads[entropy_at] = torch.zeros_like(grad_logprobs, dtype=ctx.dtypes[1])
    return tuple(grads)


_policy_loss_from_logprobs.register_autograd(
    _from_logprobs_backward, setup_context=_from_logprobs_setup_context
)
