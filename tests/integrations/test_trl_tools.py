"""Real multi-turn through TRL's own tool loop: DucaGRPOTrainer with a Python tool, 2-3 tool rounds."""

import json
import re

import pytest
import torch
from datasets import Dataset

from duca_fast.integrations.trl import DucaGRPOTrainer
from tests.integrations.test_trl_adapter import hand_turn_advantages
from tests.integrations.tiny_trl import Recording, chat_tokenizer, grpo_args, tiny_model

FINAL = "Done."


def lookup_stock(rounds: int) -> str:
    """Look up the stock level.

    Args:
        rounds: how many lookups the agent plans
    """
    return f"stock {rounds * 7}"


def tool_call(rounds: int) -> str:
    return (
        "<tool_call>\n"
        + json.dumps({"name": "lookup_stock", "arguments": {"rounds": rounds}})
        + "\n</tool_call>"
    )


def agent_script(row: int, context: str) -> str:
    """Completion r of the group plans 2 + r % 2 tool rounds; after them it answers."""
    planned = re.findall(r'"rounds": (\d+)', context.split("<|im_start|>user")[-1])
    rounds = int(planned[0]) if planned else 2 + row % 2
    return tool_call(rounds) if context.count("<tool_response>") < rounds else FINAL


@pytest.mark.parametrize("use_duca_kernel", [False, True], ids=["trl_loss", "duca_kernel"])
def test_tool_rounds_through_trl_loop_give_turn_spans_and_advantages(tmp_path, monkeypatch, use_duca_kernel):
    """With ``use_duca_kernel`` the fused kernel must receive exactly the hand-computed per-turn advantages
    on the agent tokens (and no tool-result token)."""
    from duca_fast.integrations import trl_kernel

    kernel_calls = []
    original_loss = trl_kernel.ops.fused_policy_loss

    def recording_loss(hidden, weight, target, advantages, old, **kwargs):
        kernel_calls.append((advantages.detach().clone(), kwargs["mask"].clone()))
        return original_loss(hidden, weight, target, advantages, old, **kwargs)

    monkeypatch.setattr(trl_kernel.ops, "fused_policy_loss", recording_loss)
    tokenizer = chat_tokenizer()
    model = tiny_model(tokenizer, script=agent_script)
    seen = []

    def turn_reward(completions, completion_ids, turn_spans, **kwargs):
        seen.append((completions, completion_ids, turn_spans))
        # Reward each turn by its position and length: different counts and values across the group.
        return [
            [0.1 * (end - start) - 0.4 * k for k, (start, end) in enumerate(spans)] for spans in turn_spans
        ]

    def session_reward(completions, **kwargs):
        return [float(sum(m["role"] == "tool" for m in c)) for c in completions]

    class Trainer(Recording, DucaGRPOTrainer):
        pass

    trainer = Trainer(
        model=model,
        reward_funcs=session_reward,
        args=grpo_args(tmp_path, max_completion_length=200, max_tool_calling_iterations=5),
        train_dataset=Dataset.from_dict(
            {"prompt": [[{"role": "user", "content": "How many are left?"}]] * 4}
        ),
        processing_class=tokenizer,
        tools=[lookup_stock],
        turn_reward_func=turn_reward,
        turn_weight=0.7,
        turn_scope="group",
        use_duca_kernel=use_duca_kernel,
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    (completions, completion_ids, spans), output = seen[0], trainer.recorded[0]

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    turn_rewards, session_rewards = [], []
    for row in range(4):
        rounds = 2 + row % 2
        texts = [tool_call(rounds)] * rounds + [FINAL]
        assert len(spans[row]) == rounds + 1 >= 3  # at least two tool rounds, each followed by a turn
        for (start, end), text in zip(spans[row], texts):
            assert completion_ids[row][start:end] == ids(text)
        gaps = [nxt[0] - cur[1] for cur, nxt in zip(spans[row], spans[row][1:])]
        assert all(gap > 0 for gap in gaps)  # tool results between the agent turns
        assert output["tool_mask"][row, spans[row][0][1] : spans[row][1][0]].eq(0).all()
        assert sum(m["role"] == "tool" for m in completions[row]) == rounds
        turn_rewards.append([0.1 * (e - s) - 0.4 * k for k, (s, e) in enumerate(spans[row])])
        session_rewards.append(float(rounds))

    expected = hand_turn_advantages(turn_rewards, session_rewards, 4, turn_weight=0.7)
    advantages = output["advantages"]
    for row in range(4):
        covered = torch.zeros(advantages.shape[1], dtype=torch.bool)
        for (start, end), value in zip(spans[row], expected[row]):
            torch.testing.assert_close(advantages[row, start:end], torch.full((end - start,), value))
            covered[start:end] = True
        assert (advantages[row, ~covered] == 0).all()  # tool results and padding get no advantage
    assert len({round(v, 4) for row in expected for v in row}) > 4  # the turns really differ
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if not use_duca_kernel:
        assert not kernel_calls
        return
    kernel_advantages, kernel_mask = kernel_calls[0]
    by_hand = torch.zeros(advantages.shape)
    agent = torch.zeros(advantages.shape, dtype=torch.bool)
    for row in range(4):
        for (start, end), value in zip(spans[row], expected[row]):
            by_hand[row, start:end], agent[row, start:end] = value, True
    assert torch.equal(kernel_mask, agent.reshape(-1))  # agent tokens only: no tool result, no padding
    torch.testing.assert_close(kernel_advantages[kernel_mask], by_hand.reshape(-1)[agent.reshape(-1)])
