"""Compile every Triton kernel ahead of time for a CUDA target, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy code and accepts programs that the real
compiler rejects (type mismatches between branches, unsupported casts). This check runs the real
front end, the LLVM back end and ptxas for sm_90 (Hopper) so that such errors show up in CPU CI.

Usage: ``python -m tools.compile_check`` (must run without TRITON_INTERPRET).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class KernelSpec:
    """One kernel and the argument types and constexpr variants to compile it with."""

    module: str
    name: str
    arg_types: dict[str, str]
    """Triton type of each non-constexpr argument whose type is not the default ``i64``."""
    variants: dict[str, list[Any]] = field(default_factory=dict)
    """Each constexpr with the values to try; all combinations are compiled."""

    def combinations(self) -> Iterator[dict[str, Any]]:
        names = list(self.variants)
        for values in itertools.product(*(self.variants[n] for n in names)):
            yield dict(zip(names, values))


_HIAN_POINTERS = {
    "session_rewards_ptr": "*fp32",
    "session_weights_ptr": "*fp64",
    "session_group_ptr": "*i64",
    "turn_rewards_ptr": "*bf16",
    "turn_weights_ptr": "*fp64",
    "turn_session_ptr": "*i32",
    "turn_index_ptr": "*i64",
    "stats_ptr": "*fp64",
    "horizon_ptr": "*fp64",
    "out_ptr": "*fp32",
    "token_turn_ptr": "*i64",
}
_HIAN_COMPONENTS = dict(
    SESSION_COMPONENTS=[1, 3],
    BLOCK_SESSION_COMPONENTS=[4],
    TURN_COMPONENTS=[1],
    BLOCK_TURN_COMPONENTS=[1],
    GROUP_TURN=[False, True],
    BLOCK_SIZE=[1024],
)

KERNELS = [
    KernelSpec(
        "duca_fast.ops.advantages.triton_path",
        "_hian_moments_kernel",
        _HIAN_POINTERS,
        dict(_HIAN_COMPONENTS, SECOND_PASS=[False, True], BATCH_SCALE=[False, True]),
    ),
    KernelSpec(
        "duca_fast.ops.advantages.triton_path",
        "_hian_finalize_kernel",
        dict(
            _HIAN_POINTERS,
            **{
                name: "fp32"
                for name in (
                    "eps_hi",
                    "eps_lo",
                    "turn_weight_hi",
                    "turn_weight_lo",
                    "session_weight_hi",
                    "session_weight_lo",
                )
            },
        ),
        dict(_HIAN_COMPONENTS, TOKENS=[False, True], SCALE=[0, 1, 2]),
    ),
]


_PL = "duca_fast.ops.policy_loss.triton_path"
_LOGPROB_POINTERS = {
    "hidden_ptr": "*bf16",
    "weight_ptr": "*bf16",
    "bias_ptr": "*bf16",
    "target_ptr": "*i64",
    "lse_ptr": "*fp32",
    "logprob_ptr": "*fp32",
    "entropy_ptr": "*fp32",
    "grad_logp_ptr": "*fp32",
    "grad_entropy_ptr": "*fp32",
    "grad_logits_ptr": "*bf16",
    "inv_temperature": "fp32",
}
_TILES = dict(BLOCK_N=[64], BLOCK_V=[128], BLOCK_H=[64], DOT_PRECISION=["tf32"])
_FP32_TILES = dict(BLOCK_N=[64], BLOCK_V=[128], BLOCK_H=[32], DOT_PRECISION=["ieee"])
_FP32_POINTERS = {
    **_LOGPROB_POINTERS,
    **{k: "*fp32" for k in ("hidden_ptr", "weight_ptr", "bias_ptr", "grad_logits_ptr")},
}
_LOGITS_POINTERS = {**_LOGPROB_POINTERS, "logits_ptr": "*bf16"}

KERNELS += [
    KernelSpec(_PL, "_logprob_fwd_kernel", _LOGPROB_POINTERS, dict(_TILES, HAS_BIAS=[False, True])),
    KernelSpec(_PL, "_logprob_fwd_kernel", _FP32_POINTERS, dict(_FP32_TILES, HAS_BIAS=[True])),
    KernelSpec(
        _PL,
        "_logprob_grad_logits_kernel",
        _LOGPROB_POINTERS,
        dict(_TILES, HAS_BIAS=[False, True], HAS_ENTROPY_GRAD=[False, True]),
    ),
    KernelSpec(
        _PL,
        "_logprob_grad_logits_kernel",
        _FP32_POINTERS,
        dict(_FP32_TILES, HAS_BIAS=[True], HAS_ENTROPY_GRAD=[True]),
    ),
    KernelSpec(_PL, "_logits_fwd_kernel", _LOGITS_POINTERS, dict(BLOCK_N=[16], BLOCK_V=[512])),
    KernelSpec(
        _PL,
        "_logits_grad_kernel",
        _LOGITS_POINTERS,
        dict(BLOCK_N=[16], BLOCK_V=[512], HAS_ENTROPY_GRAD=[False, True]),
    ),
]


def compile_all(arch: int = 90, warp_size: int = 32) -> list[str]:
    """Compile every variant of every kernel; return one line per kernel. Raises on the first error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check must run without TRITON_INTERPRET=1 (it needs the real compiler)")
    target = GPUTarget("cuda", arch, warp_size)
    report = []
    for spec in KERNELS:
        kernel = getattr(importlib.import_module(spec.module), spec.name)
        started, count = time.perf_counter(), 0
        for constexprs in spec.combinations():
            missing = set(constexprs) - set(kernel.arg_names)
            if missing:
                raise ValueError(f"{spec.name}: variants name unknown arguments {sorted(missing)}")
            signature = {
                name: "constexpr" if name in constexprs else spec.arg_types.get(name, "i64")
                for name in kernel.arg_names
            }
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            try:
                triton.compile(source, target=target)
            except Exception as error:
                raise RuntimeError(
                    f"{spec.name} failed to compile for sm_{arch} with {constexprs}"
                ) from error
            count += 1
        report.append(f"{spec.name}: {count} variants for sm_{arch} in {time.perf_counter() - started:.1f} s")
    return report


if __name__ == "__main__":
    for line in compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90):
        print(line)
