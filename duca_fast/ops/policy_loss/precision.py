"""How fp32 inputs multiply on CUDA: TF32 tensor cores (the default) or exact fp32 (a leaf module).

cuBLAS reads one process-wide switch, so the ops set it around their own GEMMs and put back exactly
what the caller had. Care is needed: torch (2.9+) refuses to read the legacy ``allow_tf32`` flag (and
``get_float32_matmul_precision``) while it disagrees with the new ``fp32_precision`` one, so a restore
that leaves the two out of step breaks callers and libraries that still read the legacy one
(tests/ops/test_fp32_matmul.py tries every way a caller can have set it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

FP32_MATMULS = ("tf32", "ieee")


def check_fp32_matmul(fp32_matmul: str) -> None:
    if fp32_matmul not in FP32_MATMULS:
        raise ValueError(f"fp32_matmul must be one of {FP32_MATMULS}, got {fp32_matmul!r}")


@contextmanager
def fp32_matmul_precision(fp32_matmul: str, dtype: torch.dtype) -> Iterator[None]:
    """cuBLAS fp32 GEMMs use ``fp32_matmul`` ("tf32" or "ieee") inside; a no-op for other dtypes."""
    check_fp32_matmul(fp32_matmul)
    if dtype != torch.float32:
        yield
        return
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # torch < 2.9: the legacy flag only
        before = matmul.allow_tf32
        matmul.allow_tf32 = fp32_matmul == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32 = before
        return
    before = matmul.fp32_precision  # resolved: "none" only when nothing was set anywhere
    if (before == "tf32") == (fp32_matmul == "tf32"):
        yield
        return
    matmul.fp32_precision = fp32_matmul
    try:
        yield
    finally:
        # The value read before ("none" when nothing was set) brings both flags back in step.
        matmul.fp32_precision = before
