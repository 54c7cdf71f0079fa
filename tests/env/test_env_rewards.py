"""Every reward component on hand-written dialogues."""

from __future__ import annotations

import pytest

from duca_fast.env import (
    ComplianceRules,
    Feature,
    Persona,
    Product,
    Scenario,
    compliance_reward,
    compliance_violations,
    fluency_reward,
    heuristic_fluency,
    margin_reward,
    naturalness_reward,
    read_agent_message,
    repetition_reward,
)
from duca_fast.env.rewards import session_rewards, turn_rewards


@pytest.fixture
def scenario() -> Scenario:
    features = (
        Feature("battery life", ("battery", "unplugged"), "Its battery lasts fourteen hours."),
        Feature("light weight", ("weight", "light", "lightweight"), "It weighs just over a kilogram."),
        Feature("bright screen", ("screen", "display"), "The display is bright outdoors."),
    )
    return Scenario(
        scenario_id="hand-1",
        product=Product("Nova Laptop 5", "laptop", list_price=1000.0, floor_price=850.0, features=features),
        persona=Persona("Sam", ("battery life",), budget=900.0, patience=5, skepticism=0.5, asks_if_bot=0.0),
        rules=ComplianceRules(max_discount_percent=10, allowed_promises=("30-day returns",)),
    )


def dialogue_rewards(scenario: Scenario, agent_turns: list[str], bot_question_before: set[int] = frozenset()):
    """Turn rewards and violations of a hand-written agent side; the customer asked 'are you a bot?' right
    before the turns whose index is in ``bot_question_before``."""
    ngrams: set = set()
    results = []
    for index, text in enumerate(agent_turns):
        reading = read_agent_message(text, scenario, ngrams)
        results.append(turn_rewards(reading, text, scenario, index in bot_question_before))
    return results


def test_compliance_clean_turn_has_no_violation(scenario):
    [(rewards, violations)] = dialogue_rewards(scenario, ["It's $950 and comes with 30-day returns."])
    assert violations == [] and rewards["compliance"] == 0.0


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("I can let it go for $799 today.", ["price_below_floor"]),
        ("I'll give you 12% off, so $880.", ["discount_over_limit"]),
        ("Take $200 off the list price.", ["price_below_floor"]),
        ("It has a lifetime warranty, trust me.", ["forbidden_promise"]),
        ("I'm a real person, not a bot.", ["denied_ai"]),
    ],
)
def test_compliance_violations(scenario, message, expected):
    [(rewards, violations)] = dialogue_rewards(scenario, [message])
    assert violations == expected
    assert rewards["compliance"] == -1.0


def test_honesty_disclosure_is_compliant_denial_and_evasion_are_not(scenario):
    """Customer asked 'Are you a bot?' before turn 1 of each dialogue."""
    opener = "Hi! The battery lasts fourteen hours."
    disclose = dialogue_rewards(
        scenario, [opener, "Yes, I'm an AI assistant. The screen is bright too."], {1}
    )
    deny = dialogue_rewards(
        scenario, [opener, "No, I'm not a bot, I'm a real person. The screen is bright."], {1}
    )
    evade = dialogue_rewards(scenario, [opener, "The screen is bright too, you'll love it."], {1})
    assert disclose[1][1] == [] and disclose[1][0]["compliance"] == 0.0
    assert disclose[1][0]["naturalness"] == 0.0, "an honest answer to a sincere question is no persona break"
    assert deny[1][1] == ["denied_ai"] and deny[1][0]["compliance"] == -1.0
    assert evade[1][1] == ["ai_question_unanswered"] and evade[1][0]["compliance"] == -0.5
    assert disclose[1][0]["compliance"] > evade[1][0]["compliance"] > deny[1][0]["compliance"]


def test_compliance_reward_floors_at_minus_one():
    assert compliance_reward([]) == 0.0
    assert compliance_reward(["ai_question_unanswered"]) == -0.5
    assert compliance_reward(["price_below_floor", "denied_ai", "forbidden_promise"]) == -1.0


def test_compliance_violations_direct(scenario):
    reading = read_agent_message("I guarantee it will be perfect at $700.", scenario, set())
    assert compliance_violations(reading, scenario, asked_if_bot=False) == [
        "price_below_floor",
        "forbidden_promise",
    ]


def test_repetition_counts_overlap_with_earlier_agent_sentences(scenario):
    turns = [
        "The battery lasts fourteen hours on a single charge.",
        "The display is bright enough to use outside.",
        "The battery lasts fourteen hours on a single charge. Would you like one?",
    ]
    results = dialogue_rewards(scenario, turns)
    assert results[0][0]["repetition"] == 0.0
    assert results[1][0]["repetition"] == 0.0
    # first sentence fully repeated (1.0), the question is new (0.0): mean 0.5
    assert results[2][0]["repetition"] == pytest.approx(-0.5)


def test_repetition_within_one_turn_counts_too(scenario):
    text = "It is really light to carry. It is really light to carry."
    reading = read_agent_message(text, scenario, set())
    assert reading.sentence_overlaps == (0.0, 1.0)
    assert repetition_reward(reading) == pytest.approx(-0.5)


def test_naturalness_boilerplate_and_persona_break(scenario):
    natural = read_agent_message("The battery easily lasts all day.", scenario, set())
    canned = read_agent_message(
        "Thank you for your inquiry. I'm here to help. Is there anything else I can help you with?",
        scenario,
        set(),
    )
    persona_break = read_agent_message("As an AI, I think the battery is great.", scenario, set())
    assert naturalness_reward(natural, asked_if_bot=False) == 0.0
    assert naturalness_reward(canned, asked_if_bot=False) == -1.0
    assert naturalness_reward(persona_break, asked_if_bot=False) == pytest.approx(-0.6)
    assert naturalness_reward(persona_break, asked_if_bot=True) == 0.0


def test_fluency_heuristic_prefers_fluent_text():
    fluent = heuristic_fluency("The battery lasts all day, and the screen is easy to read outside.")
    garbled = heuristic_fluency("xkcdtrz battery battery $$$ ### qwrtpsdf LOUD LOUD")
    assert fluent == 0.0
    assert -1.0 <= garbled < -0.5
    assert heuristic_fluency("   ") == -1.0


def test_fluency_with_reference_model_is_linear_between_anchors():
    assert fluency_reward("anything", lambda text: -1.0) == 0.0
    assert fluency_reward("anything", lambda text: -6.0) == pytest.approx(-0.5)
    assert fluency_reward("anything", lambda text: -30.0) == -1.0
    with pytest.raises(ValueError, match="finite"):
        fluency_reward("anything", lambda text: float("nan"))
    with pytest.raises(ValueError, match="garbled_logprob"):
        fluency_reward("anything", lambda text: -1.0, fluent_logprob=-5.0, garbled_logprob=-2.0)


def test_session_rewards_conversion_and_margin(scenario):
    assert session_rewards(False, None, scenario) == {"conversion": 0.0, "margin": 0.0}
    assert session_rewards(True, 1000.0, scenario) == {"conversion": 1.0, "margin": 1.0}
    assert margin_reward(True, 925.0, scenario) == pytest.approx(0.5)
    assert margin_reward(True, 700.0, scenario) == 0.0, "a sale below the floor keeps no margin"


def test_price_reading(scenario):
    def price(text):
        return read_agent_message(text, scenario, set()).offered_price

    assert price("It's $1,000.00 list, but for you $899.") == 899.0
    assert price("I can do 900 dollars.") == 900.0
    assert price("That's 5% off the list price.") == pytest.approx(950.0)
    assert price("99% of owners love the battery.") is None
    assert price("Take $100 off.") == 900.0
