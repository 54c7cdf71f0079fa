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


def carry_specs(first_group: int = 0) -> list[SessionSpec]:
    """Group ``first_group`` plays 6 quick turns, the two after it 2 turns each: asked for 2 complete groups,
    the rollout stops while the long group is still under way."""
    return [
        SessionSpec({"turns": 6 if group == first_group else 2}, group, 10 * group + member)
        for group in range(first_group, first_group + 3)
        for member in range(2)
    ]


def ends_after_a_customer_message(tokenizer, record) -> bool:
    """The session's tokens stop right after the customer's last message (no half-opened agent turn)."""
    messages = record["messages"]
    assert messages[-1]["role"] == "user"
    from duca_fast.rollout.driver import IncrementalChat

    tail = IncrementalChat.restore(tokenizer, messages[:-1]).append("user", messages[-1]["content"])
    return record["ids"][-len(tail) :] == tail


def test_carry_over_suspends_the_unfinished_group_and_the_next_rollout_finishes_it(engine, tokenizer):
    """complete_groups=2 with carry_over: groups 1 and 2 train, group 0 stops between two turns (a turn in
    generation is aborted and taken back) and comes back in the next rollout, where it goes on from where it
    stopped under the next weight version; its earlier tokens and sampler log-probs are kept as they were."""
    over = dataclasses.replace(CONFIG, max_turns=6, complete_groups=2, carry_over=True, weight_version=4)
    first = rollout(engine, EchoCustomer, carry_specs(), over)
    assert first.session_group.tolist() == [1, 1, 2, 2]
    assert first.stats["rollout/carried_sessions"] == 2.0 and first.stats["rollout/aborted_sessions"] == 0.0
    assert first.stats["rollout/resumed_sessions"] == 0.0 and first.stats["rollout/max_staleness"] == 0.0
    assert first.turn_weight_version.tolist() == [4] * first.turn_session.numel()
    assert engine.num_pending == 0
    carried = first.carried
    assert len(carried) == 2 and carried.groups == [0]
    records = carried.records()
    for record in records:
        assert record["live"] and 1 <= len(record["turn_spans"]) < 6
        assert ends_after_a_customer_message(tokenizer, record)

    carried.regrouped({0: 7})
    resume = dataclasses.replace(CONFIG, max_turns=6, weight_version=5)
    second = rollout(engine, EchoCustomer, [SessionSpec({"turns": 1}, 8, 99)], resume, carried=carried)
    assert second.session_group.tolist() == [7, 7, 8] and not second.failed.any()
    assert second.stats["rollout/resumed_sessions"] == 2.0 and second.stats["rollout/carried_sessions"] == 0.0
    assert second.stats["rollout/max_staleness"] == 1.0 and second.carried is None
    bounds = second.cu_seqlens.tolist()
    for session, record in enumerate(records):
        ids = second.input_ids[bounds[session] : bounds[session + 1]].tolist()
        assert ids[: len(record["ids"])] == record["ids"]  # the carried part, untouched
        logprobs = second.behavior_logprobs[bounds[session] : bounds[session] + len(record["ids"])]
        assert logprobs.tolist() == torch.tensor(record["logprobs"]).tolist()
        turns = second.turn_weight_version[second.turn_session == session].tolist()
        done = len(record["turn_spans"])
        assert turns == [4] * done + [5] * (6 - done)  # finished its 6 turns under the new version
    assert second.stats["rollout/stale_turn_share"] == pytest.approx(
        sum(len(r["turn_spans"]) for r in records) / second.turn_session.numel()
    )


def test_carry_over_aborts_a_group_that_would_be_too_stale(engine):
    """max_staleness bounds how old a carried group's turns may get when resumed (one version later): with 0,
    the left group, which has played a turn, is aborted instead of carried; with 1 it is carried."""
    over = dataclasses.replace(CONFIG, max_turns=6, complete_groups=2, carry_over=True, weight_version=4)
    strict = rollout(engine, EchoCustomer, carry_specs(), dataclasses.replace(over, max_staleness=0))
    assert len(strict.carried) == 0 and engine.num_pending == 0
    assert strict.stats["rollout/aborted_sessions"] == 2.0 and strict.stats["rollout/carried_sessions"] == 0.0
    loose = rollout(engine, EchoCustomer, carry_specs(), dataclasses.replace(over, max_staleness=1))
    assert len(loose.carried) == 2 and loose.stats["rollout/aborted_sessions"] == 0.0


def test_carried_sessions_read_back_from_records_replay_and_go_on_alike(engine, tokenizer):
    """Records (what a checkpoint keeps) -> JSON -> sessions with fresh environments that replay their
    recorded turns: the next rollout is the same as with the live sessions. A customer that answers
    differently on replay fails that session only (reason carry_replay)."""
    import json

    from duca_fast.rollout import CarriedSessions

    over = dataclasses.replace(CONFIG, max_turns=6, complete_groups=2, carry_over=True)
    records = json.loads(json.dumps(rollout(engine, EchoCustomer, carry_specs(), over).carried.records()))
    live = rollout(engine, EchoCustomer, carry_specs(), over).carried  # the same suspension again
    assert live.records() == records
    resume = dataclasses.replace(CONFIG, max_turns=6)
    expected = rollout(engine, EchoCustomer, [], resume, carried=live)
    read_back = CarriedSessions.from_records(records, tokenizer)
    assert_same_rollouts(rollout(engine, EchoCustomer, [], resume, carried=read_back), expected)

    records[1]["messages"][-1]["content"] = "Something the customer never said."
    changed = CarriedSessions.from_records(records, tokenizer)
    mixed = rollout(engine, EchoCustomer, [], resume, carried=changed)
    assert mixed.failed.tolist() == [False, True] and mixed.failure_reasons[1] == "carry_replay"
    assert mixed.input_ids.tolist() == expected.input_ids[: expected.cu_seqlens[1]].tolist()


def test_carry_over_options_and_records_are_checked(tokenizer):
    from duca_fast.rollout import CarriedSessions

    with pytest.raises(ValueError, match="carry_over needs complete_groups"):
        RolloutConfig(driver="async", carry_over=True)
    with pytest.raises(ValueError, match="max_staleness must be >= 0 or None"):
        RolloutConfig(driver="async", complete_groups=1, carry_over=True, max_staleness=-1)
    record = {"scenario": {"turns": 1}, "group": 0, "seed": 0, "ids": [1, 2], "logprobs": [0.0],
              "local_turn": [-1, -1], "turn_spans": [], "turn_rewards": [], "versions": [],
              "session_rewards": None, "outcome": None, "error": None, "failure_reason": None,
              "live": True, "messages": []}  # fmt: skip
    with pytest.raises(ValueError, match="carried session 0: ids, logprobs and local_turn differ"):
        CarriedSessions.from_records([record], tokenizer)
    with pytest.raises(ValueError, match="carried session 0: expected the keys"):
        CarriedSessions.from_records([{"ids": []}], tokenizer)
    carried = CarriedSessions.from_records([{**record, "logprobs": [0.0, 0.0]}], tokenizer)
    with pytest.raises(ValueError, match="share group ids \\[0\\]"):
        rollout(None, EchoCustomer, [SessionSpec({"turns": 1}, 0, 1)], CONFIG, carried=carried)
    with pytest.raises(ValueError, match="resume under driver='async' only"):
        rollout(None, EchoCustomer, [], dataclasses.replace(CONFIG, driver="rounds"), carried=carried)
    with pytest.raises(ValueError, match="no new id for groups \\[0\\]"):
        carried.regrouped({1: 2})
