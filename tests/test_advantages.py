"""hian_advantages / grpo_advantages: every backend against the float64 reference, and bad input."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duca_fast import native, ops
from tests.conftest import KERNEL_DEVICE
from tests.native import ensure_native_library

FAST_BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE), ("native", "cpu")]


@pytest.fixture(scope="module", autouse=True)
def native_library():
    return ensure_native_library()


def make_batch(group_sizes, turns_per_session, *, components=(1, 1), seed=0, session_scale=1.0):
    """Random batch: sessions in groups of the given sizes, each with the given number of turns."""
    gen = torch.Generator().manual_seed(seed)
    session_group = torch.cat([torch.full((n,), g) for g, n in enumerate(group_sizes)]).long()
    num_sessions = session_group.numel()
    turn_counts = torch.tensor(turns_per_session, dtype=torch.long)[:num_sessions]
    turn_session = torch.repeat_interleave(torch.arange(num_sessions), turn_counts)
    starts = torch.cumsum(turn_counts, 0) - turn_counts
    turn_index = torch.arange(turn_session.numel()) - starts[turn_session]
    kt, ks = components
    turn_rewards = torch.rand(turn_session.numel(), kt, generator=gen, dtype=torch.float64) * 1e-2
    session_rewards = torch.randn(num_sessions, ks, generator=gen, dtype=torch.float64) * session_scale
    if kt == 1:
        turn_rewards = turn_rewards[:, 0]
    if ks == 1:
        session_rewards = session_rewards[:, 0]
    return dict(
        turn_rewards=turn_rewards,
        turn_session=turn_session,
        session_rewards=session_rewards,
        session_group=session_group,
        turn_index=turn_index,
    )


def run(batch, backend, device, dtype=torch.float32, **kwargs):
    moved = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        for k, v in batch.items()
    }
    if "token_turn" in kwargs and kwargs["token_turn"] is not None:
        kwargs["token_turn"] = kwargs["token_turn"].to(device)
    return ops.hian_advantages(
        moved["turn_rewards"],
        moved["turn_session"],
        moved["session_rewards"],
        moved["session_group"],
        turn_index=moved["turn_index"],
        backend=backend,
        **kwargs,
    ).cpu()


def reference(batch, **kwargs):
    return run(batch, "reference", "cpu", dtype=torch.float64, **kwargs)


OPTION_GRID = [
    dict(scale=scale, turn_scope=scope, turn_weight=tw, session_weight=sw)
    for scale in ("group", "batch", "none")
    for scope in ("group", "group_turn")
    for tw, sw in ((1.0, 1.0), (0.3, 2.5))
]


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_matches_reference_on_random_batches(backend, device, options):
    batch = make_batch([4, 1, 7, 2, 3], [3, 1, 4, 0, 2, 5, 1, 2, 3, 3, 1, 2, 4, 2, 1, 3, 2], seed=7)
    expected = reference(batch, **options)
    got = run(batch, backend, device, **options)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    got64 = run(batch, backend, device, dtype=torch.float64, **options)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected, rtol=1e-10, atol=1e-10)


STD_CLIP_GRID = [
    dict(scale=scale, std="population", clip=clip, turn_scope=scope)
    for scale in ("group", "batch", "none")
    for clip in (None, 0.7)
    for scope in ("group", "group_turn")
] + [dict(scale="group", std="unbiased", clip=0.5)]


@pytest.mark.parametrize("backend,device", [b for b in FAST_BACKENDS if b[0] != "native"])
@pytest.mark.parametrize("options", STD_CLIP_GRID, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_population_std_and_clip_match_reference(backend, device, options):
    batch = make_batch([4, 1, 7, 2, 3], [3, 1, 4, 0, 2, 5, 1, 2, 3, 3, 1, 2, 4, 2, 1, 3, 2], seed=11)
    expected = reference(batch, **options)
    if options["clip"] is not None:
        # The clamp binds on this batch, and a fused value is at most the two clamped horizons.
        unclipped = reference(batch, **{**options, "clip": None})
        assert unclipped.abs().max().item() > 2 * options["clip"] >= expected.abs().max().item()
    torch.testing.assert_close(run(batch, backend, device, **options), expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        run(batch, backend, device, dtype=torch.float64, **options), expected, rtol=1e-10, atol=1e-10
    )


def test_population_std_and_clip_outside_the_native_library():
    batch = make_batch([3, 4], [2] * 7, seed=2)
    if native.available():
        with pytest.raises(ValueError, match="backend='native' implements std='unbiased' without clip"):
            run(batch, "native", "cpu", std="population")
    # auto on the CPU then takes the torch path instead of the library.
    torch.testing.assert_close(
        run(batch, "auto", "cpu", std="population", clip=1.0),
        reference(batch, std="population", clip=1.0).float(),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="clip must be None or a finite number > 0"):
        ops.AdvantageOptions(clip=0.0)
    with pytest.raises(ValueError, match="std must be one of"):
        ops.AdvantageOptions(std="biased")


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_multi_component_rewards_with_weights(backend, device):
    batch = make_batch([3, 5], [2] * 8, components=(3, 2), seed=3)
    kwargs = dict(turn_component_weights=[1.0, -0.5, 2.0], session_component_weights=[10.0, 1.0])
    expected = reference(batch, **kwargs)
    torch.testing.assert_close(run(batch, backend, device, **kwargs), expected.float(), rtol=1e-5, atol=1e-5)
    # Summing per horizon first is the same thing as the weighted multi-component call.
    summed = dict(batch)
    summed["turn_rewards"] = batch["turn_rewards"] @ torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    summed["session_rewards"] = batch["session_rewards"] @ torch.tensor([10.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(reference(summed), expected)


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_token_broadcast(backend, device):
    batch = make_batch([2, 3], [2, 1, 3, 2, 1], seed=5)
    num_turns = batch["turn_session"].numel()
    token_turn = torch.tensor([-1, 0, 0, 0, -1, 1, 2, 2, -1, *range(num_turns), -1])
    per_turn = reference(batch)
    expected = torch.where(token_turn >= 0, per_turn[token_turn.clamp_min(0)], 0.0)
    got = run(batch, backend, device, token_turn=token_turn)
    assert got.shape == token_turn.shape
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    assert (got[token_turn < 0] == 0).all()


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_singleton_and_zero_variance_groups_give_zero(backend, device):
    # Group 0: one session (singleton). Group 1: identical session and turn rewards (zero variance).
    turn_rewards = torch.tensor([0.3, 0.3, 0.1, 0.1, 0.1])
    turn_session = torch.tensor([0, 0, 1, 2, 2])
    session_rewards = torch.tensor([5.0, 0.1, 0.1])
    session_group = torch.tensor([0, 1, 1])
    for scale in ("group", "batch", "none"):
        got = ops.hian_advantages(
            turn_rewards.to(device),
            turn_session.to(device),
            session_rewards.to(device),
            session_group.to(device),
            scale=scale,
            backend=backend,
        ).cpu()
        assert torch.all(got.abs() < 1e-6), (scale, got)


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_horizons_are_normalized_independently(backend, device):
    """The DuCA motivating case: a 1e6 session reward must not drown 1e-2 turn rewards."""
    turn_rewards = torch.tensor([0.01, 0.02, 0.00, 0.03])
    turn_session = torch.tensor([0, 0, 1, 1])
    session_rewards = torch.tensor([1e6, 0.0])
    session_group = torch.tensor([0, 0])
    args = [t.to(device) for t in (turn_rewards, turn_session, session_rewards, session_group)]
    turn_only = ops.hian_advantages(*args, session_weight=0.0, backend=backend).cpu()
    session_only = ops.hian_advantages(*args, turn_weight=0.0, backend=backend).cpu()
    # Turn ranks survive intact: 0.03 > 0.02 > 0.01 > 0.00, at unit scale.
    assert torch.equal(turn_only.argsort(), torch.tensor([2, 0, 1, 3]))
    assert 0.5 < turn_only.abs().max() < 2.0
    torch.testing.assert_close(session_only, torch.tensor([1, 1, -1, -1]) / math.sqrt(2), atol=1e-5, rtol=0)
    # Merged into one reward first (GRPO), the turn differences vanish below float32 resolution.
    merged = ops.grpo_advantages(session_rewards.double() + torch.tensor([0.03, 0.03]), session_group)
    assert merged[0] == -merged[1]


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_nan_omit_leaves_nan_out_of_the_statistics(backend, device):
    batch = make_batch([4, 3], [2] * 7, seed=11)
    batch["turn_rewards"][3] = float("nan")
    batch["session_rewards"][5] = float("nan")
    expected = reference(batch, nan_policy="omit")
    assert torch.isfinite(expected).all()
    got = run(batch, backend, device, nan_policy="omit")
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    clean = dict(batch)
    keep_turns = torch.ones(batch["turn_session"].numel(), dtype=torch.bool)
    keep_turns[3] = False
    # Turn 3's own advantage is its session horizon only: its turn horizon gives 0.
    session_only = reference(batch, nan_policy="omit", turn_weight=0.0)
    torch.testing.assert_close(expected[3], session_only[3])
    with pytest.raises(ValueError, match="turn_rewards has a non-finite value"):
        run(clean, backend, device)


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_empty_inputs(backend, device):
    empty_float = torch.zeros(0, device=device)
    empty_long = torch.zeros(0, dtype=torch.long, device=device)
    got = ops.hian_advantages(empty_float, empty_long, empty_float, empty_long, backend=backend)
    assert got.shape == (0,)
    # Sessions without any agent turn, and token ids that all carry no loss.
    got = ops.hian_advantages(
        empty_float,
        empty_long,
        torch.tensor([1.0, 2.0], device=device),
        torch.tensor([0, 0], device=device),
        token_turn=torch.tensor([-1, -1, -1], device=device),
        backend=backend,
    )
    assert torch.equal(got.cpu(), torch.zeros(3))


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_without_validation_and_given_num_groups(backend, device):
    batch = make_batch([3, 2, 4], [2] * 9, seed=2)
    expected = reference(batch, turn_scope="group_turn")
    got = run(
        batch, backend, device, turn_scope="group_turn", validate=False, num_groups=3, num_turn_positions=2
    )
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    # More groups than used is fine: empty groups have no members.
    got = run(batch, backend, device, validate=False, num_groups=10)
    torch.testing.assert_close(got, reference(batch).float(), rtol=1e-5, atol=1e-6)


@st.composite
def batches(draw):
    group_sizes = draw(st.lists(st.integers(1, 64), min_size=1, max_size=6))
    num_sessions = sum(group_sizes)
    turns = draw(st.lists(st.integers(0, 4), min_size=num_sessions, max_size=num_sessions))
    zero_variance = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    batch = make_batch(group_sizes, turns, seed=seed, session_scale=draw(st.sampled_from([1.0, 1e6])))
    if zero_variance:
        batch["session_rewards"][: group_sizes[0]] = 3.0
    return batch


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=batches(),
    scale=st.sampled_from(["group", "batch", "none"]),
    scope=st.sampled_from(["group", "group_turn"]),
)
def test_property_all_backends_agree(batch, scale, scope):
    expected = reference(batch, scale=scale, turn_scope=scope)
    assert torch.isfinite(expected).all()
    largest = expected.abs().max().item() if expected.numel() else 1.0
    tolerance = 1e-4 * max(1.0, largest)
    for backend, device in FAST_BACKENDS:
        got = run(batch, backend, device, scale=scale, turn_scope=scope)
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=tolerance)


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("nan_policy", ["raise", "omit"])
def test_grpo_advantages_match_reference(backend, device, scale, nan_policy):
    gen = torch.Generator().manual_seed(5)
    rewards = torch.randn(40, 3, generator=gen, dtype=torch.float64) * 10
    group = torch.randint(0, 9, (40,), generator=gen) * 1000  # sparse ids: renumbered
    if nan_policy == "omit":
        rewards[[3, 17], 1] = float("nan")
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    kwargs = dict(scale=scale, nan_policy=nan_policy, component_weights=weights)
    expected = ops.grpo_advantages(rewards, group, backend="reference", **kwargs)
    got = ops.grpo_advantages(rewards.float().to(device), group.to(device), backend=backend, **kwargs).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    got64 = ops.grpo_advantages(rewards.to(device), group.to(device), backend=backend, **kwargs).cpu()
    torch.testing.assert_close(got64, expected, rtol=1e-10, atol=1e-12)


def test_auto_picks_native_on_cpu(monkeypatch):
    calls = []
    real = native.hian_advantages

    def spy(*args, **kwargs):
        calls.append(args[0].device)
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "hian_advantages", spy)
    batch = make_batch([3, 2], [2, 1, 3, 1, 2])
    auto = run(batch, "auto", "cpu")
    assert calls == [torch.device("cpu")]
    torch.testing.assert_close(auto, reference(batch).float(), rtol=1e-5, atol=1e-6)
    run(batch, "torch", "cpu")
    ops.grpo_advantages(torch.randn(5), torch.tensor([0, 0, 1, 1, 1]))
    assert len(calls) == 2, "backend='torch' must not reach the library; GRPO auto must"


def test_native_backend_bf16_rewards_match_the_torch_path():
    batch = make_batch([4, 3], [2, 3, 1, 2, 2, 1, 3])
    torch.testing.assert_close(
        run(batch, "native", "cpu", dtype=torch.bfloat16), run(batch, "torch", "cpu", dtype=torch.bfloat16)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_native_backend_on_cuda_through_the_public_op(options, monkeypatch):
    assert native.has_cuda(), "the native library was built without CUDA on a CUDA machine"
    calls = []
    real = native.hian_advantages
    monkeypatch.setattr(native, "hian_advantages", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = make_batch([5, 1, 8, 3], [2, 0, 3, 1, 4, 2, 2, 1, 3, 1, 1, 2, 3, 2, 1, 4, 2])
    expected = reference(batch, **options)
    got = run(batch, "native", "cuda", dtype=torch.float64, **options)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    run(batch, "auto", "cuda", **options)
    assert len(calls) == 1, "auto on CUDA must stay on the Triton kernels"


_FALLBACK_SCRIPT = """
import torch
from duca_fast import ops
rewards = torch.tensor([0.1, 0.5, 0.2])
args = (rewards, torch.tensor([0, 0, 1]), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
auto = ops.hian_advantages(*args)
ops.grpo_advantages(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 0, 0]))
assert torch.equal(auto, ops.hian_advantages(*args, backend="torch")), auto
try:
    ops.hian_advantages(*args, backend="native")
except RuntimeError as error:
    print("explicit:", error)
else:
    raise SystemExit("backend='native' without the library did not raise")
"""


def test_auto_falls_back_to_torch_with_one_log_line_when_the_library_is_missing(tmp_path):
    missing = tmp_path / "libduca_kernels.so"
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, DUCA_KERNELS_LIB=str(missing), PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT], capture_output=True, text=True, env=env, cwd=root
    )
    assert result.returncode == 0, result.stderr
    log_lines = [line for line in result.stderr.splitlines() if "native kernels not built" in line]
    assert len(log_lines) == 1 and str(missing) in log_lines[0], result.stderr
    assert "explicit: backend='native' needs the native kernels" in result.stdout
    assert str(missing) in result.stdout and "make native" in result.stdout


def test_grpo_advantages_matches_formula():
    rewards = torch.tensor([1.0, 2.0, 4.0, 10.0, 10.0, 7.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    got = ops.grpo_advantages(rewards, group)
    first = torch.tensor([1.0, 2.0, 4.0])
    expected = torch.cat([(first - first.mean()) / (first.std() + 1e-6), torch.zeros(3)])
    torch.testing.assert_close(got, expected)
    centered = ops.grpo_advantages(rewards, group, scale="none")
    torch.testing.assert_close(centered[:3], first - first.mean())
    assert ops.grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


# --- bad input --------------------------------------------------------------------------------------


def good_args():
    return dict(
        turn_rewards=torch.tensor([0.1, 0.2, 0.3]),
        turn_session=torch.tensor([0, 0, 1]),
        session_rewards=torch.tensor([1.0, 0.0]),
        session_group=torch.tensor([0, 0]),
    )


BAD_INPUTS = [
    ("turn_session has 2 rows", dict(turn_session=torch.tensor([0, 0]))),
    ("session_group has 3 rows", dict(session_group=torch.tensor([0, 0, 0]))),
    (r"turn_session\[2\] = 5 must be in \[0, 2\)", dict(turn_session=torch.tensor([0, 0, 5]))),
    (r"turn_session\[0\] = -1", dict(turn_session=torch.tensor([-1, 0, 1]))),
    (r"session_group\[1\] = -3 must be >= 0", dict(session_group=torch.tensor([0, -3]))),
    ("session_group must have an integer dtype", dict(session_group=torch.tensor([0.0, 0.0]))),
    ("turn_session must have an integer dtype", dict(turn_session=torch.tensor([True, False, True]))),
    ("turn_rewards must be 1-D or 2-D", dict(turn_rewards=torch.zeros(3, 1, 1))),
    ("session_rewards must have a floating dtype", dict(session_rewards=torch.tensor([1, 0]))),
    ("session_rewards must be a torch.Tensor", dict(session_rewards=[1.0, 0.0])),
    ("turn_rewards has a non-finite value", dict(turn_rewards=torch.tensor([0.1, float("nan"), 0.3]))),
    ("session_rewards has a non-finite value", dict(session_rewards=torch.tensor([float("inf"), 0.0]))),
    (
        "session_rewards has an infinite value",
        dict(session_rewards=torch.tensor([float("inf"), 0.0]), nan_policy="omit"),
    ),
    (r"token_turn\[1\] = 3 must be in \[-1, 3\)", dict(token_turn=torch.tensor([0, 3]))),
    (r"token_turn\[0\] = -2", dict(token_turn=torch.tensor([-2, 0]))),
    ("turn_scope='group_turn' needs turn_index", dict(turn_scope="group_turn")),
    ("turn_index has 2 rows", dict(turn_scope="group_turn", turn_index=torch.tensor([0, 1]))),
    (r"turn_index\[1\] = -1", dict(turn_scope="group_turn", turn_index=torch.tensor([0, -1, 0]))),
    (r"session_group\[0\] = 0 must be in \[0, 0\)", dict(num_groups=0)),
    ("scale must be one of", dict(scale="std")),
    ("turn_scope must be one of", dict(turn_scope="session")),
    ("nan_policy must be one of", dict(nan_policy="ignore")),
    ("eps must be > 0", dict(eps=0.0)),
    ("turn_weight must be a finite number", dict(turn_weight=float("nan"))),
    (
        "turn_component_weights must have one weight per reward component",
        dict(turn_component_weights=[1.0, 2.0]),
    ),
    ("backend must be one of", dict(backend="cuda")),
    ("backend='triton' needs CUDA tensors", dict(backend="triton")),
    (
        "turn_session is on meta but turn_rewards is on cpu",
        dict(turn_session=torch.zeros(3, dtype=torch.long, device="meta")),
    ),
]


@pytest.mark.parametrize("message,override", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_argument(message, override, monkeypatch):
    if override.get("backend") == "triton":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = good_args()
    kwargs = {k: v for k, v in override.items() if k not in args}
    args.update({k: v for k, v in override.items() if k in args})
    with pytest.raises(ValueError, match=message):
        ops.hian_advantages(**args, **kwargs)
