"""The ops as PyTorch custom operators: ``torch.ops.duca.*``, traceable by ``torch.compile(fullgraph=True)``.

Importing this module registers (``from duca_fast import ops`` imports it; triton is only imported
when a CUDA tensor, or ``backend="triton"``, reaches a kernel):

- ``duca::hian_advantages``: dual-horizon advantages; no gradient (advantages are constants: the
  output is marked non-differentiable, so rewards that require grad give a plain tensor).
- ``duca::fused_policy_loss``: ``(loss, metrics, grad_hidden, grad_weight, grad_bias)``. Like
  ``ops.fused_policy_loss`` it computes the parameter gradients in the forward pass (that is what
  saves the second pass over the vocabulary); backward scales them by the incoming gradient. A gradient
  that was not asked for (``needs_*_grad=False``) comes back as an empty ``[0]`` tensor.
  ``metrics`` is float32 ``[len(METRIC_KEYS)]`` in ``METRIC_KEYS`` order, 0 where the metric does not
  apply; ``fused_policy_loss_op`` returns ``(loss, dict)`` like the plain op.
- ``duca::token_logprobs``: ``(logprobs, entropy, lse)``, differentiable in hidden, weight and bias
  through ``duca::token_logprobs_backward`` (recomputes the logits chunk by chunk).

The real kernels run the same validation as the plain ops (shapes, dtypes, devices, id ranges, NaN).
The fake (meta) kernels, which ``torch.compile`` traces, can only check shapes, dtypes and options:
value checks need the data and run when the real kernel executes. Backends: CPU tensors take the
chunked torch path, CUDA tensors Triton (float64 through torch), as in the plain ops; ``backend``
overrides for tests ("reference" is not offered: it differentiates with autograd).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from duca_fast.ops._checks import ValueChecks, check_length, check_same_device, check_tensor
from duca_fast.ops.advantages import AdvantageOptions, hian_advantages, prepare_hian_problem
from duca_fast.ops.policy_loss import (
    PolicyLossOptions,
    _check_chunk_size,
    _check_projection,
    _check_vector,
    _choose_backend,
    _prepare_loss_call,
    fused_loss_torch,
    logprob_grads_torch,
    logprob_stats_torch,
)

METRIC_KEYS = (
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "approx_kl",
    "ratio_mean",
    "entropy",
    "pg_loss",
    "kl_ref",
    "tis_frac_capped",
    "dual_clip_frac",
    "behavior_logprob_gap",
)
"""Order of ``duca::fused_policy_loss``'s metrics tensor; the last four are 0 when they do not apply."""


def _custom_op(name: str):
    """``torch.library.custom_op`` with the inferred schema, but ``int`` where it would say ``SymInt``.

    The integer options (num_groups, max_tokens, chunk_size, ...) are checked with ``isinstance(int)``
    by the shared validators; as ``int`` in the schema, a symbolic size passed there is specialized
    by the tracer instead of reaching the kernels as a ``SymInt``.
    """

    def register(fn):
        schema = torch.library.infer_schema(fn, mutates_args=()).replace("SymInt", "int")
        return torch.library.custom_op(name, fn, mutates_args=(), schema=schema)

    return register


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _custom_backend(backend: str, tensor: Tensor) -> str:
    chosen = _choose_backend(backend, tensor)
    if chosen == "reference":
        raise ValueError(
            "backend='reference' differentiates with autograd and is not offered by torch.ops.duca; "
            "use duca_fast.ops directly"
        )
    return chosen


# ---------------------------------------------------------------------------------------------------
# duca::hian_advantages


@_custom_op("duca::hian_advantages")
def _hian_advantages(
    turn_rewards: Tensor,
    turn_session: Tensor,
    session_rewards: Tensor,
    session_group: Tensor,
    num_groups: int,
    turn_index: Tensor | None = None,
    token_turn: Tensor | None = None,
    turn_component_weights: Tensor | None = None,
    session_component_weights: Tensor | None = None,
    turn_weight: float = 1.0,
    session_weight: float = 1.0,
    turn_scope: str = "group",
    scale: str = "group",
    eps: float = 1e-6,
    nan_policy: str = "raise",
    num_turn_positions: int | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> Tensor:
    """``ops.hian_advantages`` with ``num_groups`` required, so that the output needs no data to size."""
    _custom_backend(backend, turn_rewards)
    return hian_advantages(
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        turn_weight=turn_weight,
        session_weight=session_weight,
        turn_scope=turn_scope,
        turn_index=turn_index,
        scale=scale,
        eps=eps,
        token_turn=token_turn,
        num_groups=num_groups,
        nan_policy=nan_policy,
        turn_component_weights=turn_component_weights,
        session_component_weights=session_component_weights,
        num_turn_positions=num_turn_positions,
        validate=validate,
        backend=backend,
    )


@_hian_advantages.register_fake
def _hian_advantages_fake(
    turn_rewards,
    turn_session,
    session_rewards,
    session_group,
    num_groups,
    turn_index=None,
    token_turn=None,
    turn_component_weights=None,
    session_component_weights=None,
    turn_weight=1.0,
    session_weight=1.0,
    turn_scope="group",
    scale="group",
    eps=1e-6,
    nan_policy="raise",
    num_turn_positions=None,
    validate=True,
    backend="auto",
):
    options = AdvantageOptions(turn_weight, session_weight, turn_scope, scale, eps, nan_policy)
    # Shape/dtype/device checks only: validate=False and a stand-in bound keep it data-independent.
    problem = prepare_hian_problem(
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        options=options,
        turn_index=turn_index,
        token_turn=token_turn,
        num_groups=num_groups,
        num_turn_positions=1 if num_turn_positions is None else num_turn_positions,
        turn_component_weights=None,
        session_component_weights=None,
        validate=False,
    )
    for name, weights, rewards in (
        ("turn_component_weights", turn_component_weights, problem.turns.rewards),
        ("session_component_weights", session_component_weights, problem.sessions.rewards),
    ):
        if weights is not None and (weights.dim() != 1 or weights.shape[0] != rewards.shape[1]):
            raise ValueError(
                f"{name} must have one weight per reward component ({rewards.shape[1]}), "
                f"got shape {tuple(weights.shape)}"
            )
    rows = turn_rewards.shape[0] if token_turn is None else token_turn.shape[0]
    return turn_rewards.new_empty(rows, dtype=problem.out_dtype)


def _hian_setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output)


def _hian_backward(ctx, grad_output):
    raise RuntimeError("duca::hian_advantages has no gradient: advantages are constants of the update")


_hian_advantages.register_autograd(_hian_backward, setup_context=_hian_setup_context)


# ---------------------------------------------------------------------------------------------------
# duca::fused_policy_loss


def _check_loss_shapes(
    hidden, weight, target, advantages, old_logprobs, bias, mask, seq_ids, ref_logprobs, behavior_logprobs
) -> None:
    """The metadata checks of ``ops.fused_policy_loss``, without the ones that read values."""
    _check_projection(hidden, weight, bias)
    check_tensor("target", target, ndims=(1,), kind="int")
    if hidden.shape[0] != target.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but target has {target.shape[0]} tokens")
    num_tokens = target.shape[0]
    _check_vector("advantages", advantages, num_tokens, "float")
    for name, values in (
        ("old_logprobs", old_logprobs),
        ("ref_logprobs", ref_logprobs),
        ("behavior_logprobs", behavior_logprobs),
    ):
        _check_vector(name, values, num_tokens, "float")
    _check_vector("seq_ids", seq_ids, num_tokens, "int")
    if mask is not None:
        check_tensor("mask", mask, ndims=(1,), kind="any")
        check_length("mask", mask, num_tokens, "target")
    check_same_device(
        {
            "hidden": hidden,
            "weight": weight,
            "target": target,
            "advantages": advantages,
            "old_logprobs": old_logprobs,
            "bias": bias,
            "mask": mask,
            "seq_ids": seq_ids,
            "ref_logprobs": ref_logprobs,
            "behavior_logprobs": behavior_logprobs,
        }
    )


@_custom_op("duca::fused_policy_loss")
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
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token_mean",
    max_tokens: int | None = None,
    tis_cap: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    needs_hidden_grad: bool = True,
    needs_weight_grad: bool = True,
    needs_bias_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss, metrics and the (unscaled) gradients of hidden, weight and bias in the compute dtype."""
    options = PolicyLossOptions(
        clip_low,
        clip_high,
        dual_clip,
        kl_coef,
        kl_type,
        entropy_coef,
        temperature,
        loss_agg,
        max_tokens,
        tis_cap,
    )
    _check_loss_shapes(
        hidden, weight, target, advantages, old_logprobs, bias, mask, seq_ids, ref_logprobs, behavior_logprobs
    )
    compute = _compute_dtype(hidden)
    inputs = _prepare_loss_call(
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
    chunk = _check_chunk_size(chunk_size, hidden.shape[0], weight.shape[0])
    needs = (needs_hidden_grad, needs_weight_grad, needs_bias_grad and bias is not None)
    if _custom_backend(backend, hidden) == "triton":
        from duca_fast.ops.policy_loss_triton import fused_loss_triton

        head, _, _, grads = fused_loss_triton(hidden, weight, bias, inputs, options, needs, chunk)
    else:
        head, _, _, grads = fused_loss_torch(hidden, weight, bias, inputs, options, needs, chunk)
    # Absent metrics are 0, not NaN: NaN would defeat output comparisons (opcheck, compile checks).
    absent = torch.zeros((), dtype=torch.float32, device=hidden.device)
    metrics = torch.stack([head.metrics.get(key, absent) for key in METRIC_KEYS])
    return (
        head.loss.to(compute),
        metrics,
        *(
            hidden.new_empty(0, dtype=compute) if grads[name] is None else grads[name].to(compute)
            for name in ("hidden", "weight", "bias")
        ),
    )


@_fused_policy_loss.register_fake
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
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    kl_coef=0.0,
    kl_type="k3",
    entropy_coef=0.0,
    temperature=1.0,
    loss_agg="token_mean",
    max_tokens=None,
    tis_cap=None,
    chunk_size=None,
    backend="auto",
    needs_hidden_grad=True,
    needs_weight_grad=True,
    needs_bias_grad=True,
):
    options = PolicyLossOptions(
        clip_low,
        clip_high,
        dual_clip,
        kl_coef,
        kl_type,
        entropy_coef,
        temperature,
        loss_agg,
        max_tokens,
        tis_cap,
    )
    _check_loss_shapes(
        hidden, weight, target, advantages, old_logprobs, bias, mask, seq_ids, ref_logprobs, behavior_logprobs
    )
    if options.kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if options.tis_cap is not None and behavior_logprobs is None:
        raise ValueError("tis_cap needs behavior_logprobs (the engine's sampler log-probs)")
    if options.loss_agg.startswith("seq_") and seq_ids is None:
        raise ValueError(f"loss_agg={options.loss_agg!r} needs seq_ids (the sequence of each token)")
    _check_chunk_size(chunk_size, hidden.shape[0], weight.shape[0])
    compute = _compute_dtype(hidden)

    def grad_like(tensor, needed):
        return tensor.new_empty(tensor.shape if needed else (0,), dtype=compute)

    return (
        hidden.new_empty((), dtype=compute),
        hidden.new_empty(len(METRIC_KEYS), dtype=torch.float32),
        grad_like(hidden, needs_hidden_grad),
        grad_like(weight, needs_weight_grad),
        grad_like(hidden, False) if bias is None else grad_like(bias, needs_bias_grad),
    )


# Positions of the differentiable inputs in the schema.
_LOSS_GRAD_INPUTS = {"hidden": 0, "weight": 1, "bias": 5}


def _fused_setup_context(ctx, inputs, output) -> None:
    _, metrics, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(metrics, grad_hidden, grad_weight, grad_bias)
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.input_meta = [
        None if inputs[position] is None else (inputs[position].shape, inputs[position].dtype)
        for position in _LOSS_GRAD_INPUTS.values()
    ]


def _needs_input_grad(ctx, count: int) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` over ``count`` inputs: the dispatcher drops trailing defaulted arguments."""
    needs = tuple(ctx.needs_input_grad)
    return needs + (False,) * (count - len(needs))


def _fused_backward(ctx, grad_loss, *unused_grads):
    needs = _needs_input_grad(ctx, max(_LOSS_GRAD_INPUTS.values()) + 1)
    grads = [None] * len(ctx.needs_input_grad)
    for (name, position), saved, meta in zip(_LOSS_GRAD_INPUTS.items(), ctx.saved_tensors, ctx.input_meta):
        if not needs[position]:
            continue
        shape, dtype = meta
        if saved.shape != shape:
            # A [0] stand-in instead of the gradient: the forward was told not to compute it.
            raise RuntimeError(
                f"duca::fused_policy_loss was called with needs_{name}_grad=False but {name} needs a "
                "gradient; pass needs_*_grad from requires_grad (fused_policy_loss_op does)"
            )
        grads[position] = (saved * grad_loss.to(saved.dtype)).to(dtype)
    return tuple(grads)


_fused_policy_loss.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def fused_policy_loss_op(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    seq_ids: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    behavior_logprobs: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token_mean",
    max_tokens: int | None = None,
    tis_cap: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """``ops.fused_policy_loss`` through ``torch.ops.duca.fused_policy_loss``: ``(loss, metrics dict)``.

    Same arguments, numbers, gradients and metric keys as the plain op; traceable by ``torch.compile``.
    Gradients are computed in the forward only for the tensors that require grad.
    """
    grad_on = torch.is_grad_enabled()
    loss, metrics, _, _, _ = torch.ops.duca.fused_policy_loss(
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
        clip_low,
        clip_high,
        dual_clip,
        kl_coef,
        kl_type,
        entropy_coef,
        temperature,
        loss_agg,
        max_tokens,
        tis_cap,
        chunk_size,
        backend,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    present = {
        "kl_ref": ref_logprobs is not None,
        "tis_frac_capped": behavior_logprobs is not None and tis_cap is not None,
        "dual_clip_frac": dual_clip is not None,
        "behavior_logprob_gap": behavior_logprobs is not None,
    }
    return loss, {key: metrics[i] for i, key in enumerate(METRIC_KEYS) if present.get(key, True)}


# ---------------------------------------------------------------------------------------------------
# duca::token_logprobs and its backward


def _check_logprob_args(hidden, weight, target, bias, temperature) -> None:
    _check_projection(hidden, weight, bias)
    check_tensor("target", target, ndims=(1,), kind="int")
    if hidden.shape[0] != target.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but target has {target.shape[0]} tokens")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    check_same_device({"hidden": hidden, "weight": weight, "target": target, "bias": bias})


@_custom_op("duca::token_logprobs")
def _token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logprobs, entropy, lse)`` per token; ``lse`` (the tempered log-sum-exp) is kept for backward."""
    _check_logprob_args(hidden, weight, target, bias, temperature)
    vocab = weight.shape[0]
    checks = ValueChecks()
    checks.forbid(
        (target < 0) | (target >= vocab),
        lambda i: f"target[{i}] = {int(target[i])} is outside [0, {vocab}) (vocabulary of weight)",
    )
    checks.raise_if_failed()
    chunk = _check_chunk_size(chunk_size, hidden.shape[0], vocab)
    if _custom_backend(backend, hidden) == "triton":
        from duca_fast.ops.policy_loss_triton import logprob_stats_triton

        lse, logprobs, entropy = logprob_stats_triton(hidden, weight, bias, target.long(), temperature)
    else:
        lse, logprobs, entropy = logprob_stats_torch(hidden, weight, bias, target.long(), temperature, chunk)
    return logprobs, entropy, lse


@_token_logprobs.register_fake
def _token_logprobs_fake(hidden, weight, target, bias=None, temperature=1.0, chunk_size=None, backend="auto"):
    _check_logprob_args(hidden, weight, target, bias, temperature)
    _check_chunk_size(chunk_size, hidden.shape[0], weight.shape[0])
    # float32 statistics (float64 for float64 inputs, which always take the torch path).
    return tuple(hidden.new_empty(hidden.shape[0], dtype=_compute_dtype(hidden)) for _ in range(3))


@_custom_op("duca::token_logprobs_backward")
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
    backend: str,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden, weight, bias (input dtypes; empty ``[0]`` when not needed)."""
    chunk = _check_chunk_size(chunk_size, hidden.shape[0], weight.shape[0])
    needs = (needs_hidden_grad, needs_weight_grad, needs_bias_grad and bias is not None)
    stats = (lse, entropy, grad_logprobs, grad_entropy)
    args = (hidden, weight, bias, target.long(), *stats, temperature, needs)
    if _custom_backend(backend, hidden) == "triton":
        from duca_fast.ops.policy_loss_triton import logprob_grads_triton

        grads = logprob_grads_triton(*args)
    else:
        grads = logprob_grads_torch(*args, chunk)
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
    backend,
    needs_hidden_grad,
    needs_weight_grad,
    needs_bias_grad,
):
    return (
        torch.empty_like(hidden) if needs_hidden_grad else hidden.new_empty(0),
        torch.empty_like(weight) if needs_weight_grad else hidden.new_empty(0),
        torch.empty_like(bias) if bias is not None and needs_bias_grad else hidden.new_empty(0),
    )


def _logprobs_setup_context(ctx, inputs, output) -> None:
    hidden, weight, target, bias, temperature, chunk_size, backend = inputs
    _, _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, bias, target, lse, output[1])
    ctx.config = (temperature, chunk_size, backend)
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, bias, target, lse, entropy = ctx.saved_tensors
    temperature, chunk_size, backend = ctx.config
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    needs = _needs_input_grad(ctx, 4)
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


def token_logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """``ops.token_logprobs`` through ``torch.ops.duca.token_logprobs`` (same arguments and results)."""
    logprobs, entropy, _ = torch.ops.duca.token_logprobs(
        hidden, weight, target, bias, temperature, chunk_size, backend
    )
    return (logprobs, entropy) if return_entropy else logprobs
