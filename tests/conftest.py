"""Test-wide setup: Triton kernels run under the interpreter when there is no CUDA device."""

import os

import torch

# Must happen before triton.jit decorates the kernels, i.e. before duca_fast's Triton modules import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where the kernel tests run: compiled on a GPU when there is one, interpreted on CPU otherwise.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
