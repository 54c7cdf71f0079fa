"""The LLM sales task of the training loop: a Hugging Face policy sells through a colocated engine.

rollout: the step's groups (split over ranks under torchrun) through vLLM (or transformers) and the sales
environment; update: packed (padding-free) sessions in token-budget micro-batches, final hidden states and
the lm_head into ``ops.fused_policy_loss`` (no ``[tokens, vocab]`` logits); sync: the new weights (LoRA
merged) pushed into the engine in place. Multi-rank runs shard the policy with FSDP2 (``train/distributed``).

``ppo_gae`` adds a value head (``estimators.ValueHead``) on the policy's final hidden state at the last
prompt token of each agent turn: the token whose hidden state emits the turn's first token has seen
exactly the conversation the agent answers, as the twin's critic sees the observation before it acts.
Its values are taken at rollout time (one extra no-grad forward), its loss is added to the policy loss
in the same forward and backward, and it trains with the policy (through the shared trunk) and is
checkpointed with it; single process only.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from duca_fast import ops
from duca_fast.env import SalesEnv, Scenario
from duca_fast.env.reward_sources import build_reward_sources
from duca_fast.train.algorithms import broadcast_to_tokens, critic_targets
from duca_fast.train.config import ConfigError, TrainConfig
from duca_fast.train.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    shard_policy,
)
from duca_fast.train.estimators import ValueHead, value_loss
from duca_fast.train.features import customer_messages, tfidf_features
from duca_fast.train.task import (
    PlayedSessions,
    StepRollout,
    TwoHorizonRewards,
    derive_seed,
    loss_options,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_MODEL_DIR = "tiny-llama-{hidden}"

logger = logging.getLogger(__name__)


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
            max_num_seqs=config.rollout.max_num_seqs,
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFEngine(
        model_dir, max_model_len=config.rollout.max_model_len, dtype=dtype, device=device, seed=config.seed
    )


def env_factory(config: TrainConfig, reward_sources=()):
    """A zero-argument callable making one fresh environment per session; ``reward_sources`` (built once
    from ``env.reward_sources``) are shared by every session."""
    if config.env.customer == "llm":
        from duca_fast.env import LLMCustomerConfig, LLMCustomerFactory

        customer = LLMCustomerFactory(
            LLMCustomerConfig(
                base_url=config.env.customer_base_url,
                model=config.env.customer_model,
                timeout_s=config.env.customer_timeout_s,
                max_attempts=config.env.customer_max_attempts,
            )
        )
        return lambda: SalesEnv(customer, max_turns=config.env.max_turns, reward_sources=reward_sources)
    return lambda: SalesEnv(max_turns=config.env.max_turns, reward_sources=reward_sources)


def combine_rank_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """The step's rollout statistics from every rank's: times, rounds and engine steps of the slowest rank,
    preemptions and aborted, carried and resumed sessions summed, the largest staleness, the other
    statistics (shares, sessions in flight, prefix-cache hit rate) averaged over the ranks that have them."""
    out: dict[str, float] = {}
    for key in sorted({k for stats in per_rank for k in stats}):
        values = [stats[key] for stats in per_rank if key in stats]
        if key.endswith("_s") or key in ("rollout/rounds", "rollout/engine_steps"):
            out[key] = max(values)
        elif key in (
            "rollout/preemptions",
            "rollout/aborted_sessions",
            "rollout/carried_sessions",
            "rollout/resumed_sessions",
        ):
            out[key] = sum(values)
        elif key == "rollout/max_staleness":
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


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


def value_positions(batch) -> torch.Tensor:
    """``[T]`` packed position of each agent turn's last prompt token (the one that predicts the turn's
    first sampled token): where ``ppo_gae``'s value head reads the policy's hidden state."""
    return batch.turn_spans[:, 0] - 1


class PolicyObjective(torch.nn.Module):
    """The policy's forward and its loss in one module call (with ``critic``, the value head's too).

    Under FSDP2 the root unit gathers embeddings, final norm and the (tied) lm_head only inside its own
    forward; computing the fused loss there gives the op the full head weight and lets the backward
    hooks reduce-scatter its gradient.
    """

    def __init__(self, model: torch.nn.Module, critic: ValueHead | None = None) -> None:
        super().__init__()
        self.model = model
        self.critic = critic

    def forward(
        self,
        batch,
        rows: slice,
        loss_inputs: dict[str, Any] | None = None,
        temperature: float = 1.0,
        value_rows: torch.Tensor | None = None,
        return_sum_p2: bool = False,
    ):
        """``(loss, metrics)`` of the micro-batch when ``loss_inputs`` is given, else its log-probs (with
        ``return_sum_p2``: ``(log-probs, sum p^2)``).

        With ``value_rows`` (token indices within the micro-batch) the critic's ``[M]`` values at those
        tokens come too, from the same hidden states: ``(loss, metrics, values)``, or the values alone
        without ``loss_inputs`` (no lm_head pass)."""
        base = unwrap(self.model)
        device = next(self.model.parameters()).device
        hidden = decoder_hidden_states(base, batch, rows, device)
        values = None
        if value_rows is not None:
            if self.critic is None:
                raise ValueError("value_rows needs a critic (algo.name=ppo_gae builds one)")
            # The head stays float32 whatever the policy's dtype.
            values = self.critic(hidden[value_rows.to(device)].float())
            if loss_inputs is None:
                return values
        weight = base.get_output_embeddings().weight
        if loss_inputs is None:
            target = torch.roll(batch.input_ids, -1)[rows].to(device)
            return ops.token_logprobs(
                hidden, weight, target, temperature=temperature, return_sum_p2=return_sum_p2
            )
        loss, metrics = ops.fused_policy_loss(hidden, weight, **loss_inputs)
        return (loss, metrics) if values is None else (loss, metrics, values)


@dataclass
class SalesRollout:
    """One rank's rollout as its update takes it."""

    batch: Any
    """The ``RolloutBatch`` of this rank's sessions."""
    values: torch.Tensor | None = None
    """ppo_gae: ``[T]`` the value head's value of each of the batch's turns, taken at rollout time."""
    policy_logprobs: torch.Tensor | None = None
    """otb: ``[N]`` the policy's log-prob of token p + 1 at row p, taken at rollout time (the weights that
    sampled): the PPO "old" log-probs of later epochs too."""


@dataclass
class CriticInputs:
    """ppo_gae: what every micro-batch's critic loss reads."""

    positions: torch.Tensor
    """[T] packed position of each turn's last prompt token (``value_positions``)."""
    returns: torch.Tensor
    """[T] critic targets (NaN: no loss)."""
    keep: torch.Tensor
    """[T] turns with a target."""
    count: int
    """Turns with a target in the step: the critic loss is their mean."""
    coef: float
    """algo.critic.value_coef."""


@dataclass
class PreparedUpdate:
    """What every pass of one step shares."""

    batch: Any
    """The step's ``RolloutBatch`` (this rank's sessions)."""
    target: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    behavior: torch.Tensor
    num_loss_tokens: int
    """Loss tokens of the whole step (all ranks): the token_mean divisor."""
    num_loss_sessions: int
    passes: list[tuple[MicroBatch, bool]]
    old_logprobs: torch.Tensor | None
    returns: torch.Tensor | None = None
    """ppo_gae: [T] critic targets (NaN for turns of dropped sessions: no critic loss)."""


class SalesTask:
    """Owns the policy (FSDP2-sharded over torchrun ranks), the engine and the weight sync.

    ``policy`` is the HF (peft) model the engine mirrors; ``model``, what the loop optimizes and
    checkpoints, is the policy, or with ``ppo_gae`` the objective holding the policy and its value head.
    """

    def __init__(self, config: TrainConfig, dist: DistContext) -> None:
        from duca_fast.rollout import WeightSync

        if config.rollout.groups_per_step % dist.world_size:
            raise ConfigError(
                f"rollout.groups_per_step={config.rollout.groups_per_step} is not divisible by the world "
                f"size {dist.world_size}; every rank rolls out the same number of groups"
            )
        if config.rollout.oversample_groups % dist.world_size:
            raise ConfigError(
                f"rollout.oversample_groups={config.rollout.oversample_groups} is not divisible by the world "
                f"size {dist.world_size}; every rank over-samples the same number of groups"
            )
        if dist.enabled and config.algo.loss.kl_coef > 0 and config.model.lora_rank == 0:
            raise ConfigError(
                "algo.loss.kl_coef > 0 with a full fine-tune is single-rank only "
                "(use LoRA: the base model is then the reference)"
            )
        if dist.enabled and config.algo.name == "ppo_gae":
            raise ConfigError(
                "algo.name=ppo_gae with env.name=sales trains on a single process (its value head is not "
                "sharded); launch it without torchrun"
            )
        self.config, self.dist, self.sharded = config, dist, dist.enabled
        loss = config.algo.loss
        if config.rollout.carry_over and loss.tis_cap is None and not loss.correction and dist.is_main:
            logger.warning(
                "rollout.carry_over without algo.loss.tis_cap or algo.loss.correction: the carried turns, "
                "sampled by older weights, are trained as if on-policy"
            )
        model_dir = resolve_model_dir(config) if dist.is_main else None
        barrier(dist)
        model_dir = model_dir or resolve_model_dir(config)
        self.policy = build_policy(config, model_dir)
        self.reference = None
        if config.algo.loss.kl_coef > 0 and config.model.lora_rank == 0:
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        critic = self._build_critic() if config.algo.name == "ppo_gae" else None
        self.objective = PolicyObjective(self.policy, critic)
        self.model = self.policy if critic is None else self.objective
        if dist.enabled:
            shard_policy(self.objective, list(unwrap(self.policy).get_decoder().layers))
        self.engine = build_engine(config, model_dir)
        self.reward_sources = build_reward_sources(config.env.reward_sources)
        self.weight_sync = WeightSync(self.engine)
        self._check_prompts: list[list[int]] = []
        self.carried = None
        """``rollout.carry_over``: this rank's sessions carried into the next step (``CarriedSessions``)."""

    # -- carry-over ------------------------------------------------------------------------------------

    def carried_groups(self) -> int:
        """Groups carried into the next step, over all ranks (every rank carries as many)."""
        return len(self.carried.groups) * self.dist.world_size if self.carried is not None else 0

    def carry_state(self) -> list[list[dict]] | None:
        """Every rank's carried sessions as plain data, a list of sessions per group (a collective: every
        rank calls it); None when the run does not carry over."""
        if not self.config.rollout.carry_over:
            return None
        mine: dict[int, list[dict]] = {}
        if self.carried is not None:
            for record in self.carried.records(lambda scenario: scenario.scenario_id):
                mine.setdefault(record["group"], []).append(record)
        return [group for part in all_gather_objects(self.dist, list(mine.values())) for group in part]

    def restore_carry(self, groups: list[list[dict]] | None, pool: list[Scenario]) -> None:
        """Take this rank's share of ``carry_state``'s groups back (any world size that divides them);
        their environments replay the recorded turns at the next rollout."""
        from duca_fast.rollout import CarriedSessions

        if not groups:
            self.carried = None
            return
        if len(groups) % self.dist.world_size:
            raise ConfigError(
                f"the checkpoint carries {len(groups)} groups over, not divisible by the world size "
                f"{self.dist.world_size}"
            )
        by_id: dict[str, list[Scenario]] = {}
        for scenario in pool:
            by_id.setdefault(scenario.scenario_id, []).append(scenario)

        def scenario_of(scenario_id: str) -> Scenario:
            found = by_id.get(scenario_id, [])
            if len(found) != 1:
                raise ConfigError(
                    f"the checkpoint carries a session of scenario {scenario_id!r}, which the scenario pool "
                    f"holds {len(found)} times (it must hold it once)"
                )
            return found[0]

        share = len(groups) // self.dist.world_size
        mine = groups[self.dist.rank * share : (self.dist.rank + 1) * share]
        records = [record for group in mine for record in group]
        self.carried = CarriedSessions.from_records(records, self.engine.tokenizer, scenario_of)

    def _build_critic(self) -> ValueHead:
        """ppo_gae's value head, drawn from its own seed: the policy and the global RNG stay those of every
        other algorithm for the seed."""
        settings, width = self.config.algo.critic, unwrap(self.policy).config.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, "value-head"))
            critic = ValueHead(width, settings.hidden_size, settings.num_layers)
        return critic.to(next(self.policy.parameters()).device)

    # -- rollout ---------------------------------------------------------------------------------------

    def _sampling(self, *, greedy: bool = False):
        from duca_fast.rollout import SamplingConfig

        rollout = self.config.rollout
        return SamplingConfig(
            max_new_tokens=rollout.max_new_tokens,
            temperature=0.0 if greedy else rollout.temperature,
            top_p=rollout.top_p,
        )

    def rollout(self, step: int, scenarios: list[Scenario]) -> StepRollout:
        """Play ``scenarios`` (the step's new groups, split over the ranks) after the groups carried over
        from the last step (``rollout.carry_over``): rank r's groups are ``r * B_r ... (r + 1) * B_r - 1``,
        its carried groups first."""
        from duca_fast.rollout import RolloutConfig, make_session_specs, rollout

        config, dist = self.config, self.dist
        carried = self.carried
        held = len(carried.groups) if carried is not None else 0
        new_per_rank = len(scenarios) // dist.world_size
        first_group = dist.rank * (new_per_rank + held)
        mine = range(first_group, first_group + held + new_per_rank)
        oversampling = config.rollout.oversample_groups > 0
        rollout_config = RolloutConfig(
            sampling=self._sampling(),
            max_turns=config.env.max_turns,
            seed=derive_seed(config.seed, "sampling", step),
            per_request_seeds=config.rollout.per_request_seeds,
            driver=config.rollout.driver,
            max_sessions_in_flight=config.rollout.max_sessions_in_flight or None,
            complete_groups=(config.rollout.groups_per_step // dist.world_size if oversampling else None),
            carry_over=config.rollout.carry_over,
            max_staleness=config.rollout.carry_max_staleness or None,
            weight_version=step - 1,  # weight pushes so far (one a step): the same labels in a resumed run
        )
        envs = env_factory(config, self.reward_sources)
        customer_seed = derive_seed(config.seed, "customer", step)
        allocation_metrics: dict[str, float] = {}
        if config.rollout.allocation == "dynamo":
            batch, allocation_metrics = self._dynamo_rollout(
                scenarios, mine, envs, customer_seed, rollout_config
            )
        else:
            if carried is not None:
                carried.regrouped({old: first_group + i for i, old in enumerate(carried.groups)})
            # Seeded per session over the whole step, so a rank's sessions are those a single process plays.
            new = scenarios[dist.rank * new_per_rank : (dist.rank + 1) * new_per_rank]
            specs = make_session_specs(new, config.rollout.group_size, customer_seed, first_group + held)
            batch = rollout(self.engine, envs, specs, rollout_config, carried=carried)
            self.carried = batch.carried
        policy_logprobs, token_fields = None, {}
        if config.algo.name == "otb":
            policy_logprobs, token_fields = self._agent_token_inputs(batch)
        everyone = all_gather_objects(
            dist,
            {
                "outcomes": [o for o, bad in zip(batch.outcomes, batch.failed.tolist()) if not bad],
                "failed": int(batch.failed.sum()),
                "truncated": int(batch.truncated.sum()),
                "tokens": int(batch.input_ids.numel()),
                "rewards": TwoHorizonRewards.of(batch, **token_fields),
                "stats": batch.stats,
                "customer_messages": (
                    customer_messages(batch.transcripts, batch.turn_session, batch.turn_index)
                    if config.algo.name == "proxmo"
                    else None
                ),
                "summary": batch.failure_summary(),
            },
        )
        metrics = {
            **allocation_metrics,
            "rollout/failed_sessions": float(sum(part["failed"] for part in everyone)),
            "rollout/truncated_sessions": float(sum(part["truncated"] for part in everyone)),
            "rollout/tokens": float(sum(part["tokens"] for part in everyone)),
            "rollout/generated_tokens_per_s": batch.num_generated_tokens / max(batch.generate_seconds, 1e-9),
            **combine_rank_stats([part["stats"] for part in everyone]),
        }
        first = sum(part["rewards"].turn_rewards.shape[0] for part in everyone[: dist.rank])
        local = slice(first, first + batch.turn_rewards.shape[0])
        bounds = batch.cu_seqlens.tolist()
        # The sync's optional log-prob check runs on the first sessions of the step.
        self._check_prompts = [
            batch.input_ids[bounds[s] : bounds[s + 1]].tolist() for s in range(min(2, len(bounds) - 1))
        ]
        rewards = TwoHorizonRewards.concat([part["rewards"] for part in everyone])
        if config.algo.name == "proxmo":
            texts = [text for part in everyone for text in part["customer_messages"]]
            rewards = replace(rewards, turn_features=tfidf_features(texts))
        values = None
        if self.objective.critic is not None:
            # Single process (ppo_gae refuses torchrun): this rank's turns are all the step's turns.
            values = self._turn_values(batch)
            rewards = replace(rewards, values=values)
        outcomes = [o for part in everyone for o in part["outcomes"]]
        summary = " | ".join(
            part["summary"] if len(everyone) == 1 else f"rank {rank}: {part['summary']}"
            for rank, part in enumerate(everyone)
        )
        local_tokens = None
        if token_fields:
            first_token = sum(part["rewards"].agent_token_turn.shape[0] for part in everyone[: dist.rank])
            local_tokens = slice(first_token, first_token + token_fields["agent_token_turn"].shape[0])
        data = SalesRollout(batch, values, policy_logprobs)
        return StepRollout(rewards, local, data, outcomes, metrics, summary, local_tokens)

    def _agent_token_inputs(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """otb: the policy's ``[N]`` log-probs (row p: token p + 1) and the ``agent_token_*`` fields of
        ``batch``'s agent tokens in packed order: their turn, log-prob and sum p^2 at the sampling weights
        and temperature (verl takes them from its actor's old-log-prob pass too)."""
        passes = self._pad_for_ranks(micro_batches(batch.cu_seqlens, self.config.optim.micro_batch_tokens))
        logprobs, sum_p2 = self._policy_logprobs(batch, passes, return_sum_p2=True)
        agent = batch.token_turn >= 0
        # Row p holds what predicts token p + 1: token q's values sit at row q - 1.
        fields = {
            "agent_token_turn": batch.token_turn[agent].long(),
            "agent_token_logprobs": torch.roll(logprobs, 1)[agent],
            "agent_token_sum_p2": torch.roll(sum_p2, 1)[agent],
        }
        return logprobs, fields

    def _dynamo_rollout(self, scenarios, mine: range, envs, customer_seed: int, rollout_config):
        """DynaMO's allocation on this rank's groups: a pilot of ``allocation_min`` sessions per scenario,
        then the rest of ``group_size`` per scenario on average, in proportion to each scenario's Bernoulli
        variance of conversion in its pilot, within [``allocation_min``, ``allocation_max``]
        (duca_fast/rollout/allocation.py). Every rank allocates its own groups (the same number of sessions
        on every rank). Session seeds are spaced by ``allocation_max`` per group, so a session's seed does
        not depend on the allocation."""
        from duca_fast.rollout import SessionSpec, concat_batches, rollout
        from duca_fast.rollout.allocation import dynamo_group_sizes, group_size_metrics

        settings = self.config.rollout
        pilot, stride = settings.allocation_min, settings.allocation_max

        def specs(group: int, members: range) -> list[SessionSpec]:
            return [SessionSpec(scenarios[group], group, customer_seed + group * stride + m) for m in members]

        first = rollout(self.engine, envs, [s for g in mine for s in specs(g, range(pilot))], rollout_config)
        conversions = [0] * len(mine)
        for spec_group, outcome, failed in zip(
            first.session_group.tolist(), first.outcomes, first.failed.tolist(), strict=True
        ):
            conversions[spec_group - mine.start] += int(outcome.converted and not failed)
        totals = dynamo_group_sizes(
            conversions, pilot, settings.group_size, settings.allocation_min, settings.allocation_max
        )
        extra = [s for g, total in zip(mine, totals, strict=True) for s in specs(g, range(pilot, total))]
        if extra:
            first = concat_batches(first, rollout(self.engine, envs, extra, rollout_config))
        sizes = all_gather_objects(self.dist, totals)
        return first, group_size_metrics([size for part in sizes for size in part])

    @torch.no_grad()
    def _turn_values(self, batch) -> torch.Tensor:
        """``[T]`` the value head's value of each agent turn of ``batch``, micro-batch by micro-batch."""
        positions = value_positions(batch)
        values = torch.zeros(len(positions))
        for chunk in micro_batches(batch.cu_seqlens, self.config.optim.micro_batch_tokens):
            inside = (positions >= chunk.rows.start) & (positions < chunk.rows.stop)
            if inside.any():
                rows = positions[inside] - chunk.rows.start
                values[inside] = self.objective(batch, chunk.rows, value_rows=rows).float().cpu()
        return values

    # -- update ----------------------------------------------------------------------------------------

    def prepare_update(
        self, data: SalesRollout, per_turn: torch.Tensor, per_agent_token: torch.Tensor | None = None
    ) -> PreparedUpdate | None:
        batch = data.batch
        self.weight_sync.sleep_for_training()
        # Token p predicts token p + 1 of the same session; the last token of a session predicts nothing.
        target = torch.roll(batch.input_ids, -1)
        same_session = torch.roll(batch.seq_ids, -1) == batch.seq_ids
        same_session[-1:] = False
        loss_mask = same_session & (torch.roll(batch.token_turn, -1) >= 0)
        if per_agent_token is None:
            per_token = broadcast_to_tokens(per_turn, batch.token_turn)
        else:  # a token-level estimator: each agent token its own advantage, in packed order
            per_token = torch.zeros(batch.token_turn.shape, dtype=per_agent_token.dtype)
            per_token[batch.token_turn >= 0] = per_agent_token
        advantages = torch.roll(per_token, -1).float()
        behavior = torch.roll(batch.behavior_logprobs, -1).float()
        session_has_loss = torch.zeros(len(batch.outcomes), dtype=torch.bool)
        session_has_loss[batch.seq_ids[loss_mask].unique()] = True
        # Aggregation is over the global batch: counts are summed over ranks.
        num_loss_tokens = int(all_reduce_sum(self.dist, float(loss_mask.sum())))
        num_loss_sessions = int(all_reduce_sum(self.dist, float(session_has_loss.sum())))
        if num_loss_tokens == 0:
            return None
        passes = self._pad_for_ranks(micro_batches(batch.cu_seqlens, self.config.optim.micro_batch_tokens))
        old = None
        if self.config.algo.ppo_epochs > 1:  # otb took them at rollout time, at these weights
            old = data.policy_logprobs
            old = self._policy_logprobs(batch, passes) if old is None else old
        returns = None
        if data.values is not None:
            rewards = TwoHorizonRewards.of(batch, values=data.values)
            returns = critic_targets(self.config.algo, rewards)
        return PreparedUpdate(
            batch,
            target,
            loss_mask,
            advantages,
            behavior,
            num_loss_tokens,
            num_loss_sessions,
            passes,
            old,
            returns,
        )

    def backward(self, prepared: PreparedUpdate) -> dict[str, float]:
        """Forward and backward of every micro-batch; the summed micro-batch losses aggregate the step."""
        batch, device = prepared.batch, next(self.policy.parameters()).device
        # FSDP2 averages gradients over ranks; the losses are sums over the global batch.
        rank_scale = float(self.dist.world_size)
        sums: dict[str, float] = {}
        critic = self._critic_inputs(prepared)
        seen_values: list[torch.Tensor] = []
        for chunk, padding in prepared.passes:
            rows = chunk.rows
            mask = prepared.loss_mask[rows] & (not padding)
            if not mask.any() and not self.dist.enabled:
                continue
            agg, scale, extra = self._aggregation(
                mask, batch.seq_ids[rows], prepared.num_loss_tokens, prepared.num_loss_sessions
            )
            target = prepared.target[rows]
            old = prepared.old_logprobs
            loss_inputs = dict(
                target=target.to(device),
                advantages=prepared.advantages[rows].to(device),
                old_logprobs=None if old is None else old[rows].to(device),
                mask=mask.to(device),
                seq_ids=(batch.seq_ids[rows] - batch.seq_ids[rows][0]).to(device),
                ref_logprobs=self._ref_logprobs(batch, rows, device)
                if self.config.algo.loss.kl_coef
                else None,
                behavior_logprobs=prepared.behavior[rows].to(device),
                **loss_options(self.config, loss_agg=agg, **extra),
            )
            inside = None if critic is None else critic.keep & (critic.positions >= rows.start)
            if inside is not None:
                inside &= critic.positions < rows.stop
            if inside is not None and bool(inside.any()):
                loss, op_metrics, values = self.objective(
                    batch, rows, loss_inputs, value_rows=critic.positions[inside] - rows.start
                )
                # Each micro-batch's share of the step's mean critic loss over its valid turns.
                critic_loss, _ = value_loss(values, critic.returns[inside].to(values.device))
                total = loss * scale + critic.coef * critic_loss * (values.numel() / critic.count)
                seen_values.append(values.detach().cpu())
            else:
                loss, op_metrics = self.objective(batch, rows, loss_inputs)
                total = loss * scale
            (total * rank_scale).backward()
            share = float(mask.sum()) / prepared.num_loss_tokens
            sums["loss/total"] = sums.get("loss/total", 0.0) + float(total.detach())
            for key, value in op_metrics.items():
                sums[f"loss/{key}"] = sums.get(f"loss/{key}", 0.0) + float(value) * share
        # Per-rank sums of the loss and of the token-weighted diagnostics add up to the global values
        # (one gather of the whole dict: a rank without loss tokens has fewer keys).
        totals: dict[str, float] = {"train/loss_tokens": float(prepared.num_loss_tokens)}
        for part in all_gather_objects(self.dist, sums):
            for key, value in part.items():
                totals[key] = totals.get(key, 0.0) + value
        if "loss/behavior_logprob_gap" in totals:
            totals["sync/logprob_gap"] = totals.pop("loss/behavior_logprob_gap")
        if seen_values:
            # Diagnostics of the whole step's critic (single process: nothing to gather).
            _, value_metrics = value_loss(torch.cat(seen_values), critic.returns[critic.keep])
            totals.update(value_metrics)
        return totals

    def _critic_inputs(self, prepared: PreparedUpdate) -> CriticInputs | None:
        if prepared.returns is None:
            return None
        keep = torch.isfinite(prepared.returns)
        if not bool(keep.any()):
            return None
        return CriticInputs(
            value_positions(prepared.batch),
            prepared.returns,
            keep,
            int(keep.sum()),
            self.config.algo.critic.value_coef,
        )

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
        agg = self.config.algo.loss.loss_agg
        if agg == "token_mean":
            return "token_sum_norm", 1.0, {"max_tokens": num_loss_tokens}
        sessions_here = int(seq_ids[mask].unique().numel())
        return agg, sessions_here / num_loss_sessions, {}

    @torch.no_grad()
    def _ref_logprobs(self, batch, rows: slice, device) -> torch.Tensor:
        """Log-probs under the frozen reference: the base model (adapters off) or a frozen copy."""
        temperature = self.config.rollout.temperature
        if self.reference is not None:
            return PolicyObjective(self.reference)(batch, rows, temperature=temperature)
        with self.policy.disable_adapter():
            return self.objective(batch, rows, temperature=temperature)

    @torch.no_grad()
    def _policy_logprobs(self, batch, passes, *, return_sum_p2: bool = False):
        """Current-policy ``[N]`` log-probs (row p: token p + 1) at the rollout temperature: the PPO "old"
        policy of later epochs; with ``return_sum_p2`` also each row's sum p^2 (``otb``)."""
        temperature = self.config.rollout.temperature
        logprobs = torch.zeros(batch.input_ids.shape[0])
        sum_p2 = torch.zeros(batch.input_ids.shape[0]) if return_sum_p2 else None
        for chunk, padding in passes:
            out = self.objective(batch, chunk.rows, temperature=temperature, return_sum_p2=return_sum_p2)
            if not padding:
                logprobs[chunk.rows] = (out[0] if return_sum_p2 else out).cpu()
                if return_sum_p2:
                    sum_p2[chunk.rows] = out[1].cpu()
        return (logprobs, sum_p2) if return_sum_p2 else logprobs

    # -- sync, records, evaluation ----------------------------------------------------------------------

    def sync(self, step: int) -> dict[str, float]:
        """Push the weights into the engine; ``step`` 0 is the push after loading a checkpoint."""
        if step == 0:
            self.weight_sync.push(self.policy)
            return {}
        every = self.config.rollout.check_logprobs_every
        check = [s[:64] for s in self._check_prompts] if every and step % every == 0 else None
        report = self.weight_sync.wake_and_push(self.policy, check_prompts=check)
        metrics = {"sync/seconds": report.seconds, "sync/weight_version": float(report.weight_version)}
        if report.logprob_mismatch is not None:
            metrics["sync/check_logprob_mismatch"] = report.logprob_mismatch
        return metrics

    def samples(self, data: SalesRollout, per_turn: torch.Tensor) -> list[dict[str, Any]]:
        batch, samples = data.batch, []
        turn_session = batch.turn_session.tolist()
        for s, outcome in enumerate(batch.outcomes):
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

    def export(self):
        # The policy alone (adapter or full model): the value head is in the checkpoint's trainable state.
        return None if self.dist.enabled else self.policy.save_pretrained

    def evaluate(
        self, scenarios: list[Scenario], customer_seeds: list[int], *, sample_seed: int | None = None
    ) -> PlayedSessions:
        """Greedy sessions, or sampled at rollout.temperature / top_p with request seeds from
        ``sample_seed`` (the same seed samples the same sessions)."""
        from duca_fast.rollout import RolloutConfig, SessionSpec, rollout

        specs = [
            SessionSpec(scenario, i, seed)
            for i, (scenario, seed) in enumerate(zip(scenarios, customer_seeds))
        ]
        config = RolloutConfig(
            sampling=self._sampling(greedy=sample_seed is None),
            max_turns=self.config.env.max_turns,
            seed=0 if sample_seed is None else sample_seed,
        )
        batch = rollout(self.engine, env_factory(self.config, self.reward_sources), specs, config)
        finished = [o for o, failed in zip(batch.outcomes, batch.failed.tolist()) if not failed]
        return PlayedSessions(finished, batch.turn_rewards, batch.session_rewards, int(batch.failed.sum()))

    def close(self) -> None:
        self.engine.close()
