"""Shape, dtype, device and option checks of the loss entry points, shared by real and fake kernels."""

from __future__ import annotations

import math

import torch

from duca_fast.ops._checks import ValueChecks, check_same_device, check_tensor, select_backend
from duca_fast.ops.policy_loss.head import check_vector, prepare_token_inputs
from duca_fast.ops.policy_loss.options import PolicyLossOptions, TokenInputs
from duca_fast.ops.policy_loss.torch_path import default_chunk_size


def check_projection(hidden, weight, bias) -> None:
    check_tensor("hidden", hidden, ndims=(2,), kind="float")
    check_tensor("weight", weight, ndims=(2,), kind="float")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden width {hidden.shape[1]} != weight width {weight.shape[1]} "
            f"(weight must be the lm_head [V, H], got {tuple(weight.shape)})"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (0 rows)")
    if bias is not None:
        check_tensor("bias", bias, ndims=(1,), kind="float")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} rows")


def check_loss_rows(
    rows_input: tuple[str, torch.Tensor],
    target,
    advantages,
    old_logprobs,
    mask,
    seq_ids,
    ref_logprobs,
    behavior_logprobs,
    options: PolicyLossOptions | None = None,
) -> None:
    """Metadata checks of the per-token arguments (and of the inputs the options need)."""
    name, values = rows_input
    check_tensor("target", target, ndims=(1,), kind="int")
    num_tokens = target.shape[0]
    if values.shape[0] != num_tokens:
        raise ValueError(f"{name} has {values.shape[0]} rows but target has {num_tokens} tokens")
    check_vector("advantages", advantages, num_tokens, "float")
    for vector_name, vector in (
        ("old_logprobs", old_logprobs),
        ("ref_logprobs", ref_logprobs),
        ("behavior_logprobs", behavior_logprobs),
    ):
        check_vector(vector_name, vector, num_tokens, "float")
    check_vector("seq_ids", seq_ids, num_tokens, "int")
    if mask is not None:
        check_tensor("mask", mask, ndims=(1,), kind="any")
        if mask.shape[0] != num_tokens:
            raise ValueError(f"mask has {mask.shape[0]} entries but target has {num_tokens} tokens")
    if options is not None:
        if options.kl_coef != 0 and ref_logprobs is None:
            raise ValueError("kl_coef != 0 needs ref_logprobs")
        if options.tis_cap is not None and behavior_logprobs is None:
            raise ValueError("tis_cap needs behavior_logprobs (the engine's sampler log-probs)")
        if options.loss_agg.startswith("seq_") and seq_ids is None:
            raise ValueError(f"loss_agg={options.loss_agg!r} needs seq_ids (the sequence of each token)")
        if options.off_policy_mask is not None and seq_ids is None:
            raise ValueError("off_policy_mask needs seq_ids (the sequence of each token)")


def check_loss_shapes(
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
    options: PolicyLossOptions | None = None,
) -> None:
    """The metadata checks of the hidden-state loss, without the ones that read values."""
    check_projection(hidden, weight, bias)
    check_loss_rows(
        ("hidden", hidden),
        target,
        advantages,
        old_logprobs,
        mask,
        seq_ids,
        ref_logprobs,
        behavior_logprobs,
        options,
    )
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


def check_logprob_args(hidden, weight, target, bias, temperature) -> None:
    check_projection(hidden, weight, bias)
    check_tensor("target", target, ndims=(1,), kind="int")
    if hidden.shape[0] != target.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but target has {target.shape[0]} tokens")
    if (
        not (
            isinstance(temperature, (int, float))
            and not isinstance(temperature, bool)
            and math.isfinite(temperature)
        )
        or not temperature > 0
    ):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    check_same_device({"hidden": hidden, "weight": weight, "target": target, "bias": bias})


def check_finite(
    name: str, values: torch.Tensor, *, allow_neg_inf: bool = False, rows: torch.Tensor | None = None
) -> None:
    """Raise ``ValueError`` naming ``name`` on NaN or inf (``-inf`` allowed for logits and bias).

    One min/max reduction over the tensor and one host read; the mask that locates the first bad
    entry is only built when there is one. ``rows`` (bool, one per row) limits the check to loss rows.
    """
    if values.numel() == 0:
        return
    checked = values if rows is None or bool(rows.all()) else values[rows.bool()]
    if checked.numel() == 0:
        return
    flat = checked.reshape(-1)
    smallest, largest = torch.aminmax(flat)
    low_ok = (smallest == smallest) if allow_neg_inf else torch.isfinite(smallest)
    if allow_neg_inf and checked.dim() == 2:
        # A row of -inf only has no distribution: its log-sum-exp would be -inf.
        low_ok = low_ok & (checked.amax(dim=1) > float("-inf")).all()

    def locate() -> torch.Tensor:
        bad = torch.isnan(flat) | (flat == float("inf"))
        if not allow_neg_inf:
            return bad | torch.isinf(flat)
        if checked.dim() == 2:
            empty_rows = (checked.amax(dim=1) == float("-inf"))[:, None].expand_as(checked)
            return bad | empty_rows.reshape(-1)
        return bad

    def describe(index: int) -> str:
        value = float(flat[index])
        where = (
            f"{name}[{index // checked.shape[1]}, {index % checked.shape[1]}]"
            if checked.dim() == 2
            else (f"{name}[{index}]")
        )
        if value == float("-inf"):
            return f"{where}: every entry of this row is -inf (no token has any probability)"
        hint = " (rows with mask False are skipped)" if rows is not None else ""
        return f"{where} = {value} is not finite{hint}; pass validate=False to skip this check"

    checks = ValueChecks()
    checks.forbid_flagged(~(low_ok & (largest < float("inf"))), locate, describe)
    checks.raise_if_failed()


def choose_backend(backend: str, tensor: torch.Tensor) -> str:
    chosen = select_backend(backend, tensor.device)
    # The kernels take 16/32-bit floats; float64 on CUDA (tests, debugging) goes through torch.
    if backend == "auto" and chosen == "triton" and tensor.dtype == torch.float64:
        return "torch"
    return chosen


def check_chunk_size(chunk_size: int | None, num_tokens: int, vocab_size: int) -> int:
    if chunk_size is None:
        return default_chunk_size(num_tokens, vocab_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size


LOGITS_DTYPES = ("float32", "bfloat16", "float16")


def check_logits_dtype(logits_dtype: str, hidden: torch.Tensor) -> bool:
    """Whether the lm_head GEMM writes its logits in the input dtype (``True``) or in fp32 (``False``)."""
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {logits_dtype!r}")
    if logits_dtype == "float32":
        return False
    if str(hidden.dtype).removeprefix("torch.") != logits_dtype:
        raise ValueError(
            f"logits_dtype={logits_dtype!r} needs {logits_dtype} hidden (the GEMM writes the logits in the "
            f"input dtype), got {hidden.dtype}; use logits_dtype='float32'"
        )
    return True


def prepare_loss_call(
    rows_input: tuple[str, torch.Tensor],
    vocab_size: int,
    projection: dict[str, torch.Tensor | None],
    target: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    *,
    mask: torch.Tensor | None,
    seq_ids: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    behavior_logprobs: torch.Tensor | None,
    options: PolicyLossOptions,
    token_weights: torch.Tensor | None = None,
) -> TokenInputs:
    """Checks shared by every loss entry point, then the per-token inputs (aggregation weights)."""
    name, values = rows_input
    check_loss_rows(
        rows_input, target, advantages, old_logprobs, mask, seq_ids, ref_logprobs, behavior_logprobs, options
    )
    check_same_device(
        {
            name: values,
            **projection,
            "target": target,
            "advantages": advantages,
            "old_logprobs": old_logprobs,
            "mask": mask,
            "seq_ids": seq_ids,
            "ref_logprobs": ref_logprobs,
            "behavior_logprobs": behavior_logprobs,
            "token_weights": token_weights,
        }
    )
    return prepare_token_inputs(
        target,
        advantages,
        old_logprobs,
        vocab_size=vocab_size,
        mask=mask,
        seq_ids=seq_ids,
        ref_logprobs=ref_logprobs,
        behavior_logprobs=behavior_logprobs,
        options=options,
        compute_dtype=torch.float64 if values.dtype == torch.float64 else torch.float32,
        token_weights=token_weights,
    )
