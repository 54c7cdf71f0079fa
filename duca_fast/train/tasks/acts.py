"""The ``sales-acts`` twin as a task of the training loop: a tiny MLP picks one dialogue act per turn.

Every agent turn is one "token": the MLP torso output is its hidden state and the act head is the
lm_head, so the loss goes through ``ops.fused_policy_loss`` exactly as the LLM's does. Sampling draws
its seeds from ``(seed, step)`` only; the rollout reads the trained weights directly (nothing to sync).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from duca_fast import ops
from duca_fast.env import ACTS, Outcome, SalesActsEnv, Scenario, TwinRegime, make_env, make_regime
from duca_fast.rollout.allocation import dynamo_group_sizes, group_size_metrics
from duca_fast.train.algorithms import critic_targets
from duca_fast.train.config import ConfigError, TrainConfig
from duca_fast.train.distributed import DistContext
from duca_fast.train.estimators import ValueHead, value_loss
from duca_fast.train.task import (
    PlayedSessions,
    StepRollout,
    TwoHorizonRewards,
    derive_seed,
    loss_options,
)


class ActsPolicy(nn.Module):
    """MLP torso (observation -> hidden) and a linear act head (``num_actions x hidden``, with bias);
    with ``critic`` also a ``ValueHead`` (``ppo_gae``), trained by the same optimizer."""

    def __init__(
        self, observation_size: int, hidden_size: int, num_actions: int, critic: ValueHead | None = None
    ) -> None:
        super().__init__()
        self.critic = critic
        self.torso = nn.Sequential(
            nn.Linear(observation_size, hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, hidden_size),
            nn.Tanh(),
        )
        self.out = nn.Linear(hidden_size, num_actions)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """``[N, observation_size]`` -> ``[N, hidden_size]`` hidden states."""
        return self.torso(observations)

    def logits(self, observations: torch.Tensor) -> torch.Tensor:
        return self.out(self.torso(observations))

    def token_logprobs(self, batch: ActsBatch, temperature: float, *, return_sum_p2: bool = False):
        """Log-prob of each turn's act (and with ``return_sum_p2`` the act distribution's sum p^2)."""
        return ops.token_logprobs(
            self(batch.observations),
            self.out.weight,
            batch.actions,
            temperature=temperature,
            bias=self.out.bias,
            return_sum_p2=return_sum_p2,
        )


@dataclass
class ActsBatch:
    """Every agent turn of one rollout, packed turn by turn."""

    observations: torch.Tensor
    """[T, observation_size] what the policy saw before each turn."""
    actions: torch.Tensor
    """[T] index into ``ACTS`` of the act taken."""
    behavior_logprobs: torch.Tensor
    """[T] log-prob of the act under the tempered sampling distribution."""
    rewards: TwoHorizonRewards
    """Turn and session rewards of the batch."""
    outcomes: list[Outcome]
    """How each session ended."""
    transcripts: list[dict[str, Any]]
    """Per session: scenario id, acts, rendered dialogue, outcome (for samples/step_N.jsonl)."""


@torch.no_grad()
def play(
    policy: ActsPolicy,
    scenarios: list[Scenario],
    customer_seeds: list[int],
    *,
    group_size: int | Sequence[int],
    max_turns: int,
    temperature: float,
    generator: torch.Generator | None,
    regime: TwinRegime | None = None,
) -> ActsBatch:
    """Play ``group_size`` sessions of each scenario (one count for all, or one per scenario, 0 allowed);
    scenario ``g``'s sessions come in order and belong to group ``g``.

    All sessions of a group meet the same customer (same seed), so the group statistics compare the
    policy's choices rather than customers' luck. ``generator=None`` plays greedily (argmax).
    """
    sizes = [group_size] * len(scenarios) if isinstance(group_size, int) else list(group_size)
    if len(sizes) != len(scenarios) or min(sizes, default=0) < 0:
        raise ValueError(f"group_size must be one count >= 0 per scenario, got {sizes}")
    envs: list[SalesActsEnv] = []
    group_of: list[int] = []
    for group, (scenario, customer_seed, size) in enumerate(zip(scenarios, customer_seeds, sizes)):
        for _ in range(size):
            env = make_env("sales-acts", max_turns=max_turns, regime=regime)
            env.reset(scenario, customer_seed)
            envs.append(env)
            group_of.append(group)
    num_sessions = len(envs)
    observations, actions, logprobs, turn_rewards, turn_session, turn_index = [], [], [], [], [], []
    session_rewards: list[list[float]] = [[] for _ in envs]
    outcomes: list[Outcome | None] = [None] * num_sessions
    acts_taken: list[list[str]] = [[] for _ in envs]
    turn_names, session_names = envs[0].turn_reward_names, envs[0].session_reward_names
    live, turn = list(range(num_sessions)), 0
    while live:
        observation = torch.tensor([envs[s].observation_vector() for s in live], dtype=torch.float32)
        log_probs = torch.log_softmax(policy.logits(observation) / temperature, dim=-1)
        if generator is None:
            chosen = log_probs.argmax(dim=-1)
        else:
            chosen = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
        still_live = []
        for row, session in enumerate(live):
            act = int(chosen[row])
            result = envs[session].step(act)
            observations.append(observation[row])
            actions.append(act)
            logprobs.append(log_probs[row, act])
            turn_rewards.append([result.turn_rewards[name] for name in turn_names])
            turn_session.append(session)
            turn_index.append(turn)
            acts_taken[session].append(ACTS[act])
            if result.done:
                session_rewards[session] = [result.session_rewards[name] for name in session_names]
                outcomes[session] = result.outcome
            else:
                still_live.append(session)
        live, turn = still_live, turn + 1
    transcripts = [
        {
            "session": session,
            "group": group_of[session],
            "scenario_id": envs[session].scenario.scenario_id,
            "acts": acts_taken[session],
            "dialogue": [f"{role}: {text}" for role, text in envs[session].transcript],
            "outcome": outcomes[session].reason,
            "session_rewards": dict(zip(session_names, session_rewards[session])),
        }
        for session in range(num_sessions)
    ]
    stacked = torch.stack(observations)
    values = None if policy.critic is None else policy.critic(stacked)
    rewards = TwoHorizonRewards(
        values=values,
        turn_features=stacked,
        turn_logprobs=torch.stack(logprobs),
        turn_rewards=torch.tensor(turn_rewards, dtype=torch.float32),
        turn_session=torch.tensor(turn_session, dtype=torch.long),
        turn_index=torch.tensor(turn_index, dtype=torch.long),
        session_rewards=torch.tensor(session_rewards, dtype=torch.float32),
        session_group=torch.tensor(group_of, dtype=torch.long),
        turn_reward_names=turn_names,
        session_reward_names=session_names,
    )
    return ActsBatch(
        observations=stacked,
        actions=torch.tensor(actions, dtype=torch.long),
        behavior_logprobs=torch.stack(logprobs),
        rewards=rewards,
        outcomes=outcomes,
        transcripts=transcripts,
    )


def concat_batches(first: ActsBatch, second: ActsBatch) -> ActsBatch:
    """One batch of both (group ids kept: they are the step's scenarios; sessions of ``second`` after)."""
    offset = len(first.outcomes)
    transcripts = [dict(t, session=t["session"] + offset) for t in second.transcripts]
    return ActsBatch(
        observations=torch.cat([first.observations, second.observations]),
        actions=torch.cat([first.actions, second.actions]),
        behavior_logprobs=torch.cat([first.behavior_logprobs, second.behavior_logprobs]),
        rewards=TwoHorizonRewards.concat([first.rewards, second.rewards]),
        outcomes=first.outcomes + second.outcomes,
        transcripts=first.transcripts + transcripts,
    )


@dataclass
class PreparedUpdate:
    batch: ActsBatch
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    returns: torch.Tensor | None = None
    """ppo_gae: [T] critic targets (NaN for turns of dropped sessions: no loss)."""


class ActsTask:
    """The twin: one process, the rollout and the update share the policy's weights."""

    sharded = False

    def __init__(self, config: TrainConfig, dist: DistContext) -> None:
        if dist.enabled:
            raise ConfigError("env.name=sales-acts trains on a single process; launch it without torchrun")
        self.config = config
        self.regime = make_regime(config.env.regime, **config.env.regime_knobs)
        observation_size = SalesActsEnv(regime=self.regime).observation_size
        self.model = ActsPolicy(observation_size, config.model.hidden_size, SalesActsEnv.num_actions)
        if config.algo.name == "ppo_gae":
            # Built after the policy: every algorithm starts from the same policy weights for a seed.
            settings = config.algo.critic
            self.model.critic = ValueHead(observation_size, settings.hidden_size, settings.num_layers)
        # KL reference: the initial policy (on resume rebuilt from the seed before the checkpoint loads).
        self.reference = (
            copy.deepcopy(self.model).requires_grad_(False) if config.algo.loss.kl_coef > 0 else None
        )

    def rollout(self, step: int, scenarios: list[Scenario]) -> StepRollout:
        config = self.config
        customers = [derive_seed(config.seed, "customer", step, group) for group in range(len(scenarios))]
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "sampling", step))
        self.model.eval()
        settings = config.rollout

        def play_groups(sizes) -> ActsBatch:
            return play(
                self.model,
                scenarios,
                customers,
                group_size=sizes,
                max_turns=config.env.max_turns,
                temperature=settings.temperature,
                generator=generator,
                regime=self.regime,
            )

        allocation_metrics: dict[str, float] = {}
        if settings.allocation == "dynamo":
            # DynaMO: a pilot group per scenario, then the rest of the step's sessions by the pilot's
            # Bernoulli variance of conversion (duca_fast/rollout/allocation.py).
            batch = play_groups(settings.allocation_min)
            pilot = settings.allocation_min
            conversions = [0] * len(scenarios)
            for session, outcome in enumerate(batch.outcomes):
                conversions[session // pilot] += int(outcome.converted)
            totals = dynamo_group_sizes(
                conversions, pilot, settings.group_size, settings.allocation_min, settings.allocation_max
            )
            extra = [total - pilot for total in totals]
            if sum(extra):
                batch = concat_batches(batch, play_groups(extra))
            allocation_metrics = group_size_metrics(totals)
        else:
            batch = play_groups(settings.group_size)
        if config.algo.name == "otb":
            # The optimal token baseline weighs each turn by its distribution's sum p^2: from the policy's
            # own token_logprobs at the weights and temperature that sampled.
            with torch.no_grad():
                _, sum_p2 = self.model.token_logprobs(batch, config.rollout.temperature, return_sum_p2=True)
            batch.rewards = replace(batch.rewards, turn_sum_p2=sum_p2)
        metrics = {"rollout/turns": float(len(batch.actions)), **allocation_metrics}
        return StepRollout(batch.rewards, slice(0, len(batch.actions)), batch, batch.outcomes, metrics)

    def prepare_update(
        self, data: ActsBatch, per_turn: torch.Tensor, per_agent_token: torch.Tensor | None = None
    ) -> PreparedUpdate:
        if per_agent_token is not None:
            raise ValueError("the twin takes per-turn advantages (one act per turn), not per_agent_token")
        temperature = self.config.rollout.temperature
        self.model.train()
        with torch.no_grad():
            # Later passes are off-policy: their ratios are taken against the weights that sampled.
            old = self.model.token_logprobs(data, temperature) if self.config.algo.ppo_epochs > 1 else None
            ref = None if self.reference is None else self.reference.token_logprobs(data, temperature)
        returns = None if data.rewards.values is None else critic_targets(self.config.algo, data.rewards)
        return PreparedUpdate(data, per_turn, old, ref, returns)

    def backward(self, prepared: PreparedUpdate) -> dict[str, float]:
        batch = prepared.batch
        loss, op_metrics = ops.fused_policy_loss(
            self.model(batch.observations),
            self.model.out.weight,
            batch.actions,
            prepared.advantages,
            prepared.old_logprobs,
            bias=self.model.out.bias,
            seq_ids=batch.rewards.turn_session,
            ref_logprobs=prepared.ref_logprobs,
            behavior_logprobs=batch.behavior_logprobs,
            **loss_options(self.config),
        )
        metrics = {f"loss/{key}": value.item() for key, value in op_metrics.items()}
        if prepared.returns is not None:
            keep = torch.isfinite(prepared.returns)
            if bool(keep.any()):
                values = self.model.critic(batch.observations[keep])
                critic_loss, value_metrics = value_loss(values, prepared.returns[keep])
                loss = loss + self.config.algo.critic.value_coef * critic_loss
                metrics.update(value_metrics)
        loss.backward()
        return {"loss/total": loss.item(), **metrics}

    def carried_groups(self) -> int:
        return 0  # the twin plays whole steps: no over-sampling, nothing carried

    def carry_state(self) -> None:
        return None

    def restore_carry(self, state: Any, pool: list[Scenario]) -> None:
        if state:
            raise ValueError("the act twin carries no sessions over; this checkpoint is not the twin's")

    def sync(self, step: int) -> dict[str, float]:
        return {}

    def samples(self, data: ActsBatch, per_turn: torch.Tensor) -> list[dict[str, Any]]:
        session_of = data.rewards.turn_session.tolist()
        return [
            {
                **transcript,
                "turn_advantages": [round(float(a), 4) for a, s in zip(per_turn, session_of) if s == n],
            }
            for n, transcript in enumerate(data.transcripts)
        ]

    def export(self):
        return None

    def evaluate(
        self, scenarios: list[Scenario], customer_seeds: list[int], *, sample_seed: int | None = None
    ) -> PlayedSessions:
        """Greedy sessions, or sampled at rollout.temperature from ``sample_seed``."""
        self.model.eval()
        generator = None if sample_seed is None else torch.Generator().manual_seed(sample_seed)
        batch = play(
            self.model,
            scenarios,
            customer_seeds,
            group_size=1,
            max_turns=self.config.env.max_turns,
            temperature=self.config.rollout.temperature,
            generator=generator,
            regime=self.regime,
        )
        rewards = batch.rewards
        return PlayedSessions(batch.outcomes, rewards.turn_rewards, rewards.session_rewards, failed=0)

    def close(self) -> None:
        pass
