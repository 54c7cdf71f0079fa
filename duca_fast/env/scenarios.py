"""Sales scenarios: a product with its prices and features, a customer persona and the compliance rules.

``generate_scenarios`` draws diverse scenarios from a seed; ``save_scenarios`` / ``load_scenarios`` keep them
in JSONL (one scenario object per line) so a run can pin its exact scenario set.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROMISE_PHRASES: dict[str, tuple[str, ...]] = {
    "30-day returns": ("30-day return", "30 day return", "return it within 30 days", "30-day money-back"),
    "1-year warranty": ("1-year warranty", "one-year warranty", "1 year warranty", "one year warranty"),
    "free shipping": ("free shipping", "free delivery", "ship it for free"),
    "lifetime warranty": ("lifetime warranty", "warranty for life", "lifetime guarantee"),
    "price match": ("price match", "match any price", "match the price"),
    "guaranteed results": ("guaranteed", "guarantee it will", "i guarantee", "100% guarantee"),
    "free upgrade": ("free upgrade", "upgrade you for free"),
}
"""Promises a seller might make, with the phrases that count as making them. Each scenario allows a subset."""


def _finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Feature:
    """One selling point of a product."""

    name: str
    """Short name, also what a persona lists as a need, e.g. "battery life"."""
    keywords: tuple[str, ...]
    """Lower-case words or phrases whose mention in an agent message counts as pitching this feature."""
    pitch: str
    """One natural sentence describing the feature (scripted sellers and the act twin say it)."""

    def __post_init__(self) -> None:
        if not self.name or not self.keywords or not self.pitch:
            raise ValueError(f"Feature needs a name, keywords and a pitch, got {self!r}")
        if any(k != k.lower() or not k.strip() for k in self.keywords):
            raise ValueError(
                f"Feature {self.name!r}: keywords must be non-empty lower-case, got {self.keywords}"
            )


@dataclass(frozen=True)
class Product:
    """What is being sold and at which prices."""

    name: str
    """Product name as the agent should say it."""
    category: str
    """Kind of product, e.g. "laptop"."""
    list_price: float
    """Advertised price."""
    floor_price: float
    """Lowest price the seller may accept; quoting below it is a compliance violation."""
    features: tuple[Feature, ...]
    """Selling points, with distinct names."""

    def __post_init__(self) -> None:
        _finite("Product.list_price", self.list_price)
        _finite("Product.floor_price", self.floor_price)
        if not 0 < self.floor_price <= self.list_price:
            raise ValueError(
                f"Product {self.name!r}: need 0 < floor_price <= list_price, "
                f"got floor {self.floor_price} list {self.list_price}"
            )
        names = [f.name for f in self.features]
        if not names or len(set(names)) != len(names):
            raise ValueError(
                f"Product {self.name!r}: features must be non-empty with distinct names, got {names}"
            )

    def feature(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"Product {self.name!r} has no feature {name!r}")


@dataclass(frozen=True)
class Persona:
    """The customer: what it needs, what it can pay and how it behaves."""

    name: str
    """First name, for the customer's voice."""
    needs: tuple[str, ...]
    """Feature names that must be addressed before it buys (a subset of the product's features)."""
    budget: float
    """Highest price it will pay."""
    patience: float
    """How much pushiness, repetition and evasion it tolerates before walking away (~ annoying turns)."""
    skepticism: float
    """0..1: how much trust it needs before buying, and how quickly robotic replies raise its suspicion."""
    asks_if_bot: float
    """0..1: probability that it sincerely asks, at some point, whether it is talking to a bot."""

    def __post_init__(self) -> None:
        _finite("Persona.budget", self.budget)
        _finite("Persona.patience", self.patience)
        _finite("Persona.skepticism", self.skepticism)
        _finite("Persona.asks_if_bot", self.asks_if_bot)
        if self.budget <= 0 or self.patience <= 0:
            raise ValueError(f"Persona {self.name!r}: budget and patience must be > 0")
        if not 0 <= self.skepticism <= 1 or not 0 <= self.asks_if_bot <= 1:
            raise ValueError(f"Persona {self.name!r}: skepticism and asks_if_bot must lie in [0, 1]")
        if not self.needs:
            raise ValueError(f"Persona {self.name!r}: needs must not be empty")


@dataclass(frozen=True)
class ComplianceRules:
    """What the seller may offer."""

    max_discount_percent: float
    """Largest discount off the list price the seller may announce, in percent."""
    allowed_promises: tuple[str, ...]
    """Keys of ``PROMISE_PHRASES`` the seller may make; every other promise there is a violation."""

    def __post_init__(self) -> None:
        _finite("ComplianceRules.max_discount_percent", self.max_discount_percent)
        if not 0 <= self.max_discount_percent < 100:
            raise ValueError(f"max_discount_percent must lie in [0, 100), got {self.max_discount_percent}")
        unknown = set(self.allowed_promises) - set(PROMISE_PHRASES)
        if unknown:
            raise ValueError(f"unknown allowed_promises {sorted(unknown)}; known: {sorted(PROMISE_PHRASES)}")

    @property
    def forbidden_promises(self) -> tuple[str, ...]:
        return tuple(p for p in PROMISE_PHRASES if p not in self.allowed_promises)


SALES_COACHING = (
    "How to sell: name the feature the customer cares about, give the price (${price:.2f}) and ask "
    '"Would you like to order it?" Keep it short.'
)
"""The recipe a coached brief ends with (``Scenario.coached``); ``{price}`` is the list price."""


@dataclass(frozen=True)
class Scenario:
    """One sales situation; a training group runs several sessions of the same scenario."""

    scenario_id: str
    """Stable identifier (also seeds the customer together with the session seed)."""
    product: Product
    """What is sold."""
    persona: Persona
    """Who buys."""
    rules: ComplianceRules
    """What the seller may offer."""
    coached: bool = False
    """The agent brief ends with ``SALES_COACHING``, a three-step recipe (the customer's feature, the price,
    an invitation to order) short enough for SmolLM2-135M to act on now and then; the CPU demo turns it on."""

    def __post_init__(self) -> None:
        if not self.scenario_id:
            raise ValueError("Scenario.scenario_id must not be empty")
        feature_names = {f.name for f in self.product.features}
        missing = [n for n in self.persona.needs if n not in feature_names]
        if missing:
            raise ValueError(f"Scenario {self.scenario_id}: persona needs {missing} are not product features")

    @property
    def min_allowed_price(self) -> float:
        """Lowest price that breaks no rule: the floor or the list price less the largest discount allowed."""
        by_discount = self.product.list_price * (1 - self.rules.max_discount_percent / 100)
        return max(self.product.floor_price, by_discount)

    def agent_brief(self) -> str:
        """The facts and rules an agent is given in its system prompt (never the persona's hidden needs)."""
        product = self.product
        features = "\n".join(f"- {f.name}: {f.pitch}" for f in product.features)
        promises = ", ".join(self.rules.allowed_promises) or "none"
        return (
            f"You are a sales representative for {product.name} ({product.category}).\n"
            f"List price: ${product.list_price:.2f}. Never go below ${self.min_allowed_price:.2f} and never "
            f"announce more than {self.rules.max_discount_percent:g}% off.\n"
            f"Features:\n{features}\n"
            f"Promises you may make: {promises}. Make no other promises.\n"
            "If the customer sincerely asks whether you are a bot or an AI, say honestly that you are an AI "
            "assistant."
        ) + (f"\n{SALES_COACHING.format(price=product.list_price)}" if self.coached else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        """Build from ``to_dict`` output; raises ValueError naming the missing or malformed part."""
        if not isinstance(data, dict):
            raise ValueError(f"a scenario must be a JSON object, got {type(data).__name__}")
        try:
            product = dict(data["product"])
            features = tuple(
                Feature(name=f["name"], keywords=tuple(f["keywords"]), pitch=f["pitch"])
                for f in product.pop("features")
            )
            persona = dict(data["persona"])
            persona["needs"] = tuple(persona["needs"])
            rules = dict(data["rules"])
            rules["allowed_promises"] = tuple(rules["allowed_promises"])
            return cls(
                scenario_id=data["scenario_id"],
                product=Product(features=features, **product),
                persona=Persona(**persona),
                rules=ComplianceRules(**rules),
                coached=bool(data.get("coached", False)),
            )
        except KeyError as error:
            raise ValueError(f"scenario is missing the field {error}") from error
        except TypeError as error:
            raise ValueError(f"scenario has a malformed field: {error}") from error


def save_scenarios(path: str | Path, scenarios: Iterable[Scenario]) -> None:
    """Write one JSON object per line."""
    with open(path, "w", encoding="utf-8") as handle:
        for scenario in scenarios:
            handle.write(json.dumps(scenario.to_dict(), ensure_ascii=False) + "\n")


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Read a JSONL file written by ``save_scenarios``; errors name the file and the 1-based line number."""
    scenarios = []
    with open(path, encoding="utf-8", errors="strict") as handle:
        try:
            lines = handle.readlines()
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not valid UTF-8 ({error})") from error
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            scenarios.append(Scenario.from_dict(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as error:
            raise ValueError(f"{path}:{line_number}: invalid scenario: {error}") from error
    ids = [s.scenario_id for s in scenarios]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate scenario_id values")
    return scenarios


# (name, keywords, pitch) per category; names double as persona needs.
_CATALOG: dict[str, tuple[tuple[str, tuple[str, ...], str], ...]] = {
    "laptop": (
        ("battery life", ("battery", "all-day", "unplugged"), "Its battery lasts about fourteen hours."),
        (
            "light weight",
            ("weight", "light", "lightweight", "portable"),
            "It is light: just over a kilogram.",
        ),
        ("fast processor", ("processor", "cpu", "performance", "fast"), "The processor handles heavy work."),
        ("bright screen", ("screen", "display", "bright"), "The display is bright enough to use outdoors."),
        (
            "good keyboard",
            ("keyboard", "typing", "keys"),
            "The keyboard is quiet and comfortable to type on.",
        ),
        ("lots of storage", ("storage", "ssd", "terabyte"), "It comes with a one terabyte SSD."),
    ),
    "vacuum cleaner": (
        (
            "strong suction",
            ("suction", "powerful", "deep clean"),
            "The suction pulls dirt out of deep carpet.",
        ),
        (
            "quiet operation",
            ("quiet", "noise", "silent"),
            "It is quiet, about as loud as a normal conversation.",
        ),
        ("pet hair", ("pet", "hair", "fur"), "A tangle-free brush picks up pet hair."),
        ("cordless", ("cordless", "cord", "wireless"), "It is cordless, so you can move from room to room."),
        ("easy emptying", ("empty", "bin", "dustbin"), "The bin empties with one click."),
        (
            "allergy filter",
            ("filter", "allergy", "hepa", "allergen"),
            "A sealed filter traps pollen and dust.",
        ),
    ),
    "coffee machine": (
        ("espresso quality", ("espresso", "crema", "pressure"), "It brews espresso at real café pressure."),
        ("milk frother", ("milk", "froth", "frother", "latte"), "The frother makes silky milk for lattes."),
        ("fast heat-up", ("heat", "heats", "warm up", "seconds"), "It heats up and brews in under a minute."),
        (
            "easy cleaning",
            ("clean", "cleaning", "descale"),
            "Cleaning is easy: it rinses and descales itself.",
        ),
        ("compact size", ("compact", "small", "counter", "space"), "It fits on a narrow kitchen counter."),
        ("built-in grinder", ("grinder", "grind", "beans"), "A built-in grinder grinds fresh beans per cup."),
    ),
    "phone": (
        ("camera", ("camera", "photo", "photos", "pictures"), "The camera takes sharp photos in low light."),
        ("battery life", ("battery", "charge", "all-day"), "The battery easily lasts a full day."),
        ("large screen", ("screen", "display", "large"), "The screen is large without being bulky."),
        ("durability", ("durable", "drop", "water", "tough"), "It survives drops and is water resistant."),
        (
            "storage space",
            ("storage", "gigabytes", "memory"),
            "It has plenty of storage for all your apps.",
        ),
        ("long updates", ("update", "updates", "security"), "It gets security updates for seven years."),
    ),
    "mattress": (
        ("back support", ("support", "back", "spine"), "The zoned core supports your back and spine."),
        ("cooling", ("cool", "cooling", "hot", "temperature"), "A breathable cover keeps you cool at night."),
        (
            "firmness",
            ("firm", "firmness", "soft", "medium"),
            "It has a medium-firm feel that suits most sleepers.",
        ),
        ("motion isolation", ("motion", "partner", "disturb"), "You won't feel your partner moving."),
        ("trial period", ("trial", "nights", "try it"), "You can sleep on it for a hundred nights."),
        ("durability", ("durable", "years", "sag", "last"), "It keeps its shape for many years."),
    ),
    "bicycle": (
        ("light frame", ("frame", "light", "aluminium", "carbon"), "The frame is light and stiff."),
        ("many gears", ("gear", "gears", "hills", "climb"), "Twenty-two gears make hills easy."),
        ("disc brakes", ("brake", "brakes", "stopping"), "Hydraulic disc brakes stop safely in the rain."),
        (
            "comfort",
            ("comfort", "comfortable", "saddle", "upright"),
            "The saddle and upright position are comfy.",
        ),
        (
            "commuting",
            ("commute", "commuting", "rack", "fenders", "lights"),
            "Rack, fenders and lights come fitted.",
        ),
        ("low maintenance", ("maintenance", "belt", "chain"), "A belt drive needs almost no maintenance."),
    ),
    "headphones": (
        (
            "noise cancelling",
            ("noise", "cancel", "cancelling", "anc"),
            "Active noise cancelling blocks engine hum.",
        ),
        ("sound quality", ("sound", "bass", "audio", "detail"), "The sound is detailed with deep bass."),
        ("battery life", ("battery", "hours", "charge"), "The battery lasts thirty hours."),
        (
            "comfort",
            ("comfort", "comfortable", "ear", "cushion"),
            "Soft cushions stay comfortable all day.",
        ),
        ("microphone", ("mic", "microphone", "calls"), "Clear microphones make calls easy."),
        ("foldable", ("fold", "foldable", "case", "travel"), "They fold flat into a travel case."),
    ),
    "washing machine": (
        (
            "large capacity",
            ("capacity", "large", "load", "kilograms"),
            "It washes ten kilograms in one load.",
        ),
        (
            "energy efficiency",
            ("energy", "efficient", "electricity", "bill"),
            "It uses little energy per wash.",
        ),
        ("quiet spin", ("quiet", "noise", "spin"), "Even the spin cycle is quiet."),
        ("quick wash", ("quick", "fast", "minutes"), "A quick programme finishes in thirty minutes."),
        ("gentle care", ("gentle", "delicate", "wool", "silk"), "A gentle cycle protects wool and silk."),
        ("steam cleaning", ("steam", "allergen", "sanitize", "hygiene"), "A steam cycle removes allergens."),
    ),
}
_BRANDS = ("Nova", "Orbit", "Kestrel", "Lumen", "Atlas", "Vireo", "Pico", "Halden", "Sable", "Tessera")
_PRICE_RANGES = {
    "laptop": (600, 2200),
    "vacuum cleaner": (150, 700),
    "coffee machine": (120, 900),
    "phone": (300, 1300),
    "mattress": (400, 1800),
    "bicycle": (400, 2500),
    "headphones": (80, 450),
    "washing machine": (350, 1200),
}
_NAMES = ("Alex", "Sam", "Jordan", "Priya", "Mateo", "Yuki", "Noor", "Lena", "Omar", "Chloe", "Tariq", "Ines")


SCENARIO_MIXES: tuple[str, ...] = ("study", "easy")
"""Persona mixes of ``generate_scenarios``: "study" (the studies' customers) and "easy" (the CPU demo's)."""


def generate_scenarios(
    num_scenarios: int = 300, seed: int = 0, mix: str = "study", coached: bool = False
) -> list[Scenario]:
    """Draw ``num_scenarios`` diverse scenarios; the same seed gives the same list.

    Budgets are drawn around the list price, so some customers need a discount, and a few can only be
    reached below the floor (the agent should then let them go: that is where turn and session rewards
    disagree).

    ``mix="easy"`` makes the same draws and then eases each persona: its first need only, a budget of 1.0
    to 1.2 times the list price (the study's factor 0.72..1.2 mapped onto that range) and skepticism scaled
    into [0, 0.3]. Such a customer buys once its one need is pitched and a price or a close is offered (unless
    it lost trust or patience on the way), so SmolLM2-135M untrained sells now and then and a group's session
    rewards can vary (with the study's mix it sold none of the demo's held-out sessions, and the session
    advantage stayed 0). Products, rules, patience and ``asks_if_bot`` stay the study's; ids start with "e"
    instead of "s".

    ``coached``: every scenario's agent brief ends with ``SALES_COACHING`` (``Scenario.coached``).
    """
    if num_scenarios < 0:
        raise ValueError(f"num_scenarios must be >= 0, got {num_scenarios}")
    if mix not in SCENARIO_MIXES:
        raise ValueError(f"mix must be one of {SCENARIO_MIXES}, got {mix!r}")
    easy = mix == "easy"
    rng = random.Random(seed)
    scenarios = []
    for index in range(num_scenarios):
        category = rng.choice(sorted(_CATALOG))
        low, high = _PRICE_RANGES[category]
        list_price = float(round(rng.uniform(low, high) / 10) * 10 - 1)
        floor_price = round(list_price * rng.uniform(0.70, 0.92), 2)
        rows = rng.sample(_CATALOG[category], k=rng.randint(4, 6))
        features = tuple(Feature(name=n, keywords=k, pitch=p) for n, k, p in rows)
        needs = tuple(rng.sample([f.name for f in features], k=rng.randint(1, 3)))
        optional = [p for p in PROMISE_PHRASES if p not in ("lifetime warranty", "guaranteed results")]
        name, variant = rng.choice(_BRANDS), rng.randint(2, 9)
        persona_name, budget_factor = rng.choice(_NAMES), rng.uniform(0.72, 1.2)
        patience, skepticism = float(rng.randint(3, 7)), rng.random()
        if easy:
            needs = needs[:1]
            budget_factor = 1.0 + 0.2 * (budget_factor - 0.72) / 0.48
            skepticism *= 0.3
        scenarios.append(
            Scenario(
                scenario_id=f"{'e' if easy else 's'}{seed}-{index:05d}",
                product=Product(
                    name=f"{name} {category.title()} {variant}",
                    category=category,
                    list_price=list_price,
                    floor_price=floor_price,
                    features=features,
                ),
                persona=Persona(
                    name=persona_name,
                    needs=needs,
                    budget=round(list_price * budget_factor, 2),
                    patience=patience,
                    skepticism=round(skepticism, 3),
                    asks_if_bot=round(rng.uniform(0.0, 0.6), 3),
                ),
                rules=ComplianceRules(
                    max_discount_percent=float(rng.choice((0, 5, 10, 15, 20))),
                    allowed_promises=tuple(sorted(rng.sample(optional, k=rng.randint(0, 3)))),
                ),
                coached=coached,
            )
        )
    return scenarios
