"""The training loop, one for every task: rollout -> advantages -> update -> sync -> records -> checkpoint.

``Trainer.step`` reads top to bottom with the time of each phase. The task (``train/tasks/``: the LLM
sales task, the dialogue-act twin) plays and learns; the loop owns the scenario cursor, the seeds, the
advantages, the optimizer and warmup schedule, the non-finite gradient check, the records, checkpoints
and resume. A resumed CPU run logs exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from duca_fast.env import Scenario, generate_scenarios, load_scenarios
from duca_fast.train.algorithms import compute_advantages
from duca_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from duca_fast.train.config import ConfigError, TrainConfig, to_yaml
from duca_fast.train.distributed import DistContext, check_same_config, init_distributed, shutdown
from duca_fast.train.records import RunRecords, write_before_after
from duca_fast.train.task import (
    ScenarioCursor,
    StepRollout,
    Task,
    derive_seed,
    evaluation_metrics,
    task_metrics,
)

HELD_OUT_SCENARIO_SEED_OFFSET = 1_000_003
"""Evaluation scenarios are generated with ``env.scenario_seed`` plus this: never the training ones."""
EVAL_TABLE = (
    "conversion_rate",
    "repetition_rate",
    "identity_detection_rate",
    "compliance_violation_rate",
    "mean_turn_reward",
    "mean_turns",
)
"""Rows of the before/after table, in order."""


class NonFiniteGradientError(FloatingPointError):
    """The gradient norm of an update is NaN or infinite; the weights were left unchanged."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_task(config: TrainConfig, dist: DistContext) -> Task:
    if config.env.name == "sales-acts":
        from duca_fast.train.tasks.acts import ActsTask

        return ActsTask(config, dist)
    from duca_fast.train.tasks.sales import SalesTask

    return SalesTask(config, dist)


def scenario_pool(config: TrainConfig) -> list[Scenario]:
    if config.env.scenarios_path:
        return load_scenarios(config.env.scenarios_path)
    return generate_scenarios(config.env.num_scenarios, seed=config.env.scenario_seed)


def held_out_sessions(config: TrainConfig, num_sessions: int, seed: int) -> tuple[list[Scenario], list[int]]:
    """Evaluation scenarios (a held-out generator seed, or ``env.scenarios_path`` cycled) and customers."""
    if config.env.scenarios_path:
        pool = load_scenarios(config.env.scenarios_path)
        scenarios = [pool[i % len(pool)] for i in range(num_sessions)]
    else:
        scenarios = generate_scenarios(
            num_sessions, seed=config.env.scenario_seed + HELD_OUT_SCENARIO_SEED_OFFSET
        )
    return scenarios, [derive_seed(seed, "eval-customer", i) for i in range(num_sessions)]


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (``max_norm`` 0 = no clip); refuse a non-finite one."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not math.isfinite(norm):
        raise NonFiniteGradientError(
            f"gradient norm is {norm}; the update was skipped. Lower optim.lr or check the rewards"
        )
    return norm


class Trainer:
    """Owns the task, the optimizer and the run directory; ``run()`` trains."""

    def __init__(self, config: TrainConfig, *, resume: bool = False) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if resume and checkpoint is None:
            raise ConfigError(f"--resume: no complete checkpoint under {self.run_dir / 'checkpoints'}")
        self.dist = init_distributed(config.distributed_timeout_s)
        check_same_config(self.dist, to_yaml(config))
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(config))
        seed_everything(config.seed)
        self.task = build_task(config, self.dist)
        self.params = [p for p in self.task.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.optim.lr,
            betas=tuple(config.optim.betas),
            weight_decay=config.optim.weight_decay,
        )
        warmup = config.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda done: min(1.0, (done + 1) / warmup) if warmup else 1.0
        )
        self.scenarios = scenario_pool(config)
        self.cursor = ScenarioCursor(len(self.scenarios), config.seed)
        self.start_step = 1
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, self.task.model, self.optimizer, self.scheduler)
            self.cursor.position = state["scenario_position"]
            self.start_step = state["step"] + 1
            self.task.sync(0)  # the rollout side still holds the initial weights
        self.records = None
        if self.dist.is_main:
            self.records = RunRecords(self.run_dir, resume_step=self.start_step - 1 if checkpoint else None)

    def step(self, step: int) -> dict[str, float]:
        config, task = self.config, self.task
        started = time.perf_counter()

        # 1. rollout: this step's scenarios, each a group of rollout.group_size sessions
        picked = self.cursor.take(config.rollout.groups_per_step)
        played: StepRollout = task.rollout(step, [self.scenarios[i] for i in picked])
        metrics = {**task_metrics(played.outcomes), **played.metrics}
        metrics["time/rollout"] = time.perf_counter() - started

        # 2. advantages over the whole step's rewards
        phase = time.perf_counter()
        advantages = compute_advantages(config.algo, **played.rewards.as_kwargs())
        metrics.update(advantages.metrics)
        per_turn = advantages.per_turn[played.local_turns]
        metrics["time/advantage"] = time.perf_counter() - phase

        # 3. update: algo.ppo_epochs passes, each one optimizer step; then the schedule
        phase = time.perf_counter()
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]
        metrics.update(self.update(played, per_turn))
        metrics["time/train"] = time.perf_counter() - phase

        # 4. sync: the rollout side gets the new weights
        phase = time.perf_counter()
        metrics.update(task.sync(step))
        metrics["time/sync"] = time.perf_counter() - phase
        metrics["time/step"] = time.perf_counter() - started
        if "rollout/tokens" in metrics:
            metrics["tokens_per_s"] = metrics["rollout/tokens"] / metrics["time/step"]

        # 5. records
        if self.records is not None:
            self.records.log(step, metrics)
            self.records.write_samples(step, task.samples(played.data, per_turn)[: config.samples_per_step])
        return metrics

    def update(self, played: StepRollout, per_turn: torch.Tensor) -> dict[str, float]:
        prepared = self.task.prepare_update(played.data, per_turn)
        if prepared is None:
            return {"loss/skipped_empty_batch": 1.0}
        epochs = self.config.algo.ppo_epochs
        totals: dict[str, float] = {}
        for _ in range(epochs):
            self.optimizer.zero_grad(set_to_none=True)
            passed = self.task.backward(prepared)
            passed["grad_norm"] = clip_gradients(self.params, self.config.optim.grad_clip)
            self.optimizer.step()
            for key, value in passed.items():
                totals[key] = totals.get(key, 0.0) + value / epochs
        self.scheduler.step()
        return totals

    def checkpoint(self, step: int) -> Path:
        return save_checkpoint(
            self.run_dir,
            step,
            model=self.task.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            data_cursor={"scenario_position": self.cursor.position},
            keep=self.config.keep_checkpoints,
            export=self.task.export(),
            sharded=self.task.sharded,
        )

    def evaluate(self, name: str) -> dict[str, float]:
        """Held-out evaluation of the current weights, written to ``eval/<name>.json``."""
        config = self.config
        scenarios, customers = held_out_sessions(config, config.eval_sessions, config.eval_seed)
        result = evaluation_metrics(self.task.evaluate(scenarios, customers), len(scenarios))
        if self.dist.is_main:
            (self.run_dir / "eval").mkdir(exist_ok=True)
            (self.run_dir / "eval" / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    def run(self) -> Path:
        from tqdm.auto import tqdm

        config = self.config
        before_path = self.run_dir / "eval" / "before.json"
        # A resumed run keeps the "before" of the run it continues.
        if config.eval_before_after and (self.start_step == 1 or not before_path.exists()):
            self.evaluate("before")
        bar = tqdm(
            range(self.start_step, config.steps + 1),
            total=config.steps,
            initial=self.start_step - 1,
            desc=f"{config.env.name} {config.algo.name}",
            unit="step",
            disable=not (config.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        try:
            for step in bar:
                metrics = self.step(step)
                bar.set_postfix(
                    conversion=f"{metrics.get('task/conversion_rate', float('nan')):.2f}",
                    turn_reward=f"{metrics.get('reward/turn_total/mean', float('nan')):.2f}",
                )
                if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    self.checkpoint(step)
                    if self.records is not None:
                        self.records.plot()
        finally:
            bar.close()
            if self.records is not None:
                self.records.plot()
                self.records.close()
        if config.eval_before_after:
            after = self.evaluate("after")
            if self.dist.is_main:
                before = json.loads(before_path.read_text())
                table = write_before_after(before, after, EVAL_TABLE, self.run_dir)
                print(table, flush=True)
        return self.run_dir

    def close(self) -> None:
        self.task.close()
        shutdown(self.dist)


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train as configured; returns the run directory."""
    trainer = Trainer(config, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


def evaluate(config: TrainConfig, checkpoint: Path | None, num_sessions: int, seed: int) -> dict[str, float]:
    """Greedy held-out sessions of a checkpoint's policy (the initial policy when ``checkpoint`` is None)."""
    if num_sessions < 1:
        raise ConfigError(f"the number of evaluation sessions must be >= 1, got {num_sessions}")
    seed_everything(config.seed)
    task = build_task(config, DistContext())
    try:
        if checkpoint is not None:
            load_checkpoint(checkpoint, task.model)
            task.sync(0)
        scenarios, customers = held_out_sessions(config, num_sessions, seed)
        return evaluation_metrics(task.evaluate(scenarios, customers), num_sessions)
    finally:
        task.close()
