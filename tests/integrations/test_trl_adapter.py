"""The TRL adapter against the real trl 1.16 package: HIAN advantages per token, one CPU training step."""

import math
import subprocess
import sys

import pytest
import torch

from duca_fast import ops
from duca_fast.integrations.trl import (
    DucaGRPOTrainer,
    hian_completion_advantages,
    normalize_turn_rewards,
    session_normalized_totals,
    session_totals,
    turn_spans,
)
from tests.integrations.tiny_trl import Recording, chat_tokenizer, grpo_args, tiny_model


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


def test_dual_track_options_and_gopo_session_horizon():
    agent_mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
    turn_rewards = [[0.5, -0.2], [0.1], [0.4], [0.2, 0.9]]
    session_rewards = torch.tensor([1.0, 0.0, 0.5, 3.0])
    flat = dict(
        turn_rewards=torch.tensor([0.5, -0.2, 0.1, 0.4, 0.2, 0.9]),
        turn_session=torch.tensor([0, 0, 1, 2, 3, 3]),
        session_group=torch.tensor([0, 0, 1, 1]),
    )
    token_turn = torch.tensor([[0, 0, -1, 1], [2, -1, -1, -1], [3, 3, 3, 3], [4, -1, 5, -1]]).reshape(-1)
    got = hian_completion_advantages(
        turn_rewards, session_rewards, 2, agent_mask, std="population", clip=0.8, turn_weight=0.5
    )
    expected = ops.hian_advantages(
        flat["turn_rewards"], flat["turn_session"], session_rewards, flat["session_group"], std="population",
        clip=0.8, turn_weight=0.5, nan_policy="omit", token_turn=token_turn, backend="reference",
    ).reshape(4, 4)  # fmt: skip
    torch.testing.assert_close(got, expected.float())
    # GOPO: within each group of two the better session gets +2, the other -2; turn horizon unchanged.
    gopo = hian_completion_advantages(
        turn_rewards, session_rewards, 2, agent_mask, session_estimator="gopo", turn_weight=0.0
    )
    assert gopo[agent_mask.bool()].tolist() == [2.0, 2.0, 2.0, -2.0, -2.0, -2.0, -2.0, -2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="session_estimator must be one of"):
        hian_completion_advantages(turn_rewards, session_rewards, 2, agent_mask, session_estimator="otb")


def test_batch_without_agent_turns_gives_zero_advantages():
    # Every completion masked (e.g. all truncated under mask_truncated_completions): no turn at all.
    advantages = hian_completion_advantages(
        [[], [], [], []], torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, torch.zeros(4, 3)
    )
    assert advantages.shape == (4, 3) and (advantages == 0).all()


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


# ---------------------------------------------------------------------------------------------------
# What a TRL user meets: truncated completions, TRL-style turn functions, logging, kwargs, async.


def hand_turn_advantages(turn_rewards, session_rewards, group_size, turn_weight=1.0, session_weight=1.0):
    """Fused advantage of every turn, in plain float64 Python (group scope and scale, NaN left out)."""

    def normalize(values):
        present = [v for v in values if not math.isnan(v)]
        if len(present) < 2:
            return [0.0] * len(values)
        mean = sum(present) / len(present)
        std = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))
        return [0.0 if math.isnan(v) else (v - mean) / (std + 1e-6) for v in values]

    fused = []
    for first in range(0, len(turn_rewards), group_size):
        rows = range(first, first + group_size)
        turn_values = normalize([r for row in rows for r in turn_rewards[row]])
        session_values = normalize([session_rewards[row] for row in rows])
        position = 0
        for local, row in enumerate(rows):
            advantages = []
            for _ in turn_rewards[row]:
                advantages.append(
                    turn_weight * turn_values[position] + session_weight * session_values[local]
                )
                position += 1
            fused.append(advantages)
    return fused


def test_turn_reward_shapes_accepted_and_refused():
    rows = normalize_turn_rewards([0.5, None, [1, None], 7.0, torch.tensor([0.25, 2.0])], [1, 1, 2, 0, 2])
    assert rows[0] == [0.5] and math.isnan(rows[1][0]) and rows[2][0] == 1.0 and math.isnan(rows[2][1])
    assert rows[3] == [] and rows[4] == [0.25, 2.0]  # a row without agent turns is skipped
    with pytest.raises(
        ValueError, match=r"one number for completion 0, which has 2 agent turns; return a list"
    ):
        normalize_turn_rewards([0.5], [2])
    with pytest.raises(ValueError, match="3 turn rewards for completion 1, but it has 2 agent turns"):
        normalize_turn_rewards([[1.0], [1.0, 2.0, 3.0]], [1, 2])
    with pytest.raises(ValueError, match="returned a str as a turn reward of completion 0"):
        normalize_turn_rewards([["good"]], [1])
    with pytest.raises(ValueError, match="returned 1 entries for 2 completions"):
        normalize_turn_rewards([[1.0]], [1, 1])
    with pytest.raises(ValueError, match="one entry per completion, got float"):
        normalize_turn_rewards(1.0, [1])


def test_turn_spans_are_runs_of_agent_tokens():
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert turn_spans(mask) == [[(0, 2), (3, 4)], [], [(0, 5)]]


def test_session_normalized_totals_is_trl_normalize_then_sum():
    rewards = torch.tensor([[1.0, 0.0], [3.0, float("nan")], [2.0, 4.0], [0.0, 2.0]])
    totals = session_normalized_totals(rewards, torch.tensor([1.0, 2.0]), num_generations=2)
    # Group 0: function 0 is (1, 3) -> (-1, 1)/(sqrt(2)+eps); function 1 has one value -> 0/(0+eps) = 0.
    first = -1 / (math.sqrt(2) + 1e-4)
    assert totals[0].item() == pytest.approx(first + 0.0, abs=1e-6)
    assert totals[1].item() == pytest.approx(-first, abs=1e-6)
    # Group 1: both functions (2, 0) and (4, 2) -> (1, -1)/(sqrt(2)+eps) each, weights 1 and 2.
    assert totals[2].item() == pytest.approx(3 / (math.sqrt(2) + 1e-4), abs=1e-6)


def test_masked_truncated_completions_are_skipped_with_a_trl_style_turn_function(tmp_path):
    from datasets import Dataset

    tokenizer = chat_tokenizer()
    # Rows 0 and 1 stop after "Hi" (EOS); rows 2 and 3 run into max_completion_length and are truncated.
    model = tiny_model(tokenizer, script=lambda row, context: "Hi" if row < 2 else None)
    seen_spans = []

    def turn_reward(completions, turn_spans, **kwargs):
        seen_spans.append(turn_spans)
        return [float(i) for i in range(len(completions))]  # one float per completion, TRL style

    class Trainer(Recording, DucaGRPOTrainer):
        pass

    trainer = Trainer(
        model=model,
        reward_funcs=lambda completions, **kw: [float(i % 3) for i in range(len(completions))],
        args=grpo_args(tmp_path, mask_truncated_completions=True),
        train_dataset=Dataset.from_dict({"prompt": ["Say hi."] * 4}),
        processing_class=tokenizer,
        turn_reward_func=turn_reward,
    )
    trainer.train()
    hi_length = len(tokenizer("Hi", add_special_tokens=False)["input_ids"]) + 1
    assert seen_spans == [[[(0, hi_length)], [(0, hi_length)], [], []]]
    advantages = trainer.recorded[0]["advantages"]
    expected = hand_turn_advantages([[0.0], [1.0], [], []], [0.0, 1.0, 2.0, 0.0], 4)
    torch.testing.assert_close(advantages[0, :hi_length], torch.full((hi_length,), expected[0][0]))
    torch.testing.assert_close(advantages[1, :hi_length], torch.full((hi_length,), expected[1][0]))
    assert (advantages[0, hi_length:] == 0).all() and (advantages[2:] == 0).all()


def test_kwargs_logging_async_and_normalize_then_sum(tmp_path):
    from datasets import Dataset

    tokenizer = chat_tokenizer()
    model = tiny_model(tokenizer)
    calls = []

    async def turn_reward(prompts, completions, completion_ids, turn_spans, trainer_state, **kwargs):
        calls.append(dict(kwargs, turn_spans=turn_spans, step=trainer_state.global_step))
        rewards = [float(len(ids) % 5) - 0.5 * i for i, ids in enumerate(completion_ids)]
        kwargs["log_metric"]("turn_fn/called", 1.0)
        kwargs["log_extra"]("turn_note", [f"r={r}" for r in rewards])
        return [[r] for r in rewards]

    def conversion(completions, **kwargs):
        return [1.0, 0.0, 1.0, 1.0]

    def deal_value(completions, **kwargs):
        return [10.0, 30.0, None, 20.0]

    class Trainer(Recording, DucaGRPOTrainer):
        pass

    trainer = Trainer(
        model=model,
        reward_funcs=[conversion, deal_value],
        args=grpo_args(tmp_path, multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 0.5]),
        train_dataset=Dataset.from_dict({"prompt": ["Buy?"] * 4, "persona": ["thrifty"] * 4}),
        processing_class=tokenizer,
        turn_reward_func=turn_reward,
        turn_weight=0.5,
    )
    trainer.train()
    (call,) = calls
    assert call["persona"] == ["thrifty"] * 4 and callable(call["log_metric"]) and call["step"] == 0
    output = trainer.recorded[0]
    lengths = output["completion_mask"].sum(dim=1).tolist()
    assert call["turn_spans"] == [[(0, n)] for n in lengths]

    # Session reward by hand: each function normalized in the group (TRL's eps 1e-4), weighted, summed.
    def normalized(values):
        present = [v for v in values if v is not None]
        mean = sum(present) / len(present)
        std = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))
        return [0.0 if v is None else (v - mean) / (std + 1e-4) for v in values]

    sessions = [
        a + 0.5 * b for a, b in zip(normalized([1.0, 0.0, 1.0, 1.0]), normalized([10.0, 30.0, None, 20.0]))
    ]
    turn_rewards = [[float(n % 5) - 0.5 * i] for i, n in enumerate(lengths)]
    expected = hand_turn_advantages(turn_rewards, sessions, 4, turn_weight=0.5)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(output["advantages"][row, :n], torch.full((n,), expected[row][0]))

    logged = trainer.state.log_history[0]
    flat = [r[0] for r in turn_rewards]
    assert logged["duca/turn_reward/mean"] == pytest.approx(sum(flat) / 4)
    assert logged["duca/session_reward/mean"] == pytest.approx(sum(sessions) / 4, abs=1e-5)
    assert logged["duca/advantage/max"] == pytest.approx(max(a[0] for a in expected), abs=1e-5)
    for key in (
        "duca/turn_advantage/std",
        "duca/session_advantage/mean",
        "duca/turns/mean",
        "turn_fn/called",
    ):
        assert key in logged, key
    assert list(trainer._logs["advantages"]) == pytest.approx([a[0] for a in expected], abs=1e-5)
    assert list(trainer._logs["extra"]["turn_note"]) == [f"r={r[0]}" for r in turn_rewards]


def test_trl_vllm_version_warning_held_back_at_import():
    code = (
        "import duca_fast.integrations.trl as adapter; print('held', adapter._held_vllm_warning is not None)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "supports vLLM versions" not in result.stderr
    from packaging.version import Version
    from trl.import_utils import _is_package_available

    available, installed = _is_package_available("vllm", return_version=True)
    supported = Version("0.22.0") <= Version(Version(installed).base_version) <= Version("0.31.0")
    outside = available and not supported
    assert f"held {outside}" in result.stdout


def test_gopo_session_horizon_and_dual_track_options_reach_the_trainer(tmp_path):
    from datasets import Dataset

    tokenizer = chat_tokenizer()

    class Trainer(Recording, DucaGRPOTrainer):
        pass

    with pytest.raises(ValueError, match="session_estimator must be one of"):
        Trainer(model=None, reward_funcs=[], turn_reward_func=lambda **kw: [], session_estimator="proxmo")
    with pytest.raises(ValueError, match="clip must be None or a finite number > 0"):
        Trainer(model=None, reward_funcs=[], turn_reward_func=lambda **kw: [], clip=-1.0)
    trainer = Trainer(
        model=tiny_model(tokenizer),
        reward_funcs=lambda completions, **kw: [float(i) for i in range(len(completions))],
        args=grpo_args(tmp_path),
        train_dataset=Dataset.from_dict({"prompt": ["Say hi."] * 4}),
        processing_class=tokenizer,
        turn_reward_func=lambda completions, **kw: [0.0] * len(completions),
        turn_weight=0.0,
        session_estimator="gopo",
        std="population",
        clip=10.0,
    )
    assert trainer.hian_options["std"] == "population" and trainer.hian_options["clip"] == 10.0
    trainer.train()
    advantages = trainer.recorded[0]["advantages"]
    mask = trainer.recorded[0]["completion_mask"].bool()
    # Session rewards 0, 1, 2, 3 in groups of num_generations: ranks spread from +2 (best) to -2.
    group_size = trainer.num_generations
    for row in range(advantages.shape[0]):
        rank = group_size - 1 - row % group_size  # 0 = best (the highest reward is the last of a group)
        expected = 2.0 - 4.0 * rank / (group_size - 1)
        assert advantages[row][mask[row]].tolist() == pytest.approx([expected] * int(mask[row].sum()))
