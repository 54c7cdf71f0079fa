"""The TRL adapter against the real trl 1.16 package: HIAN advantages per token, one CPU training step."""

import pytest
import torch

from duca_fast import ops
from duca_fast.integrations.trl import DucaGRPOTrainer, hian_completion_advantages, session_totals


def test_per_token_advantages_match_ops_on_synthetic_multi_turn_batch():
    # Two groups of two completions; 0 in the mask = padding or tool result between agent turns.
    agent_mask = torch.tensor(
        [
            [1, 1, 0, 0, 1, 1, 0],
            [1, 1, 1, 0, 1, 0, 1],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 0, 1, 1, 1, 0, 0],
        ]
    )
    turn_rewards = [[0.5, -0.2], [0.1, 0.3, 0.0], [0.4], [0.2, 0.9]]
    session_rewards = torch.tensor([1.0, 0.0, float("nan"), 3.0])
    advantages = hian_completion_advantages(
        turn_rewards, session_rewards, 2, agent_mask, turn_weight=0.7, session_weight=1.3
    )
    token_turn = torch.tensor(
        [
            [0, 0, -1, -1, 1, 1, -1],
            [2, 2, 2, -1, 3, -1, 4],
            [5, 5, 5, 5, -1, -1, -1],
            [6, -1, 7, 7, 7, -1, -1],
        ]
    )
    expected = ops.hian_advantages(
        torch.tensor([0.5, -0.2, 0.1, 0.3, 0.0, 0.4, 0.2, 0.9]),
        torch.tensor([0, 0, 1, 1, 1, 2, 3, 3]),
        session_rewards,
        torch.tensor([0, 0, 1, 1]),
        turn_weight=0.7,
        session_weight=1.3,
        nan_policy="omit",
        token_turn=token_turn.reshape(-1),
        backend="reference",
    ).reshape(4, 7)
    torch.testing.assert_close(advantages, expected.float())
    assert (advantages[agent_mask == 0] == 0).all()

    # The local slice of a second process sees the same numbers for its rows.
    local = hian_completion_advantages(
        turn_rewards, session_rewards, 2, agent_mask[2:], first_row=2, turn_weight=0.7, session_weight=1.3
    )
    torch.testing.assert_close(local, advantages[2:])


def test_turn_count_mismatch_is_reported():
    with pytest.raises(ValueError, match="2 turn rewards for completion 0, but it has 1 agent turns"):
        hian_completion_advantages([[1.0, 2.0], [0.0]], torch.zeros(2), 2, torch.ones(2, 3))


def test_session_totals_weighted_and_nan_when_all_missing():
    rewards = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [float("nan"), float("nan")]])
    totals = session_totals(rewards, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(totals[:2], torch.tensor([2.0, 0.5]))
    assert torch.isnan(totals[2])


def test_one_grpo_training_step_on_a_tiny_model(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    from duca_fast.rollout.models import build_tiny_model_dir, load_default_tokenizer

    tokenizer = load_default_tokenizer()
    model_dir = build_tiny_model_dir(tmp_path / "tiny", tokenizer=tokenizer, hidden_size=64, num_layers=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dataset = Dataset.from_dict({"prompt": ["Hello, I want a laptop.", "Is it on sale?"] * 2})

    def session_reward(completions, **kwargs):
        return [float(len(c) % 3) for c in completions]

    def turn_rewards(completions, **kwargs):
        return [[float(len(c) % 2)] for c in completions]  # no tools: one agent turn per completion

    seen = []

    class Recording(DucaGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            seen.append(output)
            return output

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    trainer = Recording(
        model=model,
        reward_funcs=session_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        turn_reward_func=turn_rewards,
        turn_weight=0.5,
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert seen, "the trainer never scored completions"
    output = seen[0]
    advantages = output["advantages"]
    assert advantages.shape == output["completion_ids"].shape
    assert (advantages[output["completion_mask"] == 0] == 0).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
