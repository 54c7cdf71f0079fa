"""Fast algorithm validation on the ``sales-acts`` twin: a tiny MLP policy picks one dialogue act per turn.

One step, top to bottom (``train_acts``):
1. **rollout**: B scenarios x G sessions each, all sessions advancing together; the policy samples an act
   from ``softmax(logits / rollout.temperature)`` with a generator seeded from ``(seed, step)`` only;
2. **advantages**: turn and session rewards -> ``compute_advantages(config.algo, ...)`` (duca/grpo/gdpo);
3. **update**: ``algo.ppo_epochs`` AdamW passes through ``ops.fused_policy_loss``, the same op that trains
   the LLM policy: every agent turn is one "token", the MLP torso output is its hidden state and the act
   head is the lm_head;
4. **log**: rewards, advantages, task metrics, loss diagnostics, time split; checkpoints on schedule.

Because sampling depends only on ``(seed, step)`` and checkpoints hold the parameters, the optimizer and
scheduler states, the RNG states and the scenario cursor, a resumed CPU run logs exactly the metrics of an
uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from duca_fast import ops
from duca_fast.env import (
    ACTS,
    Outcome,
    SalesActsEnv,
    Scenario,
    compute_metrics,
    generate_scenarios,
    load_scenarios,
    make_env,
)
from duca_fast.train.algorithms import compute_advantages
from duca_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from duca_fast.train.config import ConfigError, TrainConfig, to_yaml
from duca_fast.train.records import RunRecords

HELD_OUT_SCENARIO_SEED_OFFSET = 1_000_003
"""Evaluation scenarios are generated with ``env.scenario_seed`` plus this: not the training ones."""
TASK_METRICS = ("conversion_rate", "repetition_rate", "identity_detection_rate", "compliance_violation_rate")
"""The paper's rates, logged under ``task/`` and returned by ``evaluate_acts`` (with ``mean_turns``)."""


class ActsPolicy(nn.Module):
    """MLP torso (observation -> hidden) and a linear act head (``num_actions x hidden``, with bias).

    The torso output plays the part of an LLM's final hidden state and ``out`` that of its lm_head, so the
    loss can go through ``ops.fused_policy_loss`` unchanged.
    """

    def __init__(self, observation_size: int, hidden_size: int, num_actions: int) -> None:
        super().__init__()
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


@dataclass
class ActsBatch:
    """Every agent turn of one rollout, packed turn by turn (a turn is one "token")."""

    observations: torch.Tensor
    """[T, observation_size] what the policy saw before each turn."""
    actions: torch.Tensor
    """[T] index into ``ACTS`` of the act taken."""
    behavior_logprobs: torch.Tensor
    """[T] log-prob of the act under the tempered sampling distribution."""
    turn_rewards: torch.Tensor
    """[T, Kt] turn reward components, columns in ``turn_reward_names`` order."""
    turn_session: torch.Tensor
    """[T] session of each turn."""
    turn_index: torch.Tensor
    """[T] position of the turn in its session (0-based)."""
    session_rewards: torch.Tensor
    """[S, Ks] session reward components, columns in ``session_reward_names`` order."""
    session_group: torch.Tensor
    """[S] group (scenario) of each session."""
    outcomes: list[Outcome]
    """How each session ended."""
    transcripts: list[dict[str, Any]]
    """Per session: scenario id, acts, rendered dialogue, rewards (for samples/step_N.jsonl)."""
    turn_reward_names: tuple[str, ...]
    """Names of the turn reward columns."""
    session_reward_names: tuple[str, ...]
    """Names of the session reward columns."""


def _check_acts_config(config: TrainConfig) -> None:
    if config.env.name != "sales-acts":
        raise ConfigError(f"the acts trainer needs env.name=sales-acts, got {config.env.name!r}")
    if config.env.customer != "scripted":
        raise ConfigError("env.name=sales-acts runs the scripted customer only; set env.customer=scripted")


def _training_scenarios(config: TrainConfig) -> list[Scenario]:
    if config.env.scenarios_path is not None:
        return load_scenarios(config.env.scenarios_path)
    return generate_scenarios(config.env.num_scenarios, seed=config.env.scenario_seed)


def _scenario_order(num_scenarios: int, seed: int, epoch: int) -> np.ndarray:
    """A fresh permutation of the scenarios for every pass over them; depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x5CE7]).permutation(num_scenarios)


def _take_scenarios(
    scenarios: list[Scenario], seed: int, cursor: int, count: int
) -> tuple[list[Scenario], int]:
    """The ``count`` scenarios after the first ``cursor`` ones (in epoch order), and the new cursor."""
    orders: dict[int, np.ndarray] = {}
    taken = []
    for position in range(cursor, cursor + count):
        epoch, offset = divmod(position, len(scenarios))
        if epoch not in orders:
            orders[epoch] = _scenario_order(len(scenarios), seed, epoch)
        taken.append(scenarios[int(orders[epoch][offset])])
    return taken, cursor + count


def _step_randomness(seed: int, step: int, num_groups: int) -> tuple[torch.Generator, list[int]]:
    """Sampling generator and one customer seed per group, from (seed, step) alone (resume-exact)."""
    rng = np.random.default_rng([seed, step])
    customer_seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=num_groups)]
    generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    return generator, customer_seeds


@torch.no_grad()
def rollout(
    policy: ActsPolicy,
    scenarios: list[Scenario],
    customer_seeds: list[int],
    *,
    group_size: int,
    max_turns: int,
    temperature: float,
    generator: torch.Generator | None,
) -> ActsBatch:
    """Play ``group_size`` sessions of each scenario; session ``g * group_size + i`` belongs to group ``g``.

    All sessions of a group meet the same customer (same seed), so the group statistics compare the
    policy's choices rather than customers' luck. ``generator=None`` plays greedily (argmax).
    """
    envs: list[SalesActsEnv] = []
    for scenario, customer_seed in zip(scenarios, customer_seeds):
        for _ in range(group_size):
            env = make_env("sales-acts", max_turns=max_turns)
            env.reset(scenario, customer_seed)
            envs.append(env)
    num_sessions = len(envs)
    observations, actions, logprobs, turn_rewards = [], [], [], []
    turn_session, turn_index = [], []
    session_rewards: list[list[float]] = [[] for _ in envs]
    outcomes: list[Outcome | None] = [None] * num_sessions
    acts_taken: list[list[str]] = [[] for _ in envs]
    turn_reward_names, session_reward_names = envs[0].turn_reward_names, envs[0].session_reward_names
    live = list(range(num_sessions))
    turn = 0
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
            turn_rewards.append([result.turn_rewards[name] for name in turn_reward_names])
            turn_session.append(session)
            turn_index.append(turn)
            acts_taken[session].append(ACTS[act])
            if result.done:
                session_rewards[session] = [result.session_rewards[name] for name in session_reward_names]
                outcomes[session] = result.outcome
            else:
                still_live.append(session)
        live = still_live
        turn += 1
    transcripts = [
        {
            "session": session,
            "group": session // group_size,
            "scenario_id": envs[session].scenario.scenario_id,
            "acts": acts_taken[session],
            "dialogue": [f"{role}: {text}" for role, text in envs[session].transcript],
            "outcome": outcomes[session].reason,
            "session_rewards": dict(zip(session_reward_names, session_rewards[session])),
        }
        for session in range(num_sessions)
    ]
    return ActsBatch(
        observations=torch.stack(observations),
        actions=torch.tensor(actions, dtype=torch.long),
        behavior_logprobs=torch.stack(logprobs),
        turn_rewards=torch.tensor(turn_rewards, dtype=torch.float32),
        turn_session=torch.tensor(turn_session, dtype=torch.long),
        turn_index=torch.tensor(turn_index, dtype=torch.long),
        session_rewards=torch.tensor(session_rewards, dtype=torch.float32),
        session_group=torch.arange(num_sessions, dtype=torch.long) // group_size,
        outcomes=outcomes,
        transcripts=transcripts,
        turn_reward_names=turn_reward_names,
        session_reward_names=session_reward_names,
    )


def build_policy(config: TrainConfig) -> ActsPolicy:
    """The initial policy; its weights depend only on ``config.seed``."""
    torch.manual_seed(config.seed)
    return ActsPolicy(SalesActsEnv.observation_size, config.model.hidden_size, SalesActsEnv.num_actions)


def _warmup_schedule(warmup_steps: int):
    return lambda done_steps: min(1.0, (done_steps + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _update(
    policy: ActsPolicy,
    reference: ActsPolicy | None,
    optimizer: torch.optim.Optimizer,
    batch: ActsBatch,
    advantages: torch.Tensor,
    config: TrainConfig,
) -> dict[str, float]:
    """``algo.ppo_epochs`` full-batch passes through ``ops.fused_policy_loss``; returns mean diagnostics."""
    algo, temperature = config.algo, config.rollout.temperature
    old_logprobs = None
    if algo.ppo_epochs > 1:
        # Later passes are off-policy: their ratios must be taken against the weights that sampled.
        with torch.no_grad():
            old_logprobs = ops.token_logprobs(
                policy(batch.observations),
                policy.out.weight,
                batch.actions,
                temperature=temperature,
                bias=policy.out.bias,
            )
    ref_logprobs = None
    if reference is not None:
        with torch.no_grad():
            ref_logprobs = ops.token_logprobs(
                reference(batch.observations),
                reference.out.weight,
                batch.actions,
                temperature=temperature,
                bias=reference.out.bias,
            )
    totals: dict[str, float] = {}
    max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
    for _ in range(algo.ppo_epochs):
        loss, op_metrics = ops.fused_policy_loss(
            policy(batch.observations),
            policy.out.weight,
            batch.actions,
            advantages,
            old_logprobs,
            bias=policy.out.bias,
            seq_ids=batch.turn_session,
            ref_logprobs=ref_logprobs,
            behavior_logprobs=batch.behavior_logprobs,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            dual_clip=algo.dual_clip,
            kl_coef=algo.kl_coef,
            kl_type=algo.kl_type,
            entropy_coef=algo.entropy_coef,
            temperature=temperature,
            loss_agg=algo.loss_agg,
            tis_cap=algo.tis_cap,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
        optimizer.step()
        epoch_metrics = {"loss/total": loss.item(), "grad_norm": grad_norm.item()}
        epoch_metrics.update({f"loss/{key}": value.item() for key, value in op_metrics.items()})
        for key, value in epoch_metrics.items():
            totals[key] = totals.get(key, 0.0) + value / algo.ppo_epochs
    return totals


def _task_metrics(batch: ActsBatch) -> dict[str, float]:
    metrics = compute_metrics(batch.outcomes)
    return {f"task/{key}": getattr(metrics, key) for key in (*TASK_METRICS, "mean_turns")}


def train_acts(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train the tiny act policy on ``sales-acts``; returns the run directory.

    ``resume=True`` continues from the latest complete checkpoint in ``config.run_dir`` (and fails if there
    is none); the steps after it then log exactly what an uninterrupted run would (CPU, same config).
    """
    _check_acts_config(config)
    run_dir = Path(config.run_dir)
    scenarios = _training_scenarios(config)
    policy = build_policy(config)
    # The reference of the KL penalty is the initial policy, rebuilt from the seed on resume.
    reference = copy.deepcopy(policy).requires_grad_(False) if config.algo.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(
        policy.parameters(),
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        weight_decay=config.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_schedule(config.optim.warmup_steps))
    first_step, scenario_cursor = 1, 0
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"resume=True but {run_dir / 'checkpoints'} holds no complete checkpoint; "
                "run without resume to start fresh"
            )
        cursor = load_checkpoint(checkpoint, policy, optimizer, scheduler)
        first_step, scenario_cursor = cursor["next_step"], cursor["scenario_cursor"]
    records = RunRecords(run_dir, resume_step=first_step - 1 if resume else None)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    rollout_settings = config.rollout
    last_saved = first_step - 1
    progress = tqdm(
        range(first_step, config.steps + 1),
        total=config.steps,
        initial=first_step - 1,
        desc=f"sales-acts {config.algo.name}",
        disable=not config.progress,
    )
    try:
        for step in progress:
            started = time.perf_counter()
            generator, customer_seeds = _step_randomness(config.seed, step, rollout_settings.groups_per_step)
            step_scenarios, scenario_cursor = _take_scenarios(
                scenarios, config.seed, scenario_cursor, rollout_settings.groups_per_step
            )
            policy.eval()
            batch = rollout(
                policy,
                step_scenarios,
                customer_seeds,
                group_size=rollout_settings.group_size,
                max_turns=config.env.max_turns,
                temperature=rollout_settings.temperature,
                generator=generator,
            )
            rolled_out = time.perf_counter()
            advantages = compute_advantages(
                config.algo,
                turn_rewards=batch.turn_rewards,
                turn_session=batch.turn_session,
                turn_index=batch.turn_index,
                session_rewards=batch.session_rewards,
                session_group=batch.session_group,
                turn_reward_names=batch.turn_reward_names,
                session_reward_names=batch.session_reward_names,
            )
            advantaged = time.perf_counter()
            policy.train()
            metrics = {**advantages.metrics, **_task_metrics(batch)}
            metrics["optim/lr"] = scheduler.get_last_lr()[0]
            metrics.update(_update(policy, reference, optimizer, batch, advantages.per_turn, config))
            scheduler.step()
            trained = time.perf_counter()
            metrics["rollout/turns"] = float(len(batch.actions))
            metrics["time/rollout"] = rolled_out - started
            metrics["time/advantage"] = advantaged - rolled_out
            metrics["time/train"] = trained - advantaged
            metrics["time/sync"] = 0.0  # the rollout reads the trained weights directly: nothing to push
            records.log(step, metrics)
            records.write_samples(step, batch.transcripts[: config.samples_per_step])
            progress.set_postfix(
                conversion=f"{metrics['task/conversion_rate']:.2f}",
                turn_reward=f"{metrics.get('reward/turn_total/mean', 0.0):.2f}",
            )
            if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                save_checkpoint(
                    run_dir,
                    step,
                    model=policy,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    data_cursor={"next_step": step + 1, "scenario_cursor": scenario_cursor},
                    keep=config.keep_checkpoints,
                )
                records.plot()
                last_saved = step
        if last_saved < config.steps:
            records.plot()
    finally:
        progress.close()
        records.close()
    return run_dir


def evaluate_acts(
    config: TrainConfig, checkpoint: Path | None, num_sessions: int, seed: int, *, greedy: bool = True
) -> dict[str, float]:
    """Task metrics and mean rewards of a trained act policy on held-out scenarios.

    ``checkpoint=None`` takes the latest checkpoint of ``config.run_dir``. The scenarios come from the
    generator with a held-out seed (``env.scenario_seed + HELD_OUT_SCENARIO_SEED_OFFSET``), or from
    ``env.scenarios_path`` when one is set (then they are the training scenarios). Each session meets its
    own customer seed drawn from ``seed``. ``greedy=True`` (the default) takes the most likely act every
    turn, so the result depends only on the weights and ``seed``; ``greedy=False`` samples at
    ``rollout.temperature`` like training does.

    Returns ``conversion_rate``, ``repetition_rate``, ``identity_detection_rate``,
    ``compliance_violation_rate``, ``mean_turns``, ``mean_turn_reward`` (per agent turn, components summed),
    ``mean_session_reward`` (per session, components summed) and ``num_sessions``.
    """
    _check_acts_config(config)
    if num_sessions < 1:
        raise ValueError(f"num_sessions must be >= 1, got {num_sessions}")
    if checkpoint is None:
        checkpoint = latest_checkpoint(config.run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"no complete checkpoint under {Path(config.run_dir) / 'checkpoints'}")
    policy = build_policy(config)
    load_checkpoint(checkpoint, policy)
    policy.eval()
    if config.env.scenarios_path is not None:
        pool = load_scenarios(config.env.scenarios_path)
        scenarios = [pool[i % len(pool)] for i in range(num_sessions)]
    else:
        held_out_seed = config.env.scenario_seed + HELD_OUT_SCENARIO_SEED_OFFSET
        scenarios = generate_scenarios(num_sessions, seed=held_out_seed)
    rng = np.random.default_rng([seed, 0xE7A1])
    customer_seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=num_sessions)]
    generator = None if greedy else torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    batch = rollout(
        policy,
        scenarios,
        customer_seeds,
        group_size=1,
        max_turns=config.env.max_turns,
        temperature=config.rollout.temperature,
        generator=generator,
    )
    task = compute_metrics(batch.outcomes)
    return {
        **{key: getattr(task, key) for key in (*TASK_METRICS, "mean_turns")},
        "mean_turn_reward": batch.turn_rewards.sum(dim=1).mean().item(),
        "mean_session_reward": batch.session_rewards.sum(dim=1).mean().item(),
        "num_sessions": float(num_sessions),
    }
