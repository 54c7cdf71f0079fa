"""The async (per-session) driver against the round driver, and the engines' streaming interface."""

import asyncio
import dataclasses
import time
from typing import ClassVar

import pytest
import torch

from duca_fast.env import SalesEnv, generate_scenarios
from duca_fast.rollout import (
    HFEngine,
    RolloutConfig,
    SamplingConfig,
    SessionSpec,
    make_session_specs,
    rollout,
)
from tests.rollout.envs import EchoCustomer

CONFIG = RolloutConfig(
    sampling=SamplingConfig(max_new_tokens=8, temperature=1.0), max_turns=4, driver="async"
)


def assert_same_rollouts(a, b, logprob_tolerance: float = 0.0) -> None:
    assert a.transcripts == b.transcripts
    names = ("input_ids", "token_turn", "turn_spans", "turn_session", "cu_seqlens", "failed", "truncated")
    for name in names:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.turn_rewards, b.turn_rewards)
    assert torch.equal(a.session_rewards.nan_to_num(-9), b.session_rewards.nan_to_num(-9))
    gap = (a.behavior_logprobs - b.behavior_logprobs).abs().max().item()
    assert gap <= logprob_tolerance, gap


def test_async_and_round_drivers_sample_the_same_sales_sessions_on_vllm(engine):
    """Scripted sales customers (sessions of different lengths, so the async driver's batches differ from the
    rounds'): same per-request seeds, same tokens, transcripts, rewards; log-probs equal up to the CPU
    kernels' batch-shape dependence (measured 0.0 here, 2026-12-04)."""
    specs = make_session_specs(generate_scenarios(3, seed=5), group_size=3, seed=40)
    config = dataclasses.replace(CONFIG, max_turns=4)

    def env():
        return SalesEnv(max_turns=4)

    rounds = rollout(engine, env, specs, dataclasses.replace(config, driver="rounds"))
    asynchronous = rollout(engine, env, specs, config)
    assert asynchronous.turn_session.numel() > len(specs)  # multi-turn sessions
    assert_same_rollouts(asynchronous, rounds, logprob_tolerance=1e-5)
    assert "rollout/engine_steps" in asynchronous.stats and "rollout/rounds" in rounds.stats
    assert asynchronous.stats["rollout/preemptions"] == 0.0


def test_async_and_round_drivers_agree_exactly_on_the_hf_engine(tiny_model_dir):
    """The transformers engine samples one request at a time under its seed: equal to the last bit."""
    hf = HFEngine(tiny_model_dir, max_model_len=256)
    specs = make_session_specs([{"turns": 3}, {"turns": 1}], group_size=2, seed=3)
    config = dataclasses.replace(CONFIG, sampling=SamplingConfig(max_new_tokens=4))
    rounds = rollout(hf, EchoCustomer, specs, dataclasses.replace(config, driver="rounds"))
    assert_same_rollouts(rollout(hf, EchoCustomer, specs, config), rounds)


class SlowCustomer(EchoCustomer):
    """An echo customer that takes ``scenario["delay"]`` seconds to answer (an LLM customer's latency),
    logging when each answer starts and ends, and how many sessions were with their customer at once."""

    log: ClassVar[list] = []
    busy = 0

    def reset(self, scenario, seed):
        self.delay = scenario.get("delay", 0.0)
        return super().reset(scenario, seed)

    async def astep(self, agent_message):
        cls = SlowCustomer
        cls.busy += 1
        cls.log.append(("customer", self.seed, time.perf_counter(), cls.busy))
        try:
            await asyncio.sleep(self.delay)
            return self.step(agent_message)
        finally:
            cls.busy -= 1
            cls.log.append(("answered", self.seed, time.perf_counter(), cls.busy))


@pytest.fixture
def slow(engine, monkeypatch):
    """The engine with every poll logged next to the customers' events."""
    SlowCustomer.log, SlowCustomer.busy = [], 0
    real = engine.poll

    def poll():
        SlowCustomer.log.append(("poll", None, time.perf_counter(), engine.num_pending))
        return real()

    monkeypatch.setattr(engine, "poll", poll)
    return engine


def test_the_engine_decodes_while_a_customer_answers(slow):
    """Session 0's customer takes 0.3 s per answer; session 1's answers at once. Under the async driver the
    engine keeps decoding session 1's turns while session 0 waits; under rounds it cannot."""
    specs = [SessionSpec({"turns": 2, "delay": 0.3}, 0, 0), SessionSpec({"turns": 4, "delay": 0.0}, 0, 1)]

    def polls_during_slow_answers(driver: str) -> int:
        SlowCustomer.log.clear()
        batch = rollout(slow, SlowCustomer, specs, dataclasses.replace(CONFIG, driver=driver))
        assert not batch.failed.any()
        waiting, count = False, 0
        for kind, seed, _, _ in SlowCustomer.log:
            if seed == 0 and kind in ("customer", "answered"):
                waiting = kind == "customer"
            count += kind == "poll" and waiting
        return count

    assert polls_during_slow_answers("async") > 0
    assert polls_during_slow_answers("rounds") == 0  # rounds do not call poll at all


def test_max_sessions_in_flight_bounds_the_sessions_under_way(slow):
    specs = [SessionSpec({"turns": 2, "delay": 0.02}, 0, s) for s in range(5)]
    config = dataclasses.replace(CONFIG, max_sessions_in_flight=2)
    batch = rollout(slow, SlowCustomer, specs, config)
    assert not batch.failed.any() and batch.turn_session.numel() == 10
    most = max(busy for kind, _, _, busy in SlowCustomer.log if kind == "customer")
    assert most == 2  # two customers answered at once, never three
    assert batch.stats["rollout/sessions_in_flight"] <= 2.0
    SlowCustomer.log.clear()
    rollout(slow, SlowCustomer, specs, CONFIG)
    assert max(busy for kind, _, _, busy in SlowCustomer.log if kind == "customer") == 5


def test_an_engine_failure_mid_rollout_raises_and_still_closes_the_clients(engine, monkeypatch):
    closed = []

    class Env(EchoCustomer):
        async def aclose(self):
            closed.append(self.seed)

    real, polls = engine.poll, []

    def poll():
        polls.append(1)
        if len(polls) == 3:
            raise RuntimeError("VLLMEngine failed with 2 requests pending (simulated)")
        return real()

    monkeypatch.setattr(engine, "poll", poll)
    specs = [SessionSpec({"turns": 3}, 0, s) for s in (0, 1)]
    with pytest.raises(RuntimeError, match="simulated"):
        rollout(engine, Env, specs, CONFIG)
    assert sorted(closed) == [0, 1]
    assert engine.num_pending == 0  # what was in flight was aborted
    monkeypatch.setattr(engine, "poll", real)
    assert not rollout(engine, EchoCustomer, specs, CONFIG).failed.any()  # the engine still serves


def test_streaming_interface_matches_generate_and_guards_its_state(engine):
    sampling = SamplingConfig(max_new_tokens=5)
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    expected = engine.generate(prompts, sampling, seeds=[11, 12, 13])
    for key, (prompt, seed) in enumerate(zip(prompts, (11, 12, 13), strict=True)):
        engine.submit(("request", key), prompt, sampling, seed=seed)
    with pytest.raises(ValueError, match="already pending"):
        engine.submit(("request", 0), prompts[0], sampling)
    with pytest.raises(RuntimeError, match="3 requests from submit\\(\\) are still pending"):
        engine.generate(prompts, sampling)
    finished = {}
    while engine.num_pending:
        finished.update(engine.poll())
    for key, completion in enumerate(expected):
        got = finished[("request", key)]
        assert got.token_ids == completion.token_ids and got.finish_reason == completion.finish_reason
        assert max(abs(a - b) for a, b in zip(got.logprobs, completion.logprobs, strict=True)) < 1e-5

    engine.submit("dropped", [1, 2, 3], sampling, seed=1)
    engine.submit("kept", [1, 2, 3], sampling, seed=2, max_new_tokens=2)
    engine.abort(["dropped", "never submitted"])
    assert engine.num_pending == 1
    done = []
    while engine.num_pending:
        done += engine.poll()
    assert [key for key, _ in done] == ["kept"] and len(done[0][1].token_ids) == 2
    with pytest.raises(ValueError, match="request late has an empty prompt"):
        engine.submit("late", [], sampling)
    assert engine.poll() == [] and isinstance(engine.preemptions(), int)


def test_streaming_on_an_engine_without_a_step_api_batches_each_poll(tiny_model_dir):
    hf = HFEngine(tiny_model_dir, max_model_len=64)
    sampling = SamplingConfig(max_new_tokens=3)
    expected = hf.generate([[1, 2], [3, 4]], sampling, seeds=[5, 6])
    hf.submit("a", [1, 2], sampling, seed=5)
    hf.submit("b", [3, 4], sampling, seed=6)
    assert dict(hf.poll()) == {"a": expected[0], "b": expected[1]} and hf.num_pending == 0
    assert hf.preemptions() is None


def test_driver_options_are_validated():
    with pytest.raises(ValueError, match="driver must be one of"):
        RolloutConfig(driver="threads")
    with pytest.raises(ValueError, match="max_sessions_in_flight must be >= 1 or None"):
        RolloutConfig(max_sessions_in_flight=0)


def test_over_sampling_keeps_the_first_complete_groups_and_aborts_the_rest(slow):
    """Group 0's customer is slow (0.4 s per answer), groups 1 and 2 answer at once: asked for 2 complete
    groups out of 3, the rollout keeps groups 1 and 2 whole and aborts group 0's requests in flight."""
    specs = [
        SessionSpec({"turns": 3, "delay": 0.4 if group == 0 else 0.0}, group, 10 * group + member)
        for group in range(3)
        for member in range(2)
    ]
    full = rollout(slow, SlowCustomer, specs, CONFIG)
    SlowCustomer.log.clear()
    batch = rollout(slow, SlowCustomer, specs, dataclasses.replace(CONFIG, complete_groups=2))
    assert batch.session_group.tolist() == [1, 1, 2, 2]  # global group ids kept
    assert batch.stats["rollout/aborted_sessions"] == 2.0
    assert slow.num_pending == 0  # group 0's requests were aborted in the engine
    answered = [seed for kind, seed, _, _ in SlowCustomer.log if kind == "answered" and seed in (0, 1)]
    assert len(answered) < 6  # group 0's sessions were stopped before their last answers
    assert [m["content"] for m in batch.transcripts[0]] == [m["content"] for m in full.transcripts[2]]
    kept = full.cu_seqlens[2].item()  # the kept sessions are exactly the full rollout's sessions 2..5
    assert torch.equal(batch.input_ids, full.input_ids[kept:])
    assert torch.equal(batch.seq_ids, full.seq_ids[kept:] - 2)  # renumbered from 0
    assert batch.turn_session.tolist() == (full.turn_session[full.turn_session >= 2] - 2).tolist()
    assert not batch.failed.any() and len(batch.outcomes) == 4
    # Every group complete in time: nothing is left out.
    everything = rollout(slow, SlowCustomer, specs, dataclasses.replace(CONFIG, complete_groups=3))
    assert torch.equal(everything.input_ids, full.input_ids)
    assert everything.stats["rollout/aborted_sessions"] == 0.0


def test_over_sampling_options_are_checked():
    with pytest.raises(ValueError, match="complete_groups \\(over-sampling\\) needs driver='async'"):
        RolloutConfig(driver="rounds", complete_groups=1)
    with pytest.raises(ValueError, match="complete_groups must be >= 1"):
        RolloutConfig(driver="async", complete_groups=0)
    with pytest.raises(ValueError, match="complete_groups=3 but only 1 groups were given"):
        rollout(
            None,
            EchoCustomer,
            [SessionSpec({"turns": 1}, 0, 0)],
            dataclasses.replace(CONFIG, complete_groups=3),
        )
