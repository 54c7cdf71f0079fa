"""Regimes of the ``sales-acts`` twin: one frozen dataclass of knobs, chosen by name, seeded.

``classic`` is the twin as it was first built: deterministic customers, exact rewards, and an observation
that shows two pieces of the customer's latent state (the "was just asked if it is a bot" flag and the
customer's last intent). It inverts the DuCA paper's premise: its turn penalties (down to -4 per turn,
summed over up to 10 turns) dwarf a session reward of at most 2.

``paper`` is the premise DuCA is about: a large, sparse, noisy session reward (scaled up, stochastic
conversion) next to small dense turn signals (scaled down, a noisy continuous naturalness judge), with the
customer's state kept hidden (the agent sees only surface cues of the customer's words) and a bot
judgement that is stochastic per persona. Every knob can also be set on its own.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass

from duca_fast.env.customer import _BUY, CustomerReply, ScriptedCustomer
from duca_fast.env.scenarios import Scenario
from duca_fast.env.text import AgentTurnReading

SESSION_SCALES: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0)
"""The session-reward scales of the reward-scale sweep (against ``turn_scale`` turn penalties)."""


@dataclass(frozen=True)
class TwinRegime:
    """How the twin's customer behaves and how its rewards and observation look (defaults: ``classic``)."""

    name: str = "classic"
    """A label for logs and result tables (``make_regime`` sets it to the preset's name)."""
    session_scale: float = 1.0
    """Multiplies every session reward component (conversion, margin)."""
    turn_scale: float = 1.0
    """Multiplies every turn reward component (compliance, repetition, naturalness, fluency)."""
    buy_probability: float = 1.0
    """Chance that a customer who is ready to buy does buy when the agent closes or names a price; otherwise
    it hesitates and the session goes on (1: the classic deterministic decision)."""
    naturalness_noise: float = 0.0
    """Standard deviation of Gaussian noise added to the naturalness reward before clipping it to [-1, 0]
    (before ``turn_scale``): a noisy continuous judge instead of the exact phrase count."""
    hidden_state: bool = False
    """The observation vector leaves out the customer's latent state (bot-question flag, last intent) and
    shows surface cues of its last message instead (a question, a mention of bots or AI, a price)."""
    bot_sensitivity: float = 0.0
    """Stochastic bot judgement: after each reply the customer flags the agent as a bot with probability
    ``sensitivity * suspicion``, where a session's sensitivity is this knob x (0.5 + persona skepticism) x
    a per-session draw from U(0.5, 1.5). 0: only the classic fixed threshold (suspicion >= 1) flags."""

    def __post_init__(self) -> None:
        for field in ("session_scale", "turn_scale"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"TwinRegime.{field} must be a finite number > 0, got {value!r}")
        if not 0 < self.buy_probability <= 1:
            raise ValueError(f"TwinRegime.buy_probability must lie in (0, 1], got {self.buy_probability!r}")
        for field in ("naturalness_noise", "bot_sensitivity"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"TwinRegime.{field} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.hidden_state, bool):
            raise ValueError(f"TwinRegime.hidden_state must be a bool, got {self.hidden_state!r}")

    @property
    def changes_rewards(self) -> bool:
        """The rewards differ from the classic twin's (scaled or noisy)."""
        return self.session_scale != 1 or self.turn_scale != 1 or self.naturalness_noise > 0

    @property
    def changes_customer(self) -> bool:
        """The customer differs from ``ScriptedCustomer`` (stochastic conversion or bot judgement)."""
        return self.buy_probability < 1 or self.bot_sensitivity > 0


REGIMES: dict[str, TwinRegime] = {
    "classic": TwinRegime(),
    "paper": TwinRegime(
        name="paper",
        session_scale=10.0,
        turn_scale=0.25,
        buy_probability=0.6,
        naturalness_noise=0.2,
        hidden_state=True,
        bot_sensitivity=0.5,
    ),
}
"""Named presets; ``make_regime(name, **knobs)`` starts from one of them."""


def make_regime(name: str = "classic", **knobs: object) -> TwinRegime:
    """The preset ``name`` with some knobs changed, e.g. ``make_regime("paper", session_scale=30.0)``."""
    if name not in REGIMES:
        raise ValueError(f"unknown twin regime {name!r}; expected one of {tuple(REGIMES)}")
    known = {f.name for f in dataclasses.fields(TwinRegime)} - {"name"}
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise ValueError(f"unknown twin regime knobs {unknown}; known: {sorted(known)}")
    return dataclasses.replace(REGIMES[name], name=name, **knobs)


_HESITATE = (
    "Hmm, I'm close. Let me think about it a moment.",
    "Almost there, but I'm not ready to commit yet.",
    "I like it, I just need a minute before I decide.",
)
_TIMEOUT = ("I'll sleep on it. Bye for now.", "Let me think it over at home.")
_FLAG_BOT = ("Honestly, this feels automated.", "I think I'm chatting with a bot here.")
_LEAVE = ("I'd rather talk to someone else. Bye.",)


class RegimeCustomer(ScriptedCustomer):
    """``ScriptedCustomer`` with the regime's stochastic conversion and stochastic bot judgement.

    Its own random stream (seeded from the scenario, the seed and "regime") leaves the classic customer's
    replies untouched wherever the regime does not intervene.
    """

    def __init__(self, scenario: Scenario, seed: int, regime: TwinRegime) -> None:
        super().__init__(scenario, seed)
        self.regime = regime
        self._regime_rng = random.Random(f"{scenario.scenario_id}/{seed}/regime")
        draw = self._regime_rng.uniform(0.5, 1.5)
        self.bot_sensitivity = regime.bot_sensitivity * (0.5 + scenario.persona.skepticism) * draw
        """This session's flag probability per unit of bot suspicion."""
        self.hesitations = 0
        """Times it was ready to buy and did not (also in ``Outcome.info`` via the last reply)."""

    def respond(self, agent_message: str, reading: AgentTurnReading, final: bool) -> CustomerReply:
        reply = super().respond(agent_message, reading, final)
        if reply.bought and self._regime_rng.random() >= self.regime.buy_probability:
            reply = self._hesitate(reply, final)
        if (
            self.bot_sensitivity > 0
            and not (reply.ended or reply.flagged_bot or reply.asks_if_bot)
            and self._regime_rng.random() < self.bot_sensitivity * self.state.bot_suspicion
        ):
            reply = self._flag(reply)
        if reply.ended:
            reply = dataclasses.replace(reply, info={**reply.info, "hesitations": self.hesitations})
        return reply

    def _hesitate(self, reply: CustomerReply, final: bool) -> CustomerReply:
        self.hesitations += 1
        text = reply.text
        for line in _BUY:
            buy = line.format(price=reply.price)
            if text.endswith(buy):
                text = text[: -len(buy)].rstrip()
                break
        text = " ".join(part for part in (text, self._regime_rng.choice(_HESITATE)) if part)
        if final:
            text = f"{text} {self._regime_rng.choice(_TIMEOUT)}"
            return dataclasses.replace(
                reply, text=text, intent="left", bought=False, price=None, reason="max_turns"
            )
        return dataclasses.replace(
            reply, text=text, intent="neutral", ended=False, bought=False, price=None, reason=None
        )

    def _flag(self, reply: CustomerReply) -> CustomerReply:
        state = self.state
        state.flagged_bot = True
        state.trust = max(0.0, state.trust - 0.2)  # as the classic customer does when it flags
        text = f"{reply.text} {self._regime_rng.choice(_FLAG_BOT)}"
        if state.trust < 0.15:
            text = f"{text} {_LEAVE[0]}"
            return dataclasses.replace(
                reply, text=text, intent="left", flagged_bot=True, ended=True, reason="distrust"
            )
        return dataclasses.replace(reply, text=text, flagged_bot=True)


_BOT_WORDS = re.compile(r"\b(bot|ai|automated|script|real person)\b", re.IGNORECASE)

MESSAGE_CUES: tuple[str, ...] = ("asks_question", "mentions_bot", "mentions_price")
"""Surface cues of the customer's last message in the hidden-state observation."""


def message_cues(message: str | None) -> list[float]:
    """What an agent reading the customer's words can tell without its latent state: a question mark, a
    mention of bots/AI/scripts (a sincere question and a sarcastic remark look alike), a dollar amount."""
    text = message or ""
    return [float("?" in text), float(bool(_BOT_WORDS.search(text))), float("$" in text)]


def noisy_turn_rewards(rewards: dict[str, float], regime: TwinRegime, rng: random.Random) -> dict[str, float]:
    """The regime's view of one turn's rewards: noisy naturalness (clipped to [-1, 0]), then scaled."""
    out = dict(rewards)
    if regime.naturalness_noise > 0 and "naturalness" in out:
        out["naturalness"] = min(
            0.0, max(-1.0, out["naturalness"] + rng.gauss(0.0, regime.naturalness_noise))
        )
    return {name: value * regime.turn_scale for name, value in out.items()}


def scaled_session_rewards(rewards: dict[str, float], regime: TwinRegime) -> dict[str, float]:
    return {name: value * regime.session_scale for name, value in rewards.items()}
