"""The advantage custom operators ``torch.ops.duca.hian_advantages`` / ``duca::grpo_advantages``.

No gradient: advantages are constants of the update (the output is marked non-differentiable, so
rewards that require grad give a plain tensor). The real kernels validate like the public functions;
the fake (meta) kernels, which ``torch.compile`` traces, check shapes, dtypes and options only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from duca_fast import native
from duca_fast.ops._checks import check_choice, check_tensor, select_backend
from duca_fast.ops._custom_op import custom_op
from duca_fast.ops.advantages.options import AdvantageOptions, HianProblem
from duca_fast.ops.advantages.prepare import prepare_hian_problem
from duca_fast.ops.advantages.torch_path import hian_advantages_torch

BACKENDS = ("auto", "torch", "triton", "native", "reference")


def compute_advantages(problem: HianProblem, options: AdvantageOptions, backend: str) -> Tensor:
    """The one dispatch point of the advantage spine over validated inputs."""
    if backend == "triton":
        from duca_fast.ops.advantages.triton_path import hian_advantages_triton

        return hian_advantages_triton(problem, options)
    if backend == "native":
        return _hian_advantages_native(problem, options)
    return hian_advantages_torch(problem, options)


def _native_rewards(rewards: Tensor) -> Tensor:
    # The C ABI reads float32/float64; half-precision rewards are widened (exact).
    return rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.float()


def _hian_advantages_native(problem: HianProblem, options: AdvantageOptions) -> Tensor:
    """The validated problem through the C library (float64 statistics on the CPU or CUDA)."""
    return native.hian_advantages(
        _native_rewards(problem.turns.rewards),
        problem.turn_session.contiguous(),
        _native_rewards(problem.sessions.rewards),
        problem.session_group.contiguous(),
        None if problem.turn_index is None else problem.turn_index.contiguous(),
        None if problem.token_turn is None else problem.token_turn.contiguous(),
        problem.turns.weights,
        problem.sessions.weights,
        options.turn_weight,
        options.session_weight,
        options.turn_scope,
        options.scale,
        options.eps,
        options.nan_policy,
        problem.num_groups,
        out_dtype=problem.out_dtype,
        num_turn_positions=problem.num_turn_positions,
    )


def _native_supports(options: AdvantageOptions) -> bool:
    """The C library implements the unbiased std without clipping (Dual-Track's options are not in it)."""
    return options.std == "unbiased" and options.clip is None


def _kernel_backend(backend: str, tensor: Tensor, options: AdvantageOptions) -> str:
    """``select_backend`` plus the native library: explicit, or ``auto`` on the CPU when it is built.

    On the CPU the native kernels are exact float64 and faster than the torch path
    (bench/results/advantages_cpu.md); on CUDA the Triton kernels stay the default.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "native" and not _native_supports(options):
        raise ValueError(
            f"backend='native' implements std='unbiased' without clip; got std={options.std!r}, "
            f"clip={options.clip!r}: use backend='auto', 'torch' or 'triton'"
        )
    if backend == "native":
        if not native.available():
            raise RuntimeError(
                f"backend='native' needs the native kernels ({native.library_path()} is missing or "
                "cannot be loaded): build them with `make native`, or use backend='auto'"
            )
        if tensor.device.type == "cuda" and not native.has_cuda():
            raise ValueError(
                "backend='native' got CUDA tensors but the native library was built without CUDA: "
                "rebuild with nvcc available (`make native`) or use backend='triton'"
            )
        if tensor.device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='native' runs on the CPU or CUDA, got tensors on {tensor.device}")
        return "native"
    if backend == "auto" and tensor.device.type == "cpu" and native.available() and _native_supports(options):
        return "native"
    chosen = select_backend(backend, tensor.device)
    if chosen == "reference":
        raise ValueError("backend='reference' is not offered by torch.ops.duca; use duca_fast.ops directly")
    return chosen


@custom_op("duca::hian_advantages")
def _hian_advantages(
    turn_rewards: Tensor,
    turn_session: Tensor,
    session_rewards: Tensor,
    session_group: Tensor,
    num_groups: int | None = None,
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
    std: str = "unbiased",
    clip: float | None = None,
    num_turn_positions: int | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> Tensor:
    """``ops.hian_advantages`` as a custom op (``num_groups=None``: inferred, one host sync)."""
    options = AdvantageOptions(turn_weight, session_weight, turn_scope, scale, eps, nan_policy, std, clip)
    chosen = _kernel_backend(backend, turn_rewards, options)
    problem = prepare_hian_problem(
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        options=options,
        turn_index=turn_index,
        token_turn=token_turn,
        num_groups=num_groups,
        num_turn_positions=num_turn_positions,
        turn_component_weights=turn_component_weights,
        session_component_weights=session_component_weights,
        validate=validate,
    )
    return compute_advantages(problem, options, chosen)


@_hian_advantages.register_fake
def _hian_advantages_fake(
    turn_rewards,
    turn_session,
    session_rewards,
    session_group,
    num_groups=None,
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
    std="unbiased",
    clip=None,
    num_turn_positions=None,
    validate=True,
    backend="auto",
):
    options = AdvantageOptions(turn_weight, session_weight, turn_scope, scale, eps, nan_policy, std, clip)
    # Shape/dtype/device checks only: validate=False and in-range stand-in bounds keep it data-free.
    problem = prepare_hian_problem(
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        options=options,
        turn_index=turn_index,
        token_turn=token_turn,
        num_groups=0,
        num_turn_positions=1,
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


@custom_op("duca::grpo_advantages")
def _grpo_advantages(
    rewards: Tensor,
    group: Tensor,
    num_groups: int | None = None,
    component_weights: Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-6,
    nan_policy: str = "raise",
    validate: bool = True,
    backend: str = "auto",
) -> Tensor:
    """One-horizon GRPO: the session horizon of HIAN with one zero-weighted dummy turn per session."""
    check_tensor("rewards", rewards, ndims=(1, 2), kind="float")
    num_sessions = rewards.shape[0]
    return _hian_advantages(
        rewards.new_zeros(num_sessions),
        torch.arange(num_sessions, device=rewards.device),
        rewards,
        group,
        num_groups,
        session_component_weights=component_weights,
        turn_weight=0.0,
        session_weight=1.0,
        scale=scale,
        eps=eps,
        nan_policy=nan_policy,
        validate=validate,
        backend=backend,
    )


@_grpo_advantages.register_fake
def _grpo_advantages_fake(
    rewards,
    group,
    num_groups=None,
    component_weights=None,
    scale="group",
    eps=1e-6,
    nan_policy="raise",
    validate=True,
    backend="auto",
):
    check_tensor("rewards", rewards, ndims=(1, 2), kind="float")
    check_tensor("group", group, ndims=(1,), kind="int")
    if group.shape[0] != rewards.shape[0]:
        raise ValueError(f"group has {group.shape[0]} rows but rewards has {rewards.shape[0]}")
    AdvantageOptions(0.0, 1.0, "group", scale, eps, nan_policy)
    return rewards.new_empty(
        rewards.shape[0], dtype=torch.float64 if rewards.dtype == torch.float64 else torch.float32
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output)


def _no_backward(ctx, grad_output):
    raise RuntimeError("the advantage ops have no gradient: advantages are constants of the update")


_hian_advantages.register_autograd(_no_backward, setup_context=_setup_context)
_grpo_advantages.register_autograd(_no_backward, setup_context=_setup_context)
