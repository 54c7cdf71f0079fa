"""optim.offload_state: the optimizer state in host memory between updates, back on the device for them."""

import copy

import pytest
import torch

from duca_fast.train.offload import offload_optimizer_state, restore_optimizer_state


def adamw_steps(model: torch.nn.Module, steps: int, offload: bool) -> tuple[torch.nn.Module, list[int]]:
    """``steps`` AdamW updates on a fixed batch; with ``offload`` the state leaves the device between them.
    Returns the model and the bytes moved after each update."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    device = next(model.parameters()).device
    inputs = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)).to(device)
    moved, offloaded = [], None
    for _ in range(steps):
        restore_optimizer_state(offloaded)
        optimizer.zero_grad(set_to_none=True)
        model(inputs).square().mean().backward()
        optimizer.step()
        if offload:
            offloaded = offload_optimizer_state(optimizer)
            moved.append(offloaded.bytes)
            assert all(v.device.type == "cpu" for s in optimizer.state.values() for v in s.values())
    return model, moved


def test_offloading_on_a_cpu_run_moves_nothing_and_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    plain, _ = adamw_steps(copy.deepcopy(model), 3, offload=False)
    offloaded, moved = adamw_steps(copy.deepcopy(model), 3, offload=True)
    assert moved == [0, 0, 0]
    for a, b in zip(plain.parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the state moves between GPU and host")
def test_offloading_frees_the_state_on_the_gpu_and_updates_alike():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1)).cuda()
    plain, _ = adamw_steps(copy.deepcopy(model), 3, offload=False)
    offloaded, moved = adamw_steps(copy.deepcopy(model), 3, offload=True)
    params = sum(p.numel() for p in model.parameters())
    # exp_avg and exp_avg_sq of every parameter in float32 (AdamW's step counter lives on the host already).
    assert moved == [8 * params] * 3
    for a, b in zip(plain.parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(a, b)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 32, device="cuda")).sum().backward()
    optimizer.step()
    before = torch.cuda.memory_allocated()
    restore_optimizer_state(offloaded_state := offload_optimizer_state(optimizer))
    assert offloaded_state.bytes == 8 * params and torch.cuda.memory_allocated() == before
    offload_optimizer_state(optimizer)
    assert torch.cuda.memory_allocated() <= before - 8 * params
