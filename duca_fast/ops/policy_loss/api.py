"""Public policy-loss functions: thin wrappers over the ``torch.ops.duca`` custom ops.

Options come as one ``PolicyLossOptions`` (``options=``) with keyword overrides of its fields on top (the
custom ops' schemas carry the fields, generated from the dataclass); ``backend="reference"`` runs
the float64 ground truth of ``reference.py`` (autograd, materialized logits: tests and debugging).
"""

from __future__ import annotations

import dataclasses

import torch

from duca_fast.ops.policy_loss import custom_ops, objectives, reference
from duca_fast.ops.policy_loss.checks import (
    check_chunk_size,
    check_logits_dtype,
    check_logprob_args,
    check_loss_shapes,
    choose_backend,
    prepare_loss_call,
)
from duca_fast.ops.policy_loss.correction import CORRECTION_METRICS, as_correction_spec
from duca_fast.ops.policy_loss.options import PolicyLossOptions
from duca_fast.ops.policy_loss.precision import check_fp32_matmul

_DEFAULTS = PolicyLossOptions()
_FIELDS = tuple(field.name for field in dataclasses.fields(PolicyLossOptions))


def resolve_options(function: str, options: PolicyLossOptions | None, overrides: dict, skip=()) -> dict:
    """The option values: ``options`` (or the defaults) with the keyword ``overrides`` on top.

    Returns the fields as a dict (the custom ops carry each field in their schema; the ops build and
    check the dataclass, once per distinct set of values). Not building it here keeps the wrapper free
    of Python-float checks that ``torch.compile(fullgraph=True)`` cannot trace. ``objective`` and
    ``correction`` may be objects: they become their spec strings.
    """
    unknown = [name for name in overrides if name not in _FIELDS or name in skip]
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    if options is not None and not isinstance(options, PolicyLossOptions):
        raise ValueError(f"options must be a PolicyLossOptions, got {type(options).__name__}")
    base = _DEFAULTS if options is None else options
    values = {name: getattr(base, name) for name in _FIELDS if name not in skip} | overrides
    values["objective"] = objectives.as_spec(values["objective"])
    values["correction"] = as_correction_spec(values["correction"])
    return values


def _present(options: dict, ref_logprobs, behavior_logprobs) -> dict[str, bool]:
    return {
        "kl_ref": ref_logprobs is not None,
        "tis_frac_capped": behavior_logprobs is not None and options["tis_cap"] is not None,
        # PPOClip's dual clip, from the options or from the objective's own spec (string test: traceable).
        "dual_clip_frac": options["dual_clip"] is not None or "dual_clip=" in options["objective"],
        "behavior_logprob_gap": behavior_logprobs is not None,
        **{key: bool(options["correction"]) for key in CORRECTION_METRICS},
        "entropy_mask_kept": options["top_entropy_quantile"] < 1.0,
        "off_policy_masked": options["off_policy_mask"] is not None,
    }


def fused_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    behavior_logprobs: torch.Tensor | None = None,
    options: PolicyLossOptions | None = None,
    chunk_size: int | None = None,
    logits_dtype: str = "float32",
    fp32_matmul: str = "tf32",
    backend: str = "auto",
    validate: bool = True,
    **overrides,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss straight from hidden states and the lm_head, never holding ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` final hidden states of the packed tokens whose next token is ``target``.
        weight: ``[V, H]`` lm_head weight (same dtype as hidden). Gradients flow to hidden, weight, bias.
        target: ``[N]`` int token ids.
        advantages: ``[N]`` per-token advantages (multi-turn needs them per token).
        old_logprobs: ``[N]`` log-probs under the policy that generated the data; None = on-policy.
        bias: optional ``[V]`` lm_head bias (``-inf`` entries mask vocabulary entries exactly).
        mask: optional ``[N]`` bool, False = no loss (targets there may be anything, e.g. -100). Masked
            tokens are dropped before the lm_head GEMMs (compaction); their hidden gradient is 0.
        seq_ids: ``[N]`` int sequence of each token (needed by the seq_* aggregations).
        ref_logprobs: ``[N]`` reference-model log-probs for the KL penalty (and the kl_ref metric).
        behavior_logprobs: ``[N]`` the engine's sampler log-probs, for truncated importance sampling.
        options: a ``PolicyLossOptions``; default: its defaults.
        **overrides: any ``PolicyLossOptions`` field by keyword (clip_low, clip_high, dual_clip, kl_coef,
            kl_type, entropy_coef, temperature, loss_agg, max_tokens, tis_cap, objective, correction,
            top_entropy_quantile, off_policy_mask), applied on top of ``options``; an unknown keyword
            is a TypeError.
        objective: the policy objective, an ``ops.objectives`` instance (``objectives.GSPO(...)``) or its
            name for the defaults ("ppo_clip", "gspo", "geo_mean", "cispo", "sapo", "gpg", "dro", "dppo");
            None: PPOClip with clip_low / clip_high / dual_clip. Sequence-level objectives (gspo, geo_mean)
            need ``seq_ids``; see docs/ops.md for each one's formula and source.
        correction: an ``ops.RolloutCorrection`` (verl's rollout_is / rollout_rs vocabulary): importance
            weights from ``old_logprobs - behavior_logprobs`` on the objective's term and/or rejection of
            tokens or sequences (they leave the loss and its normalizer); ``tis_cap`` is its shorthand.
        chunk_size: tokens per chunk on the torch path (default: chunk x V <= 2^24 elements).
        logits_dtype: "float32" (default): the lm_head GEMM writes fp32 logits; "bfloat16" / "float16"
            (must match hidden): it writes them in the input dtype, as a bf16 ``lm_head`` does, halving
            the traffic of the row passes at the cost of rounding each logit (docs/ops.md has the error).
            Ignored by backend="reference" (float64) and for float64 inputs.
        fp32_matmul: how float32 inputs multiply on CUDA: "tf32" (default: tensor cores, each product's
            operands rounded to a 10-bit mantissa, fp32 accumulation; docs/ops.md has the error) or
            "ieee" (exact fp32 FMA, several times slower). The op sets cuBLAS's switch around its own
            GEMMs and restores the caller's. No effect on CPU or for 16-bit inputs.
        backend: "auto" (CUDA -> triton, else torch), "torch", "triton" or "reference".
        validate: check that hidden, weight and bias are finite (``-inf`` allowed in bias), one
            reduction each; ``False`` skips it (NaN in, NaN out).

    Returns:
        ``(loss, metrics)``: scalar float32 loss (float64 for float64 inputs) and detached scalar
        diagnostics: clip_frac, clip_frac_low, clip_frac_high, approx_kl, ratio_mean, entropy, pg_loss,
        plus kl_ref (with ref_logprobs), tis_frac_capped (with tis_cap), dual_clip_frac (with dual_clip),
        behavior_logprob_gap (mean |logp - behavior_logprobs|, with behavior_logprobs).
    """
    options = resolve_options("fused_policy_loss", options, overrides)
    if choose_backend(backend, hidden) == "reference":
        options = PolicyLossOptions(**options)
        check_logits_dtype(logits_dtype, hidden)
        check_fp32_matmul(fp32_matmul)
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
            options,
        )
        prepare_loss_call(
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
        return reference.reference_fused_policy_loss(
            hidden,
            weight,
            target,
            advantages,
            old_logprobs,
            bias=bias,
            options=options,
            mask=mask,
            seq_ids=seq_ids,
            ref_logprobs=ref_logprobs,
            behavior_logprobs=behavior_logprobs,
        )
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
        **options,
        chunk_size=chunk_size,
        logits_dtype=logits_dtype,
        fp32_matmul=fp32_matmul,
        backend=backend,
        needs_hidden_grad=grad_on and hidden.requires_grad,
        needs_weight_grad=grad_on and weight.requires_grad,
        needs_bias_grad=grad_on and bias is not None and bias.requires_grad,
        validate=validate,
    )
    return loss, custom_ops.metrics_dict(metrics, _present(options, ref_logprobs, behavior_logprobs))


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
    return_sum_p2: bool = False,
    chunk_size: int | None = None,
    logits_dtype: str = "float32",
    fp32_matmul: str = "tf32",
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``log_softmax((h @ W.T + b) / temperature)[target]`` per token, ``[N]`` float32, differentiable.

    With ``return_entropy=True`` also the entropy of each token's tempered distribution; with
    ``return_sum_p2=True`` also ``sum_v p_v^2`` of it (detached; what verl's optimal-token-baseline
    estimators need), from the same pass (no extra GEMM). Returns ``logprobs``, or the tuple
    ``(logprobs[, entropy][, sum_p2])`` in that order. Never holds
    ``[N, V]`` logits: forward keeps the log-sum-exp, backward recomputes the logits chunk by chunk.
    ``validate``: hidden, weight and bias must be finite (``-inf`` allowed in bias). ``logits_dtype``
    and ``fp32_matmul``: as in ``fused_policy_loss``; compute old log-probs with the values the loss
    uses, or on-policy ratios are not exactly 1 (both ignored by backend="reference").
    """
    check_logprob_args(hidden, weight, target, bias, temperature)
    check_logits_dtype(logits_dtype, hidden)
    check_fp32_matmul(fp32_matmul)
    if choose_backend(backend, hidden) == "reference":
        logprobs, entropy = reference.reference_token_logprobs(hidden, weight, target, bias, temperature)
        sum_p2 = reference.reference_sum_p2(hidden, weight, bias, temperature) if return_sum_p2 else None
    else:
        logprobs, entropy, _, sum_p2 = torch.ops.duca.token_logprobs(
            hidden,
            weight,
            target,
            bias,
            float(temperature),
            chunk_size,
            logits_dtype,
            fp32_matmul,
            backend,
            validate,
            return_sum_p2,
        )
    if not (return_entropy or return_sum_p2):
        return logprobs
    return (logprobs, *((entropy,) if return_entropy else ()), *((sum_p2,) if return_sum_p2 else ()))


def policy_loss_from_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    behavior_logprobs: torch.Tensor | None = None,
    options: PolicyLossOptions | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    **overrides,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fused_policy_loss`` for stacks that already hold ``[N, V]`` logits; gradient flows to logits.

    ``options`` and ``**overrides`` (any ``PolicyLossOptions`` field) as in ``fused_policy_loss``.

    One pass over the logits forward (log-sum-exp, target, entropy) and one backward (writes the
    gradient); no ``log_softmax`` copy. ``-inf`` logits (masked vocabulary entries) are exact (0 log 0 = 0);
    ``validate`` rejects NaN / +inf in the rows with mask True, and rows that are all ``-inf``.
    """
    options = resolve_options("policy_loss_from_logits", options, overrides)
    if choose_backend(backend, logits) == "reference":
        options = PolicyLossOptions(**options)
        from duca_fast.ops._checks import check_tensor

        check_tensor("logits", logits, ndims=(2,), kind="float")
        prepare_loss_call(
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
        return reference.reference_policy_loss_from_logits(
            logits,
            target,
            advantages,
            old_logprobs,
            options=options,
            tempered=False,
            mask=mask,
            seq_ids=seq_ids,
            ref_logprobs=ref_logprobs,
            behavior_logprobs=behavior_logprobs,
        )
    check_chunk_size(chunk_size, logits.shape[0], max(logits.shape[-1], 1))
    loss, metrics, *_ = torch.ops.duca.policy_loss_from_logits(
        logits,
        target,
        advantages,
        old_logprobs,
        mask,
        seq_ids,
        ref_logprobs,
        behavior_logprobs,
        **options,
        chunk_size=chunk_size,
        backend=backend,
        validate=validate,
    )
    return loss, custom_ops.metrics_dict(metrics, _present(options, ref_logprobs, behavior_logprobs))


def policy_loss_from_logprobs(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    *,
    entropy: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    behavior_logprobs: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    options: PolicyLossOptions | None = None,
    backend: str = "auto",
    **overrides,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same policy head on log-probs a stack already has (verl, TRL, your own forward pass).

    Args:
        logprobs: ``[N]`` current-policy log-probs of the sampled tokens; the gradient flows here.
        advantages, old_logprobs, mask, seq_ids, ref_logprobs, behavior_logprobs: as in
            ``fused_policy_loss``.
        entropy: optional ``[N]`` per-token entropies: needed by ``entropy_coef != 0`` (the gradient
            flows to it) and for the ``entropy`` metric, which is left out without it.
        token_weights: optional ``[N]`` float weights (no gradient) multiplying each token's loss
            before the aggregation, e.g. rollout importance-sampling weights or a stack's own
            loss-aggregation scaling; ``pg_loss`` is weighted the same way, the other metrics are not.
        backend: "auto" / "torch" (the custom op) or "reference" (float64 autograd).
        options, **overrides: as in ``fused_policy_loss``, but no temperature (the log-probs already carry
            it: ``options.temperature`` is not used, a ``temperature=`` keyword is a TypeError).

    Returns:
        ``(loss, metrics)`` with the metric keys of ``fused_policy_loss`` (``entropy`` only when given).
    """
    options = resolve_options("policy_loss_from_logprobs", options, overrides, skip=("temperature",))
    from duca_fast.ops._checks import check_choice, check_tensor

    check_choice("backend", backend, ("auto", "torch", "reference"))
    check_tensor("logprobs", logprobs, ndims=(1,), kind="float")
    if backend == "reference":
        options = PolicyLossOptions(**options)
        custom_ops.check_logprob_inputs(logprobs, entropy, options)
        target = torch.zeros(logprobs.shape[0], dtype=torch.long, device=logprobs.device)
        prepare_loss_call(
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
        return reference.reference_policy_loss_from_logprobs(
            logprobs,
            entropy,
            advantages,
            old_logprobs,
            mask=mask,
            seq_ids=seq_ids,
            ref_logprobs=ref_logprobs,
            behavior_logprobs=behavior_logprobs,
            options=options,
            token_weights=token_weights,
        )
    loss, metrics, _, _ = torch.ops.duca.policy_loss_from_logprobs(
        logprobs,
        advantages,
        old_logprobs,
        entropy,
        mask,
        seq_ids,
        ref_logprobs,
        behavior_logprobs,
        **options,
        token_weights=token_weights,
    )
    present = _present(options, ref_logprobs, behavior_logprobs)
    present["entropy"] = entropy is not None
    return loss, custom_ops.metrics_dict(metrics, present)
