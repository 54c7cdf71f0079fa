"""The natural-language sales environment: an agent sells a scenario's product to a customer in free text."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from duca_fast.env.base import Observation, Outcome, TurnResult
from duca_fast.env.customer import Customer, CustomerReply, ScriptedCustomer
from duca_fast.env.rewards import (
    SESSION_REWARD_NAMES,
    TURN_REWARD_NAMES,
    ReferenceLogprob,
    session_rewards,
    turn_rewards,
)
from duca_fast.env.scenarios import Scenario
from duca_fast.env.text import AgentTurnReading, read_agent_message

if TYPE_CHECKING:
    from duca_fast.env.reward_sources import RewardSource

CustomerFactory = Callable[[Scenario, int], Customer]
"""Builds the customer of one session from its scenario and seed (``ScriptedCustomer`` itself is one)."""


def check_agent_message(agent_message: object, max_chars: int) -> str:
    """Return the message as a str, or raise ValueError saying what is wrong with it.

    Accepts str, or bytes that decode as UTF-8. Rejects empty or whitespace-only text, text longer than
    ``max_chars`` characters and text with lone surrogates (which cannot be encoded as UTF-8).
    """
    if isinstance(agent_message, (bytes, bytearray)):
        try:
            agent_message = bytes(agent_message).decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"agent_message is not valid UTF-8: {error}") from error
    if not isinstance(agent_message, str):
        raise ValueError(f"agent_message must be a str, got {type(agent_message).__name__}")
    try:
        agent_message.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"agent_message is not valid UTF-8: lone surrogate at index {error.start} "
            "(decode model output with errors='replace')"
        ) from error
    if not agent_message.strip():
        raise ValueError("agent_message is empty")
    if len(agent_message) > max_chars:
        raise ValueError(
            f"agent_message has {len(agent_message)} characters, more than max_chars={max_chars}"
        )
    return agent_message


@dataclass
class SessionTally:
    """Per-session counters that end up in ``Outcome.info`` (the metrics read them)."""

    num_sentences: int = 0
    """Agent sentences so far."""
    num_repeated_sentences: int = 0
    """Agent sentences whose n-gram overlap with earlier agent sentences reached the repetition threshold."""
    num_violation_turns: int = 0
    """Agent turns with at least one compliance violation."""
    violations: list[str] = field(default_factory=list)
    """Every violation, in order."""
    bot_questions: int = 0
    """Times the customer sincerely asked whether it talked to a bot."""

    def add(self, reading: AgentTurnReading, violations: list[str]) -> None:
        self.num_sentences += len(reading.sentence_overlaps)
        self.num_repeated_sentences += reading.num_repeated_sentences
        self.num_violation_turns += bool(violations)
        self.violations.extend(violations)

    def as_info(self) -> dict[str, object]:
        return {
            "num_sentences": self.num_sentences,
            "num_repeated_sentences": self.num_repeated_sentences,
            "num_violation_turns": self.num_violation_turns,
            "violations": list(self.violations),
            "bot_questions": self.bot_questions,
        }


class SalesEnv:
    """One sales session at a time over free-text agent messages (implements ``DialogueEnv``).

    The customer speaks first (``Observation.customer_message``). Each ``step`` reads the agent message
    heuristically, scores it (``TURN_REWARD_NAMES``), lets the customer answer, and on the last turn adds
    ``SESSION_REWARD_NAMES`` and an ``Outcome``. A rejected message (ValueError) or a failed customer call
    (RuntimeError) leaves the session exactly as it was, so the caller may retry.
    """

    turn_reward_names = TURN_REWARD_NAMES
    session_reward_names = SESSION_REWARD_NAMES

    def __init__(
        self,
        customer_factory: CustomerFactory = ScriptedCustomer,
        *,
        max_turns: int = 10,
        max_message_chars: int = 2000,
        reference_logprob: ReferenceLogprob | None = None,
        reward_sources: Sequence[RewardSource] = (),
    ) -> None:
        """``reference_logprob``: ``text -> mean token log-prob`` for the fluency reward (None: heuristic).
        ``reward_sources``: learned reward components (``env.reward_sources``: LLM judges, reward models),
        each on the turn or the session horizon, after the rule-based ones in the reward names."""
        if max_turns < 1 or max_message_chars < 1:
            raise ValueError(
                f"max_turns and max_message_chars must be >= 1, got {max_turns}, {max_message_chars}"
            )
        self.customer_factory = customer_factory
        self.max_turns = max_turns
        self.max_message_chars = max_message_chars
        self.reference_logprob = reference_logprob
        self.reward_sources = tuple(reward_sources)
        builtin = set(TURN_REWARD_NAMES) | set(SESSION_REWARD_NAMES)
        clashing = sorted(builtin & {source.name for source in self.reward_sources})
        if clashing:
            raise ValueError(f"reward source names {clashing} clash with the rule-based rewards")
        self.turn_reward_names = TURN_REWARD_NAMES + tuple(
            source.name for source in self.reward_sources if source.horizon == "turn"
        )
        self.session_reward_names = SESSION_REWARD_NAMES + tuple(
            source.name for source in self.reward_sources if source.horizon == "session"
        )
        self._scenario: Scenario | None = None
        self._done = True

    @property
    def scenario(self) -> Scenario:
        if self._scenario is None:
            raise RuntimeError("no session: call reset(scenario, seed) first")
        return self._scenario

    @property
    def done(self) -> bool:
        return self._done

    @property
    def transcript(self) -> list[tuple[str, str]]:
        """(role, text) pairs, role "customer" or "agent", in order."""
        return list(self._transcript)

    def reset(self, scenario: Scenario, seed: int) -> Observation:
        if not isinstance(scenario, Scenario):
            raise ValueError(f"scenario must be a Scenario, got {type(scenario).__name__}")
        self._scenario = scenario
        self.customer = self.customer_factory(scenario, seed)
        self._ngrams: set[tuple[str, ...]] = set()
        self._tally = SessionTally()
        self._turn = 0
        self._awaiting_bot_answer = False
        self._flagged_bot = False
        self._done = False
        opening = self.customer.opening()
        self._transcript = [("customer", opening)]
        return Observation(system_prompt=scenario.agent_brief(), customer_message=opening)

    def step(self, agent_message: str) -> TurnResult:
        text, reading, ngrams, final = self._prepare(agent_message)
        reply = self.customer.respond(text, reading, final)
        learned = asyncio.run(self._score_and_close(text, reply, final)) if self.reward_sources else {}
        return self._commit(text, reading, ngrams, reply, learned)

    async def _score_and_close(self, text: str, reply: CustomerReply, final: bool) -> dict[str, float]:
        # A sync step runs its own event loop: the judges' HTTP clients are closed in it, not left behind.
        try:
            return await self._learned_rewards(text, reply, final)
        finally:
            await self.aclose()

    async def astep(self, agent_message: str) -> TurnResult:
        text, reading, ngrams, final = self._prepare(agent_message)
        reply = await self.customer.arespond(text, reading, final)
        learned = await self._learned_rewards(text, reply, final) if self.reward_sources else {}
        return self._commit(text, reading, ngrams, reply, learned)

    async def _learned_rewards(self, text: str, reply: CustomerReply, final: bool) -> dict[str, float]:
        """Scores of the reward sources: turn sources on the conversation up to this seller message, session
        sources (when the session ends) on the whole conversation; concurrently."""
        ends = reply.ended or final
        so_far = [*self._transcript, ("agent", text)]
        chosen = [s for s in self.reward_sources if s.horizon == "turn" or ends]
        scores = await asyncio.gather(
            *(s.score(so_far if s.horizon == "turn" else [*so_far, ("customer", reply.text)]) for s in chosen)
        )
        return {source.name: float(score) for source, score in zip(chosen, scores)}

    async def aclose(self) -> None:
        """Close the reward judges' HTTP clients (``aclose_all`` calls it at the end of a rollout)."""
        for source in self.reward_sources:
            hook = getattr(source, "aclose", None)
            if hook is not None:
                await hook()

    def _prepare(self, agent_message: str) -> tuple[str, AgentTurnReading, set[tuple[str, ...]], bool]:
        scenario = self.scenario
        if self._done:
            raise RuntimeError("the session is over (done=True); call reset() before stepping again")
        text = check_agent_message(agent_message, self.max_message_chars)
        ngrams = set(self._ngrams)  # a copy: committed only once the customer has answered
        reading = read_agent_message(text, scenario, ngrams)
        return text, reading, ngrams, self._turn + 1 >= self.max_turns

    def _commit(
        self,
        text: str,
        reading: AgentTurnReading,
        ngrams: set[tuple[str, ...]],
        reply: CustomerReply,
        learned: dict[str, float],
    ) -> TurnResult:
        scenario = self.scenario
        rewards, violations = turn_rewards(
            reading, text, scenario, self._awaiting_bot_answer, self.reference_logprob
        )
        session_names = set(self.session_reward_names)
        rewards = {**rewards, **{k: v for k, v in learned.items() if k not in session_names}}
        self._ngrams = ngrams
        self._turn += 1
        self._tally.add(reading, violations)
        self._tally.bot_questions += reply.asks_if_bot
        self._awaiting_bot_answer = reply.asks_if_bot
        self._flagged_bot = self._flagged_bot or reply.flagged_bot
        self._transcript += [("agent", text), ("customer", reply.text)]
        info = {"violations": violations, "customer_intent": reply.intent}
        if not (reply.ended or self._turn >= self.max_turns):
            return TurnResult(customer_message=reply.text, turn_rewards=rewards, done=False, info=info)
        self._done = True
        outcome = Outcome(
            converted=reply.bought,
            flagged_bot=self._flagged_bot,
            num_turns=self._turn,
            reason=reply.reason or "max_turns",
            price=reply.price,
            info={"scenario_id": scenario.scenario_id, **self._tally.as_info(), **reply.info},
        )
        return TurnResult(
            customer_message=reply.text,
            turn_rewards=rewards,
            done=True,
            session_rewards={
                **session_rewards(reply.bought, reply.price, scenario),
                **{k: v for k, v in learned.items() if k in session_names},
            },
            outcome=outcome,
            info=info,
        )
