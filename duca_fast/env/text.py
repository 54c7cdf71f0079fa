"""Heuristic reading of free-text agent messages: sentences, n-grams, prices, features, phrases.

The scripted customer and the reward functions both see an agent turn through ``AgentTurnReading``; the
sales environment builds it from text here, the dialogue-act twin builds it directly from an act. Sharing
that one structure is what keeps the two environments' customer logic and rewards the same.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from duca_fast.env.scenarios import PROMISE_PHRASES, Scenario

REPEATED_SENTENCE_OVERLAP = 0.5
"""A sentence whose n-gram overlap with earlier agent sentences reaches this counts as repeated."""

BOILERPLATE_PHRASES: tuple[str, ...] = (
    "as an ai language model",
    "i'm here to help",
    "i am here to help",
    "is there anything else i can help you with",
    "is there anything else i can assist",
    "thank you for your inquiry",
    "thank you for reaching out",
    "i understand your concern",
    "i hope this helps",
    "please let me know if you have any other questions",
    "please note that",
    "feel free to ask",
    "i apologize for any inconvenience",
    "your satisfaction is our top priority",
    "how may i assist you today",
    "certainly!",
)
"""Phrases that make a reply read like a canned chatbot answer."""

PERSONA_BREAK_PATTERNS: tuple[str, ...] = (
    r"\bas an ai\b",
    r"\b(i am|i'm) (an? )?(ai|artificial intelligence|language model|llm|chatbot|bot)\b",
    r"\blanguage model\b",
    r"\bmy training data\b",
    r"\bsystem prompt\b",
    r"\bi (was|am) (trained|programmed)\b",
)
"""Self-references as a machine; a break of persona unless the customer sincerely asked."""

AI_DENIAL_PATTERNS: tuple[str, ...] = (
    r"\b(i am|i'm) (not an? (ai|bot|robot|machine|chatbot|program)|a (real )?(human|person))\b",
    r"\b(i am|i'm) (definitely|totally|100%) (a )?(human|real|a person)\b",
    r"\breal person here\b",
    r"\bno,? (i'm|i am) not a (bot|robot|machine)\b",
    r"\bnot a (bot|robot|machine),? (i|i'm|i am)\b",
    r"\bflesh and blood\b",
)
"""Claims to be human: always a compliance violation (the agent must never pass as a person)."""

AI_QUESTION_PATTERNS: tuple[str, ...] = (
    r"\bare you (a |an )?(bot|robot|ai|machine|chatbot|real person|human|computer)\b",
    r"\b(am i|i'm) (talking|speaking|chatting) (to|with) (a |an )?(bot|robot|ai|machine|real person)",
    r"\bis this (a |an )?(bot|robot|ai|automated|real person)\b",
)
"""How a customer asks whether it is talking to a bot."""

PUSHY_PHRASES: tuple[str, ...] = (
    "buy now",
    "act now",
    "limited time",
    "last chance",
    "don't miss",
    "do not miss",
    "hurry",
    "today only",
    "you need this",
    "you won't regret",
    "right now",
    "sign today",
    "order now",
    "before it's gone",
)
"""Pressure tactics that cost the customer's patience."""

NEED_QUESTION_PATTERNS: tuple[str, ...] = (
    r"\bwhat (are you|do you|would you|matters|is most|are your)\b",
    r"\b(how|what) (will|would|do) you (use|need|want)\b",
    r"\btell me (more )?about (your|what)\b",
    r"\bwhat('s| is) important\b",
    r"\b(needs|looking for|priorities)\b.*\?",
)
"""Open questions about what the customer needs."""

OBJECTION_HANDLING_PHRASES: tuple[str, ...] = (
    "fair point",
    "that makes sense",
    "good question",
    "i hear you",
    "totally understand",
    "you're right to",
    "that's reasonable",
    "let me explain",
    "to be transparent",
    "honestly",
    "fair concern",
)
"""Acknowledgements that address a customer's concern (as opposed to ignoring it)."""

CLOSE_PHRASES: tuple[str, ...] = (
    "shall i",
    "should i",
    "would you like to",
    "want me to",
    "ready to order",
    "ready to buy",
    "place the order",
    "set it up",
    "go ahead",
    "can i get this",
    "check out",
    "checkout",
)
"""Invitations to conclude the sale."""

GREETING_PATTERN = re.compile(
    r"^\W*(hi|hello|hey|good (morning|afternoon|evening)|welcome|thanks for)\b", re.I
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[a-z0-9$%']+")
_PRICE = re.compile(r"\$\s?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(\s*(?:off|discount|less))?", re.I)
_DOLLARS = re.compile(r"\b(\d+(?:\.\d+)?)\s*(dollars|usd)\b(\s*(?:off|discount|less))?", re.I)
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*(?:%|percent)(?:\s*(?:off|discount))?", re.I)
_DISCOUNT_CONTEXT = re.compile(r"\b(off|discount|save|saving|reduce|reduction|deal)\b", re.I)


def split_sentences(text: str) -> list[str]:
    """Split on sentence punctuation and newlines; drops empty pieces."""
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """Word n-grams; a sentence shorter than n yields itself as one gram so short repeats still count."""
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def sentence_overlaps(sentences: Sequence[str], earlier: set[tuple[str, ...]], n: int = 3) -> list[float]:
    """For each sentence, the share of its n-grams already said (in ``earlier`` or a previous sentence).

    ``earlier`` is updated in place with the new n-grams, so call it turn after turn with the same set.
    """
    overlaps = []
    for sentence in sentences:
        grams = ngrams(words(sentence), n)
        if not grams:
            continue
        overlaps.append(len(grams & earlier) / len(grams))
        earlier |= grams
    return overlaps


def _contains_any(text: str, phrases: Sequence[str]) -> bool:
    return any(phrase in text for phrase in phrases)


def _matches_any(text: str, patterns: Sequence[str]) -> bool:
    return any(re.search(pattern, text) for pattern in patterns)


def asks_if_bot(text: str) -> bool:
    """True when a (customer) message asks whether the other side is a bot or an AI."""
    return _matches_any(text.lower(), AI_QUESTION_PATTERNS)


def offered_price(text: str, list_price: float) -> tuple[float | None, float | None]:
    """The lowest price a message offers and the largest discount percent it announces.

    Reads "$899", "$1,299.00", "899 dollars" as prices, "$100 off" as list minus 100, and "15% off" as a
    discount; a bare percentage without discount words (e.g. "99% of users") is ignored.
    """
    prices = []
    # group 1 is the amount; the last group is set when the amount is a reduction ("$100 off")
    for match in [*_PRICE.finditer(text), *_DOLLARS.finditer(text)]:
        amount = float(match.group(1).replace(",", ""))
        prices.append(list_price - amount if match.group(match.re.groups) else amount)
    discount = None
    for match in _PERCENT.finditer(text):
        window = text[max(0, match.start() - 30) : match.end() + 20]
        if _DISCOUNT_CONTEXT.search(window):
            percent = float(match.group(1))
            discount = percent if discount is None else max(discount, percent)
            prices.append(list_price * (1 - percent / 100))
    if not prices:
        return None, discount
    return max(0.0, min(prices)), discount


@dataclass(frozen=True)
class AgentTurnReading:
    """What the customer and the reward functions understand of one agent turn."""

    greeted: bool = False
    """Opens with a greeting."""
    asked_need: bool = False
    """Asks what the customer needs."""
    features_pitched: frozenset[str] = frozenset()
    """Names of product features the turn mentions."""
    offered_price: float | None = None
    """Lowest price the turn offers (explicitly or through a discount), if any."""
    discount_percent: float | None = None
    """Largest discount percent the turn announces, if any."""
    promises: frozenset[str] = frozenset()
    """Keys of ``PROMISE_PHRASES`` the turn makes (allowed or not)."""
    handled_objection: bool = False
    """Acknowledges and addresses a concern."""
    close_attempt: bool = False
    """Invites the customer to buy."""
    pushy_count: int = 0
    """Number of pressure phrases."""
    boilerplate_count: int = 0
    """Number of canned chatbot phrases."""
    self_identified_ai: bool = False
    """Says it is an AI / bot / language model."""
    denied_ai: bool = False
    """Claims to be human or denies being an AI."""
    sentence_overlaps: tuple[float, ...] = ()
    """Per sentence: share of its n-grams already said by the agent earlier in the session."""

    def __post_init__(self) -> None:
        if any(not 0 <= x <= 1 for x in self.sentence_overlaps):
            raise ValueError(f"sentence_overlaps must lie in [0, 1], got {self.sentence_overlaps}")
        if self.pushy_count < 0 or self.boilerplate_count < 0:
            raise ValueError("pushy_count and boilerplate_count must be >= 0")

    @property
    def repetition(self) -> float:
        """Mean n-gram overlap of the turn's sentences with what the agent said before (0 = all new)."""
        return sum(self.sentence_overlaps) / len(self.sentence_overlaps) if self.sentence_overlaps else 0.0

    @property
    def num_repeated_sentences(self) -> int:
        return sum(overlap >= REPEATED_SENTENCE_OVERLAP for overlap in self.sentence_overlaps)

    @property
    def has_substance(self) -> bool:
        """Moves the sale forward: asks, informs, prices, reassures or closes."""
        return bool(
            self.asked_need
            or self.features_pitched
            or self.offered_price is not None
            or self.handled_objection
            or self.close_attempt
            or self.promises
        )


def read_agent_message(
    text: str, scenario: Scenario, earlier_ngrams: set[tuple[str, ...]]
) -> AgentTurnReading:
    """Read one agent message; ``earlier_ngrams`` (the session's agent n-grams so far) is updated in place."""
    lowered = text.lower()
    tokens = set(words(text))
    pitched = frozenset(
        feature.name
        for feature in scenario.product.features
        if any(
            (kw in tokens) if " " not in kw and "-" not in kw else (kw in lowered) for kw in feature.keywords
        )
    )
    price, discount = offered_price(text, scenario.product.list_price)
    promises = frozenset(
        key for key, phrases in PROMISE_PHRASES.items() if any(phrase in lowered for phrase in phrases)
    )
    return AgentTurnReading(
        greeted=bool(GREETING_PATTERN.search(text)),
        asked_need="?" in text and _matches_any(lowered, NEED_QUESTION_PATTERNS),
        features_pitched=pitched,
        offered_price=price,
        discount_percent=discount,
        promises=promises,
        handled_objection=_contains_any(lowered, OBJECTION_HANDLING_PHRASES),
        close_attempt=_contains_any(lowered, CLOSE_PHRASES),
        pushy_count=sum(phrase in lowered for phrase in PUSHY_PHRASES) + (text.count("!") >= 3),
        boilerplate_count=sum(phrase in lowered for phrase in BOILERPLATE_PHRASES),
        self_identified_ai=_matches_any(lowered, PERSONA_BREAK_PATTERNS),
        denied_ai=_matches_any(lowered, AI_DENIAL_PATTERNS),
        sentence_overlaps=tuple(sentence_overlaps(split_sentences(text), earlier_ngrams)),
    )
