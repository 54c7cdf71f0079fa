"""The DuCA trainer for LLM sales agents: rollout -> advantages -> update -> sync -> log, in one process.

One step, top to bottom (``Trainer.step``):
1. rollout: B scenarios x G sessions through the colocated engine and the sales environment;
2. advantages: DuCA (HIAN), GRPO or GDPO over the batch's turn and session rewards, broadcast to tokens;
3. update: packed (padding-free) sessions in token-budget micro-batches; final hidden states and the
   lm_head go into ``ops.fused_policy_loss`` (no ``[tokens, vocab]`` logits); grad clip; AdamW;
4. sync: the new weights (LoRA merged) are pushed into the engine in place; prefix cache reset;
5. log: metrics.jsonl, TensorBoard, transcripts, plots; checkpoints on schedule.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duca_fast import ops
from duca_fast.env import SalesEnv, compute_metrics, generate_scenarios, load_scenarios
from duca_fast.train.algorithms import broadcast_to_tokens, compute_advantages
from duca_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from duca_fast.train.config import ConfigError, TrainConfig, to_yaml
from duca_fast.train.distributed import (
    all_gather_objects,
    all_reduce_sum,
    barrier,
    check_same_config,
    init_distributed,
    shard_policy,
    shutdown,
)
from duca_fast.train.records import RunRecords

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_MODEL_DIR = "tiny-llama-{hidden}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_model_dir(config: TrainConfig) -> Path:
    """The HF model directory the engine and the trainer load (converted or built once when needed)."""
    from duca_fast.rollout import build_tiny_model_dir, load_default_model_dir

    cache = Path(config.model.cache_dir)
    if config.model.path == "default":
        return load_default_model_dir(cache)
    if config.model.path == "tiny":
        target = cache / TINY_MODEL_DIR.format(hidden=config.model.hidden_size)
        if not (target / "config.json").exists():
            rng = torch.get_rng_state()
            build_tiny_model_dir(target, hidden_size=config.model.hidden_size, seed=0)
            torch.set_rng_state(rng)
        return target
    path = Path(config.model.path)
    if not (path / "config.json").exists():
        raise ConfigError(f"model.path {str(path)!r} has no config.json (not a Hugging Face model directory)")
    return path


def attention_implementation(config: TrainConfig) -> str:
    if config.model.attn_implementation != "auto":
        return config.model.attn_implementation
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_policy(config: TrainConfig, model_dir: Path) -> torch.nn.Module:
    """The trainable model: the HF causal LM, wrapped with LoRA adapters when ``lora_rank > 0``."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=DTYPES[config.model.dtype], attn_implementation=attention_implementation(config)
    ).to(device)
    model.config.use_cache = False
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.model.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.model.lora_rank,
            lora_alpha=config.model.lora_alpha,
            target_modules=list(config.model.lora_target_modules),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def build_engine(config: TrainConfig, model_dir: Path):
    from duca_fast.rollout import HFEngine, VLLMEngine

    dtype = DTYPES[config.model.dtype]
    if config.rollout.engine == "vllm":
        return VLLMEngine(
            model_dir,
            max_model_len=config.rollout.max_model_len,
            dtype=dtype,
            seed=config.seed,
            gpu_memory_utilization=config.rollout.gpu_memory_utilization,
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFEngine(
        model_dir, max_model_len=config.rollout.max_model_len, dtype=dtype, device=device, seed=config.seed
    )


def load_scenario_pool(config: TrainConfig) -> list:
    if config.env.scenarios_path:
        return load_scenarios(config.env.scenarios_path)
    return generate_scenarios(config.env.num_scenarios, seed=config.env.scenario_seed)


def env_factory(config: TrainConfig):
    """A zero-argument callable making one fresh environment per session."""
    if config.env.customer == "llm":
        from duca_fast.env import LLMCustomerConfig, LLMCustomerFactory

        customer = LLMCustomerFactory(
            LLMCustomerConfig(base_url=config.env.customer_base_url, model=config.env.customer_model)
        )
        return lambda: SalesEnv(customer, max_turns=config.env.max_turns)
    return lambda: SalesEnv(max_turns=config.env.max_turns)


@dataclass
class ScenarioCursor:
    """Walks a seeded permutation of the scenario pool, reshuffled every epoch; checkpointed."""

    pool_size: int
    seed: int
    epoch: int = 0
    position: int = 0

    def order(self) -> list[int]:
        return torch.randperm(
            self.pool_size, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()

    def take(self, count: int) -> list[int]:
        picked = []
        while len(picked) < count:
            order = self.order()
            take = min(count - len(picked), self.pool_size - self.position)
            picked += order[self.position : self.position + take]
            self.position += take
            if self.position == self.pool_size:
                self.epoch, self.position = self.epoch + 1, 0
        return picked

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying HF causal LM (a peft model keeps its LoRA layers inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class MicroBatch:
    rows: slice
    """Token range in the packed batch (whole sessions)."""
    num_sessions: int


def micro_batches(cu_seqlens: torch.Tensor, budget: int) -> list[MicroBatch]:
    """Whole sessions packed greedily up to ``budget`` tokens (a longer session gets its own)."""
    bounds = cu_seqlens.tolist()
    batches, start, count = [], bounds[0], 0
    for s in range(len(bounds) - 1):
        end = bounds[s + 1]
        if count and end - start > budget:
            batches.append(MicroBatch(slice(start, bounds[s]), count))
            start, count = bounds[s], 0
        count += 1
    if bounds[-1] > start:
        batches.append(MicroBatch(slice(start, bounds[-1]), count))
    return batches


def decoder_hidden_states(base: torch.nn.Module, batch, rows: slice, device) -> torch.Tensor:
    """``[tokens, H]`` final hidden states of the whole sessions in ``rows`` of the packed batch.

    With flash_attention_2 the micro-batch is one padding-free sequence whose position_ids restart
    per session. Otherwise each session runs on its own: a packed sequence would need a block-diagonal
    mask, which sends sdpa to its math kernel and stores [heads, L, L] attention weights per layer
    (7 GB at 2.7k tokens on SmolLM2-135M, measured), while a lone causal sequence takes sdpa's
    flash kernel with no mask at all.
    """
    decoder = base.get_decoder()
    ids, positions = batch.input_ids, batch.position_ids
    if getattr(base.config, "_attn_implementation", None) == "flash_attention_2":
        out = decoder(
            input_ids=ids[rows][None].to(device),
            position_ids=positions[rows][None].to(device),
            use_cache=False,
        )
        return out.last_hidden_state[0]
    bounds = [b for b in batch.cu_seqlens.tolist() if rows.start <= b <= rows.stop]
    pieces = []
    for start, end in itertools.pairwise(bounds):
        if end > start:
            out = decoder(input_ids=ids[start:end][None].to(device), use_cache=False)
            pieces.append(out.last_hidden_state[0])
    return torch.cat(pieces)


class PolicyObjective(torch.nn.Module):
    """The policy's forward and its loss in one module call.

    Under FSDP2 the root unit gathers embeddings, final norm and the (tied) lm_head only inside its own
    forward; computing the fused loss there gives the op the full head weight and lets the backward
    hooks reduce-scatter its gradient.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch, rows: slice, loss_inputs: dict[str, Any] | None = None, temperature: float = 1.0
    ):
        """``(loss, metrics)`` of the micro-batch when ``loss_inputs`` is given, else its log-probs."""
        base = unwrap(self.model)
        device = next(self.model.parameters()).device
        hidden = decoder_hidden_states(base, batch, rows, device)
        weight = base.get_output_embeddings().weight
        if loss_inputs is None:
            target = torch.roll(batch.input_ids, -1)[rows].to(device)
            return ops.token_logprobs(hidden, weight, target, temperature=temperature)
        return ops.fused_policy_loss(hidden, weight, **loss_inputs)


class Trainer:
    """Owns the policy, the engine, the optimizer and the run directory; ``run()`` trains.

    Launched by torchrun with K > 1 ranks it shards the policy with FSDP2 and splits every step's
    groups over the ranks (see ``duca_fast.train.distributed``).
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False) -> None:
        self.config = config
        self.dist = init_distributed(config.distributed_timeout_s)
        if config.rollout.groups_per_step % self.dist.world_size:
            raise ConfigError(
                f"rollout.groups_per_step={config.rollout.groups_per_step} is not divisible by the world "
                f"size {self.dist.world_size}; every rank rolls out the same number of groups"
            )
        check_same_config(self.dist, to_yaml(config))
        self.run_dir = Path(config.run_dir)
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if resume and checkpoint is None:
            raise ConfigError(f"--resume: no complete checkpoint under {self.run_dir / 'checkpoints'}")
        if self.dist.enabled and config.algo.kl_coef > 0 and config.model.lora_rank == 0:
            raise ConfigError(
                "algo.kl_coef > 0 with a full fine-tune is single-rank only "
                "(use LoRA: the base model is then the reference)"
            )
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(config))
        seed_everything(config.seed)
        self.model_dir = resolve_model_dir(config) if self.dist.is_main else None
        barrier(self.dist)
        self.model_dir = self.model_dir or resolve_model_dir(config)
        self.model = build_policy(config, self.model_dir)
        self.reference = None
        if config.algo.kl_coef > 0 and config.model.lora_rank == 0:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.objective = PolicyObjective(self.model)
        if self.dist.enabled:
            shard_policy(self.objective, list(unwrap(self.model).get_decoder().layers))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=config.optim.lr,
            betas=tuple(config.optim.betas),
            weight_decay=config.optim.weight_decay,
        )
        warmup = config.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.scenarios = load_scenario_pool(config)
        self.cursor = ScenarioCursor(len(self.scenarios), config.seed)
        self.start_step = 1
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)
            self.cursor.epoch, self.cursor.position = state["epoch"], state["position"]
            self.start_step = state["step"] + 1
        self.records = None
        if self.dist.is_main:
            self.records = RunRecords(self.run_dir, resume_step=self.start_step - 1 if checkpoint else None)
        self.engine = build_engine(config, self.model_dir)
        from duca_fast.rollout import WeightSync

        self.sync = WeightSync(self.engine)
        if checkpoint is not None:
            # The engine loaded the base weights; the resumed ones must replace them.
            self.sync.push(self.model)

    # -- one step ------------------------------------------------------------------------------------

    def local_specs(self, step: int):
        """This rank's sessions: its share of the step's groups (same seeds as on a single rank)."""
        from duca_fast.rollout import make_session_specs

        config = self.config
        picked = self.cursor.take(config.rollout.groups_per_step)
        specs = make_session_specs(
            [self.scenarios[i] for i in picked],
            config.rollout.group_size,
            seed=config.seed * 1_000_003 + step * 10_007,
        )
        per_rank = config.rollout.groups_per_step // self.dist.world_size
        mine = range(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)
        return [spec for spec in specs if spec.group in mine]

    def step(self, step: int) -> dict[str, float]:
        from duca_fast.rollout import RolloutConfig, SamplingConfig, rollout

        config = self.config
        metrics: dict[str, float] = {}
        started = time.perf_counter()

        # 1. rollout
        sampling = SamplingConfig(
            max_new_tokens=config.rollout.max_new_tokens,
            temperature=config.rollout.temperature,
            top_p=config.rollout.top_p,
        )
        rollout_config = RolloutConfig(
            sampling=sampling, max_turns=config.env.max_turns, seed=config.seed * 7919 + step
        )
        batch = rollout(self.engine, env_factory(config), self.local_specs(step), rollout_config)
        metrics["time/rollout"] = time.perf_counter() - started
        metrics["rollout/generated_tokens_per_s"] = batch.num_generated_tokens / max(
            batch.generate_seconds, 1e-9
        )
        everyone = all_gather_objects(
            self.dist,
            {
                "outcomes": [o for o, bad in zip(batch.outcomes, batch.failed.tolist()) if not bad],
                "failed": int(batch.failed.sum()),
                "truncated": int(batch.truncated.sum()),
                "tokens": int(batch.input_ids.numel()),
                "rewards": (
                    batch.turn_rewards,
                    batch.turn_session,
                    batch.turn_index,
                    batch.session_rewards,
                    batch.session_group,
                ),
            },
        )
        metrics["rollout/failed_sessions"] = float(sum(r["failed"] for r in everyone))
        metrics["rollout/truncated_sessions"] = float(sum(r["truncated"] for r in everyone))
        metrics["rollout/tokens"] = float(sum(r["tokens"] for r in everyone))
        outcomes = [o for r in everyone for o in r["outcomes"]]
        if outcomes:
            metrics.update({f"task/{k}": float(v) for k, v in compute_metrics(outcomes).__dict__.items()})

        # 2. advantages, over the global batch on every rank
        phase = time.perf_counter()
        rewards, first_turn = self._global_rewards([r["rewards"] for r in everyone], self.dist.rank)
        advantages = compute_advantages(
            config.algo,
            **rewards,
            turn_reward_names=batch.turn_reward_names,
            session_reward_names=batch.session_reward_names,
        )
        metrics.update(advantages.metrics)
        per_turn = advantages.per_turn[first_turn : first_turn + batch.turn_rewards.shape[0]]
        per_token = broadcast_to_tokens(per_turn, batch.token_turn)
        metrics["time/advantage"] = time.perf_counter() - phase

        # 3. update
        phase = time.perf_counter()
        self.sync.sleep_for_training()
        metrics.update(self.update(batch, per_token))
        metrics["time/train"] = time.perf_counter() - phase

        # 4. sync
        phase = time.perf_counter()
        check_every = config.rollout.check_logprobs_every
        check = (
            [s[:64] for s in self._check_prompts(batch)] if check_every and step % check_every == 0 else None
        )
        report = self.sync.wake_and_push(self.model, check_prompts=check)
        metrics["time/sync"] = time.perf_counter() - phase
        metrics["sync/seconds"] = report.seconds
        metrics["sync/weight_version"] = float(report.weight_version)
        if report.logprob_mismatch is not None:
            metrics["sync/check_logprob_mismatch"] = report.logprob_mismatch
        metrics["time/step"] = time.perf_counter() - started
        metrics["tokens_per_s"] = metrics["rollout/tokens"] / metrics["time/step"]

        # 5. log
        if self.records is not None:
            self.records.log(step, metrics)
            self.records.write_samples(step, self._samples(batch, per_turn))
        return metrics

    @staticmethod
    def _global_rewards(parts, rank: int) -> tuple[dict[str, torch.Tensor], int]:
        """Concatenate the ranks' rewards (session ids offset); also this rank's first global turn."""
        turn_rewards, turn_session, turn_index, session_rewards, session_group = [], [], [], [], []
        sessions = turns = 0
        offsets = []
        for t_rewards, t_session, t_index, s_rewards, s_group in parts:
            offsets.append(turns)
            turn_rewards.append(t_rewards)
            turn_session.append(t_session + sessions)
            turn_index.append(t_index)
            session_rewards.append(s_rewards)
            session_group.append(s_group)
            sessions += s_rewards.shape[0]
            turns += t_rewards.shape[0]
        return (
            {
                "turn_rewards": torch.cat(turn_rewards),
                "turn_session": torch.cat(turn_session),
                "turn_index": torch.cat(turn_index),
                "session_rewards": torch.cat(session_rewards),
                "session_group": torch.cat(session_group),
            },
            offsets[rank],
        )

    def _check_prompts(self, batch) -> list[list[int]]:
        bounds = batch.cu_seqlens.tolist()
        return [batch.input_ids[bounds[s] : bounds[s + 1]].tolist() for s in range(min(2, len(bounds) - 1))]

    def _samples(self, batch, per_turn: torch.Tensor) -> list[dict[str, Any]]:
        samples = []
        turn_session = batch.turn_session.tolist()
        for s in range(min(self.config.samples_per_step, len(batch.transcripts))):
            outcome = batch.outcomes[s]
            samples.append(
                {
                    "session": s,
                    "group": int(batch.session_group[s]),
                    "messages": batch.transcripts[s],
                    "turn_advantages": [round(float(a), 4) for a, t in zip(per_turn, turn_session) if t == s],
                    "outcome": {
                        "converted": outcome.converted,
                        "flagged_bot": outcome.flagged_bot,
                        "reason": outcome.reason,
                    },
                    "error": batch.errors[s],
                }
            )
        return samples

    def update(self, batch, token_advantages: torch.Tensor) -> dict[str, float]:
        """``algo.ppo_epochs`` optimizer steps over the packed batch, in token-budget micro-batches."""
        config = self.config
        device = next(self.model.parameters()).device
        # Token p predicts token p + 1 of the same session; the last token of a session predicts nothing.
        target = torch.roll(batch.input_ids, -1)
        same_session = torch.roll(batch.seq_ids, -1) == batch.seq_ids
        same_session[-1:] = False
        loss_mask = same_session & (torch.roll(batch.token_turn, -1) >= 0)
        advantages = torch.roll(token_advantages, -1).float()
        behavior = torch.roll(batch.behavior_logprobs, -1).float()
        session_has_loss = torch.zeros(len(batch.outcomes), dtype=torch.bool)
        session_has_loss[batch.seq_ids[loss_mask].unique()] = True
        # Aggregation is over the global batch: counts are summed over ranks.
        num_loss_tokens = int(all_reduce_sum(self.dist, float(loss_mask.sum())))
        num_loss_sessions = int(all_reduce_sum(self.dist, float(session_has_loss.sum())))
        if num_loss_tokens == 0:
            return {"loss/skipped_empty_batch": 1.0}
        chunks = micro_batches(batch.cu_seqlens, config.optim.micro_batch_tokens)
        passes = self._pad_for_ranks(chunks)
        old = self._old_logprobs(batch, passes) if config.algo.ppo_epochs > 1 else None
        # FSDP2 averages gradients over ranks; the losses are sums over the global batch.
        rank_scale = float(self.dist.world_size)

        totals: dict[str, float] = {}
        for _ in range(config.algo.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for chunk, padding in passes:
                rows = chunk.rows
                mask = loss_mask[rows] & (not padding)
                if not mask.any() and not self.dist.enabled:
                    continue
                agg, scale, extra = self._aggregation(
                    mask, batch.seq_ids[rows], num_loss_tokens, num_loss_sessions
                )
                ref = (
                    self._ref_logprobs(batch, rows, target[rows], device) if config.algo.kl_coef > 0 else None
                )
                loss_inputs = dict(
                    target=target[rows].to(device),
                    advantages=advantages[rows].to(device),
                    old_logprobs=None if old is None else old[rows].to(device),
                    mask=mask.to(device),
                    seq_ids=(batch.seq_ids[rows] - batch.seq_ids[rows][0]).to(device),
                    ref_logprobs=ref,
                    behavior_logprobs=behavior[rows].to(device),
                    clip_low=config.algo.clip_low,
                    clip_high=config.algo.clip_high,
                    dual_clip=config.algo.dual_clip,
                    kl_coef=config.algo.kl_coef,
                    kl_type=config.algo.kl_type,
                    entropy_coef=config.algo.entropy_coef,
                    temperature=config.rollout.temperature,
                    loss_agg=agg,
                    tis_cap=config.algo.tis_cap,
                    **extra,
                )
                loss, op_metrics = self.objective(batch, rows, loss_inputs)
                (loss * scale * rank_scale).backward()
                share = float(mask.sum()) / num_loss_tokens / config.algo.ppo_epochs
                totals["loss/total"] = (
                    totals.get("loss/total", 0.0) + float(loss.detach()) * scale / config.algo.ppo_epochs
                )
                for key, value in op_metrics.items():
                    totals[f"loss/{key}"] = totals.get(f"loss/{key}", 0.0) + float(value) * share
            params = [p for p in self.model.parameters() if p.requires_grad]
            clip = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(
                    f"gradient norm is {float(grad_norm)}; lower optim.lr or check the data"
                )
            self.optimizer.step()
            totals["grad_norm"] = float(grad_norm)
        self.scheduler.step()
        # Per-rank sums of the loss and of the token-weighted diagnostics add up to the global values
        # (one gather of the whole dict: a rank without loss tokens has fewer keys).
        local_sums = {k: v for k, v in totals.items() if k.startswith("loss/")}
        for key in local_sums:
            totals.pop(key)
        for part in all_gather_objects(self.dist, local_sums):
            for key, value in part.items():
                totals[key] = totals.get(key, 0.0) + value
        totals["lr"] = self.scheduler.get_last_lr()[0]
        totals["train/loss_tokens"] = float(num_loss_tokens)
        if "loss/behavior_logprob_gap" in totals:
            totals["sync/logprob_gap"] = totals.pop("loss/behavior_logprob_gap")
        return totals

    def _pad_for_ranks(self, chunks: list[MicroBatch]) -> list[tuple[MicroBatch, bool]]:
        """Micro-batches to run, flagged True where one is a masked-out repeat.

        Under FSDP2 every forward and backward is a collective, so all ranks must run as many passes;
        a rank with fewer micro-batches repeats its first one with the loss masked out.
        """
        passes = [(chunk, False) for chunk in chunks]
        if not self.dist.enabled:
            return passes
        most = max(all_gather_objects(self.dist, len(chunks)))
        if not chunks and most:
            raise RuntimeError(
                f"rank {self.dist.rank}: every session of this rank failed, so it has no tokens to keep "
                "in step with the other ranks; see the rollout errors in its log"
            )
        return passes + [(chunks[0], True)] * (most - len(chunks))

    def _aggregation(self, mask, seq_ids, num_loss_tokens: int, num_loss_sessions: int):
        """Per-micro-batch loss_agg and scale so that the summed micro-batch losses aggregate the step."""
        agg = self.config.algo.loss_agg
        if agg == "token_mean":
            return "token_sum_norm", 1.0, {"max_tokens": num_loss_tokens}
        sessions_here = int(seq_ids[mask].unique().numel())
        return agg, sessions_here / num_loss_sessions, {}

    @torch.no_grad()
    def _ref_logprobs(self, batch, rows: slice, target: torch.Tensor, device) -> torch.Tensor:
        """Log-probs under the frozen reference: the base model (adapters off) or a frozen copy."""
        temperature = self.config.rollout.temperature
        if self.reference is not None:
            return PolicyObjective(self.reference)(batch, rows, temperature=temperature)
        with self.model.disable_adapter():
            return self.objective(batch, rows, temperature=temperature)

    @torch.no_grad()
    def _old_logprobs(self, batch, passes) -> torch.Tensor:
        """Current-policy log-probs before the first epoch (the PPO "old" policy for later epochs)."""
        old = torch.zeros(batch.input_ids.shape[0])
        for chunk, padding in passes:
            logprobs = self.objective(batch, chunk.rows, temperature=self.config.rollout.temperature)
            if not padding:
                old[chunk.rows] = logprobs.cpu()
        return old

    # -- the loop ------------------------------------------------------------------------------------

    def checkpoint(self, step: int) -> Path:
        return save_checkpoint(
            self.run_dir,
            step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            data_cursor=self.cursor.state(),
            keep=self.config.keep_checkpoints,
            export=None if self.dist.enabled else (lambda path: self.model.save_pretrained(path)),
            sharded=self.dist.enabled,
        )

    def run(self) -> Path:
        from tqdm import tqdm

        config = self.config
        steps = range(self.start_step, config.steps + 1)
        bar = tqdm(
            steps, desc="train", disable=not (config.progress and self.dist.is_main), dynamic_ncols=True
        )
        try:
            for step in bar:
                metrics = self.step(step)
                bar.set_postfix(
                    conv=f"{metrics.get('task/conversion_rate', float('nan')):.2f}",
                    loss=f"{metrics.get('loss/total', float('nan')):.3f}",
                    s=f"{metrics['time/step']:.0f}",
                )
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps:
                    self.checkpoint(step)
                    if self.records is not None:
                        self.records.plot()
        finally:
            bar.close()
            if self.records is not None:
                self.records.plot()
                self.records.close()
        return self.run_dir

    def close(self) -> None:
        self.engine.close()
        shutdown(self.dist)


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train as configured; returns the run directory."""
    trainer = Trainer(config, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


def evaluate(config: TrainConfig, checkpoint: Path | None, num_sessions: int, seed: int) -> dict[str, float]:
    """Run ``num_sessions`` sessions with the checkpoint's policy (the base model when None); metrics."""
    from duca_fast.rollout import RolloutConfig, SamplingConfig, SessionSpec, WeightSync, rollout

    seed_everything(seed)
    model_dir = resolve_model_dir(config)
    engine = build_engine(config, model_dir)
    try:
        if checkpoint is not None:
            model = build_policy(config, model_dir)
            load_checkpoint(checkpoint, model)
            WeightSync(engine).push(model)
        scenarios = load_scenario_pool(config)
        order = torch.randperm(len(scenarios), generator=torch.Generator().manual_seed(seed)).tolist()
        specs = [
            SessionSpec(scenarios[order[i % len(order)]], i, seed * 100_003 + i) for i in range(num_sessions)
        ]
        sampling = SamplingConfig(
            max_new_tokens=config.rollout.max_new_tokens,
            temperature=config.rollout.temperature,
            top_p=config.rollout.top_p,
        )
        batch = rollout(
            engine,
            env_factory(config),
            specs,
            RolloutConfig(sampling=sampling, max_turns=config.env.max_turns, seed=seed),
        )
    finally:
        engine.close()
    ok = [o for o, failed in zip(batch.outcomes, batch.failed.tolist()) if not failed]
    result = {k: float(v) for k, v in compute_metrics(ok).__dict__.items()} if ok else {}
    for k, name in enumerate(batch.turn_reward_names):
        result[f"turn_reward/{name}"] = (
            float(batch.turn_rewards[:, k].mean()) if len(batch.turn_rewards) else 0.0
        )
    result["turn_reward_mean"] = float(batch.turn_rewards.sum(1).mean()) if len(batch.turn_rewards) else 0.0
    result["failed_sessions"] = float(batch.failed.sum())
    result["sessions"] = float(num_sessions)
    return result
