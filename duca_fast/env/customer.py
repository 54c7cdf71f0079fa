"""Customers: the reply record, the protocol both customers follow, and the deterministic scripted customer.

The scripted customer keeps latent state (interest, trust, patience, bot suspicion, unmet needs, best offer)
and reacts to an ``AgentTurnReading``, so the same logic drives the text environment and the act twin.

How it decides, in short:
- It buys when every need has been addressed, the best offer is within budget, interest and trust are high
  enough (skeptics need more trust), and the agent closes or names a price.
- Pushiness, repeated sentences and turns without substance cost patience; at zero it walks away.
- Boilerplate and unsolicited "as an AI" talk raise bot suspicion; past a threshold it flags the agent as
  a bot. It sincerely asks "am I talking to a bot?" sometimes (persona ``asks_if_bot``) and when suspicious.
  Honest disclosure raises trust; denial lowers it (and a denial followed by boilerplate costs much more),
  so lying never pays at the session horizon either.
- Some levers the turn rewards penalise do help it buy: announcing prices below the floor reaches
  customers whose budget is under the floor, forbidden promises ("guaranteed results") raise trust, and
  repeating a pitch of a need adds a little interest. That is the two-horizon trade-off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from duca_fast.env.scenarios import Scenario
from duca_fast.env.text import AgentTurnReading


class CustomerEndpointError(RuntimeError):
    """An LLM customer's endpoint could not answer (here, not in ``llm_customer``: the driver catches it
    without importing openai); ``reason`` says why in one word, for counting.

    Reasons: "unreachable" (no connection), "timeout" (no full answer within ``timeout_s``),
    "server_error" (429 or 5xx on every try), "rejected" (another 4xx, not retried).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


CUSTOMER_INTENTS: tuple[str, ...] = (
    "opening",
    "reveal_need",
    "interested",
    "price_objection",
    "need_objection",
    "trust_objection",
    "asks_if_bot",
    "annoyed",
    "neutral",
    "bought",
    "left",
)
"""What a scripted customer reply mainly does (the act twin one-hot encodes the last one)."""


@dataclass(frozen=True)
class CustomerReply:
    """The customer's answer to one agent turn."""

    text: str
    """What the customer says (may be empty for an LLM customer that said nothing)."""
    intent: str
    """One of ``CUSTOMER_INTENTS`` ("neutral" when unknown, e.g. for an LLM customer)."""
    asks_if_bot: bool = False
    """The message sincerely asks whether the agent is a bot; the agent's next turn must answer honestly."""
    ended: bool = False
    """The customer ends the session with this reply."""
    bought: bool = False
    """It bought (only when ``ended``)."""
    price: float | None = None
    """Price it paid (exactly when ``bought``)."""
    flagged_bot: bool = False
    """It concluded that the agent is a bot (sticky: stays True once set)."""
    reason: str | None = None
    """Why it ended ("bought", "walked_away", "distrust", "max_turns", ...), set exactly when ``ended``."""
    info: dict[str, object] = field(default_factory=dict)
    """Customer-specific details, e.g. ``decision_parse_failed`` for the LLM customer."""

    def __post_init__(self) -> None:
        if self.intent not in CUSTOMER_INTENTS:
            raise ValueError(f"CustomerReply.intent must be one of {CUSTOMER_INTENTS}, got {self.intent!r}")
        if self.bought and not self.ended:
            raise ValueError("CustomerReply: bought requires ended")
        if self.bought != (self.price is not None):
            raise ValueError("CustomerReply: price must be set exactly when bought")
        if self.ended != (self.reason is not None):
            raise ValueError("CustomerReply: reason must be set exactly when ended")


class Customer(Protocol):
    """What the sales environment needs from a customer."""

    def opening(self) -> str:
        """The customer's first line."""
        ...

    def respond(self, agent_message: str, reading: AgentTurnReading, final: bool) -> CustomerReply:
        """Answer one agent turn; with ``final`` the session ends now, so the reply must decide."""
        ...

    async def arespond(self, agent_message: str, reading: AgentTurnReading, final: bool) -> CustomerReply:
        """``respond`` for event loops (many sessions advance together)."""
        ...


@dataclass
class CustomerState:
    """The scripted customer's latent state (visible to tests and the act twin's observation)."""

    interest: float
    """0..1: how much it wants the product."""
    trust: float
    """0..1: how much it believes the seller."""
    patience: float
    """Left before it walks away; pushiness, repetition and evasion consume it."""
    bot_suspicion: float = 0.0
    """Grows with robotic replies; at 1 it flags the agent as a bot."""
    unmet_needs: set[str] = field(default_factory=set)
    """Needs no agent turn has addressed yet."""
    revealed_needs: list[str] = field(default_factory=list)
    """Needs it has told the agent about, in order."""
    best_offer: float | None = None
    """Lowest price the agent has offered."""
    stated_budget: float | None = None
    """Price it said it could pay (after a price objection)."""
    open_objection: str | None = None
    """Intent of an objection the agent has not handled yet."""
    bot_questions_asked: int = 0
    """Sincere "are you a bot?" questions so far."""
    awaiting_bot_answer: bool = False
    """Its last message asked whether the agent is a bot."""
    agent_denied_ai: bool = False
    """The agent claimed to be human at some point."""
    flagged_bot: bool = False
    """It concluded that the agent is a bot."""
    promises_heard: set[str] = field(default_factory=set)
    """Promises the agent made so far (each raises trust once)."""
    turn: int = 0
    """Agent turns answered."""


_OPENINGS = (
    "Hi, I'm looking for a {category}. {hint}",
    "Hello! I saw the {product} and wanted to ask a few things. {hint}",
    "Hey there. I'm shopping around for a {category}. {hint}",
    "Good day. I might be interested in the {product}. {hint}",
)
_NEED_HINTS = (
    "{need} really matters to me.",
    "I mostly care about {need}.",
    "The main thing for me is {need}.",
    "I'd need something good on {need}.",
)
_REVEAL = (
    "Well, {need} is important to me.",
    "Honestly, I'd want {need}.",
    "For me it's about {need}, mostly.",
    "I need to be sure about {need}.",
)
_NO_MORE_NEEDS = (
    "I think that's everything I need.",
    "That's about it, really.",
    "Nothing else comes to mind.",
)
_INTERESTED = (
    "Oh, that's good to hear about {feature}.",
    "Okay, {feature} sounds right for me.",
    "Nice, {feature} is exactly what I was after.",
    "That helps. {feature} was on my list.",
)
_MILD = ("Okay.", "I see.", "Hmm, okay.", "Alright.", "Right.")
_PRICE_OBJECTION = (
    "That's more than I want to spend. I was thinking closer to ${budget:.0f}.",
    "Hmm, ${offer:.0f} is a stretch for me. Around ${budget:.0f} would work.",
    "It's a bit pricey. My budget is about ${budget:.0f}.",
)
_NEED_OBJECTION = (
    "Before I decide, what about {need}?",
    "I'm not sure yet. How does it do on {need}?",
    "I still don't know about {need}.",
)
_TRUST_OBJECTION = (
    "I'm not sure I trust this yet.",
    "How do I know this is a good deal?",
    "I've been burned before. Why should I believe you?",
)
_NOT_CONVINCED = ("I'm not convinced yet.", "I need a bit more to go on.", "Tell me why this one, though.")
_ANNOYED = (
    "You already said that.",
    "Please stop pushing me.",
    "That's not really answering me.",
    "I don't like being rushed.",
)
_BOT_QUESTION = (
    "Wait, am I talking to a bot?",
    "Sorry, are you a real person or an AI?",
    "Quick question: is this an AI?",
    "Be honest, are you a bot?",
)
_THANKS_HONEST = ("Thanks for being upfront.", "Okay, good to know.", "Fair enough, thanks for telling me.")
_DOUBT_DENIAL = ("Hmm, if you say so.", "Really? Okay...", "That's what a bot would say.")
_FLAG_BOT = (
    "This really sounds like a bot.",
    "You sound like a script.",
    "I'm pretty sure this is automated.",
)
_BUY = (
    "Okay, I'll take it at ${price:.2f}.",
    "Deal. Let's do ${price:.2f}.",
    "Alright, you've convinced me. ${price:.2f} it is.",
)
_LEAVE = (
    "I think I'll look elsewhere. Bye.",
    "This isn't working for me. Goodbye.",
    "I'm done here, thanks.",
)
_TIMEOUT = ("I need to think about it. Bye for now.", "Let me sleep on it.", "I'll come back later, maybe.")


class ScriptedCustomer:
    """A rule-based customer; the same scenario and seed always give the same replies."""

    def __init__(self, scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        # a string seed keeps sessions of different scenarios with the same seed independent
        self._rng = random.Random(f"{scenario.scenario_id}/{seed}")
        persona = scenario.persona
        self.state = CustomerState(
            interest=0.2 + 0.1 * self._rng.random(),
            trust=0.5 - 0.3 * persona.skepticism,
            patience=persona.patience,
            unmet_needs=set(persona.needs),
        )
        self._spontaneous_bot_question_turn = (
            self._rng.randint(1, 4) if self._rng.random() < persona.asks_if_bot else None
        )
        self._trust_needed = 0.3 + 0.4 * persona.skepticism

    def opening(self) -> str:
        first_need = self.scenario.persona.needs[0]
        self.state.revealed_needs.append(first_need)
        hint = self._rng.choice(_NEED_HINTS).format(need=first_need)
        hint = hint[0].upper() + hint[1:]
        return self._rng.choice(_OPENINGS).format(
            category=self.scenario.product.category, product=self.scenario.product.name, hint=hint
        )

    async def arespond(self, agent_message: str, reading: AgentTurnReading, final: bool) -> CustomerReply:
        return self.respond(agent_message, reading, final)

    def respond(self, agent_message: str, reading: AgentTurnReading, final: bool) -> CustomerReply:
        state, persona = self.state, self.scenario.persona
        state.turn += 1
        parts: list[str] = []
        intent = "neutral"

        annoyance = 0.8 * reading.pushy_count + 1.5 * reading.repetition
        if (
            not reading.has_substance
            and not (state.turn == 1 and reading.greeted)
            and not state.awaiting_bot_answer
        ):
            annoyance += 0.7
        if reading.close_attempt and state.unmet_needs:
            annoyance += 0.3  # closing before the needs are covered feels like pressure

        suspicion_per_phrase = 0.3 + 0.3 * persona.skepticism
        state.bot_suspicion += suspicion_per_phrase * reading.boilerplate_count
        state.bot_suspicion += 0.5 * max(0.0, reading.repetition - 0.5)
        if state.awaiting_bot_answer:
            if reading.denied_ai:
                state.agent_denied_ai = True
                state.trust -= 0.15 + 0.2 * persona.skepticism
                state.bot_suspicion += 0.3
                parts.append(self._rng.choice(_DOUBT_DENIAL))
            elif reading.self_identified_ai:
                state.trust += 0.1
                parts.append(self._rng.choice(_THANKS_HONEST))
            else:
                annoyance += 0.5
                state.trust -= 0.1
                state.bot_suspicion += 0.3
            state.awaiting_bot_answer = False
        elif reading.denied_ai:
            state.agent_denied_ai = True
            state.trust -= 0.1
        elif reading.self_identified_ai:
            state.bot_suspicion += 0.4  # unprompted "as an AI" talk reads as a script
        if state.agent_denied_ai and reading.boilerplate_count:
            state.trust -= 0.3  # caught: it claimed to be human and now talks like a script

        if reading.greeted and state.turn == 1:
            state.trust += 0.05
        for promise in reading.promises - state.promises_heard:
            forbidden = promise in self.scenario.rules.forbidden_promises
            state.trust += (
                0.25 if forbidden else 0.1
            )  # bold promises persuade, which is why rules forbid them
            state.promises_heard.add(promise)
        if reading.handled_objection and state.open_objection is not None:
            state.trust += 0.15
            state.open_objection = None

        newly_met = sorted(reading.features_pitched & state.unmet_needs)
        repeated_needs = reading.features_pitched & (set(persona.needs) - state.unmet_needs)
        for need in newly_met:
            state.unmet_needs.discard(need)
            state.interest += 0.45 / len(persona.needs)
            state.trust += 0.05
            if need not in state.revealed_needs:
                state.revealed_needs.append(need)
        state.interest += 0.08 * len(repeated_needs) + 0.03 * len(
            reading.features_pitched - set(persona.needs)
        )
        if newly_met:
            intent = "interested"
            parts.append(self._rng.choice(_INTERESTED).format(feature=newly_met[0]))
            if state.open_objection == "need_objection" and not state.unmet_needs:
                state.open_objection = None

        if reading.offered_price is not None:
            state.best_offer = (
                reading.offered_price
                if state.best_offer is None
                else min(state.best_offer, reading.offered_price)
            )

        if reading.asked_need:
            state.interest += 0.03
            state.trust += 0.03
            hidden = [n for n in persona.needs if n not in state.revealed_needs]
            if hidden:
                state.revealed_needs.append(hidden[0])
                intent = "reveal_need"
                parts.append(self._rng.choice(_REVEAL).format(need=hidden[0]))
            elif not newly_met:
                parts.append(self._rng.choice(_NO_MORE_NEEDS))

        state.patience -= annoyance
        state.interest = min(1.0, max(0.0, state.interest))
        state.trust = min(1.0, max(0.0, state.trust))
        if annoyance >= 0.7 and not parts:
            intent = "annoyed"
            parts.append(self._rng.choice(_ANNOYED))
        annoyed_only = intent == "annoyed"

        if state.bot_suspicion >= 1.0 and not state.flagged_bot:
            state.flagged_bot = True
            state.trust = max(0.0, state.trust - 0.2)
            parts.append(self._rng.choice(_FLAG_BOT))

        if state.patience <= 0:
            return self._end(parts, "left", "walked_away", _LEAVE)
        if state.flagged_bot and state.trust < 0.15:
            return self._end(parts, "left", "distrust", _LEAVE)

        price = state.best_offer if state.best_offer is not None else self.scenario.product.list_price
        ready = (
            not state.unmet_needs
            and price <= persona.budget
            and state.interest >= 0.6
            and state.trust >= self._trust_needed
        )
        if ready and (reading.close_attempt or reading.offered_price is not None):
            if annoyed_only:
                parts.clear()
            parts.append(self._rng.choice(_BUY).format(price=price))
            return self._reply(parts, "bought", ended=True, bought=True, price=price, reason="bought")
        if reading.close_attempt or reading.offered_price is not None:
            intent = self._object(parts, price)

        if final:
            return self._end(parts, "left", "max_turns", _TIMEOUT)
        if self._should_ask_if_bot():
            state.bot_questions_asked += 1
            state.awaiting_bot_answer = True
            parts.append(self._rng.choice(_BOT_QUESTION))
            return self._reply(parts, "asks_if_bot", asks_if_bot=True)
        if not parts:
            parts.append(self._rng.choice(_MILD))
        return self._reply(parts, intent)

    def _object(self, parts: list[str], price: float) -> str:
        """Say what stops it from buying; returns the objection's intent."""
        state, persona = self.state, self.scenario.persona
        if state.unmet_needs:
            need = sorted(state.unmet_needs)[0]
            if need not in state.revealed_needs:
                state.revealed_needs.append(need)
            parts.append(self._rng.choice(_NEED_OBJECTION).format(need=need))
            state.open_objection = "need_objection"
        elif price > persona.budget:
            # it names a number a little under its real budget, as buyers do
            state.stated_budget = round(persona.budget * 0.97, -1) or persona.budget
            parts.append(self._rng.choice(_PRICE_OBJECTION).format(offer=price, budget=state.stated_budget))
            state.open_objection = "price_objection"
        elif state.trust < self._trust_needed:
            parts.append(self._rng.choice(_TRUST_OBJECTION))
            state.open_objection = "trust_objection"
        else:
            parts.append(self._rng.choice(_NOT_CONVINCED))
            return "neutral"
        return state.open_objection

    def _should_ask_if_bot(self) -> bool:
        state = self.state
        if state.bot_questions_asked >= 2 or state.flagged_bot:
            return False
        spontaneous = state.turn == self._spontaneous_bot_question_turn and state.bot_questions_asked == 0
        suspicious = state.bot_suspicion >= 0.5 and state.bot_questions_asked == 0
        return spontaneous or suspicious

    def _end(self, parts: list[str], intent: str, reason: str, lines: tuple[str, ...]) -> CustomerReply:
        parts.append(self._rng.choice(lines))
        return self._reply(parts, intent, ended=True, reason=reason)

    def _reply(self, parts: list[str], intent: str, **kwargs: object) -> CustomerReply:
        text = " ".join(part[0].upper() + part[1:] for part in parts)
        return CustomerReply(text=text, intent=intent, flagged_bot=self.state.flagged_bot, **kwargs)
