"""The optimizer's state out of the rollout's way: AdamW's two moments go to host memory after each update
and come back to the device just before the next one (``optim.offload_state``).

Around one step on CUDA the trainer and the colocated engine take turns with the GPU memory: during the
update the engine sleeps (``WeightSync.sleep_for_training``: its weights and KV cache freed), and during
the rollout the trainer keeps only what the rollout needs. The policy's weights stay on the device (the
weight push reads them, OTB and ppo_gae run the policy right after generation); its gradients are freed
after every update (always); with this option the optimizer state (8 bytes per trainable parameter for
AdamW in float32, the largest part of a full fine-tune's training memory) is on the host while the engine
generates. The moves happen after the update, before the engine wakes its KV cache (so the cache gets
the room), and after the engine sleeps again. On a CPU run there is nothing to move.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class OffloadedState:
    """Where the moved state tensors lived: ``(state dict, key, device)``."""

    places: list[tuple[dict, str, torch.device]] = field(default_factory=list)
    bytes: int = 0
    """Bytes moved to the host."""


def offload_optimizer_state(optimizer: torch.optim.Optimizer) -> OffloadedState:
    """Move every optimizer state tensor that is not on the CPU to host memory (FSDP2's DTensor shards
    included: each rank moves its own); return where each one was, for ``restore_optimizer_state``."""
    moved = OffloadedState()
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                moved.places.append((state, key, value.device))
                moved.bytes += value.numel() * value.element_size()
                state[key] = value.to("cpu")
    if moved.places and torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the freed blocks back, for the engine's KV cache to take
    return moved


def restore_optimizer_state(moved: OffloadedState | None) -> None:
    """Put the state tensors ``offload_optimizer_state`` moved back on their devices."""
    if moved is None:
        return
    for state, key, device in moved.places:
        state[key] = state[key].to(device)
    moved.places.clear()
