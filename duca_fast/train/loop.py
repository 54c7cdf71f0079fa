"""The training loop, one for every task: rollout -> advantages -> update -> sync -> records -> checkpoint.

``Trainer.step`` reads top to bottom with the time of each phase. The task (``train/tasks/``: the LLM
sales task, the dialogue-act twin) plays and learns; the loop owns the scenario cursor, the seeds, the
advantages, the optimizer and warmup schedule, the non-finite gradient check, the records, checkpoints
and resume. A resumed CPU run logs exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from duca_fast.env import Scenario, generate_scenarios, load_scenarios
from duca_fast.train.algorithms import compute_advantages
from duca_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from duca_fast.train.config import (
    ConfigError,
    TrainConfig,
    changed_keys,
    defines_the_run,
    load_config,
    to_yaml,
)
from duca_fast.train.console import intro_lines, route_engine_logs
from duca_fast.train.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    check_same_config,
    init_distributed,
    shutdown,
)
from duca_fast.train.offload import OffloadedState, offload_optimizer_state, restore_optimizer_state
from duca_fast.train.records import RunRecords, strict_json, write_before_after
from duca_fast.train.rundir import RunDirError, claim_run_dir, release_run_dir
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
    "mean_session_reward",
    "mean_turns",
)
"""Rows of the before/after table, in order."""


FAULT_ENV = "DUCA_FAST_FAULT"
"""Fault injection for the reliability tests: ``STEP:PHASE`` makes the loop SIGKILL itself when step STEP
reaches PHASE (one of ``FAULT_PHASES``); ``STEP:checkpoint:SECONDS`` kills it that long after the
checkpoint write of STEP started (mid-write, or just after when the write is quicker)."""
FAULT_PHASES = ("rollout", "advantage", "update", "sync", "records", "checkpoint")


class NonFiniteGradientError(FloatingPointError):
    """The gradient norm of an update is NaN or infinite; the weights were left unchanged."""


class RolloutFailureError(RuntimeError):
    """Too many sessions failed for ``train.max_failed_steps`` steps in a row; the run stopped."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run after a step; ``step`` is the last one done (and checkpointed)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}; resume with --resume")
        self.step = step


def _fault_point(step: int, phase: str) -> None:
    """SIGKILL this process at the point ``DUCA_FAST_FAULT`` names (tests only; unset: nothing)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != step or parts[1] != phase:
        return
    if len(parts) == 3:
        threading.Timer(float(parts[2]), os.kill, (os.getpid(), signal.SIGKILL)).start()
    else:
        os.kill(os.getpid(), signal.SIGKILL)


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
    return generate_scenarios(
        config.env.num_scenarios,
        seed=config.env.scenario_seed,
        mix=config.env.scenario_mix,
        coached=config.env.agent_coaching,
    )


def cursor_state(position: int, carried: list | None) -> dict:
    """What a checkpoint's ``cursor.json`` holds: the scenario position, and the sessions carried into the
    next step (``rollout.carry_over``) when there are any."""
    return {"scenario_position": position, **({"carried": carried} if carried else {})}


def held_out_sessions(config: TrainConfig, num_sessions: int, seed: int) -> tuple[list[Scenario], list[int]]:
    """Evaluation scenarios (a held-out generator seed, or ``env.scenarios_path`` cycled) and customers."""
    if config.env.scenarios_path:
        pool = load_scenarios(config.env.scenarios_path)
        scenarios = [pool[i % len(pool)] for i in range(num_sessions)]
    else:
        scenarios = generate_scenarios(
            num_sessions,
            seed=config.env.scenario_seed + HELD_OUT_SCENARIO_SEED_OFFSET,
            mix=config.env.scenario_mix,
            coached=config.env.agent_coaching,
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

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        force: bool = False,
        trust_checkpoint: bool = False,
    ) -> None:
        self.config = config
        self.trust_checkpoint = trust_checkpoint
        self.run_dir = Path(config.run_dir)
        self.dist = init_distributed(config.distributed_timeout_s)
        check_same_config(self.dist, to_yaml(config))
        self.run_id, changes = self._claim(resume=resume, overwrite=overwrite, force=force)
        try:
            self._start(resume=resume, changes=changes)
        except BaseException:
            self._release()
            raise

    def _claim(self, *, resume: bool, overwrite: bool, force: bool) -> tuple[str, dict]:
        """Rank 0 claims the run directory (``rundir.claim_run_dir``) and checks the resume overrides;
        every rank gets the run id and the changes, or the same error."""
        claimed: object = RunDirError("rank 0 did not claim the run directory")
        if self.dist.is_main:
            try:
                run_id = claim_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
                try:
                    claimed = (run_id, self._resume_changes(run_id, force) if resume else {})
                except ConfigError:
                    release_run_dir(self.run_dir)
                    raise
            except (RunDirError, ConfigError) as error:
                claimed = error
        claimed = all_gather_objects(self.dist, claimed)[0]
        if isinstance(claimed, Exception):
            raise claimed
        return claimed

    def _release(self) -> None:
        if self.dist.is_main:
            release_run_dir(self.run_dir)

    def _start(self, *, resume: bool, changes: dict) -> None:
        config = self.config
        checkpoint = latest_checkpoint(self.run_dir, run_id=self.run_id) if resume else None
        if resume and checkpoint is None:
            raise ConfigError(
                f"--resume: run {self.run_id} has no checkpoint under {self.run_dir / 'checkpoints'} that "
                "verifies; start again with --overwrite"
            )
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(config))
            if config.progress:
                resumed = int(checkpoint.name.removeprefix("step_")) if checkpoint is not None else None
                print("\n".join(intro_lines(config, self.run_dir, resumed)), flush=True)
        log_name = "engine.log" if self.dist.is_main else f"engine.rank{self.dist.rank}.log"
        self._undo_logs = route_engine_logs(self.run_dir / "logs" / log_name, console=config.verbose)
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
        self.offloaded: OffloadedState | None = None
        """The optimizer state ``optim.offload_state`` moved to host memory after the last update."""
        self.failed_streak = 0
        self.step_failed = False
        self.interrupted = False
        if checkpoint is not None:
            state = load_checkpoint(
                checkpoint,
                self.task.model,
                self.optimizer,
                self.scheduler,
                run_id=self.run_id,
                trust_pickle=self.trust_checkpoint,
            )
            self.cursor.position = state["scenario_position"]
            self.task.restore_carry(state.get("carried"), self.scenarios)
            self.start_step = state["step"] + 1
            self._apply_optimizer_settings()
            self.task.sync(0)  # the rollout side still holds the initial weights
        self.records = None
        if self.dist.is_main:
            self.records = RunRecords(self.run_dir, resume_step=self.start_step - 1 if checkpoint else None)
            for key, (before, after) in changes.items():
                print(f"resume: {key} {before!r} -> {after!r}", flush=True)

    def _resume_changes(self, run_id: str, force: bool) -> dict:
        """What the resumed config changes against the run's ``config.yaml``; refuse run-defining changes."""
        saved_path = self.run_dir / "config.yaml"
        try:
            saved = load_config(saved_path)
        except ConfigError as error:
            raise ConfigError(f"--resume: the run's {saved_path} does not load ({error})") from None
        changes = changed_keys(saved, self.config)
        defining = {k: v for k, v in changes.items() if defines_the_run(k)}
        if defining and not force:
            listed = ", ".join(f"{k} {before!r} -> {after!r}" for k, (before, after) in defining.items())
            raise ConfigError(
                f"--resume would change what run {run_id} is ({listed}); start a new run (another "
                "run_dir or --overwrite), or pass --force to continue with them"
            )
        return changes

    def _apply_optimizer_settings(self) -> None:
        """The configured lr, betas and weight decay replace the checkpoint's (the schedule is kept)."""
        optim = self.config.optim
        self.scheduler.base_lrs = [optim.lr for _ in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(lr=optim.lr * factor, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def step(self, step: int) -> dict[str, float]:
        config, task = self.config, self.task
        started = time.perf_counter()

        # 1. rollout: this step's scenarios, each a group of rollout.group_size sessions
        _fault_point(step, "rollout")
        # Groups carried over from the last step (rollout.carry_over) take the place of new ones.
        wanted = config.rollout.groups_per_step + config.rollout.oversample_groups
        picked = self.cursor.take(wanted - task.carried_groups())
        played: StepRollout = task.rollout(step, [self.scenarios[i] for i in picked])
        metrics = {**task_metrics(played.outcomes), **played.metrics}
        metrics["time/rollout"] = time.perf_counter() - started
        self._count_failures(step, played, metrics)

        # 2. advantages over the whole step's rewards
        _fault_point(step, "advantage")
        phase = time.perf_counter()
        advantages = compute_advantages(config.algo, **played.rewards.as_kwargs())
        metrics.update(advantages.metrics)
        per_turn = advantages.per_turn[played.local_turns]
        per_token = None
        if advantages.per_agent_token is not None:
            if played.local_agent_tokens is None:
                raise RuntimeError(f"{config.algo.name}: per-token advantages, but the rollout has no tokens")
            per_token = advantages.per_agent_token[played.local_agent_tokens]
        metrics["time/advantage"] = time.perf_counter() - phase

        # 3. update: algo.ppo_epochs passes, each one optimizer step; then the schedule
        _fault_point(step, "update")
        phase = time.perf_counter()
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]
        metrics.update(self.update(played, per_turn, per_token))
        metrics["time/train"] = time.perf_counter() - phase

        # 4. sync: the rollout side gets the new weights
        _fault_point(step, "sync")
        phase = time.perf_counter()
        metrics.update(task.sync(step))
        metrics["time/sync"] = time.perf_counter() - phase
        metrics["time/step"] = time.perf_counter() - started
        if "rollout/tokens" in metrics:
            metrics["tokens_per_s"] = metrics["rollout/tokens"] / metrics["time/step"]

        # 5. records
        _fault_point(step, "records")
        if self.records is not None:
            self.records.log(step, metrics)
            if config.samples_per_step > 0:
                samples = task.samples(played.data, per_turn)[: config.samples_per_step]
                self.records.write_samples(step, samples)
        if self.failed_streak >= config.train.max_failed_steps:
            raise RolloutFailureError(
                f"stopped at step {step}: {self.failed_streak} steps in a row with at least "
                f"{config.train.max_failed_share:.0%} of the sessions failed (train.max_failed_share, "
                f"train.max_failed_steps); step {step}: {' '.join(played.failure_summary.split())}"
            )
        return metrics

    def _count_failures(self, step: int, played: StepRollout, metrics: dict[str, float]) -> None:
        """Print the step's failed and truncated sessions; count steps that failed in a row."""
        failed = metrics.get("rollout/failed_sessions", 0.0)
        truncated = metrics.get("rollout/truncated_sessions", 0.0)
        if (failed or truncated) and self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(f"step {step}: {played.failure_summary}")
        sessions = played.rewards.session_group.numel()
        self.step_failed = failed > 0 and failed >= self.config.train.max_failed_share * sessions
        self.failed_streak = self.failed_streak + 1 if self.step_failed else 0

    def update(
        self, played: StepRollout, per_turn: torch.Tensor, per_agent_token: torch.Tensor | None = None
    ) -> dict[str, float]:
        prepared = self.task.prepare_update(played.data, per_turn, per_agent_token)  # the engine sleeps
        if prepared is None:
            return {"loss/skipped_empty_batch": 1.0}
        restore_optimizer_state(self.offloaded)
        epochs = self.config.algo.ppo_epochs
        totals: dict[str, float] = {}
        for _ in range(epochs):
            self.optimizer.zero_grad(set_to_none=True)
            passed = self.task.backward(prepared)
            passed["grad_norm"] = clip_gradients(self.params, self.config.optim.grad_clip)
            self.optimizer.step()
            for key, value in passed.items():
                totals[key] = totals.get(key, 0.0) + value / epochs
        self.optimizer.zero_grad(set_to_none=True)  # no gradients held through the sync and the rollout
        self.scheduler.step()
        if self.config.optim.offload_state:  # before the sync wakes the engine's KV cache
            self.offloaded = offload_optimizer_state(self.optimizer)
            totals["optim/offloaded_mib"] = self.offloaded.bytes / 2**20
        return totals

    def checkpoint(self, step: int) -> Path:
        _fault_point(step, "checkpoint")
        return save_checkpoint(
            self.run_dir,
            step,
            model=self.task.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            data_cursor=cursor_state(self.cursor.position, self.task.carry_state()),
            keep=self.config.keep_checkpoints,
            export=self.task.export(),
            sharded=self.task.sharded,
            run_id=self.run_id,
        )

    def evaluate(self, name: str) -> dict[str, float]:
        """Held-out evaluation of the current weights, written to ``eval/<name>.json``."""
        config = self.config
        scenarios, customers = held_out_sessions(config, config.eval_sessions, config.eval_seed)
        result = evaluation_metrics(self.task.evaluate(scenarios, customers), len(scenarios))
        if self.dist.is_main:
            (self.run_dir / "eval").mkdir(exist_ok=True)
            (self.run_dir / "eval" / f"{name}.json").write_text(strict_json(result))
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
        previous_handler = self._catch_sigint()
        try:
            for step in bar:
                metrics = self.step(step)
                bar.set_postfix(
                    conversion=f"{metrics.get('task/conversion_rate', float('nan')):.2f}",
                    turn_reward=f"{metrics.get('reward/turn_total/mean', float('nan')):.2f}",
                )
                interrupted = self._interrupted_everywhere()
                scheduled = config.checkpoint_every and step % config.checkpoint_every == 0
                # A step whose sessions failed (train.max_failed_share) is never checkpointed.
                if not self.step_failed and (step == config.steps or scheduled or interrupted):
                    self.checkpoint(step)
                    if self.records is not None:
                        self.records.plot()
                if interrupted and step < config.steps:
                    raise TrainingInterrupted(step)
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
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

    def _catch_sigint(self):
        """First Ctrl-C: finish the step, checkpoint it, stop; a second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def stop_after_this_step(signum, frame):
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        return signal.signal(signal.SIGINT, stop_after_this_step)

    def _interrupted_everywhere(self) -> bool:
        # Ranks must agree, or one would checkpoint (a collective) while the others go on.
        if not self.dist.enabled:
            return self.interrupted
        return all_reduce_sum(self.dist, float(self.interrupted)) > 0

    def close(self) -> None:
        try:
            self.task.close()
            shutdown(self.dist)
        finally:
            self._release()
            if getattr(self, "_undo_logs", None) is not None:
                self._undo_logs()
                self._undo_logs = None


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    trust_checkpoint: bool = False,
) -> Path:
    """Train as configured; returns the run directory.

    ``resume`` continues the run in ``run_dir`` (overrides that change what the run is need ``force``;
    a duca_fast 0.1 checkpoint with a pickled trainer state needs ``trust_checkpoint``);
    ``overwrite`` replaces it; with neither, ``run_dir`` must be empty or missing (``RunDirError``).
    """
    trainer = Trainer(
        config, resume=resume, overwrite=overwrite, force=force, trust_checkpoint=trust_checkpoint
    )
    try:
        return trainer.run()
    finally:
        trainer.close()


def evaluate(
    config: TrainConfig,
    checkpoint: Path | None,
    num_sessions: int,
    seed: int,
    *,
    sampled: bool = False,
    trust_checkpoint: bool = False,
) -> dict[str, float]:
    """Held-out sessions of a checkpoint's policy (the initial policy when ``checkpoint`` is None):
    greedy, or ``sampled`` at the rollout temperature with request seeds from ``seed`` (repeatable).
    ``trust_checkpoint`` allows a duca_fast 0.1 checkpoint's pickled trainer state."""
    if num_sessions < 1:
        raise ConfigError(f"the number of evaluation sessions must be >= 1, got {num_sessions}")
    seed_everything(config.seed)
    task = build_task(config, DistContext())
    try:
        if checkpoint is not None:
            load_checkpoint(checkpoint, task.model, trust_pickle=trust_checkpoint)
            task.sync(0)
        scenarios, customers = held_out_sessions(config, num_sessions, seed)
        played = task.evaluate(scenarios, customers, sample_seed=seed if sampled else None)
        return evaluation_metrics(played, num_sessions)
    finally:
        task.close()
