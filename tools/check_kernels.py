"""Compile every Triton kernel for sm_90 and sm_80 as the JIT would launch it, on a machine without a GPU.

The launchers run on ``meta`` tensors at the benchmark shapes; each kernel launch is captured instead
of executed and specialized by Triton's own binder (integers equal to 1 become constants, integers
that are multiples of 16 and 16-byte aligned pointers get the divisibility hint, exactly as at a real
launch). The kernel is then compiled by the real compiler for the target, and ``ptxas -v`` on its PTX
reports registers and spills (the driver that fills ``n_regs`` / ``n_spills`` needs a GPU).

Prints one row per kernel variant (kernel, dtype, flags, registers, spills, shared memory) and exits
non-zero on a compile failure or any spill. ``--markdown PATH`` also writes the table.

Usage: ``python -m tools.check_kernels [--arch 90 80] [--markdown bench/results/kernels_sm90.md]``
(``make check-kernels``; must run without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Benchmark shapes (bench/bench_policy_loss.py, bench/bench_advantages.py).
LOSS_TOKENS, VOCAB = 8192, 151936
SESSIONS, TURNS_PER_SESSION, GROUP_SIZE = 128000, 4, 8
H100_SMS = 132
PTXAS = os.environ.get("PTXAS", "/usr/local/cuda/bin/ptxas")


@dataclass
class Launch:
    kernel: object
    args: tuple
    kwargs: dict


@dataclass
class Row:
    kernel: str
    dtype: str
    flags: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int


@contextlib.contextmanager
def capture(kernels: list) -> Iterator[list[Launch]]:
    """Record ``kernel[grid](...)`` calls instead of running them."""
    launches: list[Launch] = []
    saved = {}
    for kernel in kernels:
        saved[kernel] = kernel.__dict__.get("run")

        def record(*args, grid, warmup, _kernel=kernel, **kwargs):
            launches.append(Launch(_kernel, args, kwargs))

        kernel.run = record
    try:
        yield launches
    finally:
        for kernel, run in saved.items():
            if run is None:
                del kernel.run
            else:
                kernel.run = run


@contextlib.contextmanager
def _assume_sms(count: int) -> Iterator[None]:
    """The launchers size the vocabulary split by the SM count; meta tensors have no device to ask."""
    from duca_fast.ops.policy_loss import triton_path

    saved = triton_path._multiprocessors
    triton_path._multiprocessors = lambda device: count
    try:
        yield
    finally:
        triton_path._multiprocessors = saved


def loss_launches() -> Iterator[tuple[str, str, Callable[[], None], list]]:
    import torch

    from duca_fast.ops.policy_loss import triton_path

    chunk = triton_path.chunk_rows(LOSS_TOKENS, VOCAB, None, torch.device("cuda"))
    meta = torch.device("meta")
    kernels = [triton_path._row_partials_kernel, triton_path._logits_grad_kernel]
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        logits = torch.empty(chunk, VOCAB, dtype=torch.float32, device=meta)
        grad_out = torch.empty(chunk, VOCAB, dtype=dtype, device=meta)
        bias = torch.empty(VOCAB, dtype=dtype, device=meta)
        target = torch.empty(chunk, dtype=torch.long, device=meta)
        rows = torch.empty(chunk, dtype=torch.float32, device=meta)
        for has_bias in (False, True):
            flags = f"bias={has_bias}"
            yield (
                "row_partials (hidden path)",
                name,
                flags,
                lambda z=logits, b=bias if has_bias else None, t=target: triton_path.row_stats(z, b, t, 1.0),
                kernels,
            )
            for entropy in (False, True):
                yield (
                    "logits_grad (hidden path)",
                    name,
                    f"{flags} entropy_grad={entropy}",
                    lambda z=logits, b=bias if has_bias else None, t=target, r=rows, e=entropy, g=grad_out: (
                        triton_path.logits_to_grad(z, b, t, r, r, r, r if e else None, 1.0, out=g)
                    ),
                    kernels,
                )
        if dtype != torch.float32:
            # logits_dtype=<input dtype>: GEMM1 writes 16-bit logits, the d-logits overwrite them.
            chunk16 = triton_path.chunk_rows(LOSS_TOKENS, VOCAB, None, torch.device("cuda"), dtype.itemsize)
            logits16 = torch.empty(chunk16, VOCAB, dtype=dtype, device=meta)
            rows16 = torch.empty(chunk16, dtype=torch.float32, device=meta)
            target16 = torch.empty(chunk16, dtype=torch.long, device=meta)
            for entropy in (False, True):
                yield (
                    "logits_grad (hidden path, 16-bit logits in place)",
                    name,
                    f"entropy_grad={entropy}",
                    lambda z=logits16, t=target16, r=rows16, e=entropy: triton_path.logits_to_grad(
                        z, None, t, r, r, r, r if e else None, 1.0, out=z
                    ),
                    kernels,
                )
        given = torch.empty(LOSS_TOKENS, VOCAB, dtype=dtype, device=meta)
        target_all = torch.empty(LOSS_TOKENS, dtype=torch.long, device=meta)
        yield (
            "row_partials (given logits)",
            name,
            "",
            lambda z=given, t=target_all: triton_path.row_stats(z, None, t, 1.0),
            kernels,
        )


def meta_hian_problem(components: int):
    """A HIAN problem of ``SESSIONS`` sessions x ``TURNS_PER_SESSION`` turns on the meta device."""
    import torch

    from duca_fast.ops.advantages.options import HianProblem, HorizonInput

    meta = torch.device("meta")
    turns = SESSIONS * TURNS_PER_SESSION
    return HianProblem(
        turns=HorizonInput(
            torch.empty(turns, components, device=meta),
            torch.empty(components, dtype=torch.float64, device=meta),
        ),
        sessions=HorizonInput(
            torch.empty(SESSIONS, 1, device=meta), torch.empty(1, dtype=torch.float64, device=meta)
        ),
        turn_session=torch.empty(turns, dtype=torch.long, device=meta),
        session_group=torch.empty(SESSIONS, dtype=torch.long, device=meta),
        turn_index=torch.empty(turns, dtype=torch.long, device=meta),
        token_turn=None,
        num_groups=SESSIONS // GROUP_SIZE,
        num_turn_positions=TURNS_PER_SESSION,
        out_dtype=torch.float32,
    )


def advantage_launches() -> Iterator[tuple[str, str, Callable[[], None], list]]:
    from duca_fast.ops.advantages import triton_path
    from duca_fast.ops.advantages.options import AdvantageOptions

    kernels = [triton_path._hian_moments_kernel, triton_path._hian_finalize_kernel]
    for components in (1, 3):
        for scope in ("group", "group_turn"):
            for scale in ("group", "batch"):
                problem = meta_hian_problem(components)
                options = AdvantageOptions(turn_scope=scope, scale=scale)
                yield (
                    "hian",
                    "float32",
                    f"components={components} scope={scope} scale={scale}",
                    lambda p=problem, o=options: triton_path.hian_advantages_triton(p, o),
                    kernels,
                )


def estimator_launches() -> Iterator[tuple[str, str, Callable[[], None], list]]:
    """Dual-Track's HIAN variant, ProxMO's two kernels (16 and 1,024 TF-IDF features), GOPO's and the
    optimal token baseline's."""
    import torch

    from duca_fast.ops.advantages import gopo_triton, optimal_baseline_triton, proxmo_triton, triton_path
    from duca_fast.ops.advantages.options import AdvantageOptions
    from duca_fast.ops.advantages.proxmo import ProxmoOptions, ProxmoProblem

    meta = torch.device("meta")
    turns = SESSIONS * TURNS_PER_SESSION
    problem = meta_hian_problem(1)
    dual_track = AdvantageOptions(std="population", clip=10.0)
    yield (
        "hian (Dual-Track)",
        "float32",
        "std=population clip=10",
        lambda: triton_path.hian_advantages_triton(problem, dual_track),
        [triton_path._hian_moments_kernel, triton_path._hian_finalize_kernel],
    )
    for features in (16, 1024):
        proxmo = ProxmoProblem(
            base=problem,
            features=torch.empty(turns, features, device=meta),
            order_in_session=torch.empty(turns, dtype=torch.long, device=meta),
        )
        yield (
            "proxmo",
            "float32",
            f"features={features}",
            lambda p=proxmo: proxmo_triton.proxmo_advantages_triton(p, ProxmoOptions()),
            [proxmo_triton._returns_kernel, proxmo_triton._proxmo_kernel],
        )
    yield (
        "gopo",
        "float32",
        "",
        lambda: gopo_triton.gopo_advantages_triton(
            torch.empty(SESSIONS, device=meta), torch.empty(SESSIONS, dtype=torch.long, device=meta)
        ),
        [gopo_triton._gopo_kernel],
    )
    tokens = turns * 16  # 16 agent tokens a turn
    yield (
        "optimal token baseline",
        "float64",
        "",
        lambda: optimal_baseline_triton.otb_advantages_triton(
            torch.empty(tokens, dtype=torch.long, device=meta),
            *(torch.empty(tokens, dtype=torch.float64, device=meta) for _ in range(3)),
            torch.empty(tokens, dtype=torch.bool, device=meta),
            1e-8,
        ),
        [optimal_baseline_triton._otb_kernel],
    )


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """``(registers, spill bytes)`` from ``ptxas -v`` on the kernel's PTX."""
    gpu = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run(
            [PTXAS, "-v", f"--gpu-name={gpu}", str(source), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {result.stderr[-2000:]}")
    registers = int(re.search(r"Used (\d+) registers", result.stderr).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    return registers, int(spills.group(1)) + int(spills.group(2))


def compile_launch(launch: Launch, arch: int) -> tuple[int, int, int]:
    """Specialize like the JIT, compile for ``sm_<arch>``: ``(registers, spill bytes, shared bytes)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, launch.kwargs, bound_args, specialization, options
    )
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    registers, spills = ptxas_report(compiled.asm["ptx"], arch)
    return registers, spills, int(compiled.metadata.shared)


def check(archs: list[int]) -> tuple[list[Row], list[str]]:
    rows, failures = [], []
    for source in (loss_launches, advantage_launches, estimator_launches):
        for label, dtype, flags, launcher, kernels in source():
            with capture(kernels) as launches, _assume_sms(H100_SMS):
                launcher()
            for launch in launches:
                name = launch.kernel.fn.__name__
                for arch in archs:
                    try:
                        registers, spills, shared = compile_launch(launch, arch)
                    except Exception as error:  # reported per kernel; the exit status says it failed
                        failures.append(
                            f"{name} [{dtype} {flags}] sm_{arch}: {type(error).__name__}: {error}"
                        )
                        continue
                    rows.append(Row(f"{name} ({label})", dtype, flags, arch, registers, spills, shared))
                    if spills:
                        failures.append(f"{name} [{dtype} {flags}] sm_{arch}: {spills} bytes of spills")
    return rows, failures


def table(rows: list[Row]) -> str:
    lines = [
        "| kernel | dtype | variant | arch | registers | spill bytes | shared bytes |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.kernel} | {row.dtype} | {row.flags or '-'} | sm_{row.arch} | {row.registers} "
            f"| {row.spill_bytes} | {row.shared_bytes} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--markdown", type=Path, help="also write the table (with device-free provenance)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("check_kernels needs the real compiler: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    if shutil.which(PTXAS) is None:
        print(f"ptxas not found at {PTXAS} (set PTXAS)", file=sys.stderr)
        return 2
    import triton

    rows, failures = check(args.arch)
    text = table(rows)
    print(text)
    if args.markdown:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout
        ptxas = (
            subprocess.run([PTXAS, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        )
        header = (
            "# Triton kernels compiled for CUDA targets (no GPU needed)\n\n"
            f"`make check-kernels` (tools/check_kernels.py) at commit {commit.strip() or 'unknown'}, "
            f"triton {triton.__version__}, {ptxas[-1] if ptxas else 'ptxas'}. Launch specialization as the "
            f"JIT does it, at the benchmark shapes: policy loss N={LOSS_TOKENS}, V={VOCAB} "
            f"(chunk rows from the launcher, {H100_SMS} SMs assumed for the vocabulary split); HIAN "
            f"{SESSIONS} sessions x {TURNS_PER_SESSION} turns, groups of {GROUP_SIZE}. Registers and "
            "spills from `ptxas -v` on the kernel's PTX; shared memory from the compiled metadata.\n\n"
        )
        args.markdown.write_text(header + text + "\n")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print(f"{len(rows)} kernel variants compiled, {len(failures)} failures or spills")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
