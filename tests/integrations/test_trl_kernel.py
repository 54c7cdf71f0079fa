"""``DucaGRPOTrainer(use_duca_kernel=True)``: the fused kernel's loss and parameter gradients equal TRL
1.16's own ``GRPOTrainer._compute_loss`` on the same generated batch, for every loss type TRL offers
(but vespo), both importance-sampling levels, the KL term, vLLM's importance-sampling modes and
truncated completions; what it cannot reproduce is refused at construction, naming the option."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOTrainer

from duca_fast.integrations import trl_kernel
from duca_fast.integrations.trl import DucaGRPOTrainer
from tests.integrations.tiny_trl import Recording, chat_tokenizer, grpo_args, tiny_model


class RecordingDuca(Recording, DucaGRPOTrainer):
    pass


def one_turn_rewards(completions, **kwargs):
    return [[float(len(str(c)) % 3)] for c in completions]


def session_reward(completions, **kwargs):
    return [float(len(str(c)) % 2) for c in completions]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trainer after one step with the kernel, and the batch its loss received. fp32 (no bf16 autocast):
    under autocast TRL's LM head rounds its GEMM to bf16 and the kernel's does not, so only fp32 compares
    exactly."""
    from datasets import Dataset

    tmp_path = tmp_path_factory.mktemp("trl_kernel")
    tokenizer = chat_tokenizer()
    model = tiny_model(tokenizer, seed=3)
    args = grpo_args(tmp_path, max_completion_length=10, beta=0.0, bf16=False)
    trainer = RecordingDuca(
        model=model,
        reward_funcs=session_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["Hello, I want a laptop.", "Is it on sale?"] * 2}),
        processing_class=tokenizer,
        turn_reward_func=one_turn_rewards,
        use_duca_kernel=True,
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert trainer.recorded, "the trainer never scored a batch"
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return trainer, trainer.recorded[0], moved


def configure(trainer, **settings):
    """Set TRL's attributes and args as GRPOTrainer.__init__ would have, and rebuild the kernel plan."""
    args = trainer.args
    for name, value in settings.items():
        setattr(args, name, value)
    trainer.loss_type = args.loss_type
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.beta = args.beta
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    trainer.top_entropy_quantile = args.top_entropy_quantile
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.use_vllm = settings.get("use_vllm", False)
    trainer.duca_kernel_plan = trl_kernel.KernelPlan.from_config(args, trainer.use_vllm, trainer.model.config)


def perturbed_batch(trainer, recorded, per_token_advantages: bool, seed: int = 0):
    """The recorded batch with off-policy old log-probs (ratios away from 1, some clipped), reference
    log-probs, and per-token (or per-completion) advantages: every term of the loss is exercised."""
    generator = torch.Generator().manual_seed(seed)
    batch = {key: (value.clone() if torch.is_tensor(value) else value) for key, value in recorded.items()}
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    length = batch["completion_ids"].shape[1]
    with torch.no_grad():
        current, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, attention, length
        )
    shape = current.shape
    batch["old_per_token_logps"] = current + 0.3 * torch.randn(shape, generator=generator)
    batch["ref_per_token_logps"] = current + 0.2 * torch.randn(shape, generator=generator)
    batch["sampling_per_token_logps"] = batch["old_per_token_logps"] + 0.4 * torch.randn(
        shape, generator=generator
    )
    rows = shape[0]
    if per_token_advantages:
        batch["advantages"] = torch.randn(shape, generator=generator)
    else:
        batch["advantages"] = torch.randn(rows, generator=generator)
    batch["num_items_in_batch"] = batch["completion_mask"].sum().float()
    return batch


def loss_and_grads(trainer, batch, use_kernel: bool):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.use_duca_kernel = use_kernel
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    grads = {
        name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None
    }
    trainer.use_duca_kernel = True
    return loss.detach(), grads


def assert_same(trainer, batch):
    expected_loss, expected_grads = loss_and_grads(trainer, batch, use_kernel=False)
    loss, grads = loss_and_grads(trainer, batch, use_kernel=True)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert expected_loss != 0


def test_one_training_step_with_the_kernel_moves_the_model(trained):
    trainer, batch, moved = trained
    assert moved
    assert batch["advantages"].shape == batch["completion_ids"].shape  # DuCA's per-token advantages
    logged = trainer.state.log_history[0]
    assert "duca/kernel/pg_loss" in logged and "clip_ratio/region_mean" in logged


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"])
def test_every_loss_type_equals_trl_at_token_level(trained, loss_type):
    trainer, recorded, _ = trained
    configure(
        trainer,
        loss_type=loss_type,
        importance_sampling_level="token",
        beta=0.0,
        epsilon_high=1.5 if loss_type == "cispo" else 0.28,
        delta=None,
    )
    assert_same(trainer, perturbed_batch(trainer, recorded, per_token_advantages=True))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "luspo"])
def test_sequence_level_importance_sampling_equals_trl(trained, loss_type):
    trainer, recorded, _ = trained
    configure(
        trainer,
        loss_type=loss_type,
        importance_sampling_level="sequence",
        beta=0.0,
        epsilon_high=0.28,
        delta=None,
    )
    # Equal gradients need one advantage per completion (TRL's default); the loss is equal either way.
    assert_same(trainer, perturbed_batch(trainer, recorded, per_token_advantages=False, seed=1))


def test_sequence_level_loss_value_equals_trl_with_per_turn_advantages(trained):
    trainer, recorded, _ = trained
    configure(trainer, loss_type="grpo", importance_sampling_level="sequence", beta=0.0, epsilon_high=0.28)
    batch = perturbed_batch(trainer, recorded, per_token_advantages=True, seed=2)
    expected, _ = loss_and_grads(trainer, batch, use_kernel=False)
    loss, _ = loss_and_grads(trainer, batch, use_kernel=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_kl_term_and_two_sided_delta_equal_trl(trained, loss_type):
    trainer, recorded, _ = trained
    configure(
        trainer,
        loss_type=loss_type,
        importance_sampling_level="token",
        beta=0.05,
        use_bias_correction_kl=False,
        epsilon_high=0.28,
        delta=1.2,
    )
    assert_same(trainer, perturbed_batch(trainer, recorded, per_token_advantages=True, seed=3))
    configure(trainer, beta=0.0, delta=None)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_vllm_importance_sampling_modes_equal_trl(trained, mode):
    trainer, recorded, _ = trained
    configure(
        trainer,
        loss_type="dapo",
        importance_sampling_level="token",
        beta=0.0,
        epsilon_high=0.28,
        delta=None,
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=None if mode.endswith("truncate") else 0.5,
        vllm_importance_sampling_clip_max=1.5 if mode.startswith("token") else 3.0,
    )
    batch = perturbed_batch(trainer, recorded, per_token_advantages=True, seed=4)
    # TRL's ratio, as its _generate_and_score_completions builds it (grpo_trainer.py, vLLM branch).
    mask = batch["completion_mask"]
    diff = (batch["old_per_token_logps"] - batch["sampling_per_token_logps"]) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = diff.exp()
    if mode.endswith("truncate"):
        ratio = ratio.clamp(max=trainer.args.vllm_importance_sampling_clip_max)
    else:
        low, high = 0.5, trainer.args.vllm_importance_sampling_clip_max
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    batch["importance_sampling_ratio"] = ratio
    try:
        assert_same(trainer, batch)
    finally:
        configure(trainer, use_vllm=False, vllm_importance_sampling_correction=True)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_top_entropy_and_off_policy_masks_equal_trl(trained, loss_type):
    trainer, recorded, _ = trained
    for settings in (
        dict(top_entropy_quantile=0.3, off_policy_mask_threshold=None),
        dict(top_entropy_quantile=1.0, off_policy_mask_threshold=0.05),
        dict(top_entropy_quantile=0.5, off_policy_mask_threshold=0.0),
    ):
        configure(
            trainer,
            loss_type=loss_type,
            importance_sampling_level="token",
            beta=0.0,
            epsilon_high=0.28,
            **settings,
        )
        batch = perturbed_batch(trainer, recorded, per_token_advantages=True, seed=7)
        try:
            assert_same(trainer, batch)
        finally:
            configure(trainer, top_entropy_quantile=1.0, off_policy_mask_threshold=None)


def test_off_policy_mask_reads_vllm_sampling_logprobs_as_trl_does(trained):
    trainer, recorded, _ = trained
    configure(
        trainer,
        loss_type="bnpo",
        importance_sampling_level="token",
        beta=0.0,
        epsilon_high=0.28,
        off_policy_mask_threshold=0.05,
        use_vllm=True,
        vllm_importance_sampling_correction=False,
    )
    batch = perturbed_batch(trainer, recorded, per_token_advantages=True, seed=8)
    try:
        assert_same(trainer, batch)
    finally:
        configure(
            trainer, off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=True
        )


def test_truncated_completions_leave_the_loss(trained):
    trainer, recorded, _ = trained
    configure(trainer, loss_type="grpo", importance_sampling_level="token", beta=0.0, epsilon_high=0.28)
    batch = perturbed_batch(trainer, recorded, per_token_advantages=True, seed=5)
    batch["completion_mask"][0] = 0  # what mask_truncated_completions does to a truncated completion
    assert_same(trainer, batch)


def test_per_token_advantages_reach_the_kernel(trained, monkeypatch):
    """Two turns in a completion with different advantages: the kernel receives exactly those, per token."""
    trainer, recorded, _ = trained
    configure(trainer, loss_type="bnpo", importance_sampling_level="token", beta=0.0, epsilon_high=0.28)
    batch = perturbed_batch(trainer, recorded, per_token_advantages=False, seed=6)
    mask = batch["completion_mask"]
    tool = torch.ones_like(mask)
    tool[:, 3:5] = 0  # a tool result between two agent turns
    batch["tool_mask"] = tool
    advantages = torch.zeros(mask.shape)
    advantages[:, :3], advantages[:, 5:] = 1.5, -0.5
    batch["advantages"] = advantages
    seen = {}
    original = trl_kernel.ops.fused_policy_loss

    def spy(hidden, weight, target, adv, old, **kwargs):
        seen["advantages"], seen["mask"] = adv.clone(), kwargs["mask"].clone()
        return original(hidden, weight, target, adv, old, **kwargs)

    monkeypatch.setattr(trl_kernel.ops, "fused_policy_loss", spy)
    loss_and_grads(trainer, batch, use_kernel=True)
    live = (mask * tool).reshape(-1).bool()
    assert torch.equal(seen["mask"], live)
    expected = advantages.reshape(-1)[live]
    assert torch.equal(seen["advantages"][live], expected)
    assert set(expected.tolist()) == {1.5, -0.5}
    monkeypatch.undo()
    assert_same(trainer, batch)


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(loss_type="vespo"), "loss_type='vespo'"),
        (dict(beta=0.1, use_bias_correction_kl=True), "use_bias_correction_kl"),
        (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
        (dict(entropy_coef=0.01, loss_type="grpo"), "entropy_coef"),
        (dict(entropy_coef=0.01, loss_type="bnpo", top_entropy_quantile=0.5), "top_entropy_quantile"),
        (dict(loss_type="cispo", importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(loss_type="cispo", epsilon_high=0.28), "epsilon_high"),
        (dict(delta=1.5, importance_sampling_level="sequence"), "delta"),
    ],
)
def test_unreproducible_options_are_refused_naming_them(settings, named):
    from trl import GRPOConfig

    fields = dict(
        output_dir="unused", use_cpu=True, report_to="none", per_device_train_batch_size=4, num_generations=4
    )
    args = GRPOConfig(**{**fields, **settings})
    with pytest.raises(ValueError, match=named):
        trl_kernel.KernelPlan.from_config(args, use_vllm=False)


def test_vllm_truncate_with_a_lower_bound_and_scaled_logits_are_refused():
    with pytest.raises(ValueError, match="vllm_importance_sampling_clip_min"):
        trl_kernel._vllm_correction("token_truncate", 0.5, 2.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        trl_kernel._check_model_config(types.SimpleNamespace(final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="logit_scale"):
        trl_kernel._check_model_config(types.SimpleNamespace(logit_scale=0.5))
