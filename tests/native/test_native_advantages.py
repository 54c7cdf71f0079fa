"""The native CPU advantage kernels against a plain-Python reference, the float64 torch path and themselves
(bit-identical across runs and OpenMP thread counts); bad inputs come back as ValueError naming the argument.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duca_fast import native, ops

EPS = 1e-6


def plain_normalize(values: list[float], keys: list, scale: str, eps: float = EPS) -> list[float]:
    """Grouped normalization with Python floats (NaN members left out and given 0)."""
    members: dict = {}
    for i, (value, key) in enumerate(zip(values, keys)):
        if not math.isnan(value):
            members.setdefault(key, []).append(i)
    out = [0.0] * len(values)
    centered_all = []
    for indices in members.values():
        if len(indices) < 2:
            continue
        mean = sum(values[i] for i in indices) / len(indices)
        std = math.sqrt(sum((values[i] - mean) ** 2 for i in indices) / (len(indices) - 1))
        for i in indices:
            out[i] = values[i] - mean
            centered_all.append(out[i])
            if scale == "group":
                out[i] /= std + eps
    if scale == "batch" and centered_all:
        std = math.sqrt(sum(c * c for c in centered_all) / max(len(centered_all) - 1, 1))
        out = [o / (std + eps) for o in out]
    return out


def plain_hian(
    turn_rewards,
    turn_session,
    session_rewards,
    session_group,
    *,
    turn_index=None,
    turn_weight=1.0,
    session_weight=1.0,
    scale="group",
    turn_scope="group",
):
    session_adv = plain_normalize(session_rewards, session_group, scale)
    turn_group = [session_group[s] for s in turn_session]
    keys = turn_group if turn_scope == "group" else list(zip(turn_group, turn_index))
    turn_adv = plain_normalize(turn_rewards, keys, scale)
    return [turn_weight * a + session_weight * session_adv[s] for a, s in zip(turn_adv, turn_session)]


def call_native(turn_rewards, turn_session, session_rewards, session_group, **kwargs):
    options = dict(
        turn_index=None,
        token_turn=None,
        turn_weights=None,
        session_weights=None,
        turn_weight=1.0,
        session_weight=1.0,
        turn_scope="group",
        scale="group",
        eps=EPS,
        nan_policy="raise",
        num_groups=None,
        out_dtype=torch.float64,
    )
    options.update(kwargs)
    return native.hian_advantages(turn_rewards, turn_session, session_rewards, session_group, **options)


def tensors(turn_rewards, turn_session, session_rewards, session_group):
    return (
        torch.tensor(turn_rewards, dtype=torch.float64),
        torch.tensor(turn_session),
        torch.tensor(session_rewards, dtype=torch.float64),
        torch.tensor(session_group),
    )


HAND_CASE = ([0.5, 1.0, 0.0, 2.0, 1.5, 4.0, -1.0], [0, 0, 1, 1, 2, 3, 3], [1.0, 0.0, 5.0, 3.0], [0, 0, 1, 1])
HAND_INDEX = [0, 1, 0, 1, 0, 0, 1]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("turn_scope", ["group", "group_turn"])
def test_hand_case_matches_plain_python(scale, turn_scope):
    want = plain_hian(
        *HAND_CASE,
        turn_index=HAND_INDEX,
        turn_weight=0.7,
        session_weight=1.3,
        scale=scale,
        turn_scope=turn_scope,
    )
    got = call_native(
        *tensors(*HAND_CASE),
        turn_index=torch.tensor(HAND_INDEX),
        turn_weight=0.7,
        session_weight=1.3,
        scale=scale,
        turn_scope=turn_scope,
    )
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_nan_omit_token_broadcast_and_component_weights():
    turn_rewards = torch.tensor(
        [[1.0, 0.0], [float("nan"), 1.0], [3.0, 2.0], [2.0, 2.0]], dtype=torch.float64
    )
    weights = torch.tensor([1.0, -0.5], dtype=torch.float64)
    session_rewards = torch.tensor([0.0, 1.0, 1.0])
    turn_session, session_group = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 0])
    combined = [1.0, float("nan"), 2.0, 1.0]
    per_turn = plain_hian(combined, [0, 0, 1, 2], session_rewards.tolist(), [0, 0, 0])
    token_turn = torch.tensor([-1, 3, 3, 1, -1, 0])
    got = call_native(
        turn_rewards,
        turn_session,
        session_rewards,
        session_group,
        token_turn=token_turn,
        turn_weights=weights,
        nan_policy="omit",
    )
    want = [0.0 if t < 0 else per_turn[t] for t in token_turn.tolist()]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_grpo_matches_plain_python_and_ops():
    rewards = torch.tensor([3.0, 1.0, 2.0, 7.0, 7.0, 5.0], dtype=torch.float64)
    group = torch.tensor([4, 4, 4, 1, 1, 9])
    for scale in ("group", "batch", "none"):
        got = native.grpo_advantages(rewards, group, None, scale, EPS, "raise", None, out_dtype=torch.float64)
        assert got.tolist() == pytest.approx(
            plain_normalize(rewards.tolist(), group.tolist(), scale), abs=1e-12
        )
        torch_path = ops.grpo_advantages(rewards, group, scale=scale, backend="torch")
        torch.testing.assert_close(got, torch_path, rtol=1e-12, atol=1e-12)


def test_float32_rewards_strides_and_output():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 40, generator=gen)
    strided = base.T  # [40, 3] with strides (1, 40): read in place, no copy
    turn_session, session_group = torch.arange(40) // 2, torch.arange(20) // 4
    session_rewards = torch.randn(20, generator=gen, dtype=torch.float64)
    got32 = call_native(strided, turn_session, session_rewards, session_group, out_dtype=torch.float32)
    got64 = call_native(strided.contiguous().double(), turn_session, session_rewards, session_group)
    assert got32.dtype == torch.float32
    assert torch.equal(got32, got64.float())
    want = ops.hian_advantages(strided, turn_session, session_rewards, session_group, backend="torch")
    torch.testing.assert_close(got64, want.double(), rtol=1e-12, atol=1e-12)


def test_sparse_and_huge_group_ids_are_remapped():
    rewards = torch.tensor([1.0, 4.0, 2.0, 8.0], dtype=torch.float64)
    group = torch.tensor([2**62, 5, 2**62, 5])
    got = native.grpo_advantages(rewards, group, None, "group", EPS, "raise", None, out_dtype=torch.float64)
    assert got.tolist() == pytest.approx(
        plain_normalize(rewards.tolist(), group.tolist(), "group"), abs=1e-12
    )


def test_empty_batch():
    empty = torch.zeros(0, dtype=torch.float64)
    no_ids = torch.zeros(0, dtype=torch.int64)
    assert call_native(empty, no_ids, empty, no_ids).shape == (0,)
    assert call_native(empty, no_ids, empty, no_ids, token_turn=torch.tensor([-1, -1])).tolist() == [0.0, 0.0]


@st.composite
def batches(draw):
    group_sizes = draw(st.lists(st.integers(1, 64), min_size=1, max_size=6))
    session_group = [g for g, size in enumerate(group_sizes) for _ in range(size)]
    turns_per_session = [draw(st.integers(0, 4)) for _ in session_group]
    turn_session = [s for s, count in enumerate(turns_per_session) for _ in range(count)]
    turn_index = [i for count in turns_per_session for i in range(count)]
    magnitude = draw(st.sampled_from([1e-8, 1.0, 1e6, 1e15, 1e100]))
    ties = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    nan_fraction = draw(st.sampled_from([0.0, 0.0, 0.2]))
    return session_group, turn_session, turn_index, magnitude, ties, seed, nan_fraction


@settings(max_examples=60, deadline=None)
@given(
    batch=batches(),
    scale=st.sampled_from(["group", "batch", "none"]),
    turn_scope=st.sampled_from(["group", "group_turn"]),
    components=st.integers(1, 3),
)
def test_property_matches_float64_torch_path(batch, scale, turn_scope, components):
    session_group, turn_session, turn_index, magnitude, ties, seed, nan_fraction = batch
    gen = torch.Generator().manual_seed(seed)
    num_turns, num_sessions = len(turn_session), len(session_group)

    def rewards(rows):
        values = torch.randn(rows, components, generator=gen, dtype=torch.float64)
        if ties:
            values = values.round()
        values = values * magnitude
        if nan_fraction:
            values[torch.rand(rows, components, generator=gen) < nan_fraction] = float("nan")
        return values

    turn_rewards, session_rewards = rewards(num_turns), rewards(num_sessions)
    turn_weights = torch.rand(components, generator=gen, dtype=torch.float64) + 0.5
    nan_policy = "omit" if nan_fraction else "raise"
    ids = dict(turn_index=torch.tensor(turn_index, dtype=torch.int64), token_turn=None)
    args = (
        turn_rewards,
        torch.tensor(turn_session, dtype=torch.int64),
        session_rewards,
        torch.tensor(session_group),
    )
    got = call_native(
        *args,
        **ids,
        turn_weights=turn_weights,
        turn_weight=0.6,
        session_weight=1.7,
        turn_scope=turn_scope,
        scale=scale,
        nan_policy=nan_policy,
        num_groups=len(set(session_group)),
    )
    want = ops.hian_advantages(
        *args,
        turn_index=ids["turn_index"],
        turn_weight=0.6,
        session_weight=1.7,
        turn_scope=turn_scope,
        scale=scale,
        nan_policy=nan_policy,
        turn_component_weights=turn_weights,
        backend="torch",
    )
    assert not torch.isnan(got).any()
    # "none" keeps the reward magnitude: compare relative to it.
    atol = 1e-9 * (magnitude if scale == "none" else 1.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=atol)


BAD_INPUTS = [
    ("turn_session", dict(turn_session=torch.tensor([0, 0, 1, 1, 2, 4, 3])), "turn_session[5] = 4"),
    ("session_group", dict(num_groups=1), "session_group[2] = 1"),
    ("token_turn", dict(token_turn=torch.tensor([0, -2])), "token_turn[1] = -2"),
    (
        "turn_index",
        dict(turn_scope="group_turn", turn_index=torch.tensor([0, 1, 0, 1, 0, -1, 1])),
        "turn_index[5] = -1",
    ),
    ("turn_index missing", dict(turn_scope="group_turn"), "turn_index"),
    ("nan raise", dict(session_rewards=torch.tensor([1.0, float("nan"), 5.0, 3.0])), "session_rewards"),
    (
        "inf omit",
        dict(turn_rewards=torch.tensor([0.5, 1.0, 0.0, float("inf"), 1.5, 4.0, -1.0]), nan_policy="omit"),
        "turn_rewards has an infinite value at flat index 3",
    ),
    ("eps", dict(eps=0.0), "eps"),
    ("scale", dict(scale="std"), "scale"),
    ("ids dtype", dict(session_group=torch.tensor([0, 0, 1, 1], dtype=torch.int32)), "session_group"),
    ("ids contiguous", dict(turn_session=torch.tensor([0, 0, 1, 1, 2, 3, 3] * 2)[::2]), "turn_session"),
    ("ids length", dict(turn_session=torch.tensor([0, 0, 1])), "turn_session"),
    ("reward dtype", dict(turn_rewards=torch.arange(7)), "turn_rewards"),
    ("weights", dict(turn_weights=torch.tensor([1.0, 2.0])), "turn_rewards weights"),
    (
        "non-finite weight",
        dict(session_weights=torch.tensor([float("nan")])),
        "session_rewards component weight",
    ),
    ("out dtype", dict(out_dtype=torch.int64), "out_dtype"),
]


@pytest.mark.parametrize("label, change, fragment", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_value_error_naming_the_argument(label, change, fragment):
    turn_rewards, turn_session, session_rewards, session_group = tensors(*HAND_CASE)
    inputs = dict(
        turn_rewards=turn_rewards,
        turn_session=turn_session,
        session_rewards=session_rewards,
        session_group=session_group,
    )
    for key in list(inputs):
        if key in change:
            inputs[key] = change.pop(key)
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        call_native(**inputs, **change)


DETERMINISM_SCRIPT = """
import hashlib, sys, torch
from duca_fast import native
# torch and the library share one OpenMP runtime; torch caps OMP_NUM_THREADS at the core count.
torch.set_num_threads(int(sys.argv[1]))
gen = torch.Generator().manual_seed(11)
sessions = 40_000
session_group = torch.arange(sessions) // 8
turn_session = torch.arange(sessions).repeat_interleave(3)
turn_index = torch.arange(3).repeat(sessions)
turn_rewards = torch.randn(3 * sessions, 2, generator=gen) * 1e3
session_rewards = torch.randn(sessions, generator=gen, dtype=torch.float64) * 1e6
digest = hashlib.sha256()
for scope in ("group", "group_turn"):
    for scale in ("group", "batch", "none"):
        out = native.hian_advantages(turn_rewards, turn_session, session_rewards, session_group, turn_index,
                                     None, None, None, 0.5, 1.0, scope, scale, 1e-6, "raise", None,
                                     out_dtype=torch.float64)
        again = native.hian_advantages(turn_rewards, turn_session, session_rewards, session_group, turn_index,
                                       None, None, None, 0.5, 1.0, scope, scale, 1e-6, "raise", None,
                                       out_dtype=torch.float64)
        assert torch.equal(out, again), "two runs differ"
        digest.update(out.numpy().tobytes())
print(native.cpu_threads(), digest.hexdigest())
"""


def test_bit_identical_across_runs_and_thread_counts():
    repo = Path(native.__file__).resolve().parent.parent
    digests = {}
    for threads in (1, 2, 4):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(repo))
        result = subprocess.run(
            [sys.executable, "-c", DETERMINISM_SCRIPT, str(threads)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        used, digest = result.stdout.split()
        assert int(used) == threads
        digests.setdefault(digest, []).append(threads)
    assert len(digests) == 1, f"results differ by thread count: {digests}"


def test_matches_torch_path_at_parallel_sizes():
    # Sizes above the kernels' parallel threshold, so the OpenMP loops really run.
    gen = torch.Generator().manual_seed(5)
    sessions = 30_000
    session_group = torch.randint(0, 3000, (sessions,), generator=gen)
    turn_session = torch.arange(sessions).repeat_interleave(2)
    turn_rewards = torch.randn(2 * sessions, generator=gen, dtype=torch.float64)
    session_rewards = torch.randn(sessions, generator=gen, dtype=torch.float64) * 100
    for scale in ("group", "batch"):
        got = call_native(turn_rewards, turn_session, session_rewards, session_group, scale=scale)
        want = ops.hian_advantages(
            turn_rewards, turn_session, session_rewards, session_group, scale=scale, backend="torch"
        )
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_missing_library_is_one_log_line_not_an_import_error(tmp_path):
    script = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from duca_fast import native\n"
        "print(native.available(), native.available())\n"
    )
    env = dict(os.environ, DUCA_KERNELS_LIB=str(tmp_path / "missing.so"))
    env["PYTHONPATH"] = str(Path(native.__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.split() == ["False", "False"]
    logged = [line for line in result.stderr.splitlines() if "native kernels" in line]
    assert len(logged) == 1 and "missing.so" in logged[0]
