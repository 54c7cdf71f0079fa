"""duca_gopo / duca_otb / duca_tir_otb / duca_proxmo through verl 0.9.1's own ``compute_advantage``."""

import numpy as np
import pytest
import torch
from verl import DataProto
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo import core_algos

import duca_fast.integrations.verl  # noqa: F401 - registers the estimators and patches compute_advantage
from duca_fast import ops
from duca_fast.train.features import tfidf_features
from tests.integrations.test_verl_optimal_baseline import verl_batch
from tests.ops.test_proxmo import official


def compute_advantage(data, name, config=None):
    # Imported here: the patch must also reach a module imported after the adapter.
    from verl.trainer.ppo.ray_trainer import compute_advantage as verl_compute_advantage

    assert getattr(verl_compute_advantage, "__duca_wrapped__", False)
    return verl_compute_advantage(data, adv_estimator=name, config=config or AlgoConfig(adv_estimator=name))


def test_all_names_are_in_verls_registry():
    for name in ("duca_hian", "duca_gopo", "duca_otb", "duca_tir_otb", "duca_proxmo"):
        assert callable(core_algos.get_adv_estimator_fn(name))


def test_gopo_ranks_row_scores_within_uid():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(9, 5, generator=gen)
    mask = (torch.rand(9, 5, generator=gen) > 0.3).long()
    uids = np.array(["a", "b", "a", "c", "b", "a", "b", "c", "a"], dtype=object)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask}, non_tensors={"uid": uids}
    )
    out = compute_advantage(data, "duca_gopo").batch["advantages"]
    group = torch.tensor([{"a": 0, "b": 1, "c": 2}[u] for u in uids])
    per_row = ops.gopo_advantages(rewards.sum(-1), group)
    torch.testing.assert_close(out, per_row[:, None] * mask)
    assert sorted(per_row[group == 0].tolist()) == pytest.approx([-2.0, -2.0 / 3, 2.0 / 3, 2.0])


@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize(
    "ours,theirs", [("duca_otb", "optimal_token_baseline"), ("duca_tir_otb", "tir_optimal_token_baseline")]
)
def test_otb_equals_verls_own_estimators_through_compute_advantage(with_is, ours, theirs):
    rewards, mask, index, old, sum_p2, is_weights = verl_batch(4, holes=ours == "duca_tir_otb")
    tensors = {
        "token_level_rewards": rewards,
        "response_mask": mask,
        "old_log_probs": old,
        "sum_pi_squared": sum_p2,
    }
    if with_is:
        tensors["rollout_is_weights"] = is_weights
    uids = np.array([f"u{i}" for i in index], dtype=object)
    expected = compute_advantage(
        DataProto.from_dict(tensors=dict(tensors), non_tensors={"uid": uids}), theirs
    )
    got = compute_advantage(DataProto.from_dict(tensors=dict(tensors), non_tensors={"uid": uids}), ours)
    for key in ("advantages", "returns"):
        torch.testing.assert_close(got.batch[key], expected.batch[key], rtol=1e-10, atol=1e-12)
    del tensors["sum_pi_squared"]
    with pytest.raises(ValueError, match="calculate_sum_pi_squared=True"):
        compute_advantage(DataProto.from_dict(tensors=tensors, non_tensors={"uid": uids}), ours)


def test_proxmo_in_the_official_codes_layout_matches_its_transcription():
    gen = torch.Generator().manual_seed(5)
    texts = ["you are in the kitchen", "you see a fridge", "the fridge is open", "you are in the hall", ""]
    rows, steps = [], []
    for group in range(3):
        for trajectory in range(4):
            length = int(torch.randint(1, 5, (1,), generator=gen))
            won = float(torch.rand(1, generator=gen) > 0.5)
            for _ in range(length):
                text = texts[int(torch.randint(0, len(texts), (1,), generator=gen))]
                step_reward = float(torch.randn(1, generator=gen))
                steps.append((group, f"t{group}-{trajectory}", won, step_reward, text))
    features = tfidf_features([s[4] for s in steps])
    rows = [
        dict(uid=g, traj=t, score=won, reward=r, feature=f.tolist())
        for (g, t, won, r, _), f in zip(steps, features)
    ]
    expected = official(
        rows, gamma=0.95, step_weight=1.0, temperature=0.1, alpha=4.0, beta=ops.advantages.proxmo.PSC_BETA
    )
    length = 6
    token_rewards = torch.zeros(len(steps), length)
    token_rewards[:, -1] = torch.tensor([s[2] for s in steps])  # the episode reward on the last token
    mask = torch.ones(len(steps), length, dtype=torch.long)
    mask[::3, -2:] = 0
    data = DataProto.from_dict(
        tensors={
            "token_level_rewards": token_rewards,
            "response_mask": mask,
            "step_rewards": torch.tensor([s[3] for s in steps]),
        },
        non_tensors={
            "uid": np.array([f"g{s[0]}" for s in steps], dtype=object),
            "traj_uid": np.array([s[1] for s in steps], dtype=object),
            "anchor_obs": np.array([s[4] for s in steps], dtype=object),
        },
    )
    out = compute_advantage(data, "duca_proxmo").batch["advantages"]
    torch.testing.assert_close(out, (expected.float()[:, None] * mask), rtol=1e-5, atol=2e-5)
    # Options from a duca_proxmo mapping in the config.
    data.non_tensor_batch["traj_uid"] = data.non_tensor_batch["traj_uid"]
    config = {"duca_proxmo": {"gamma": 0.5, "psc": False}}
    out = compute_advantage(data, "duca_proxmo", config=config).batch["advantages"]
    expected_plain = official(rows, gamma=0.5, step_weight=1.0, temperature=0.1, alpha=4.0, beta=0.0)
    torch.testing.assert_close(out, (expected_plain.float()[:, None] * mask), rtol=1e-5, atol=2e-5)


def test_proxmo_needs_trajectories_and_states():
    data = DataProto.from_dict(
        tensors={
            "token_level_rewards": torch.zeros(2, 3),
            "response_mask": torch.ones(2, 3, dtype=torch.long),
        },
        non_tensors={"uid": np.array(["a", "a"], dtype=object)},
    )
    with pytest.raises(ValueError, match=r"traj_uid"):
        compute_advantage(data, "duca_proxmo")
    data.non_tensor_batch["traj_uid"] = np.array(["x", "y"], dtype=object)
    with pytest.raises(ValueError, match="anchor_obs"):
        compute_advantage(data, "duca_proxmo")
