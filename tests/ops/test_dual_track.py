"""Dual-Track GRPO (TRUST-SQL) is a HIAN configuration: checked against a transcription of its advantages."""

import pytest
import torch

from duca_fast import ops
from tests.conftest import KERNEL_DEVICE


def trust_sql(r_schema, r_answer, valid, schema_end, length, group_size, schema_weight):
    """stulove123/TRUST-SQL- (8cf260a), ``slime/backends/megatron_utils/loss.py``, in float64:
    ``_compute_group_advantages`` (per group over valid samples: population std, eps 1e-6, clamp +-10,
    a group with fewer than 2 valid samples gets 0, invalid samples 0) and the additive advantage of
    ``--use_weighted_schema_advantage``: every response token gets A_ans, tokens before ``schema_end``
    also ``schema_weight * A_sch``. Returns the per-token advantages of each sample."""

    def normalize(rewards):
        out = torch.zeros_like(rewards)
        for start in range(0, rewards.numel(), group_size):
            r, ok = rewards[start : start + group_size], valid[start : start + group_size]
            if ok.sum() <= 1:
                continue
            mean, std = r[ok].mean(), r[ok].std(unbiased=False)
            out[start : start + group_size] = ((r - mean) / (std + 1e-6)).clamp(-10, 10) * ok
        return out

    a_schema, a_answer = normalize(r_schema), normalize(r_answer)
    tokens = []
    for i in range(r_schema.numel()):
        e = min(int(schema_end[i]), int(length[i]))
        row = torch.full((int(length[i]),), float(a_answer[i]), dtype=torch.float64)
        row[:e] += schema_weight * a_schema[i]
        tokens.append(row)
    return tokens


@pytest.mark.parametrize(
    "backend,device", [("torch", "cpu"), ("triton", KERNEL_DEVICE), ("reference", "cpu")]
)
@pytest.mark.parametrize("schema_weight", [1.0, 0.25])
def test_dual_track_is_hian_with_population_std_and_clip(backend, device, schema_weight):
    gen = torch.Generator().manual_seed(3)
    groups, size = 5, 8
    count = groups * size
    r_answer = torch.tensor([1.0, 0.2, 0.0, 1.1, 0.1])[torch.randint(0, 5, (count,), generator=gen)].double()
    r_schema = torch.rand(count, generator=gen, dtype=torch.float64) * (r_answer >= 1.0)
    valid = torch.rand(count, generator=gen) > 0.15
    valid[8:15] = False  # group 1: one valid sample -> zeros
    r_answer[16:24] = 0.3  # group 2: zero spread on the answer track -> 0
    length = torch.randint(3, 9, (count,), generator=gen)
    schema_end = torch.randint(0, 10, (count,), generator=gen)
    expected = trust_sql(r_schema, r_answer, valid, schema_end, length, size, schema_weight)

    # HIAN: each sample is a session (the answer track) with two turns: 0 = the schema span (the schema
    # track), 1 = the rest (a constant reward, advantage 0); statistics per (group, turn position).
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    session_rewards = torch.where(valid, r_answer, nan)
    turn_rewards = torch.stack(
        [torch.where(valid, r_schema, nan), torch.zeros(count, dtype=torch.float64)], 1
    )
    turn_session = torch.arange(count).repeat_interleave(2)
    turn_index = torch.tensor([0, 1]).repeat(count)
    token_turn = torch.cat(
        [
            torch.where(torch.arange(int(n)) < min(int(e), int(n)), 2 * i, 2 * i + 1)
            for i, (n, e) in enumerate(zip(length, schema_end))
        ]
    )
    got = ops.hian_advantages(
        turn_rewards.reshape(-1).float().to(device),
        turn_session.to(device),
        session_rewards.float().to(device),
        (torch.arange(count) // size).to(device),
        turn_scope="group_turn",
        turn_index=turn_index.to(device),
        token_turn=token_turn.to(device),
        turn_weight=schema_weight,
        session_weight=1.0,
        std="population",
        clip=10.0,
        eps=1e-6,
        nan_policy="omit",
        backend=backend,
    ).cpu()
    torch.testing.assert_close(got.double(), torch.cat(expected), rtol=1e-5, atol=1e-5)
    assert got.abs().max().item() > 1.0  # the batch does exercise the scaling
