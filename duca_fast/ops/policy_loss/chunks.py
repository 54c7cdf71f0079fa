"""The one chunk loop of the lm_head ops; the backends give its row primitives.

Every op that multiplies hidden states by the lm_head runs the same loop over token chunks:
GEMM1 (the chunk's logits into a reused buffer), the row statistics (log-sum-exp, target log-prob,
entropy, optionally sum p^2) or, in a backward, the saved ones, then, when gradients are wanted, the
per-token derivatives (the policy head, or the incoming gradient), d-logits in the buffer, and GEMM2/GEMM3
(hidden and weight gradients). ``run_chunks`` is that loop, written once; ``torch_path.TorchRows`` and
``triton_path.TritonRows`` implement ``RowPrimitives`` for one chunk (buffers, kernels, streams).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class RowPrimitives(Protocol):
    """One backend's work on one chunk of rows; state (buffers, streams) lives in the object."""

    stats_dtype: torch.dtype
    """dtype of the row statistics (float32, float64 for float64 inputs on the torch path)."""

    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """GEMM1 of the chunk into the reused buffer (what the other primitives read)."""

    def stats(
        self, logits: torch.Tensor, target: torch.Tensor, keep_logits: bool, with_sum_p2: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(lse, logprobs, entropy, probs or None, sum_p2 or None)`` of the chunk's rows; ``probs`` is
        whatever ``grad`` may reuse; ``keep_logits=False`` lets the statistics overwrite the logits."""

    def probs(self, logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor | None:
        """The reusable probabilities from saved statistics (a backward), or None."""

    def grad(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor | None,
        target: torch.Tensor,
        lse: torch.Tensor,
        entropy: torch.Tensor,
        grad_logprobs: torch.Tensor,
        grad_entropy: torch.Tensor | None,
    ) -> torch.Tensor:
        """d loss / d logits of the chunk (into a reused buffer)."""

    def backward_gemms(
        self, grad_logits: torch.Tensor, hidden_rows: torch.Tensor, rows: slice, grads: dict
    ) -> None:
        """GEMM2 (``grads["hidden"][rows]``) and GEMM3 (``grads["weight"] +=``), the bias gradient."""

    def finish(self) -> None:
        """Wait for work still in flight (a side stream) before the results are read."""


@dataclass
class ChunkResults:
    """Per-token statistics of a forward loop (None in a backward loop) and the parameter gradients."""

    lse: torch.Tensor | None
    logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    sum_p2: torch.Tensor | None
    grads: dict


Derivatives = Callable[[slice, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
"""``(rows, logprobs, entropy) -> (d loss / d logp, d loss / d entropy or None)`` of a chunk."""


def run_chunks(
    primitives: RowPrimitives,
    hidden: torch.Tensor,
    target: torch.Tensor,
    chunks: Sequence[slice],
    grads: dict,
    *,
    derivatives: Derivatives | None = None,
    saved: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep_logits: bool = False,
    with_sum_p2: bool = False,
) -> ChunkResults:
    """The chunk loop.

    Forward (``saved`` None): statistics of every row; with ``derivatives`` (the policy head per chunk)
    and any gradient in ``grads``, the gradients in the same pass. Backward: ``saved = (lse, entropy)``
    of the forward and ``derivatives`` giving the incoming gradients of each chunk.
    ``keep_logits``: the d-logits need the logits again (an entropy gradient) after the statistics.
    """
    num_rows = hidden.shape[0]
    dtype = primitives.stats_dtype
    forward = saved is None
    out = {
        name: hidden.new_empty(num_rows, dtype=dtype) if forward else None
        for name in ("lse", "logprobs", "entropy")
    }
    out["sum_p2"] = hidden.new_empty(num_rows, dtype=dtype) if forward and with_sum_p2 else None
    want_grads = derivatives is not None and any(g is not None for g in grads.values())
    for rows in chunks:
        hidden_rows = hidden[rows]
        logits = primitives.logits(hidden_rows)
        if forward:
            lse, logprobs, entropy, probs, sum_p2 = primitives.stats(
                logits, target[rows], keep_logits and want_grads, with_sum_p2
            )
            out["lse"][rows], out["logprobs"][rows], out["entropy"][rows] = lse, logprobs, entropy
            if sum_p2 is not None:
                out["sum_p2"][rows] = sum_p2
        else:
            lse, entropy = saved[0][rows], saved[1][rows]
            logprobs = None
            probs = primitives.probs(logits, lse)
        if not want_grads:
            continue
        grad_logprobs, grad_entropy = derivatives(rows, logprobs, entropy)
        grad_logits = primitives.grad(logits, probs, target[rows], lse, entropy, grad_logprobs, grad_entropy)
        primitives.backward_gemms(grad_logits, hidden_rows, rows, grads)
    primitives.finish()
    return ChunkResults(out["lse"], out["logprobs"], out["entropy"], out["sum_p2"], grads)
