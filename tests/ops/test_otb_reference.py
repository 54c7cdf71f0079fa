"""ops.optimal_token_baseline_advantages against its float64 reference written as plain loops."""

import pytest
import torch

from duca_fast import ops
from duca_fast.ops.advantages.reference import reference_optimal_token_baseline
from tests.conftest import KERNEL_DEVICE


def random_case(seed: int):
    """Packed sequences of random lengths in random groups (groups of one, sequences without loss tokens,
    ties for the longest included), random masks, log-probs, sum p^2 and IS weights."""
    g = torch.Generator().manual_seed(seed)
    num_groups = int(torch.randint(1, 4, (1,), generator=g))
    sizes = torch.randint(1, 5, (num_groups,), generator=g).tolist()
    seq_group = torch.tensor([group for group, size in enumerate(sizes) for _ in range(size)])
    lengths = torch.randint(1, 9, (len(seq_group),), generator=g)
    seq_ids = torch.repeat_interleave(torch.arange(len(seq_group)), lengths)
    n = int(lengths.sum())
    mask = torch.rand(n, generator=g) < 0.7
    if seed % 3 == 0:
        mask[seq_ids == 0] = False  # a sequence without loss tokens
    probs = torch.rand(n, generator=g).clamp_min(1e-3)
    return dict(
        token_rewards=torch.randn(n, generator=g, dtype=torch.float64),
        old_logprobs=probs.log().double(),
        sum_p2=(probs**2 + 0.3 * torch.rand(n, generator=g)).double(),
        seq_ids=seq_ids,
        seq_group=seq_group,
        mask=mask,
        is_weights=(0.5 + torch.rand(n, generator=g)).double() if seed % 2 else None,
    )


@pytest.mark.parametrize("backend,device", [("torch", "cpu"), ("triton", KERNEL_DEVICE)])
@pytest.mark.parametrize("positions", ["loss_tokens", "all"])
@pytest.mark.parametrize("zero_tail", [True, False])
def test_op_equals_the_float64_reference(positions, zero_tail, backend, device):
    zero_tails_hit = 0
    for seed in range(40):
        case = random_case(seed)
        on_device = {k: None if v is None else v.to(device) for k, v in case.items()}
        got, got_returns = ops.optimal_token_baseline_advantages(
            **on_device, positions=positions, handle_zero_tail=zero_tail, backend=backend
        )
        got, got_returns = got.cpu(), got_returns.cpu()
        want, want_returns = reference_optimal_token_baseline(
            **case, positions=positions, handle_zero_tail=zero_tail
        )
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_returns, torch.tensor(want_returns, dtype=torch.float64))
        if zero_tail:
            unmasked, _ = reference_optimal_token_baseline(
                **case, positions=positions, handle_zero_tail=False
            )
            zero_tails_hit += unmasked != want
    if zero_tail:
        assert zero_tails_hit > 0  # the random cases exercise the zero tail
