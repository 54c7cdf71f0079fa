"""Input validation shared by the ops: clear ``ValueError`` messages that name the argument.

Shape, dtype and device checks read tensor metadata only. Checks on values (ranges, NaN) need the
values on the host; on CUDA they are batched into a single synchronisation by ``ValueChecks``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("auto", "torch", "triton", "reference")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_tensor(
    name: str,
    value: object,
    *,
    ndims: Sequence[int],
    kind: str,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of one of ``ndims`` and of ``kind`` "float", "int" or "any"."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() not in ndims:
        dims = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {dims}, got shape {tuple(value.shape)}")
    if kind == "float" and not value.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {value.dtype}")
    if kind == "int" and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(f"{name} must have an integer dtype (ids), got {value.dtype}")
    return value


def check_length(name: str, value: torch.Tensor, expected: int, what: str) -> None:
    if value.shape[0] != expected:
        raise ValueError(f"{name} has {value.shape[0]} rows but {what} has {expected}")


def check_same_device(tensors: dict[str, torch.Tensor | None]) -> torch.device:
    present = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, tensor in present.items():
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                "move all inputs to one device"
            )
    return first.device


def select_backend(backend: str, device: torch.device) -> str:
    """CUDA tensors -> Triton, everything else -> torch; ``backend`` overrides (tests, benchmarks)."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 set before "
            "triton is imported"
        )
    return backend


class ValueChecks:
    """Collects value checks as device tensors and reads them all in one host synchronisation."""

    def __init__(self) -> None:
        self._checks: list[tuple[torch.Tensor, Callable[[], torch.Tensor], Callable[[int], str]]] = []

    def forbid(self, bad: torch.Tensor, describe: Callable[[int], str]) -> None:
        """Fail if any entry of the bool tensor ``bad`` is True; ``describe(index)`` words the error."""
        if bad.numel():
            self._checks.append((bad.any(), lambda: bad, describe))

    def forbid_flagged(
        self, flag: torch.Tensor, locate: Callable[[], torch.Tensor], describe: Callable[[int], str]
    ) -> None:
        """Fail if the 0-d bool ``flag`` is True; ``locate()`` builds the bool mask only then."""
        self._checks.append((flag, locate, describe))

    def forbid_outside(self, name: str, ids: torch.Tensor, low: int, high: int | None, what: str) -> None:
        """Ids must lie in ``[low, high)`` (``high=None``: only ``>= low``); one min/max pass, no mask."""
        if ids.numel() == 0:
            return
        smallest, largest = torch.aminmax(ids)
        flag = smallest < low if high is None else (smallest < low) | (largest >= high)
        bound = f">= {low}" if high is None else f"in [{low}, {high}) ({what})"

        def locate() -> torch.Tensor:
            return (ids < low) if high is None else (ids < low) | (ids >= high)

        self.forbid_flagged(flag, locate, lambda i: f"{name}[{i}] = {int(ids[i])} must be {bound}")

    def raise_if_failed(self) -> None:
        if not self._checks:
            return
        failed = torch.stack([flag.reshape(()) for flag, _, _ in self._checks]).tolist()
        for is_bad, (_, locate, describe) in zip(failed, self._checks):
            if is_bad:
                index = int(locate().reshape(-1).nonzero()[0, 0].item())
                raise ValueError(describe(index))
