"""GOPO's rank advantages against a transcription of the authors' code and the plain-loop reference."""

import pytest
import torch

from duca_fast import ops
from duca_fast.ops.advantages.gopo import reference_gopo_advantages
from tests.conftest import KERNEL_DEVICE


def authors_code(rewards_grouped: torch.Tensor) -> torch.Tensor:
    """friendshipkim/gopo, ``grpo_trainer.py``: ranks by a double argsort, rank 1 = best (transcribed)."""
    generations = rewards_grouped.shape[1]
    ranks = torch.argsort(torch.argsort(rewards_grouped, dim=1, descending=True), dim=1) + 1
    return 2.0 - 4.0 * (ranks.double() - 1.0) / (generations - 1)


@pytest.mark.parametrize("groups,size", [(5, 8), (3, 2), (7, 5)])
def test_matches_the_authors_code_on_distinct_rewards(groups, size):
    gen = torch.Generator().manual_seed(groups * size)
    rewards = torch.randn(groups, size, generator=gen, dtype=torch.float64)
    expected = authors_code(rewards).reshape(-1)
    group = torch.arange(groups).repeat_interleave(size)
    # Shuffle the packed order: groups need not be contiguous.
    order = torch.randperm(groups * size, generator=gen)
    got = ops.gopo_advantages(rewards.reshape(-1)[order].float(), group[order])
    torch.testing.assert_close(got.double(), expected[order], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        got.double(), reference_gopo_advantages(rewards.reshape(-1)[order], group[order])
    )


def test_ties_single_members_and_sparse_ids():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0, 2.0, 2.0])
    group = torch.tensor([4, 4, 4, 4, 9, 0, 0])
    got = ops.gopo_advantages(rewards, group)
    # Group 4: ties in batch order (1.0 at 0 before 1.0 at 2; 0.0 at 1 before 0.0 at 3); a lone member: 0.
    assert got.tolist() == pytest.approx([2.0, -2.0 / 3, 2.0 / 3, -2.0, 0.0, 2.0, -2.0])
    torch.testing.assert_close(got.double(), reference_gopo_advantages(rewards, group))
    assert ops.gopo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize(
    "rewards,group,message",
    [
        (torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), r"rewards\[1\] = nan is not finite"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0, -1]), r"group\[1\] = -1 must be >= 0"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0]), "group has 1 entries but rewards has 2"),
        (torch.tensor([1, 2]), torch.tensor([0, 0]), "rewards"),
    ],
)
def test_bad_inputs_are_named(rewards, group, message):
    with pytest.raises(ValueError, match=message):
        ops.gopo_advantages(rewards, group)


@pytest.mark.parametrize(
    "backend,device", [("torch", "cpu"), ("triton", KERNEL_DEVICE), ("reference", "cpu")]
)
def test_every_backend_on_ties_sparse_ids_and_shuffled_groups(backend, device):
    gen = torch.Generator().manual_seed(11)
    rewards = torch.randint(0, 4, (150,), generator=gen).float()  # many ties
    group = torch.randint(0, 9, (150,), generator=gen) * 1000 + 7  # sparse ids, shuffled members
    group[5] = 123456  # a group of one
    expected = reference_gopo_advantages(rewards, group)
    got = ops.gopo_advantages(rewards.to(device), group.to(device), backend=backend).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    assert got[5].item() == 0.0
