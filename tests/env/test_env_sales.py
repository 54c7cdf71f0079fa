"""The text sales environment with the scripted customer: contract, determinism, policies, bad input."""

from __future__ import annotations

import asyncio

import pytest

from duca_fast.env import (
    SESSION_REWARD_NAMES,
    TURN_REWARD_NAMES,
    DialogueEnv,
    SalesEnv,
    ScriptedCustomer,
    compute_metrics,
    generate_scenarios,
    read_agent_message,
    step_many,
)
from tests.env.sellers import GoodSeller, pushy_repeater


def run_session(scenario, seed, seller):
    env = SalesEnv()
    observation = env.reset(scenario, seed)
    message = observation.customer_message
    turns = []
    while True:
        result = env.step(seller(message))
        turns.append(result)
        message = result.customer_message
        if result.done:
            return turns


def test_contract_and_keys():
    env = SalesEnv(max_turns=3)
    assert isinstance(env, DialogueEnv)
    scenario = generate_scenarios(1, seed=9)[0]
    observation = env.reset(scenario, seed=0)
    assert scenario.product.name in observation.system_prompt
    assert observation.customer_message
    for persona_need in scenario.persona.needs[1:]:
        assert persona_need not in observation.system_prompt.split("Features:")[0], "needs stay hidden"
    results = [env.step("Hello there, what do you need it for?") for _ in range(3)]
    assert [r.done for r in results][-1]
    for result in results:
        assert tuple(result.turn_rewards) == TURN_REWARD_NAMES
        assert all(-1.0 <= v <= 0.0 for v in result.turn_rewards.values())
    last = results[-1]
    assert tuple(last.session_rewards) == SESSION_REWARD_NAMES
    assert last.outcome.num_turns == len(env.transcript) // 2 == 3


def test_scripted_customer_is_deterministic_under_a_seed():
    scenario = generate_scenarios(5, seed=4)[3]
    transcripts = []
    for seed in (11, 11, 12):
        env = SalesEnv()
        observation = env.reset(scenario, seed)
        seller = GoodSeller(scenario)
        message = observation.customer_message
        while not env.done:
            message = env.step(seller(message)).customer_message
        transcripts.append(env.transcript)
    assert transcripts[0] == transcripts[1]
    assert transcripts[0] != transcripts[2]


def test_customer_replies_are_varied_sentences():
    replies = set()
    for index, scenario in enumerate(generate_scenarios(30, seed=8)):
        for turn in run_session(scenario, index, GoodSeller(scenario)):
            replies.add(turn.customer_message)
    assert len(replies) > 60
    assert all(reply[0].isupper() and reply.rstrip()[-1] in ".?!" for reply in replies)


def test_good_seller_beats_pushy_repeater_on_conversion_and_turn_rewards():
    scenarios = generate_scenarios(200, seed=1)
    summary = {}
    for name in ("good", "pushy"):
        outcomes, turn_totals, num_turns = [], dict.fromkeys(TURN_REWARD_NAMES, 0.0), 0
        for index, scenario in enumerate(scenarios):
            seller = (
                GoodSeller(scenario) if name == "good" else (lambda _message, s=scenario: pushy_repeater(s))
            )
            turns = run_session(scenario, index, seller)
            outcomes.append(turns[-1].outcome)
            num_turns += len(turns)
            for turn in turns:
                for key, value in turn.turn_rewards.items():
                    turn_totals[key] += value
        summary[name] = (compute_metrics(outcomes), sum(turn_totals.values()) / num_turns)
    good_metrics, good_turn_reward = summary["good"]
    pushy_metrics, pushy_turn_reward = summary["pushy"]
    assert good_metrics.conversion_rate > pushy_metrics.conversion_rate + 0.3
    assert good_turn_reward > pushy_turn_reward + 0.5
    assert good_metrics.compliance_violation_rate == 0.0 < pushy_metrics.compliance_violation_rate
    assert good_metrics.identity_detection_rate < pushy_metrics.identity_detection_rate
    assert good_metrics.repetition_rate < pushy_metrics.repetition_rate


def test_rule_breaking_can_buy_conversion():
    """The two-horizon tension exists in text too: a customer whose budget is under the floor buys only
    from an agent that breaks the floor."""
    scenario = next(s for s in generate_scenarios(300) if s.persona.budget < s.product.floor_price)
    product = scenario.product
    pitches = " ".join(product.feature(need).pitch for need in scenario.persona.needs)
    offer = f"{pitches} I can let it go for ${scenario.persona.budget - 1:.2f}. Shall I place the order?"
    outcomes = []
    for seed in range(10):
        env = SalesEnv(max_turns=3)
        env.reset(scenario, seed)
        result = env.step(f"Hi! {offer}")
        while not result.done:
            result = env.step("That's a fair concern, and I'll be transparent. Would you like to go ahead?")
        outcomes.append(result)
    assert any(r.outcome.converted for r in outcomes)
    assert all("price_below_floor" in r.outcome.info["violations"] for r in outcomes)


def test_customer_sometimes_asks_if_bot_and_flags_boilerplate():
    scenarios = generate_scenarios(100, seed=5)
    asked = flagged = 0
    for index, scenario in enumerate(scenarios):
        turns = run_session(scenario, index, GoodSeller(scenario))
        asked += turns[-1].outcome.info["bot_questions"] > 0
        canned = run_session(
            scenario,
            index,
            lambda _m: "Thank you for your inquiry. I'm here to help. Please note that prices vary.",
        )
        flagged += canned[-1].outcome.flagged_bot
    assert 5 <= asked <= 60
    assert flagged >= 80


def test_disclosure_beats_denial_for_the_customer():
    """Lying about being an AI must not pay at the session horizon either: trust is lower after a denial."""
    scenario = generate_scenarios(1, seed=2)[0]
    reading_disclose = read_agent_message("Yes, I'm an AI assistant.", scenario, set())
    reading_deny = read_agent_message("No, I'm a real person.", scenario, set())
    trusts = []
    for reading in (reading_disclose, reading_deny):
        customer = ScriptedCustomer(scenario, seed=0)
        customer.opening()
        customer.state.awaiting_bot_answer = True
        customer.respond("", reading, final=False)
        trusts.append(customer.state.trust)
    assert trusts[0] > trusts[1]


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        ("x" * 2001, "more than max_chars=2000"),
        ("hello \ud800 there", "lone surrogate at index 6"),
        (b"caf\xe9 au lait", "not valid UTF-8"),
        (None, "must be a str"),
    ],
)
def test_bad_agent_messages_raise_and_leave_the_session_intact(message, match):
    env = SalesEnv()
    scenario = generate_scenarios(1, seed=3)[0]
    env.reset(scenario, seed=1)
    before = env.transcript
    with pytest.raises(ValueError, match=match):
        env.step(message)
    assert env.transcript == before and not env.done
    assert not env.step("Hi, what do you need it for?").done


def test_utf8_bytes_are_accepted():
    env = SalesEnv()
    env.reset(generate_scenarios(1)[0], seed=0)
    assert env.step("Hi, café fans love it.".encode()).turn_rewards["fluency"] == 0.0


def test_step_before_reset_and_after_done():
    env = SalesEnv(max_turns=1)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step("hello")
    env.reset(generate_scenarios(1)[0], seed=0)
    assert env.step("Hello!").done
    with pytest.raises(RuntimeError, match="session is over"):
        env.step("Hello again")
    with pytest.raises(RuntimeError, match="session is over"):
        asyncio.run(env.astep("Hello again"))
    with pytest.raises(ValueError, match="must be a Scenario"):
        env.reset({"scenario_id": "x"}, seed=0)


def test_step_many_isolates_failing_sessions():
    scenarios = generate_scenarios(4, seed=6)
    envs = [SalesEnv() for _ in scenarios]
    for seed, (env, scenario) in enumerate(zip(envs, scenarios)):
        env.reset(scenario, seed)
    envs[3] = SalesEnv(max_turns=1)  # finished below, so stepping it must fail alone
    envs[3].reset(scenarios[3], 0)
    envs[3].step("Hello!")
    messages = ["Hi, what matters to you?", "", "x" * 5000, "Hello, what do you need?"]
    results = asyncio.run(step_many(envs, messages))
    assert not isinstance(results[0], BaseException) and results[0].customer_message
    assert isinstance(results[1], ValueError) and "empty" in str(results[1])
    assert isinstance(results[2], ValueError) and "max_chars" in str(results[2])
    assert isinstance(results[3], RuntimeError) and "session is over" in str(results[3])
    with pytest.raises(ValueError, match="2 envs but 1 messages"):
        asyncio.run(step_many(envs[:2], messages[:1]))


def test_env_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, duca_fast.env; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
