"""Scripted text sellers used by the tests: a careful one and a pushy repeater."""

from __future__ import annotations

import re

from duca_fast.env.scenarios import Scenario
from duca_fast.env.text import asks_if_bot


class GoodSeller:
    """Greets, asks about needs, pitches the features the customer names, meets a stated budget within the
    rules, answers "are you a bot?" honestly and closes once the needs are covered."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.pitched: set[str] = set()
        self.turn = 0
        self.price = scenario.product.list_price

    def __call__(self, customer_message: str) -> str:
        self.turn += 1
        product, lowered = self.scenario.product, customer_message.lower()
        parts = []
        if asks_if_bot(customer_message):
            parts.append("Yes, I'm an AI assistant helping with this sale.")
        if self.turn == 1:
            parts.append(f"Hi, thanks for stopping by to look at the {product.name}.")
        mentioned = [f for f in product.features if f.name in lowered and f.name not in self.pitched]
        for feature in mentioned:
            parts.append(feature.pitch)
            self.pitched.add(feature.name)
        budget = re.search(r"\$(\d+)", customer_message)
        if (
            (budget and "budget" in lowered)
            or (budget and "closer to" in lowered)
            or (budget and "work" in lowered)
        ):
            self.price = max(self.scenario.min_allowed_price, float(budget.group(1)))
            parts.append(f"I can offer it to you for ${self.price:.2f}.")
        if any(w in lowered for w in ("trust", "believe", "good deal")):
            parts.append("That's a fair concern, and I want you to feel sure about it.")
        if self.turn == 1:
            parts.append("What matters most to you in a new one?")
        elif self.turn == 2:
            parts.append("Is there anything else you need it to do well?")
        elif not mentioned or self.turn >= 4:
            parts.append(_CLOSES[self.turn % len(_CLOSES)].format(price=self.price))
        return " ".join(parts)


_CLOSES = (
    "At ${price:.2f}, would you like to go ahead with it?",
    "Shall I set it up for you at ${price:.2f}?",
    "Ready to place the order for ${price:.2f}?",
    "Want me to reserve one at ${price:.2f} for you?",
)


def pushy_repeater(scenario: Scenario) -> str:
    product = scenario.product
    return (
        f"Buy the {product.name} now! Limited time offer!!! It is only ${product.list_price:.2f}. "
        "I'm here to help. Is there anything else I can help you with?"
    )
