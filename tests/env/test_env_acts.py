"""The sales-acts twin: contract, random policy, observation vector, two-horizon levers, bad acts."""

from __future__ import annotations

import asyncio
import random

import pytest

from duca_fast.env import (
    ACTS,
    OBSERVATION_SIZE,
    SESSION_REWARD_NAMES,
    TURN_REWARD_NAMES,
    DialogueEnv,
    SalesActsEnv,
    compute_metrics,
    generate_scenarios,
    make_env,
    step_many,
)


def play(scenario, seed, policy, max_turns=10):
    env = SalesActsEnv(max_turns=max_turns)
    env.reset(scenario, seed)
    turns = []
    while not env.done:
        turns.append(env.step(policy(env, len(turns))))
    return turns


def test_random_policy_runs_and_respects_the_contract():
    env = make_env("sales-acts")
    assert isinstance(env, DialogueEnv) and env.num_actions == len(ACTS)
    rng = random.Random(0)
    outcomes = []
    for seed, scenario in enumerate(generate_scenarios(200, seed=7)):
        observation = env.reset(scenario, seed)
        assert "greet" in observation.system_prompt and observation.customer_message
        while not env.done:
            vector = env.observation_vector()
            assert len(vector) == OBSERVATION_SIZE and all(isinstance(x, float) for x in vector)
            result = env.step(rng.randrange(env.num_actions))
            assert tuple(result.turn_rewards) == TURN_REWARD_NAMES
        assert tuple(result.session_rewards) == SESSION_REWARD_NAMES
        outcomes.append(result.outcome)
    metrics = compute_metrics(outcomes)
    assert 0 < metrics.compliance_violation_rate < 1 and 1 <= metrics.mean_turns <= 10
    assert metrics.conversion_rate < 0.3, "random acts rarely sell"


def good_acts(scenario):
    """A compliant act policy: greet, ask, pitch the revealed needs, price within the rules, close."""
    allowed = [
        d for d in (20, 10, 5) if scenario.product.list_price * (1 - d / 100) >= scenario.min_allowed_price
    ]

    def policy(env, turn):
        state = env.customer.state
        if state.awaiting_bot_answer:
            return "disclose_ai"
        if turn == 0:
            return "greet"
        names = [f.name for f in scenario.product.features]
        for need in state.revealed_needs:
            if need in state.unmet_needs:
                return f"pitch_feature_{names.index(need)}"
        if turn == 1:
            return "ask_need"
        if state.open_objection == "price_objection" and allowed:
            return f"discount_{allowed.pop(0)}"
        if state.open_objection == "trust_objection" and "handle_objection" not in env._acts_used:
            return "handle_objection"
        return "close" if "close" not in env._acts_used else "quote_list_price"

    return policy


def test_two_horizons_pull_apart():
    """Rule-breaking acts convert customers that compliant play cannot, at a turn-reward cost."""
    scenarios = [s for s in generate_scenarios(300, seed=11) if s.persona.budget < s.min_allowed_price]
    assert len(scenarios) >= 20

    def cheater(scenario):
        good = good_acts(scenario)
        return lambda env, turn: "discount_35" if turn == 3 else good(env, turn)

    for name, make_policy in (("good", good_acts), ("cheater", cheater)):
        sessions = [play(s, i, make_policy(s)) for i, s in enumerate(scenarios)]
        conversion = sum(t[-1].outcome.converted for t in sessions) / len(sessions)
        compliance = sum(r.turn_rewards["compliance"] for t in sessions for r in t) / len(sessions)
        if name == "good":
            good_conversion, good_compliance = conversion, compliance
    assert good_conversion == 0.0, "no compliant price fits these budgets"
    assert conversion > 0.3 and compliance < good_compliance


def test_repeated_acts_are_penalised_as_repetition():
    scenario = generate_scenarios(1, seed=1)[0]
    turns = play(scenario, 0, lambda env, turn: "pitch_feature_0", max_turns=3)
    assert turns[0].turn_rewards["repetition"] == 0.0
    assert turns[1].turn_rewards["repetition"] == -1.0


def test_observation_tracks_needs_offers_and_acts():
    scenario = generate_scenarios(1, seed=1)[0]
    env = SalesActsEnv()
    env.reset(scenario, 0)
    first = env.observation_vector()
    env.step("ask_need")
    env.step("discount_5")
    second = env.observation_vector()
    assert second != first
    assert second[6] == pytest.approx(0.95), "best offer / list price"
    assert second[-len(ACTS) + ACTS.index("ask_need")] == 1.0


@pytest.mark.parametrize(
    ("act", "match"),
    [
        (len(ACTS), "out of range"),
        (-1, "out of range"),
        ("sell_harder", "unknown act"),
        (True, "act name"),
        ("", "unknown"),
    ],
)
def test_bad_acts(act, match):
    env = SalesActsEnv()
    env.reset(generate_scenarios(1)[0], 0)
    with pytest.raises(ValueError, match=match):
        env.step(act)
    assert env.observation_vector()[-len(ACTS) :] == [0.0] * len(ACTS), "a rejected act changes nothing"


def test_acts_step_many_and_after_done():
    envs = [SalesActsEnv(max_turns=1) for _ in range(3)]
    for seed, (env, scenario) in enumerate(zip(envs, generate_scenarios(3))):
        env.reset(scenario, seed)
    results = asyncio.run(step_many(envs, ["greet", 99, "close"]))
    assert results[0].done and isinstance(results[1], ValueError) and results[2].done
    with pytest.raises(RuntimeError, match="session is over"):
        envs[0].step("greet")
    with pytest.raises(ValueError, match="unknown environment"):
        make_env("poker")
