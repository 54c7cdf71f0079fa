"""The environment contract shared by the sales environment, its dialogue-act twin and the rollout driver.

An environment runs one session at a time: ``reset`` starts it and returns what the agent sees first;
``step`` takes the agent's message and returns the customer's answer with that turn's rewards. Nothing
here imports torch: the trainer composes environments and ops, environments know nothing of tensors.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


def _check_finite_components(name: str, values: Mapping[str, float]) -> None:
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name}: component names must be non-empty strings, got {key!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name}[{key!r}] must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Observation:
    """What the agent sees when a session starts."""

    system_prompt: str
    """Instructions and scenario facts for the agent (product, prices it may quote, rules)."""
    customer_message: str | None
    """The customer's opening line, or None when the agent speaks first."""


@dataclass(frozen=True)
class Outcome:
    """How a finished session ended, for metrics and transcripts."""

    converted: bool
    """The customer bought."""
    flagged_bot: bool
    """The customer concluded that it was talking to a bot."""
    num_turns: int
    """Agent turns taken in the session."""
    reason: str
    """Why the session ended, e.g. "bought", "walked_away", "max_turns", "error: ..."."""
    price: float | None = None
    """Agreed price when converted."""
    info: dict[str, Any] = field(default_factory=dict)
    """Environment-specific details (violations, repetition rate, ...)."""

    def __post_init__(self) -> None:
        if self.num_turns < 0:
            raise ValueError(f"Outcome.num_turns must be >= 0, got {self.num_turns}")
        if self.converted and self.price is not None and not math.isfinite(self.price):
            raise ValueError(f"Outcome.price must be finite, got {self.price}")


@dataclass(frozen=True)
class TurnResult:
    """The environment's answer to one agent turn."""

    customer_message: str | None
    """The customer's reply; None when the session ended without one."""
    turn_rewards: dict[str, float]
    """Named turn-level reward components of the agent turn just taken (same keys every turn)."""
    done: bool
    """The session is over; ``session_rewards`` and ``outcome`` are set exactly when it is."""
    session_rewards: dict[str, float] | None = None
    """Named session-level reward components, set on the last turn only."""
    outcome: Outcome | None = None
    """How the session ended, set on the last turn only."""
    info: dict[str, Any] = field(default_factory=dict)
    """Environment-specific details of this turn (e.g. the compliance violations found), for logs."""

    def __post_init__(self) -> None:
        _check_finite_components("turn_rewards", self.turn_rewards)
        if self.done != (self.session_rewards is not None):
            raise ValueError("TurnResult: session_rewards must be set exactly when done is True")
        if self.done != (self.outcome is not None):
            raise ValueError("TurnResult: outcome must be set exactly when done is True")
        if self.session_rewards is not None:
            _check_finite_components("session_rewards", self.session_rewards)


@runtime_checkable
class DialogueEnv(Protocol):
    """One session of a multi-turn, two-horizon dialogue task."""

    turn_reward_names: tuple[str, ...]
    """Keys of ``TurnResult.turn_rewards``, in a fixed order (the columns of the turn-reward tensor)."""
    session_reward_names: tuple[str, ...]
    """Keys of ``TurnResult.session_rewards``, in a fixed order."""

    def reset(self, scenario: Any, seed: int) -> Observation: ...

    def step(self, agent_message: str) -> TurnResult: ...

    async def astep(self, agent_message: str) -> TurnResult: ...


async def step_many(envs: Sequence[DialogueEnv], messages: Sequence[str]) -> list[TurnResult | BaseException]:
    """Advance many sessions concurrently; a session that raises yields its exception, the others go on."""
    if len(envs) != len(messages):
        raise ValueError(f"step_many: got {len(envs)} envs but {len(messages)} messages")
    return await asyncio.gather(
        *(env.astep(message) for env, message in zip(envs, messages)), return_exceptions=True
    )


async def aclose_all(envs: Sequence[Any]) -> None:
    """Close what the environments hold open (an LLM customer's HTTP client), each resource once.

    An environment (or its ``customer``, or that customer's ``factory``) may define ``async def aclose()``;
    the hooks run in the event loop the sessions used, so clients bound to that loop close cleanly. A hook
    that raises does not stop the others; the first error is raised at the end.
    """
    seen: set[int] = set()
    errors: list[BaseException] = []
    for env in envs:
        for holder in (
            env,
            getattr(env, "customer", None),
            getattr(getattr(env, "customer", None), "factory", None),
        ):
            hook = getattr(holder, "aclose", None)
            if holder is None or hook is None or id(holder) in seen:
                continue
            seen.add(id(holder))
            try:
                await hook()
            except Exception as error:
                errors.append(error)
    if errors:
        raise errors[0]
