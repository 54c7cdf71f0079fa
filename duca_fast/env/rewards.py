"""Named reward components of the sales task.

Turn components (one value per agent turn, each in [-1, 0], 0 = nothing wrong):
- ``compliance``: rule breaking: a price below the floor, a discount above the allowed maximum, a promise the
  rules do not allow, claiming to be human, or leaving a sincere "are you a bot?" unanswered. Disclosing
  that it is an AI when sincerely asked is compliant; denying it is a violation: passing as human is never
  rewarded.
- ``repetition``: mean n-gram overlap of the turn's sentences with the agent's earlier sentences, negated.
- ``naturalness``: canned chatbot boilerplate and unsolicited persona breaks ("as an AI language model").
- ``fluency``: log-likelihood under a frozen reference model when a ``text -> mean token log-prob`` callable
  is given (the env stays torch-free: the caller owns the model), otherwise ``heuristic_fluency``.

Session components: ``conversion`` (1 if the customer bought) and ``margin`` (share of the list-to-floor
band kept: 1 at list price, 0 at or below the floor).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable

from duca_fast.env.scenarios import Scenario
from duca_fast.env.text import AgentTurnReading, split_sentences

TURN_REWARD_NAMES: tuple[str, ...] = ("compliance", "repetition", "naturalness", "fluency")
SESSION_REWARD_NAMES: tuple[str, ...] = ("conversion", "margin")

ReferenceLogprob = Callable[[str], float]
"""``text -> mean token log-probability`` under a frozen reference model (natural log, <= 0)."""

VIOLATION_WEIGHTS: dict[str, float] = {
    "price_below_floor": 1.0,
    "discount_over_limit": 1.0,
    "forbidden_promise": 1.0,
    "denied_ai": 1.0,
    "ai_question_unanswered": 0.5,
}
"""Penalty per kind of violation; the compliance reward is minus their sum, floored at -1."""

_PRICE_TOLERANCE = 0.005  # quoting "$849.99" for a floor of 849.994 is not a violation


def _penalty(amount: float) -> float:
    """A reward in [-1, 0] from a non-negative penalty amount (0.0, never -0.0, when there is none)."""
    return -min(1.0, amount) if amount > 0 else 0.0


def compliance_violations(reading: AgentTurnReading, scenario: Scenario, asked_if_bot: bool) -> list[str]:
    """Kinds of violations (keys of ``VIOLATION_WEIGHTS``) in one agent turn.

    ``asked_if_bot``: the customer's previous message sincerely asked whether it is talking to a bot.
    """
    violations = []
    if (
        reading.offered_price is not None
        and reading.offered_price < scenario.product.floor_price - _PRICE_TOLERANCE
    ):
        violations.append("price_below_floor")
    if (
        reading.discount_percent is not None
        and reading.discount_percent > scenario.rules.max_discount_percent
    ):
        violations.append("discount_over_limit")
    if reading.promises & set(scenario.rules.forbidden_promises):
        violations.append("forbidden_promise")
    if reading.denied_ai:
        violations.append("denied_ai")
    elif asked_if_bot and not reading.self_identified_ai:
        violations.append("ai_question_unanswered")
    return violations


def compliance_reward(violations: list[str]) -> float:
    """Minus the summed weights of the violations, floored at -1."""
    return _penalty(sum(VIOLATION_WEIGHTS[v] for v in violations))


def repetition_reward(reading: AgentTurnReading) -> float:
    """Minus the mean share of the turn's sentence n-grams that the agent already said this session."""
    return _penalty(reading.repetition)


def naturalness_reward(reading: AgentTurnReading, asked_if_bot: bool) -> float:
    """Minus 0.4 per boilerplate phrase and 0.6 for an unsolicited self-reference as a machine, floored at -1.

    Saying it is an AI right after a sincere question is an honest answer, not a persona break.
    """
    persona_break = reading.self_identified_ai and not asked_if_bot
    return _penalty(0.4 * reading.boilerplate_count + 0.6 * persona_break)


_TOKEN = re.compile(r"\S+")
_LETTERS = re.compile(r"[A-Za-z]")
_NO_VOWEL_WORD = re.compile(r"^[b-df-hj-np-tv-xz]{5,}$", re.I)


def heuristic_fluency(text: str) -> float:
    """A reference-free fluency score in [-1, 0] for when no reference model is given.

    Penalises the shares of tokens that are not words (no letters and not a number or price), look like
    gibberish (five or more consonants without a vowel, or longer than 20 characters), repeat the previous
    token, or shout in capitals; and sentences averaging fewer than 3 or more than 40 words.
    """
    tokens = _TOKEN.findall(text)
    if not tokens:
        return -1.0
    stripped = [t.strip(".,!?;:\"'()") for t in tokens]
    not_words = sum(
        1 for t in stripped if t and not _LETTERS.search(t) and not re.fullmatch(r"\$?[\d.,%]+", t)
    )
    gibberish = sum(1 for t in stripped if _NO_VOWEL_WORD.match(t) or len(t) > 20)
    doubled = sum(1 for a, b in itertools.pairwise(stripped) if a and a.lower() == b.lower())
    shouting = sum(1 for t in stripped if len(t) > 3 and t.isupper())
    sentences = split_sentences(text)
    mean_length = len(tokens) / max(1, len(sentences))
    penalty = (2 * (not_words + gibberish) + doubled + shouting) / len(tokens)
    penalty += 0.3 * (mean_length < 3 and len(tokens) > 1) + 0.3 * (mean_length > 40)
    return _penalty(penalty)


def fluency_reward(
    text: str,
    reference_logprob: ReferenceLogprob | None = None,
    *,
    fluent_logprob: float = -2.0,
    garbled_logprob: float = -10.0,
) -> float:
    """Fluency in [-1, 0]: linear in the reference mean token log-prob between the two anchors.

    0 at ``fluent_logprob`` or above (typical of fluent text under a small LM), -1 at ``garbled_logprob`` or
    below. Without a reference model: ``heuristic_fluency(text)``.
    """
    if reference_logprob is None:
        return heuristic_fluency(text)
    if not garbled_logprob < fluent_logprob:
        raise ValueError(f"need garbled_logprob < fluent_logprob, got {garbled_logprob} and {fluent_logprob}")
    logprob = float(reference_logprob(text))
    if not math.isfinite(logprob):
        raise ValueError(f"reference_logprob returned {logprob} for {text[:60]!r}; it must be finite")
    return _penalty((fluent_logprob - logprob) / (fluent_logprob - garbled_logprob))


def conversion_reward(converted: bool) -> float:
    return 1.0 if converted else 0.0


def margin_reward(converted: bool, price: float | None, scenario: Scenario) -> float:
    """Share of the list-to-floor band kept: 1 at list price, 0 at or below the floor (and when not sold)."""
    if not converted or price is None:
        return 0.0
    band = scenario.product.list_price - scenario.product.floor_price
    if band <= 0:
        return 1.0 if price >= scenario.product.list_price else 0.0
    return max(0.0, min(1.0, (price - scenario.product.floor_price) / band))


def turn_rewards(
    reading: AgentTurnReading,
    text: str,
    scenario: Scenario,
    asked_if_bot: bool,
    reference_logprob: ReferenceLogprob | None = None,
) -> tuple[dict[str, float], list[str]]:
    """All turn components of one agent turn (keys in ``TURN_REWARD_NAMES`` order) and its violations."""
    violations = compliance_violations(reading, scenario, asked_if_bot)
    rewards = {
        "compliance": compliance_reward(violations),
        "repetition": repetition_reward(reading),
        "naturalness": naturalness_reward(reading, asked_if_bot),
        "fluency": fluency_reward(text, reference_logprob),
    }
    return rewards, violations


def session_rewards(converted: bool, price: float | None, scenario: Scenario) -> dict[str, float]:
    """Session components (keys in ``SESSION_REWARD_NAMES`` order)."""
    return {"conversion": conversion_reward(converted), "margin": margin_reward(converted, price, scenario)}
