"""TRL adapter: ``DucaGRPOTrainer``, a ``GRPOTrainer`` that trains on per-token HIAN advantages.

TRL 1.16's ``GRPOTrainer`` normalizes one scalar reward per completion into one advantage per
completion, and its loss already accepts ``[B, T]`` advantages from subclasses. This subclass keeps
everything else (generation, tool loop, vLLM, loss, logging) and, after TRL has scored a batch:
- finds the **agent turns** of every completion: maximal runs of tokens the model generated, i.e. of
  ``completion_mask * tool_mask`` (tool results are 0; a truncated completion masked by
  ``mask_truncated_completions`` has none). Without tools a completion is one turn;
- calls ``turn_reward_func`` with those turn spans and TRL's reward-function keyword arguments;
- replaces ``output["advantages"]`` with ``[B, T]`` HIAN advantages and logs both horizons.

A completion is one session; the ``num_generations`` completions of a prompt are its group.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from duca_fast import ops
from duca_fast.integrations import trl_kernel
from duca_fast.integrations._layout import turn_layout

# TRL warns from every module that asks whether vLLM is usable (five copies at import) when the installed vLLM
# is newer than it was tested with. That says nothing to a run without vLLM, so it is held back here and
# repeated once by DucaGRPOTrainer when ``use_vllm=True``. (If trl was imported before this module, its
# warnings were already printed.)
VLLM_VERSION_WARNING = "TRL currently supports vLLM versions"

try:
    with warnings.catch_warnings(record=True) as _import_warnings:
        warnings.simplefilter("always")
        from accelerate.utils import gather_object, is_peft_model
        from trl import GRPOTrainer
        from trl.trainer.utils import is_async_callable
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "duca_fast.integrations.trl needs trl (`pip install trl==1.16.0`); "
        "see duca_fast/integrations/INSTALL.txt"
    ) from error

_held_vllm_warning: str | None = None
for _caught in _import_warnings:
    if VLLM_VERSION_WARNING in str(_caught.message):
        _held_vllm_warning = _held_vllm_warning or str(_caught.message)
    else:
        warnings.warn_explicit(_caught.message, _caught.category, _caught.filename, _caught.lineno)
del _import_warnings

TurnSpans = list[tuple[int, int]]


def session_totals(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the reward functions per completion; NaN where every function returned None."""
    totals = (rewards_per_func * weights.to(rewards_per_func)[None, :]).nansum(dim=1)
    return torch.where(torch.isnan(rewards_per_func).all(dim=1), float("nan"), totals)


def session_normalized_totals(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int, eps: float = 1e-4
) -> torch.Tensor:
    """TRL's ``normalize_then_sum`` session reward: each function normalized within its group, then summed.

    Per function ``k`` and group ``g``: ``(r - nanmean_g r) / (nanstd_g r + eps)`` (unbiased std, 0 for a
    group of one), weighted by ``weights`` and summed; NaN where every function returned None.
    """
    grouped = rewards_per_func.reshape(-1, num_generations, rewards_per_func.shape[1])
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    if num_generations > 1:
        present = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        squares = torch.nansum((grouped - mean) ** 2, dim=1, keepdim=True)
        std = torch.sqrt(squares / (present - 1).clamp_min(1))
    else:
        std = torch.zeros_like(mean)
    normalized = ((grouped - mean) / (std + eps)).reshape(rewards_per_func.shape)
    return session_totals(normalized, weights)


def turn_spans(agent_mask: torch.Tensor) -> list[TurnSpans]:
    """Token ranges ``[(start, end), ...]`` (end exclusive) of the agent turns of every row of ``[B, T]``."""
    mask = agent_mask.bool()
    padded = torch.nn.functional.pad(mask.to(torch.int8), (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]  # +1 at a turn's first token, -1 one past its last
    spans = []
    for row in edges:
        starts = (row == 1).nonzero().flatten().tolist()
        ends = (row == -1).nonzero().flatten().tolist()
        spans.append(list(zip(starts, ends)))
    return spans


def _reward_value(value: Any, completion: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(
        f"turn_reward_func returned a {type(value).__name__} as a turn reward of completion {completion}; "
        "turn rewards must be floats (or None for 'no reward')"
    )


def normalize_turn_rewards(rewards: Any, turns_per_completion: Sequence[int]) -> list[list[float]]:
    """Check the turn function's result against the turn counts; one list of floats (NaN = None) per row.

    Accepted per completion: a sequence with one float or None per agent turn; a single float (or None)
    for a completion of exactly one turn; anything for a completion with no agent turn (all its tokens
    were masked, e.g. a truncated completion under ``mask_truncated_completions``): it is skipped.
    """
    if isinstance(rewards, (str, bytes)) or not isinstance(rewards, Sequence):
        raise ValueError(
            f"turn_reward_func must return a list with one entry per completion, got {type(rewards).__name__}"
        )
    if len(rewards) != len(turns_per_completion):
        raise ValueError(
            f"turn_reward_func returned {len(rewards)} entries for {len(turns_per_completion)} completions "
            "(one list of turn rewards per completion expected)"
        )
    result = []
    for completion, (entry, num_turns) in enumerate(zip(rewards, turns_per_completion)):
        if hasattr(entry, "tolist"):  # tensors and numpy arrays or scalars
            entry = entry.tolist()
        if num_turns == 0:
            result.append([])
        elif entry is None:
            result.append([math.nan] * num_turns)
        elif isinstance(entry, numbers.Real):
            if num_turns != 1:
                raise ValueError(
                    f"turn_reward_func returned one number for completion {completion}, which has "
                    f"{num_turns} agent turns; return a list with one float (or None) per agent turn, e.g. "
                    f"[{', '.join(['0.0'] * num_turns)}] (the turn spans are passed as turn_spans)"
                )
            result.append([float(entry)])
        elif isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
            raise ValueError(
                f"turn_reward_func returned a {type(entry).__name__} for completion {completion}; expected a "
                "list with one float (or None) per agent turn"
            )
        else:
            values = [_reward_value(value, completion) for value in entry]
            if len(values) != num_turns:
                raise ValueError(
                    f"turn_reward_func returned {len(values)} turn rewards for completion {completion}, "
                    f"but it has {num_turns} agent turns (runs of generated tokens between tool results)"
                )
            result.append(values)
    return result


SESSION_ESTIMATORS = ("zscore", "gopo")


def hian_turn_horizons(
    turn_rewards: Sequence[Sequence[float]],
    session_rewards: torch.Tensor,
    num_generations: int,
    session_estimator: str = "zscore",
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both normalized horizons per agent turn of the whole batch: ``(turn_session, A_turn, A_session)``.

    ``turn_rewards[i]`` are the rewards of completion ``i``'s turns (NaN: left out of the statistics, its
    turn horizon 0); ``session_rewards`` ``[N]`` (NaN likewise). ``options``: ``ops.hian_advantages``
    keywords other than the horizon weights (turn_scope, scale, eps, std, clip).
    ``session_estimator="gopo"``: the session horizon is GOPO's rank advantage within the group
    (``ops.gopo_advantages``; NaN sessions are not ranked and get 0) instead of HIAN's z-score.
    """
    if session_estimator not in SESSION_ESTIMATORS:
        raise ValueError(f"session_estimator must be one of {SESSION_ESTIMATORS}, got {session_estimator!r}")
    num_sessions = len(turn_rewards)
    if session_rewards.shape != (num_sessions,):
        raise ValueError(f"session_rewards must be [{num_sessions}], got {tuple(session_rewards.shape)}")
    if num_sessions % num_generations:
        raise ValueError(f"{num_sessions} completions are not groups of num_generations={num_generations}")
    device = session_rewards.device
    turns_per_session = torch.tensor([len(turns) for turns in turn_rewards], dtype=torch.long)
    flat_rewards = torch.tensor([r for turns in turn_rewards for r in turns], dtype=torch.float32)
    turn_session = torch.repeat_interleave(torch.arange(num_sessions), turns_per_session)
    turn_index = (
        torch.arange(flat_rewards.numel()) - (turns_per_session.cumsum(0) - turns_per_session)[turn_session]
    )
    arguments = (
        flat_rewards.to(device),
        turn_session.to(device),
        session_rewards.float(),
        (torch.arange(num_sessions) // num_generations).to(device),
    )
    keywords = dict(
        turn_index=turn_index.to(device),
        num_groups=num_sessions // num_generations,
        nan_policy="omit",
        **options,
    )
    turn_horizon = ops.hian_advantages(*arguments, turn_weight=1.0, session_weight=0.0, **keywords)
    if session_estimator == "gopo":
        ranked = torch.isfinite(session_rewards)
        per_session = torch.zeros(num_sessions, device=device)
        per_session[ranked] = ops.gopo_advantages(session_rewards[ranked].float(), arguments[3][ranked])
        session_horizon = per_session[turn_session.to(device)]
    else:
        session_horizon = ops.hian_advantages(*arguments, turn_weight=0.0, session_weight=1.0, **keywords)
    return turn_session.to(device), turn_horizon, session_horizon


def broadcast_to_tokens(
    turn_advantages: torch.Tensor,
    turns_per_session: Sequence[int],
    agent_mask: torch.Tensor,
    first_row: int = 0,
) -> torch.Tensor:
    """``[b, T]`` token advantages of local rows ``first_row ..``: each agent token gets its turn's value."""
    token_turn, _ = turn_layout(agent_mask)
    counts = torch.tensor(list(turns_per_session), dtype=torch.long, device=agent_mask.device)
    offsets = (counts.cumsum(0) - counts)[first_row : first_row + agent_mask.shape[0], None]
    padded = torch.cat([turn_advantages.float(), turn_advantages.new_zeros(1).float()])
    index = torch.where(
        token_turn >= 0, token_turn + offsets, torch.full_like(token_turn, padded.numel() - 1)
    )
    return padded[index]


def hian_completion_advantages(
    turn_rewards: Sequence[Sequence[float]],
    session_rewards: torch.Tensor,
    num_generations: int,
    agent_mask: torch.Tensor,
    first_row: int = 0,
    turn_weight: float = 1.0,
    session_weight: float = 1.0,
    **options: Any,
) -> torch.Tensor:
    """Per-token HIAN advantages ``[b, T]`` of the local completions ``first_row .. first_row + b``.

    Args:
        turn_rewards: for every completion of the whole batch (all processes), one reward per agent turn.
        session_rewards: ``[N]`` session reward of every completion (NaN: left out of the statistics).
        num_generations: completions per prompt; consecutive blocks of that size are the groups.
        agent_mask: ``[b, T]`` 1 on the tokens the model generated, 0 on padding and tool results.
        first_row: index of the first local completion in the whole batch.
        turn_weight, session_weight: weights of the normalized horizons.
        options: other keyword options of ``ops.hian_advantages`` (turn_scope, scale, eps).
    """
    spans = turn_spans(agent_mask)
    for row, row_spans in enumerate(spans, start=first_row):
        if len(turn_rewards[row]) != len(row_spans):
            raise ValueError(
                f"turn_reward_func returned {len(turn_rewards[row])} turn rewards for completion {row}, "
                f"but it has {len(row_spans)} agent turns (runs of generated tokens between tool results)"
            )
    _, turn_horizon, session_horizon = hian_turn_horizons(
        turn_rewards, session_rewards.to(agent_mask.device), num_generations, **options
    )
    fused = turn_weight * turn_horizon + session_weight * session_horizon
    return broadcast_to_tokens(fused, [len(t) for t in turn_rewards], agent_mask, first_row)


class DucaGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with Dual-Horizon Credit Assignment: per-token HIAN advantages, multi-turn.

    Reward functions:
    - ``reward_funcs`` (as in TRL) are the **session-level** rewards: each returns one float (or None) per
      completion. ``args.multi_objective_aggregation``: ``"sum_then_normalize"`` (default) sums them with
      ``args.reward_weights``; ``"normalize_then_sum"`` first normalizes each within its group (as TRL does).
      HIAN then normalizes the session reward within the group.
    - ``turn_reward_func`` (plain or ``async def``) is called with the keyword arguments of a TRL reward
      function (``prompts``, ``completions``, ``completion_ids``, dataset columns, ``trainer_state``,
      ``log_metric``, ``log_extra``, ``environments`` when TRL has them) plus ``turn_spans``: per
      completion, the ``(start, end)`` token ranges of its agent turns in ``completion_ids`` (runs of
      generated tokens between tool results; one span without tools; none when TRL masked the
      completion). It returns per completion a list with one float or None per span; a single float
      is accepted for a one-span completion; completions without spans are skipped. None (like NaN) is
      left out of the turn statistics and gives that turn a turn-horizon advantage of 0.

    Logged (``trainer.state.log_history`` and every ``report_to`` backend, ``eval_`` prefix in eval):
    ``duca/turn_reward/{mean,std}``, ``duca/session_reward/{mean,std}``, ``duca/turn_advantage/{mean,std}``,
    ``duca/session_advantage/{mean,std}``, ``duca/advantage/{mean,std,min,max}`` (fused, per turn),
    ``duca/turns/mean``; the completions table's ``advantages`` column holds each completion's mean fused
    advantage over its turns.

    Args:
        turn_reward_func: see above.
        turn_weight, session_weight: weights of the normalized horizons in the fused advantage.
        turn_scope: "group" or "group_turn" (turn statistics per group and turn position).
        std, clip: HIAN's std ("unbiased" or "population") and per-horizon clamp (None: none);
            ``std="population", clip=10.0`` is Dual-Track GRPO (TRUST-SQL).
        session_estimator: "zscore" (HIAN) or "gopo" (GOPO's ranks of the session rewards in the group).
            ProxMO and the optimal token baseline are not offered here: TRL gives no state per turn and
            computes no sum p^2 (use them through verl or ``duca_fast.ops``).
        use_duca_kernel: compute the loss with ``ops.fused_policy_loss`` on the policy's last hidden
            states (one pass over the vocabulary, loss and gradients together, per-token advantages)
            instead of TRL's log-prob head and loss. ``args`` is mapped as TRL reads it; options it cannot
            reproduce exactly are refused here (``trl_kernel.KernelPlan``; docs/integrations.md).
        *args, **kwargs: everything ``GRPOTrainer`` takes. ``args.scale_rewards`` "group"/"batch"/"none"
            becomes HIAN's ``scale``.
    """

    def __init__(
        self,
        *args: Any,
        turn_reward_func: Callable[..., Any],
        turn_weight: float = 1.0,
        session_weight: float = 1.0,
        turn_scope: str = "group",
        std: str = "unbiased",
        clip: float | None = None,
        session_estimator: str = "zscore",
        use_duca_kernel: bool = False,
        **kwargs: Any,
    ) -> None:
        if not callable(turn_reward_func):
            raise ValueError(f"turn_reward_func must be callable, got {type(turn_reward_func).__name__}")
        if turn_scope not in ("group", "group_turn"):
            raise ValueError(f"turn_scope must be 'group' or 'group_turn', got {turn_scope!r}")
        if session_estimator not in SESSION_ESTIMATORS:
            raise ValueError(
                f"session_estimator must be one of {SESSION_ESTIMATORS}, got {session_estimator!r}"
            )
        ops.AdvantageOptions(std=std, clip=clip)  # their own checks, before TRL's long set-up
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=VLLM_VERSION_WARNING)
            super().__init__(*args, **kwargs)
        if self.use_vllm and _held_vllm_warning is not None:
            warnings.warn(_held_vllm_warning, stacklevel=2)
        self.turn_reward_func = turn_reward_func
        self.turn_weight = float(turn_weight)
        self.session_weight = float(session_weight)
        self.hian_options = {
            "turn_scope": turn_scope,
            "scale": self.scale_rewards,
            "std": std,
            "clip": clip,
            "session_estimator": session_estimator,
        }
        self._scored: dict[str, Any] | None = None
        self.use_duca_kernel = bool(use_duca_kernel)
        if self.use_duca_kernel:
            if self.aux_loss_enabled:
                raise ValueError(
                    "use_duca_kernel=True cannot honour router_aux_loss_coef != 0: the kernel path does not "
                    "return the MoE load-balancing loss"
                )
            self.duca_kernel_plan = trl_kernel.KernelPlan.from_config(
                self.args, self.use_vllm, self.model.config
            )
            if self.duca_kernel_plan.top_entropy_quantile < 1.0 and self.accelerator.num_processes > 1:
                raise ValueError(
                    "use_duca_kernel=True cannot honour top_entropy_quantile < 1 on several processes: TRL "
                    "takes the quantile over every process's tokens, the kernel over its own"
                )
            trl_kernel.add_hidden_states_loss(
                self.model.get_base_model() if is_peft_model(self.model) else self.model
            )

    def _compute_loss(self, model, inputs):
        if not self.use_duca_kernel:
            return super()._compute_loss(model, inputs)
        return trl_kernel.fused_trl_loss(self, model, inputs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # The turn function needs the turn spans, known once TRL has built its masks: it runs after the batch.
        self._scored = dict(
            inputs=inputs,
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids_list,
            rewards_per_func=rewards_per_func,
        )
        return rewards_per_func

    def _session_rewards(self, rewards_per_func: torch.Tensor, num_generations: int) -> torch.Tensor:
        if self.multi_objective_aggregation == "normalize_then_sum":
            return session_normalized_totals(rewards_per_func, self.reward_weights, num_generations)
        return session_totals(rewards_per_func, self.reward_weights)

    def _call_turn_reward_func(self, scored: dict[str, Any], spans: list[TurnSpans]) -> Any:
        keys = [key for key in scored["inputs"][0] if key not in ("prompt", "completion", "completion_ids")]
        kwargs = {key: [example[key] for example in scored["inputs"]] for key in keys}
        kwargs.update(
            trainer_state=self.state, log_extra=self._log_completion_extra, log_metric=self._log_metric
        )
        if self.environments is not None:
            kwargs["environments"] = self.environments
        call = dict(
            prompts=scored["prompts"],
            completions=scored["completions"],
            completion_ids=scored["completion_ids"],
            turn_spans=spans,
            **kwargs,
        )
        if not is_async_callable(self.turn_reward_func):
            return self.turn_reward_func(**call)
        loop = getattr(self, "async_loop", None)
        if loop is not None:  # TRL's loop, shared with its async reward functions and tools
            return asyncio.run_coroutine_threadsafe(self.turn_reward_func(**call), loop).result()
        return asyncio.run(self.turn_reward_func(**call))

    def _flush_user_logs(self, mode: str) -> None:
        # TRL flushed log_metric / log_extra before the turn function ran: flush its entries into this step.
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            values = self._pending_extra_logs.get(column, [])
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            local = torch.tensor(
                [sum(values), len(values)], dtype=torch.float32, device=self.accelerator.device
            )
            total, count = self.accelerator.gather(local).view(-1, 2).sum(dim=0).tolist()
            self._metrics[mode][name].append(total / count)
        self._pending_metrics.clear()

    def _log_horizons(self, mode, turn_rewards, session_rewards, turn_session, turn_horizon, session_horizon):
        fused = self.turn_weight * turn_horizon + self.session_weight * session_horizon
        flat_turn_rewards = torch.tensor([r for turns in turn_rewards for r in turns], dtype=torch.float64)

        def log_stats(name: str, values: torch.Tensor, extremes: bool = False) -> None:
            values = values.double()
            values = values[~torch.isnan(values)]
            if not values.numel():  # e.g. every completion masked: nothing to report, never a NaN
                return
            metrics = self._metrics[mode]
            metrics[f"duca/{name}/mean"].append(values.mean().item())
            metrics[f"duca/{name}/std"].append(values.std().item() if values.numel() > 1 else 0.0)
            if extremes:
                metrics[f"duca/{name}/min"].append(values.min().item())
                metrics[f"duca/{name}/max"].append(values.max().item())

        log_stats("turn_reward", flat_turn_rewards)
        log_stats("session_reward", session_rewards)
        log_stats("turn_advantage", turn_horizon)
        log_stats("session_advantage", session_horizon)
        log_stats("advantage", fused, extremes=True)
        self._metrics[mode]["duca/turns/mean"].append(sum(map(len, turn_rewards)) / len(turn_rewards))
        # The completions table: replace TRL's one-scalar advantages of this batch by DuCA's.
        sums = torch.zeros(len(turn_rewards), dtype=torch.float64).index_add_(
            0, turn_session.cpu(), fused.cpu().double()
        )
        counts = torch.tensor([max(len(turns), 1) for turns in turn_rewards], dtype=torch.float64)
        table = self._logs["advantages"]
        for _ in range(min(len(turn_rewards), len(table))):
            table.pop()
        table.extend((sums / counts).tolist())

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        scored, self._scored = self._scored, None
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        agent_mask = output["completion_mask"]
        if "tool_mask" in output:
            agent_mask = agent_mask * output["tool_mask"]
        spans = turn_spans(agent_mask)
        local = normalize_turn_rewards(self._call_turn_reward_func(scored, spans), [len(s) for s in spans])
        self._flush_user_logs(mode)
        turn_rewards = gather_object(local)
        session_rewards = self._session_rewards(scored["rewards_per_func"], num_generations)
        turn_session, turn_horizon, session_horizon = hian_turn_horizons(
            turn_rewards, session_rewards.to(agent_mask.device), num_generations, **self.hian_options
        )
        fused = self.turn_weight * turn_horizon + self.session_weight * session_horizon
        output["advantages"] = broadcast_to_tokens(
            fused,
            [len(turns) for turns in turn_rewards],
            agent_mask,
            first_row=self.accelerator.process_index * agent_mask.shape[0],
        )
        with torch.no_grad():
            self._log_horizons(
                mode, turn_rewards, session_rewards, turn_session, turn_horizon, session_horizon
            )
        return output
