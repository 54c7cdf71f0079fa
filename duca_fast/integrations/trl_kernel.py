"""``DucaGRPOTrainer(use_duca_kernel=True)``: TRL's GRPO loss computed by ``ops.fused_policy_loss``.

TRL 1.16 scores completions through its own chunked LM head (``trl.trainer.utils.add_fused_lm_head``:
log-probs and entropy without ``[tokens, vocab]`` logits), then applies the loss to ``[B, T]`` log-probs;
its backward recomputes the logits (8 N H V FLOPs in the LM head). With the kernel the policy's last
hidden states go straight into ``fused_policy_loss``, which computes the loss and its gradients in one
pass over the vocabulary (6 N H V FLOPs), drops the tokens outside the loss before the GEMMs, and takes
per-token advantages (DuCA's multi-turn credit).

``KernelPlan.from_config`` maps a ``GRPOConfig`` as a TRL user writes it (the table is in
docs/integrations.md); whatever it cannot reproduce exactly is refused at construction, in one line
naming the option. The mapping follows TRL 1.16's ``GRPOTrainer._compute_loss`` (read in
``trl/trainer/grpo_trainer.py``):

- ``loss_type`` grpo / sapo: ``mean_b(sum_t l m / max(sum_t m, 1))``; bnpo: ``sum l m / sum m``;
  dr_grpo: ``sum l m / (B * max_completion_length)``; dapo / cispo: ``sum l m / normalizer`` with TRL's
  normalizer from ``num_items_in_batch``; luspo: ``mean_b(sum_t l m)``; all divided by the gradient
  accumulation steps in training, as TRL does.
- ``importance_sampling_level="sequence"`` is ``objectives.GSPO`` (the sequence ratio
  ``exp(mean_t log r)``, clipped); its loss equals TRL's, and so does its gradient when the advantages
  are constant within a completion. With per-turn advantages GSPO's token form sends each token its own
  advantage, where TRL's sum of the sequence ratio over tokens mixes them; that is GSPO's published
  form and the reason it is used here.
- ``beta``: TRL's k3 estimator; ``use_bias_correction_kl=True`` (TRL's default) multiplies it by the
  ratio, which the kernel does not, so ``beta != 0`` needs ``use_bias_correction_kl=False``.
- vLLM importance sampling (``use_vllm`` with ``vllm_importance_sampling_correction``): the four modes
  become an ``ops.RolloutCorrection`` on ``old - sampling`` log-probs (token or sequence, truncated or
  masked outside ``[clip_min, clip_max]``), weighting the objective's term as TRL's ratio does.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from duca_fast import ops
from duca_fast.ops import objectives

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")
"""TRL loss types the kernel reproduces (TRL's vespo is refused)."""

# How each loss type aggregates ``[B, T]`` token losses: the kernel's loss_agg and the extra divisor.
_AGGREGATION = {
    "grpo": "seq_mean_token_mean",
    "sapo": "seq_mean_token_mean",
    "bnpo": "token_mean",
    "dr_grpo": "token_sum_norm",
    "dapo": "token_sum_norm",
    "cispo": "token_sum_norm",
    "luspo": "seq_mean_token_sum",
}


def _refuse(option: str, why: str) -> ValueError:
    return ValueError(f"use_duca_kernel=True cannot honour {option}: {why}")


@dataclass(frozen=True)
class KernelPlan:
    """What ``fused_policy_loss`` is called with for a TRL config (built once, at construction)."""

    loss_type: str
    objective: objectives.Objective
    loss_agg: str
    kl_coef: float
    temperature: float
    max_completion_length: int
    is_mode: str | None
    """TRL's ``vllm_importance_sampling_mode`` when the correction is on, else None."""
    correction: ops.RolloutCorrection | None
    top_entropy_quantile: float = 1.0
    off_policy_mask: float | None = None

    @classmethod
    def from_config(cls, args: Any, use_vllm: bool, model_config: Any = None) -> KernelPlan:
        """The plan for ``args`` (a ``GRPOConfig``); ValueError naming the first option it cannot honour."""
        loss_type = args.loss_type
        if loss_type not in LOSS_TYPES:
            raise _refuse(f"loss_type={loss_type!r}", f"the kernel reproduces {', '.join(LOSS_TYPES)}")
        clip_low = float(args.epsilon)
        clip_high = float(args.epsilon_high if args.epsilon_high is not None else args.epsilon)
        level = args.importance_sampling_level
        if level not in ("token", "sequence"):
            raise _refuse(f"importance_sampling_level={level!r}", "TRL knows 'token' and 'sequence'")
        if level == "sequence" and loss_type in ("cispo", "sapo"):
            raise _refuse(
                f"importance_sampling_level='sequence' with loss_type={loss_type!r}",
                "the kernel's CISPO and SAPO are token-level (use 'token')",
            )
        if args.delta is not None and level == "sequence":
            raise _refuse("delta with importance_sampling_level='sequence'", "GSPO has no two-sided clip")
        if loss_type == "cispo":
            if clip_high <= 1.0:
                raise _refuse(
                    f"epsilon_high={clip_high}",
                    "TRL's CISPO caps the ratio at epsilon_high itself, so it must be above 1",
                )
            objective = objectives.CISPO(clip_low=None, clip_high=clip_high - 1.0)
        elif loss_type == "sapo":
            objective = objectives.SAPO(
                tau_pos=float(args.sapo_temperature_pos), tau_neg=float(args.sapo_temperature_neg)
            )
        elif level == "sequence":
            objective = objectives.GSPO(clip_low=clip_low, clip_high=clip_high)
        else:
            delta = None if args.delta is None else float(args.delta)
            objective = objectives.PPOClip(clip_low=clip_low, clip_high=clip_high, delta=delta)
        beta = float(args.beta)
        if beta != 0.0 and args.use_bias_correction_kl:
            raise _refuse(
                "use_bias_correction_kl=True with beta != 0",
                "TRL multiplies its KL by the policy ratio; the kernel's KL is unweighted "
                "(set use_bias_correction_kl=False)",
            )
        if args.use_adaptive_entropy:
            raise _refuse(
                "use_adaptive_entropy=True",
                "TRL's controller adapts entropy_coef between steps from its own loss; use TRL's own loss "
                "(use_duca_kernel=False)",
            )
        if args.entropy_coef != 0.0 and loss_type != "bnpo":
            raise _refuse(
                f"entropy_coef={args.entropy_coef} with loss_type={loss_type!r}",
                "TRL averages the entropy bonus over tokens whatever the loss type; the kernel aggregates "
                "it like the loss, which is the same only for bnpo",
            )
        if args.entropy_coef != 0.0 and args.top_entropy_quantile < 1.0:
            raise _refuse(
                "entropy_coef with top_entropy_quantile < 1",
                "TRL restricts its entropy bonus to the high-entropy tokens; the kernel's stays on all",
            )
        _check_model_config(model_config)
        is_mode, correction = None, None
        if use_vllm and args.vllm_importance_sampling_correction:
            is_mode = args.vllm_importance_sampling_mode
            correction = _vllm_correction(
                is_mode, args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
            )
        return cls(
            loss_type=loss_type,
            objective=objective,
            loss_agg=_AGGREGATION[loss_type],
            kl_coef=beta,
            temperature=float(args.temperature),
            max_completion_length=int(args.max_completion_length),
            is_mode=is_mode,
            correction=correction,
            top_entropy_quantile=float(args.top_entropy_quantile),
            off_policy_mask=None
            if args.off_policy_mask_threshold is None
            else float(args.off_policy_mask_threshold),
        )


def _check_model_config(config: Any) -> None:
    """Refuse models whose LM head scales or soft-caps the logits (TRL's fused head knows them; ours not)."""
    if config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "final_logit_softcapping", None) is not None:
        raise _refuse("final_logit_softcapping", "the kernel's softmax takes the plain lm_head logits")
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(text, name, None)
        if value is not None and value != 1.0:
            raise _refuse(f"the model's {name}={value}", "the kernel takes unscaled lm_head logits")


def _vllm_correction(mode: str, clip_min: float | None, clip_max: float | None) -> ops.RolloutCorrection:
    """TRL's vLLM importance-sampling modes as a RolloutCorrection on ``old - sampling`` log-probs."""
    level, _, kind = mode.partition("_")
    if level not in ("token", "sequence") or kind not in ("truncate", "mask"):
        raise _refuse(f"vllm_importance_sampling_mode={mode!r}", "TRL knows token/sequence x truncate/mask")
    if clip_max is None:
        raise _refuse("vllm_importance_sampling_clip_max=None", "the correction needs an upper bound")
    if kind == "truncate":
        if clip_min is not None:
            raise _refuse(
                f"vllm_importance_sampling_clip_min={clip_min} with mode {mode!r}",
                "the kernel truncates the weight from above only (verl's TIS)",
            )
        return ops.RolloutCorrection(rollout_is=level, rollout_is_threshold=float(clip_max))
    # Weights are exp(d) > 0 with d clamped at -20: a lower bound below exp(-20) masks nothing, as TRL's -inf.
    lower = 1e-30 if clip_min is None or clip_min <= 0 else float(clip_min)
    return ops.RolloutCorrection(rollout_is=level, rollout_is_threshold=f"{lower!r}_{float(clip_max)!r}")


# ---------------------------------------------------------------------------------------------------
# The model side: the loss runs inside the model's forward (DDP, ZeRO-3 and FSDP hooks fire as for any
# forward), on the backbone's last hidden states.


def add_hidden_states_loss(model: torch.nn.Module) -> None:
    """Patch ``model.forward`` (after TRL's own patch): ``model(..., duca_loss=fn)`` runs the backbone and
    returns ``fn(last_hidden_state, lm_head)``; without ``duca_loss`` the forward is unchanged."""
    previous = model.forward
    text_config = model.config.get_text_config()
    backbone_attr = "base_model"
    if text_config is not model.config and not hasattr(model, "base_model"):
        backbone_attr = "model"

    def forward(self, *args, duca_loss: Callable | None = None, **kwargs):
        if duca_loss is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        return duca_loss(hidden, self.get_output_embeddings())

    model.forward = types.MethodType(forward, model)


def lm_head_parameters(lm_head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = lm_head.weight, lm_head.bias
    full_tensor = getattr(weight, "full_tensor", None)  # FSDP2 DTensor: gather the head once
    if full_tensor is not None:
        weight = full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


def aggregation_scale(
    plan: KernelPlan, inputs: dict, mask: torch.Tensor, accumulation: float, processes: int
):
    """What the kernel's aggregated loss is multiplied by to give TRL's ``loss`` for this micro-batch."""
    rows = mask.shape[0]
    if plan.loss_type in ("grpo", "sapo", "luspo"):
        # The kernel averages over sequences with loss tokens; TRL over all rows (empty ones add 0).
        nonempty = (mask.sum(-1) > 0).sum().clamp_min(1).to(torch.float32)
        return nonempty / rows / accumulation
    if plan.loss_type in ("bnpo", "dr_grpo"):
        return 1.0 / accumulation
    # dapo, cispo: TRL's normalizer from num_items_in_batch (the generation batch's loss tokens).
    return 1.0 / (inputs["num_items_in_batch"].clamp(min=1.0) / processes * accumulation)


def fused_trl_loss(trainer: Any, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """TRL's GRPO loss of one micro-batch by ``ops.fused_policy_loss`` (``trainer.duca_kernel_plan``)."""
    plan: KernelPlan = trainer.duca_kernel_plan
    for key in ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids"):
        if inputs.get(key) is not None:
            raise _refuse(f"inputs with {key}", "the kernel path scores text-only batches")
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    rows, length = completion_ids.shape
    advantages = inputs["advantages"]
    advantages = (advantages[:, None] if advantages.dim() == 1 else advantages).expand(rows, length)
    flat = mask.reshape(-1).bool()

    def packed(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values.reshape(-1)

    old = inputs.get("old_per_token_logps")
    sampling = inputs.get("sampling_per_token_logps")
    behavior = None
    if sampling is not None and (plan.correction is not None or plan.off_policy_mask is not None):
        reference_old = old if old is not None else sampling
        # TRL gives a token vLLM could not score a ratio of 1: its sampling log-prob becomes the old one.
        behavior = torch.where(torch.isnan(sampling), reference_old, sampling)
        if plan.correction is not None:
            old = reference_old
    mode = "train" if trainer.model.training else "eval"
    accumulation = float(trainer.current_gradient_accumulation_steps) if mode == "train" else 1.0
    if plan.loss_type in ("dapo", "cispo") and mode == "train":
        accumulation = accumulation / trainer.args.steps_per_generation
    scale = aggregation_scale(plan, inputs, mask, accumulation, trainer.accelerator.num_processes)
    seq_ids = torch.arange(rows, device=mask.device)[:, None].expand(rows, length)
    metrics: dict[str, torch.Tensor] = {}

    def loss_on_hidden(hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        weight, bias = lm_head_parameters(lm_head)
        states = hidden[:, -length - 1 : -1].reshape(-1, hidden.shape[-1])
        if states.dtype != weight.dtype:
            states = states.to(weight.dtype)
        loss, found = ops.fused_policy_loss(
            states,
            weight,
            completion_ids.reshape(-1),
            advantages.reshape(-1).float(),
            packed(old),
            bias=bias,
            mask=flat,
            seq_ids=seq_ids.reshape(-1),
            ref_logprobs=packed(inputs.get("ref_per_token_logps")) if plan.kl_coef else None,
            behavior_logprobs=packed(behavior),
            objective=plan.objective,
            correction=plan.correction,
            kl_coef=plan.kl_coef,
            kl_type="k3",
            entropy_coef=float(trainer.entropy_coef),
            temperature=plan.temperature,
            loss_agg=plan.loss_agg,
            max_tokens=rows * plan.max_completion_length if plan.loss_type == "dr_grpo" else 1,
            top_entropy_quantile=plan.top_entropy_quantile,
            off_policy_mask=plan.off_policy_mask,
        )
        metrics.update(found)
        return loss

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    # The backbone under TRL's autocast, as TRL runs it; the kernel's lm_head GEMMs in the weight's dtype.
    with trainer.accelerator.autocast():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, duca_loss=loss_on_hidden)
    loss = loss * scale
    log_metrics(trainer, mode, plan, metrics)
    return loss


def log_metrics(trainer: Any, mode: str, plan: KernelPlan, metrics: dict[str, torch.Tensor]) -> None:
    """TRL's metric names (token means over the loss tokens, averaged over processes) plus ``duca/*``."""
    # One gather and one host sync for every metric of the step, not one each.
    keys = list(metrics)
    local = torch.stack([metrics[key].detach().float().reshape(()) for key in keys])[None]
    means = trainer.accelerator.gather(local).reshape(-1, len(keys)).mean(0).tolist() if keys else []
    gathered = dict(zip(keys, means))
    logged = trainer._metrics[mode]
    if "entropy" in gathered:
        logged["entropy"].append(gathered["entropy"])
    if plan.kl_coef and "kl_ref" in gathered:
        logged["kl"].append(gathered["kl_ref"])
    if plan.loss_type not in ("cispo", "sapo"):  # TRL's CISPO share counts A > 0 only: ours is under duca/
        logged["clip_ratio/low_mean"].append(gathered["clip_frac_low"])
        logged["clip_ratio/high_mean"].append(gathered["clip_frac_high"])
        logged["clip_ratio/region_mean"].append(gathered["clip_frac"])
    for key, value in gathered.items():
        if math.isfinite(value):
            logged[f"duca/kernel/{key}"].append(value)
