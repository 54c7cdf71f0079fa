"""Minimal environments that satisfy ``duca_fast.env.base.DialogueEnv``, for the rollout tests."""

from __future__ import annotations

from typing import Any

from duca_fast.env.base import Observation, Outcome, TurnResult
from duca_fast.env.sales import check_agent_message


class EchoCustomer:
    """Replies a fixed sentence and ends after ``scenario["turns"]`` agent turns.

    Turn reward "length" = characters of the agent message; session reward "conversion" = seed parity.
    Like the sales environment, it rejects empty agent messages.
    """

    turn_reward_names = ("length",)
    session_reward_names = ("conversion",)

    def __init__(self, reply: str = "Tell me more.", fail_seed: int | None = None, fail_on_turn: int = 1):
        self.reply = reply
        self.fail_seed = fail_seed
        self.fail_on_turn = fail_on_turn
        self.turns = 0
        self.limit = 0
        self.seed = 0

    def reset(self, scenario: Any, seed: int) -> Observation:
        self.turns, self.limit, self.seed = 0, scenario["turns"], seed
        if self.fail_seed == seed and self.fail_on_turn == 0:
            raise RuntimeError(f"reset failed for seed {seed}")
        opening = None if scenario.get("agent_first") else scenario.get("opening", "Hello, what do you sell?")
        return Observation(system_prompt=scenario.get("system", "You sell tea."), customer_message=opening)

    def step(self, agent_message: str) -> TurnResult:
        check_agent_message(agent_message, max_chars=2000)
        self.turns += 1
        if self.fail_seed == self.seed and self.turns == self.fail_on_turn:
            raise RuntimeError(f"customer crashed for seed {self.seed} on turn {self.turns}")
        rewards = {"length": float(len(agent_message))}
        if self.turns < self.limit:
            return TurnResult(self.reply, rewards, done=False)
        outcome = Outcome(
            converted=self.seed % 2 == 0, flagged_bot=False, num_turns=self.turns, reason="done"
        )
        return TurnResult(None, rewards, True, {"conversion": float(self.seed % 2 == 0)}, outcome)

    async def astep(self, agent_message: str) -> TurnResult:
        return self.step(agent_message)
