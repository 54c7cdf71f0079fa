"""Twin regimes: classic unchanged, reward scales and noise, stochastic customers, hidden state, seeding."""

from __future__ import annotations

import random

import pytest

from duca_fast.env import (
    ACTS,
    CUSTOMER_INTENTS,
    HIDDEN_OBSERVATION_SIZE,
    OBSERVATION_SIZE,
    REGIMES,
    SESSION_SCALES,
    RegimeCustomer,
    SalesActsEnv,
    TwinRegime,
    compute_metrics,
    generate_scenarios,
    make_env,
    make_regime,
)
from duca_fast.env.customer import ScriptedCustomer
from duca_fast.env.regimes import message_cues
from tests.env.test_env_acts import good_acts

SCENARIOS = generate_scenarios(60, seed=5)


def run(regime, *, policy="random", scenarios=SCENARIOS, seed_offset=0, max_turns=8):
    """Every session's (customer messages, turn rewards, session rewards, outcome, observations)."""
    sessions = []
    for i, scenario in enumerate(scenarios):
        env = SalesActsEnv(max_turns=max_turns, regime=regime)
        env.reset(scenario, i + seed_offset)
        rng, good = random.Random(i), good_acts(scenario)
        steps, observations = [], [env.observation_vector()]
        while not env.done:
            act = good(env, len(steps)) if policy == "good" else rng.randrange(len(ACTS))
            steps.append(env.step(act))
            observations.append(env.observation_vector())
        sessions.append((steps, observations))
    return sessions


def outcomes(sessions):
    return [steps[-1].outcome for steps, _ in sessions]


def test_classic_is_todays_twin():
    assert make_regime() == TwinRegime() == REGIMES["classic"]
    assert not TwinRegime().changes_customer and not TwinRegime().changes_rewards
    default, classic = run(None), run(make_regime("classic"))
    assert default == classic
    env = make_env("sales-acts", regime=make_regime())
    assert isinstance(env, SalesActsEnv) and env.observation_size == OBSERVATION_SIZE


def test_reward_scales_multiply_rewards_and_change_nothing_else():
    regime = make_regime(session_scale=10.0, turn_scale=0.1)
    assert not regime.changes_customer and regime.changes_rewards
    for (base, base_obs), (scaled, scaled_obs) in zip(run(None), run(regime)):
        assert base_obs == scaled_obs
        for a, b in zip(base, scaled):
            assert a.customer_message == b.customer_message and a.outcome == b.outcome
            assert b.turn_rewards == pytest.approx({k: 0.1 * v for k, v in a.turn_rewards.items()})
        assert scaled[-1].session_rewards == pytest.approx(
            {k: 10 * v for k, v in base[-1].session_rewards.items()}
        )
    assert len(SESSION_SCALES) == 5 and all(
        make_regime("paper", session_scale=s).session_scale == s for s in SESSION_SCALES
    )


def test_naturalness_noise_is_continuous_clipped_and_touches_nothing_else():
    base, noisy = run(None), run(make_regime(naturalness_noise=0.3))
    values = []
    for (a_steps, _), (b_steps, _) in zip(base, noisy):
        assert outcomes([(a_steps, 0)]) == outcomes([(b_steps, 0)])
        for a, b in zip(a_steps, b_steps):
            assert {k: v for k, v in a.turn_rewards.items() if k != "naturalness"} == {
                k: v for k, v in b.turn_rewards.items() if k != "naturalness"
            }
            values.append(b.turn_rewards["naturalness"])
    assert all(-1.0 <= v <= 0.0 for v in values)
    assert len({round(v, 6) for v in values}) > 50, "a continuous score, not the exact phrase count"
    assert 0.05 < sum(v == 0.0 for v in values) / len(values) < 0.95, "clipped at 0 about half the time"


def test_stochastic_conversion_hesitates_and_sessions_go_on():
    classic = outcomes(run(None, policy="good"))
    regime = make_regime(buy_probability=0.4)
    sessions = run(regime, policy="good")
    stochastic = outcomes(sessions)
    hesitations = sum(o.info.get("hesitations", 0) for o in stochastic)
    assert hesitations >= 5
    assert 0 < compute_metrics(stochastic).conversion_rate < compute_metrics(classic).conversion_rate
    for steps, _ in sessions:
        for step in steps[:-1]:
            assert "I'll take it" not in step.customer_message and "it is." not in step.customer_message
    final_hesitations = [o for o in stochastic if not o.converted and o.info.get("hesitations")]
    assert all(o.reason in ("max_turns", "walked_away", "distrust") for o in final_hesitations)
    # a hesitation never ends a session by itself before the last turn
    assert any(o.num_turns > 1 and o.info.get("hesitations") and o.converted for o in stochastic)


def test_stochastic_bot_judgement_depends_on_persona_and_draw():
    classic = compute_metrics(outcomes(run(None))).identity_detection_rate
    regime = make_regime(bot_sensitivity=1.0)
    assert compute_metrics(outcomes(run(regime))).identity_detection_rate > classic
    customers = [RegimeCustomer(s, seed, regime) for s in generate_scenarios(300, seed=2) for seed in (0, 1)]
    sensitivities = [c.bot_sensitivity for c in customers]
    assert len(set(sensitivities)) > 100, "drawn per session"
    skeptics = [c.bot_sensitivity for c in customers if c.scenario.persona.skepticism > 0.7]
    trusting = [c.bot_sensitivity for c in customers if c.scenario.persona.skepticism < 0.3]
    assert sum(skeptics) / len(skeptics) > 1.5 * sum(trusting) / len(trusting)
    env = SalesActsEnv(regime=make_regime(buy_probability=1.0))
    env.reset(SCENARIOS[0], 0)
    assert type(env.customer) is ScriptedCustomer


def test_hidden_state_stays_hidden():
    regime = make_regime(hidden_state=True)
    assert OBSERVATION_SIZE - 1 - len(CUSTOMER_INTENTS) + 3 == HIDDEN_OBSERVATION_SIZE
    scenario = next(s for s in generate_scenarios(200, seed=9) if s.persona.asks_if_bot > 0.3)
    hidden, visible = SalesActsEnv(regime=regime), SalesActsEnv()
    found = False
    for seed in range(200):
        for env in (hidden, visible):
            env.reset(scenario, seed)
        while not hidden.done and not hidden.customer.state.awaiting_bot_answer:
            for env in (hidden, visible):
                env.step("boilerplate" if hidden.customer.state.turn % 2 else "pitch_feature_0")
        if not hidden.done:
            found = True
            break
    assert found, "some session reaches a sincere bot question"
    before_hidden, before_visible = hidden.observation_vector(), visible.observation_vector()
    assert len(before_hidden) == hidden.observation_size == HIDDEN_OBSERVATION_SIZE
    # the question is visible only as words: a question mark and the word "bot"/"AI"
    assert before_hidden[7 + 3 * 6 : 7 + 3 * 6 + 2] == [1.0, 1.0]
    # changing the customer's latent state changes the classic observation, not the hidden one
    for env in (hidden, visible):
        env.customer.state.awaiting_bot_answer = False
        env._last_intent = "neutral"
    assert hidden.observation_vector() == before_hidden
    assert visible.observation_vector() != before_visible


def test_message_cues_read_only_words():
    assert message_cues("Wait, am I talking to a bot?") == [1.0, 1.0, 0.0]
    assert message_cues("This really sounds like a bot.") == [0.0, 1.0, 0.0]
    assert message_cues("It's a bit pricey. My budget is about $400.") == [0.0, 0.0, 1.0]
    assert message_cues("I need to think about it. Maybe the AIR model?") == [1.0, 0.0, 0.0]
    assert message_cues(None) == [0.0, 0.0, 0.0]


def test_regimes_are_deterministic_given_seeds():
    paper = make_regime("paper")
    first, second = run(paper), run(paper)
    assert first == second
    other = run(paper, seed_offset=1000)
    assert [s[-1].turn_rewards for s, _ in first] != [s[-1].turn_rewards for s, _ in other]


def test_paper_regime_puts_a_large_sparse_session_reward_against_small_turn_rewards():
    sessions = run(make_regime("paper"), policy="good")
    turn = [sum(step.turn_rewards.values()) for steps, _ in sessions for step in steps]
    session = [sum(steps[-1].session_rewards.values()) for steps, _ in sessions]
    assert max(session) >= 10 and min(turn) >= -1.0
    assert max(abs(v) for v in turn) < 0.2 * max(session)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_regime("nope"), "unknown twin regime 'nope'"),
        (lambda: make_regime(session_scael=3.0), r"unknown twin regime knobs \['session_scael'\]"),
        (lambda: make_regime(session_scale=0.0), "session_scale must be a finite number > 0"),
        (lambda: make_regime(turn_scale=float("inf")), "turn_scale"),
        (lambda: make_regime(buy_probability=0.0), "buy_probability"),
        (lambda: make_regime(naturalness_noise=-0.1), "naturalness_noise"),
        (lambda: make_regime(hidden_state=1), "hidden_state must be a bool"),
        (lambda: SalesActsEnv(regime="paper"), "regime must be a TwinRegime"),
    ],
)
def test_bad_regimes(call, match):
    with pytest.raises(ValueError, match=match):
        call()
