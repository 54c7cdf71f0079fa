"""What a task gives the training loop (``train/loop.py``), and the pieces both tasks share.

A task owns its policy and how it plays and learns one batch: ``rollout`` (play the step's scenarios),
``prepare_update`` and ``backward`` (one pass of the loss), ``sync`` (make the rollout side see the new
weights), ``evaluate`` (greedy or sampled sessions with the current weights). The loop owns everything else:
scenario order, seeds, advantages, the optimizer and its schedule, the gradient check, records,
checkpoints and resume.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from duca_fast.env import Outcome, Scenario, compute_metrics
from duca_fast.train.config import TrainConfig
from duca_fast.train.estimators import TwoHorizonRewards


def derive_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 31-bit seed from ``(seed, purpose, indices)`` alone: the one seed formula of the trainer.

    Every random choice of a run (scenario order, customers, sampling, evaluation) draws its seed here,
    so it depends on what it is for and where it is in the run, never on what ran before (resume-exact).
    """
    entropy = [seed, zlib.crc32(purpose.encode()), *indices]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


class ScenarioCursor:
    """Position in the endless sequence of per-epoch permutations of the scenario pool.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so the position (one integer) is the
    whole checkpointed state.
    """

    def __init__(self, pool_size: int, seed: int, position: int = 0) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.pool_size, self.seed, self.position = pool_size, seed, position

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(derive_seed(self.seed, "scenario-order", epoch))
        return rng.permutation(self.pool_size)

    def take(self, count: int) -> list[int]:
        """The next ``count`` scenario indices; advances the cursor."""
        picked, orders = [], {}
        for position in range(self.position, self.position + count):
            epoch, offset = divmod(position, self.pool_size)
            if epoch not in orders:
                orders[epoch] = self.order(epoch)
            picked.append(int(orders[epoch][offset]))
        self.position += count
        return picked


@dataclass
class StepRollout:
    """What a task's rollout hands the loop."""

    rewards: TwoHorizonRewards
    """Rewards of the whole step (every rank's sessions): advantages are normalized over them."""
    local_turns: slice
    """This rank's turns within ``rewards`` (all of them on a single process)."""
    data: Any
    """The task's own batch (token ids, observations, ...), passed back to its update."""
    outcomes: list[Outcome]
    """How the step's finished sessions ended (every rank's; failed sessions left out)."""
    metrics: dict[str, float]
    """Rollout diagnostics (``rollout/``) of the whole step."""
    failure_summary: str = "no session failed"
    """One console line: failed and truncated sessions by reason (``RolloutBatch.failure_summary``)."""
    local_agent_tokens: slice | None = None
    """This rank's agent tokens within ``rewards.agent_token_turn``, when the rollout gave per-token inputs
    (a token-level estimator: ``otb`` on the text task)."""


@dataclass
class PlayedSessions:
    """What a task's ``evaluate`` played: the loop turns it into metrics."""

    outcomes: list[Outcome]
    """How the finished sessions ended."""
    turn_rewards: torch.Tensor
    """[T, Kt] turn rewards of every agent turn."""
    session_rewards: torch.Tensor
    """[S, Ks] session rewards (NaN rows: cut or failed sessions)."""
    failed: int
    """Sessions that failed (environment or engine error) and have no outcome."""


class Task(Protocol):
    model: torch.nn.Module
    """The trainable policy (its ``requires_grad`` parameters are optimized and checkpointed)."""
    sharded: bool
    """Checkpoints go through torch.distributed.checkpoint (FSDP2 ranks)."""

    def rollout(self, step: int, scenarios: list[Scenario]) -> StepRollout: ...

    def prepare_update(
        self, data: Any, per_turn: torch.Tensor, per_agent_token: torch.Tensor | None = None
    ) -> Any | None:
        """Everything the passes of this step share (old and reference log-probs); None: nothing to learn.
        ``per_agent_token``: this rank's agent tokens' own advantages (a token-level estimator), which
        then replace ``per_turn`` broadcast to the turn's tokens."""

    def backward(self, prepared: Any) -> dict[str, float]:
        """One pass: loss over the step's batch, ``backward()``; returns the loss metrics (whole step)."""

    def sync(self, step: int) -> dict[str, float]: ...

    def carried_groups(self) -> int:
        """Groups the last rollout carried into the next step (over all ranks): the loop draws that many
        fewer new scenarios (``rollout.carry_over``; 0 for tasks without it)."""

    def carry_state(self) -> Any:
        """The carried sessions as plain data for the checkpoint (a collective), or None."""

    def restore_carry(self, state: Any, pool: list[Scenario]) -> None:
        """Take ``carry_state``'s data back on resume (``pool``: the run's scenarios)."""

    def samples(self, data: Any, per_turn: torch.Tensor) -> list[dict[str, Any]]: ...

    def export(self) -> Callable[[Any], None] | None: ...

    def evaluate(
        self, scenarios: list[Scenario], customer_seeds: list[int], *, sample_seed: int | None = None
    ) -> PlayedSessions:
        """Sessions of the current weights, one per (scenario, customer seed): greedy, or sampled at
        ``rollout.temperature`` from ``sample_seed``."""

    def close(self) -> None: ...


def loss_options(config: TrainConfig, **trainer_set: Any) -> dict[str, Any]:
    """Keyword arguments of the policy-loss ops: the configured options plus the trainer's own."""
    options = replace(config.algo.loss, temperature=config.rollout.temperature, **trainer_set)
    return asdict(options)


def task_metrics(outcomes: list, prefix: str = "task/") -> dict[str, float]:
    """The paper's rates and the mean session length (``num_sessions`` left out: it is a count)."""
    if not outcomes:
        return {}
    metrics = compute_metrics(outcomes).as_dict()
    metrics.pop("num_sessions")
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def evaluation_metrics(played: PlayedSessions, num_sessions: int) -> dict[str, float]:
    """What an evaluation returns with either task (the rates over finished sessions)."""
    turn, session = played.turn_rewards, played.session_rewards
    finite = session[torch.isfinite(session).all(dim=1)]
    return {
        **task_metrics(played.outcomes, prefix=""),
        "mean_turn_reward": turn.sum(dim=1).mean().item() if len(turn) else 0.0,
        "mean_session_reward": finite.sum(dim=1).mean().item() if len(finite) else 0.0,
        "failed_sessions": float(played.failed),
        "num_sessions": float(num_sessions),
    }
