import dataclasses
import math

import pytest
import torch

from duca_fast.env import LLMCustomerConfig, LLMCustomerFactory, SalesEnv, generate_scenarios
from duca_fast.rollout import (
    DRIVERS,
    Completion,
    HFEngine,
    IncrementalChat,
    RolloutConfig,
    SamplingConfig,
    SessionSpec,
    make_session_specs,
    rollout,
)
from tests.rollout.envs import EchoCustomer

CONFIG = RolloutConfig(sampling=SamplingConfig(max_new_tokens=6, temperature=1.0), max_turns=5)
ROUNDS = dataclasses.replace(CONFIG, driver="rounds")


@pytest.fixture
def spied(engine, monkeypatch):
    """The engine, recording every prompt it is asked to continue (in a batch or one by one)."""
    prompts = []
    real_generate, real_submit = engine.generate, engine.submit

    def generate(batch, *args, **kwargs):
        prompts.extend(list(p) for p in batch)
        return real_generate(batch, *args, **kwargs)

    def submit(key, prompt, *args, **kwargs):
        prompts.append(list(prompt))
        return real_submit(key, prompt, *args, **kwargs)

    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(engine, "submit", submit)
    return engine, prompts


@pytest.mark.parametrize("driver", DRIVERS)
def test_multi_turn_spans_masks_and_packing(spied, tokenizer, driver):
    engine, prompts = spied
    specs = make_session_specs([{"turns": 3}, {"turns": 2}], group_size=2, seed=10)
    batch = rollout(engine, EchoCustomer, specs, dataclasses.replace(CONFIG, driver=driver))

    assert batch.turn_reward_names == ("length",) and batch.session_reward_names == ("conversion",)
    assert batch.session_group.tolist() == [0, 0, 1, 1]
    assert batch.turn_session.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert batch.turn_index.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 1]
    assert batch.turn_rewards.shape == (10, 1) and batch.session_rewards.shape == (4, 1)
    assert batch.session_rewards[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]  # seeds 10, 11, 12, 13
    assert not batch.failed.any() and not batch.truncated.any()
    assert [o.reason for o in batch.outcomes] == ["done"] * 4
    n = batch.input_ids.numel()
    for name in ("position_ids", "seq_ids", "token_turn", "behavior_logprobs"):
        assert getattr(batch, name).shape == (n,)
    assert batch.num_generated_tokens == int(batch.loss_mask.sum()) == 10 * 6

    for session in range(4):
        lo, hi = batch.cu_seqlens[session].item(), batch.cu_seqlens[session + 1].item()
        assert (batch.seq_ids[lo:hi] == session).all()
        assert batch.position_ids[lo:hi].tolist() == list(range(hi - lo))
        ids = batch.input_ids[lo:hi].tolist()
        first = tokenizer.apply_chat_template(
            batch.transcripts[session][:2], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert ids[: len(first)] == first
        assert "Tell me more." in tokenizer.decode(ids)

    assert len(prompts) == 10
    for turn, (start, end) in enumerate(batch.turn_spans.tolist()):
        session_start = batch.cu_seqlens[batch.turn_session[turn]].item()
        assert batch.input_ids[session_start:start].tolist() in prompts  # exactly what the agent saw
        assert (batch.token_turn[start:end] == turn).all()
        assert (batch.behavior_logprobs[start:end] < 0).all()
        text = tokenizer.decode(batch.input_ids[start:end].tolist(), skip_special_tokens=True)
        session = batch.turn_session[turn].item()
        agent_messages = [m["content"] for m in batch.transcripts[session] if m["role"] == "assistant"]
        assert agent_messages[batch.turn_index[turn].item()] == text
        assert batch.turn_rewards[turn, 0].item() == len(text)
    no_loss = batch.token_turn == -1
    assert (batch.behavior_logprobs[no_loss] == 0).all()
    assert int(no_loss.sum()) + 60 == n


def test_rollouts_are_reproducible(engine):
    specs = make_session_specs([{"turns": 2}], group_size=2)
    first, second = rollout(engine, EchoCustomer, specs, CONFIG), rollout(engine, EchoCustomer, specs, CONFIG)
    assert torch.equal(first.input_ids, second.input_ids)
    assert torch.equal(first.behavior_logprobs, second.behavior_logprobs)
    lo, hi = first.turn_spans[0].tolist()
    lo2, hi2 = first.turn_spans[2].tolist()
    assert first.input_ids[lo:hi].tolist() != first.input_ids[lo2:hi2].tolist()  # group members differ


def test_rollout_statistics_per_step(spied):
    engine, prompts = spied
    # Sessions of 1, 2 and 3 turns: 3 rounds with 3, 2 and 1 sessions in flight. A long system prompt,
    # so that whole KV-cache blocks (128 tokens on the CPU backend) can be reused across turns.
    block = engine._llm.llm_engine.vllm_config.cache_config.block_size
    system = " ".join(["You sell tea from many gardens and answer briefly."] * (block // 6))
    specs = [SessionSpec({"turns": n, "system": system}, 0, n) for n in (1, 2, 3)]
    batch = rollout(engine, EchoCustomer, specs, ROUNDS)
    stats = batch.stats
    assert stats["rollout/rounds"] == 3 and stats["rollout/sessions_in_flight"] == pytest.approx(2.0)
    assert stats["rollout/generate_s"] == batch.generate_seconds > 0
    assert stats["rollout/customer_wait_s"] == batch.env_seconds >= 0
    share = stats["rollout/engine_idle_share"]
    assert share == pytest.approx(batch.env_seconds / (batch.env_seconds + batch.generate_seconds))
    # vLLM reports prefix-cache hits: later turns re-send the whole conversation, most of it cached.
    assert 0.0 < stats["rollout/prefix_cache_hit_rate"] < 1.0
    assert len(prompts) == 6


def test_no_prefix_cache_rate_without_the_engines_report(tiny_model_dir):
    hf = HFEngine(tiny_model_dir, max_model_len=256)
    specs = make_session_specs([{"turns": 2}], group_size=2)
    stats = rollout(hf, EchoCustomer, specs, RolloutConfig(sampling=SamplingConfig(max_new_tokens=4))).stats
    assert "rollout/prefix_cache_hit_rate" not in stats and stats["rollout/rounds"] == 2


def test_per_request_seeds_can_be_switched_off(spied, monkeypatch):
    """With per_request_seeds=False the engine gets no seeds (it samples the batch with its own seed);
    with the default, one distinct seed per request, the same for a session whatever its batch."""
    engine, _ = spied
    seen = []
    real = engine.generate

    def generate(prompts, sampling, seeds=None, **kwargs):
        seen.append(seeds)
        return real(prompts, sampling, seeds, **kwargs)

    monkeypatch.setattr(engine, "generate", generate)
    specs = make_session_specs([{"turns": 2}], group_size=3)
    rollout(engine, EchoCustomer, specs, ROUNDS)
    assert all(seeds is not None and len(set(seeds)) == len(seeds) for seeds in seen)
    alone = list(seen)
    seen.clear()
    rollout(engine, EchoCustomer, specs[1:2], ROUNDS)
    assert [seeds[0] for seeds in seen] == [seeds[1] for seeds in alone]  # session 1, batched or alone
    seen.clear()
    batch = rollout(engine, EchoCustomer, specs, dataclasses.replace(ROUNDS, per_request_seeds=False))
    assert seen and all(seeds is None for seeds in seen) and not batch.failed.any()


@pytest.mark.parametrize("driver", DRIVERS)
def test_failing_session_is_recorded_without_losing_the_others(engine, driver):
    specs = [SessionSpec({"turns": 3}, group=0, seed=s) for s in (0, 1, 2)]
    config = dataclasses.replace(CONFIG, driver=driver)
    batch = rollout(engine, lambda: EchoCustomer(fail_seed=1, fail_on_turn=2), specs, config)
    assert batch.failed.tolist() == [False, True, False]
    assert "customer crashed for seed 1 on turn 2" in batch.errors[1]
    assert batch.outcomes[1].reason.startswith("error: RuntimeError")
    assert batch.cu_seqlens[1] == batch.cu_seqlens[2]  # no tokens from the failed session
    assert math.isnan(batch.session_rewards[1, 0].item())
    assert batch.turn_session.tolist() == [0, 0, 0, 2, 2, 2]
    assert batch.token_turn.max().item() == 5

    assert batch.failure_reasons == [None, "env_error", None] and batch.failure_counts == {"env_error": 1}
    assert batch.truncation_counts == {} and not batch.all_failed

    reset_fails = rollout(engine, lambda: EchoCustomer(fail_seed=2, fail_on_turn=0), specs, config)
    assert reset_fails.failed.tolist() == [False, False, True]
    assert "reset failed for seed 2" in reset_fails.errors[2]
    assert reset_fails.failure_counts == {"env_error": 1}


def test_empty_agent_turn_fails_the_turn_not_the_session(engine, tokenizer, monkeypatch):
    """A turn that decodes to nothing (the agent ends its turn at once) ends its session, keeps earlier turns.

    Injected on the real engine's output: session 0 stays silent on its first turn, session 1 on its
    second; session 2 talks normally. The environment (which rejects empty messages, like the sales
    environment) must never see the empty text.
    """
    silent = {(0, 0), (1, 1)}  # (session seed, turn)
    real, calls = engine.generate, []

    def generate(prompts, sampling, seeds, max_new_tokens):
        completions = real(prompts, sampling, seeds, max_new_tokens=max_new_tokens)
        turn = len(calls)
        calls.append(len(prompts))
        live_seeds = [s for s in (0, 1, 2) if (s, turn) not in {(0, 1), (0, 2), (1, 2)}]
        return [
            Completion((tokenizer.eos_token_id,), (-0.5,), "stop") if (seed, turn) in silent else completion
            for seed, completion in zip(live_seeds, completions, strict=True)
        ]

    monkeypatch.setattr(engine, "generate", generate)
    specs = [SessionSpec({"turns": 3}, group=0, seed=s) for s in (0, 1, 2)]
    batch = rollout(engine, EchoCustomer, specs, ROUNDS)

    assert calls == [3, 2, 1]
    assert batch.failed.tolist() == [True, False, False] and batch.truncated.tolist() == [False, True, False]
    assert batch.failure_counts == {"empty_turn": 1} and batch.truncation_counts == {"empty_turn": 1}
    assert "first turn decoded to empty text" in batch.errors[0]
    assert batch.outcomes[1].reason == "empty_turn" and batch.outcomes[1].num_turns == 1
    assert batch.outcomes[2].reason == "done"
    # session 1 keeps its good first turn with its reward; the silent turn is in the sequence, without loss
    assert batch.turn_session.tolist() == [1, 2, 2, 2] and batch.turn_index.tolist() == [0, 0, 1, 2]
    assert batch.turn_rewards[0, 0].item() > 0
    lo, hi = batch.cu_seqlens[1].item(), batch.cu_seqlens[2].item()
    session_turns = batch.token_turn[lo:hi]
    assert (session_turns[session_turns >= 0] == 0).all() and int((session_turns == 0).sum()) == 6
    ids = batch.input_ids[lo:hi].tolist()
    silent_at = lo + max(i for i, token in enumerate(ids) if token == tokenizer.eos_token_id)
    assert silent_at > batch.turn_spans[0, 1].item() and batch.token_turn[silent_at].item() == -1
    assert batch.behavior_logprobs[silent_at].item() == 0.0
    assert batch.transcripts[1][-1] == {"role": "assistant", "content": ""}
    assert math.isnan(batch.session_rewards[1, 0].item()) and batch.session_rewards[2, 0].item() == 1.0
    assert int(batch.loss_mask.sum()) == 4 * 6
    assert "1/3 sessions failed (empty_turn 1); 1 truncated (empty_turn 1)" in batch.failure_summary()


def test_dead_customer_endpoint_fails_every_session_with_the_reason(engine):
    import socket

    with socket.socket() as sock:  # a real closed port on the loopback interface
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    factory = LLMCustomerFactory(LLMCustomerConfig(base_url=url, model="customer", backoff_s=0.01))
    specs = make_session_specs(generate_scenarios(2, seed=3), group_size=2)
    batch = rollout(engine, lambda: SalesEnv(factory, max_turns=3), specs, CONFIG)
    assert batch.all_failed and batch.failure_counts == {"customer_error": 4}
    assert batch.input_ids.numel() == 0 and batch.turn_spans.shape == (0, 2)
    summary = batch.failure_summary()
    assert summary.startswith("4/4 sessions failed (customer_error 4); 0 truncated; customer_error: ")
    assert "could not connect" in summary and url in summary
    assert factory._client is None  # the client the sessions shared was closed at the end of the rollout


def test_one_event_loop_per_rollout_and_shared_clients_closed_in_it(engine):
    """Every round's customer replies run in one loop; a shared factory's aclose runs once, in that loop."""
    import asyncio
    import types

    loops, closed = [], []

    class Factory:
        async def aclose(self):
            closed.append(asyncio.get_running_loop())

    shared = types.SimpleNamespace(factory=Factory())

    class Env(EchoCustomer):
        customer = shared

        async def astep(self, agent_message):
            loops.append(asyncio.get_running_loop())
            return await super().astep(agent_message)

    specs = [SessionSpec({"turns": 3}, group=0, seed=s) for s in (0, 1)]
    batch = rollout(engine, Env, specs, CONFIG)
    assert not batch.failed.any() and len(loops) == 6
    assert len({id(loop) for loop in loops}) == 1
    assert closed == [loops[0]] and loops[0].is_closed()


def test_max_turns_cuts_sessions(engine):
    specs = make_session_specs([{"turns": 10}, {"turns": 1}], group_size=1)
    batch = rollout(engine, EchoCustomer, specs, RolloutConfig(sampling=CONFIG.sampling, max_turns=2))
    assert batch.truncated.tolist() == [True, False]
    assert [o.reason for o in batch.outcomes] == ["max_turns", "done"]
    assert batch.truncation_counts == {"max_turns": 1} and batch.failure_counts == {}
    assert batch.turn_session.tolist() == [0, 0, 1]
    assert math.isnan(batch.session_rewards[0, 0].item()) and batch.session_rewards[1, 0].item() == 0.0


def test_context_budget_ends_sessions_and_too_long_prompts_fail(engine):
    specs = [
        SessionSpec({"turns": 10}, group=0, seed=0),
        SessionSpec({"turns": 10, "system": "tea " * 200}, group=0, seed=1),
    ]
    config = RolloutConfig(sampling=CONFIG.sampling, max_turns=10, max_context_tokens=80)
    batch = rollout(engine, EchoCustomer, specs, config)
    assert batch.outcomes[0].reason == "context_budget" and batch.truncated[0]
    assert batch.cu_seqlens[1].item() <= 80
    assert batch.failed.tolist() == [False, True]
    assert "prompt too long" in batch.errors[1]
    assert batch.failure_counts == {"prompt_too_long": 1} and batch.truncation_counts == {"context_budget": 1}


def test_engine_context_too_small_for_every_prompt_is_reported(tiny_model_dir):
    short = HFEngine(tiny_model_dir, max_model_len=24)
    specs = make_session_specs([{"turns": 2}], group_size=3)
    batch = rollout(short, EchoCustomer, specs, CONFIG)
    assert batch.all_failed and batch.failure_counts == {"prompt_too_long": 3}
    assert batch.num_generated_tokens == 0 and batch.input_ids.numel() == 0
    summary = batch.failure_summary()
    assert summary.startswith("3/3 sessions failed (prompt_too_long 3); 0 truncated; prompt_too_long: ")
    assert "within the 24-token budget (engine max_model_len=24, max_context_tokens=None)" in summary


def test_agent_speaking_first(engine):
    batch = rollout(engine, EchoCustomer, [SessionSpec({"turns": 1, "agent_first": True}, 0, 0)], CONFIG)
    assert [m["role"] for m in batch.transcripts[0]] == ["system", "assistant"]
    assert batch.turn_spans.shape == (1, 2)


def test_incremental_chat_matches_the_full_template_for_whole_messages(tokenizer):
    chat = IncrementalChat(tokenizer)
    ids = chat.append("system", "You sell tea.") + chat.append("user", "Hi there")
    ids += chat.generation_prompt()
    full = tokenizer.apply_chat_template(
        chat.messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == full


def test_driver_runs_on_the_hf_backend(tiny_model_dir):
    hf = HFEngine(tiny_model_dir, max_model_len=256)
    specs = make_session_specs([{"turns": 2}], group_size=2)
    batch = rollout(hf, EchoCustomer, specs, RolloutConfig(sampling=SamplingConfig(max_new_tokens=4)))
    assert batch.turn_session.tolist() == [0, 0, 1, 1]
    assert int(batch.loss_mask.sum()) == 16
    assert (batch.behavior_logprobs[batch.loss_mask] < 0).all()


def teacher_forced_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from one forward of the trainer-side copy (float64 softmax)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_behavior_logprobs_are_the_engines_logprobs_of_their_own_tokens(engine, trainer_model):
    """Every agent token's behavior log-prob equals the model's log-prob of that very token, recomputed
    by a teacher-forced forward of the same weights: a shift or rotation within a turn cannot pass."""
    specs = make_session_specs([{"turns": 3}, {"turns": 2}], group_size=2, seed=21)
    config = RolloutConfig(sampling=SamplingConfig(max_new_tokens=8, temperature=1.0), max_turns=3)
    batch = rollout(engine, EchoCustomer, specs, config)
    # vLLM's CPU float32 kernels vs transformers' float32 forward of the same weights: 1.0e-6 apart here
    # (2026-12-04); a rotation by one position moved them by 0.53.
    tolerance = 1e-4
    worst, worst_shifted, turns_checked = 0.0, 0.0, 0
    for turn, (start, end) in enumerate(batch.turn_spans.tolist()):
        session = batch.turn_session[turn].item()
        lo = batch.cu_seqlens[session].item()
        session_ids = batch.input_ids[lo:end].tolist()
        recomputed = teacher_forced_logprobs(trainer_model, session_ids)[start - lo - 1 :]
        behavior = batch.behavior_logprobs[start:end].double()
        assert recomputed.shape == behavior.shape
        worst = max(worst, (behavior - recomputed).abs().max().item())
        if end - start > 1:
            worst_shifted = max(worst_shifted, (behavior.roll(1) - recomputed).abs().max().item())
        turns_checked += 1
    assert turns_checked == 10
    assert worst < tolerance, f"behavior log-probs differ from the recomputed ones by up to {worst:.3g}"
    # The check has power: the same log-probs rotated by one position within their turn would fail it.
    assert worst_shifted > 10 * tolerance, worst_shifted


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_template_that_rewrites_history_fails_only_its_session(engine, monkeypatch, driver):
    """Before: the ValueError of a non-append-only template escaped the rollout and lost every session."""
    real_render = IncrementalChat._render

    def render(self, messages, add_generation_prompt=False):
        text = real_render(self, messages, add_generation_prompt)
        users = sum(message["role"] == "user" for message in messages)
        if "REWRITE" in messages[0]["content"] and users >= 2:
            text = text.replace("REWRITE", "rewritten", 1)  # the second customer message edits the first
        return text

    monkeypatch.setattr(IncrementalChat, "_render", render)
    specs = [
        SessionSpec({"turns": 3}, group=0, seed=0),
        SessionSpec({"turns": 3, "system": "REWRITE: you sell tea."}, group=0, seed=1),
        SessionSpec({"turns": 3}, group=0, seed=2),
    ]
    batch = rollout(engine, EchoCustomer, specs, dataclasses.replace(CONFIG, driver=driver))
    assert batch.failed.tolist() == [False, True, False]
    assert batch.failure_reasons == [None, "template_error", None]
    assert "not append-only" in batch.errors[1]
    assert batch.turn_session.tolist() == [0, 0, 0, 2, 2, 2]


def test_concat_batches_is_one_rollout_of_both_spec_lists(engine):
    """A pilot rollout and its follow-up, concatenated, equal one rollout of both spec lists (per-request
    seeds: a session samples the same tokens in either), indices offset; statistics added up."""
    from duca_fast.rollout import concat_batches

    first_specs = [SessionSpec({"turns": 2}, 0, 0), SessionSpec({"turns": 3}, 1, 1)]
    second_specs = [SessionSpec({"turns": 1}, 0, 2), SessionSpec({"turns": 2}, 1, 3)]
    first = rollout(engine, lambda: EchoCustomer(fail_seed=1, fail_on_turn=1), first_specs, CONFIG)
    second = rollout(engine, EchoCustomer, second_specs, CONFIG)
    both = concat_batches(first, second)
    whole = rollout(
        engine, lambda: EchoCustomer(fail_seed=1, fail_on_turn=1), first_specs + second_specs, CONFIG
    )
    names = ("input_ids", "position_ids", "seq_ids", "cu_seqlens", "token_turn", "turn_session", "turn_index")
    for name in (*names, "turn_spans", "session_group", "failed", "truncated", "turn_rewards"):
        assert torch.equal(getattr(both, name), getattr(whole, name)), name
    assert torch.equal(both.session_rewards.nan_to_num(-1), whole.session_rewards.nan_to_num(-1))
    assert both.transcripts == whole.transcripts and both.failure_counts == {"env_error": 1}
    assert both.num_generated_tokens == first.num_generated_tokens + second.num_generated_tokens
    assert both.stats["rollout/rounds"] == first.stats["rollout/rounds"] + second.stats["rollout/rounds"]
    assert (both.behavior_logprobs - whole.behavior_logprobs).abs().max() < 1e-5
    engine.weight_version += 1
    try:
        with pytest.raises(ValueError, match="weight versions differ"):
            concat_batches(first, rollout(engine, EchoCustomer, second_specs, CONFIG))
    finally:
        engine.weight_version -= 1
