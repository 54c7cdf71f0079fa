"""TRL adapter: ``DucaGRPOTrainer``, a ``GRPOTrainer`` that trains on per-token HIAN advantages.

TRL 1.16's ``GRPOTrainer`` normalizes one scalar reward per completion into one advantage per
completion, and its loss already accepts ``[B, T]`` advantages from subclasses. This subclass keeps
everything else (generation, tools, vLLM, loss, logging) and changes two things:
- ``_calculate_rewards`` also calls ``turn_reward_func`` and keeps both horizons (gathered over processes);
- ``_generate_and_score_completions`` replaces ``output["advantages"]`` with ``[B, T]`` HIAN advantages.

A completion is one session; the ``num_generations`` completions of a prompt are its group. Its **agent
turns** are the maximal runs of completion tokens that the model generated: ``completion_mask`` times
TRL's ``tool_mask`` when tools are used (tool results are 0). Without tools a completion is one turn.
(TRL's own ``advantages`` log column still shows the one-scalar GRPO values.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from duca_fast import ops
from duca_fast.integrations._layout import turn_layout

try:
    from accelerate.utils import gather_object
    from trl import GRPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "duca_fast.integrations.trl needs trl (`pip install trl==1.16.0`); "
        "see duca_fast/integrations/INSTALL.txt"
    ) from error


def session_totals(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the reward functions per completion; NaN where every function returned None."""
    totals = (rewards_per_func * weights.to(rewards_per_func)[None, :]).nansum(dim=1)
    return torch.where(torch.isnan(rewards_per_func).all(dim=1), float("nan"), totals)


def hian_completion_advantages(
    turn_rewards: Sequence[Sequence[float]],
    session_rewards: torch.Tensor,
    num_generations: int,
    agent_mask: torch.Tensor,
    first_row: int = 0,
    **hian_options: Any,
) -> torch.Tensor:
    """Per-token HIAN advantages ``[b, T]`` of the local completions ``first_row .. first_row + b``.

    Args:
        turn_rewards: for every completion of the whole batch (all processes), one reward per agent turn.
        session_rewards: ``[N]`` session reward of every completion (NaN: left out of the statistics).
        num_generations: completions per prompt; consecutive blocks of that size are the groups.
        agent_mask: ``[b, T]`` 1 on the tokens the model generated, 0 on padding and tool results.
        first_row: index of the first local completion in the whole batch.
        hian_options: keyword options of ``ops.hian_advantages`` (turn_weight, session_weight, ...).
    """
    num_sessions = len(turn_rewards)
    if session_rewards.shape != (num_sessions,):
        raise ValueError(f"session_rewards must be [{num_sessions}], got {tuple(session_rewards.shape)}")
    if num_sessions % num_generations:
        raise ValueError(f"{num_sessions} completions are not groups of num_generations={num_generations}")
    device = agent_mask.device
    token_turn, starts = turn_layout(agent_mask)
    local_rows = range(first_row, first_row + agent_mask.shape[0])
    for row, turns_found in zip(local_rows, starts.sum(dim=1).tolist()):
        if len(turn_rewards[row]) != turns_found:
            raise ValueError(
                f"turn_reward_func returned {len(turn_rewards[row])} turn rewards for completion {row}, "
                f"but it has {turns_found} agent turns (runs of generated tokens between tool results)"
            )
    turns_per_session = torch.tensor([len(turns) for turns in turn_rewards], dtype=torch.long)
    offsets = (turns_per_session.cumsum(0) - turns_per_session).to(device)
    flat_rewards = torch.tensor([float(r) for turns in turn_rewards for r in turns], dtype=torch.float32)
    turn_session = torch.repeat_interleave(torch.arange(num_sessions), turns_per_session)
    turn_index = (
        torch.arange(flat_rewards.numel()) - (turns_per_session.cumsum(0) - turns_per_session)[turn_session]
    )
    local_offsets = offsets[first_row : first_row + agent_mask.shape[0], None]
    global_turn = torch.where(token_turn >= 0, token_turn + local_offsets, token_turn)
    advantages = ops.hian_advantages(
        flat_rewards.to(device),
        turn_session.to(device),
        session_rewards.float().to(device),
        (torch.arange(num_sessions) // num_generations).to(device),
        turn_index=turn_index.to(device),
        token_turn=global_turn.reshape(-1),
        num_groups=num_sessions // num_generations,
        nan_policy="omit",
        **hian_options,
    )
    return advantages.reshape(agent_mask.shape)


class DucaGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with Dual-Horizon Credit Assignment: per-token HIAN advantages, multi-turn.

    Reward functions:
    - ``reward_funcs`` (as in TRL) are the **session-level** rewards: each returns one float (or None)
      per completion; they are weighted by ``args.reward_weights`` and summed into the session reward.
    - ``turn_reward_func(prompts, completions, completion_ids, **kwargs)`` is called like a TRL reward
      function (same keyword arguments: dataset columns, ``trainer_state``) and returns, per completion,
      a sequence with **one float per agent turn** in order; its length must equal the number of agent
      turns of that completion (runs of generated tokens between tool results; 1 without tools).

    Args:
        turn_reward_func: see above.
        turn_weight, session_weight: weights of the normalized horizons in the fused advantage.
        turn_scope: "group" or "group_turn" (turn statistics per group and turn position).
        *args, **kwargs: everything ``GRPOTrainer`` takes. ``args.scale_rewards`` "group"/"batch"/"none"
            becomes HIAN's ``scale``.
    """

    def __init__(
        self,
        *args: Any,
        turn_reward_func: Callable[..., Sequence[Sequence[float]]],
        turn_weight: float = 1.0,
        session_weight: float = 1.0,
        turn_scope: str = "group",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not callable(turn_reward_func):
            raise ValueError(f"turn_reward_func must be callable, got {type(turn_reward_func).__name__}")
        self.turn_reward_func = turn_reward_func
        self.hian_options = {
            "turn_weight": turn_weight,
            "session_weight": session_weight,
            "turn_scope": turn_scope,
            "scale": self.scale_rewards,
        }
        self._duca_rewards: tuple[list[list[float]], torch.Tensor] | None = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        keys = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
        reward_kwargs = {key: [example[key] for example in inputs] for key in keys}
        local = self.turn_reward_func(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids_list,
            trainer_state=self.state,
            **reward_kwargs,
        )
        if len(local) != len(prompts):
            raise ValueError(
                f"turn_reward_func returned {len(local)} entries for {len(prompts)} completions "
                "(one sequence of turn rewards per completion expected)"
            )
        turn_rewards = gather_object([[float(reward) for reward in turns] for turns in local])
        self._duca_rewards = (turn_rewards, session_totals(rewards_per_func, self.reward_weights))
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        turn_rewards, session_rewards = self._duca_rewards
        self._duca_rewards = None
        agent_mask = output["completion_mask"]
        if "tool_mask" in output:
            agent_mask = agent_mask * output["tool_mask"]
        mode = "train" if self.model.training else "eval"
        output["advantages"] = hian_completion_advantages(
            turn_rewards,
            session_rewards,
            self.num_generations if mode == "train" else self.num_generations_eval,
            agent_mask,
            first_row=self.accelerator.process_index * agent_mask.shape[0],
            **self.hian_options,
        )
        return output
