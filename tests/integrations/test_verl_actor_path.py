"""The verl adapter inside verl's actor update path, as deep as verl 0.9.1 runs on CPU.

verl 0.9.1's actor update is ``TrainingWorker.train_batch -> engine.train_batch(data, ppo_loss)``. It has
no CPU platform (it falls back to CUDA and fails in ``torch.cuda.set_device``) and registers its FSDP engines
for "cuda" and "npu" only, so on CPU the deepest real piece is the loss function the worker hands the
engine, ``verl.workers.utils.losses.ppo_loss``. This test feeds it what the engine would: log-probs of a
real tiny Llama in verl's no-padding layout, advantages from verl's own ``compute_advantage`` with
``duca_hian``; then backward and an optimizer step.
"""

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from transformers import LlamaConfig, LlamaForCausalLM
from verl import DataProto
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.utils import tensordict_utils as tu
from verl.utils.torch_functional import logprobs_from_logits
from verl.workers.utils.losses import ppo_loss

import duca_fast.integrations.verl  # noqa: F401  (registers duca_hian and duca_fused)
from tests.integrations.test_verl_adapter import actor_config

PROMPT, RESPONSE, VOCAB = 3, 10, 64
# Per row: uid, agent-token runs (start, length, turn reward), session score; other response tokens are
# tool/user tokens (response_mask 0) or padding after the response length.
ROWS = [
    ("a", [(0, 2, 0.5), (4, 3, -0.2)], 1.0, 8),
    ("a", [(0, 3, 0.1), (5, 4, 0.3)], 0.0, 10),
    ("b", [(0, 1, 0.7), (2, 2, 0.0), (6, 2, 0.4)], 0.0, 9),
    ("b", [(0, 4, -0.3)], 2.0, 5),
]


def verl_batch():
    generator = torch.Generator().manual_seed(0)
    rows = len(ROWS)
    prompts = torch.randint(0, VOCAB, (rows, PROMPT), generator=generator)
    responses = torch.randint(0, VOCAB, (rows, RESPONSE), generator=generator)
    attention = torch.zeros(rows, PROMPT + RESPONSE, dtype=torch.int64)
    response_mask = torch.zeros(rows, RESPONSE, dtype=torch.int64)
    rewards = torch.zeros(rows, RESPONSE)
    for row, (_, turns, score, length) in enumerate(ROWS):
        attention[row, : PROMPT + length] = 1
        for start, size, reward in turns:
            response_mask[row, start : start + size] = 1
            rewards[row, start] += reward
        last = max(start + size for start, size, _ in turns) - 1
        rewards[row, last] += score
    uids = np.array([uid for uid, *_ in ROWS], dtype=object)
    return prompts, responses, attention, response_mask, rewards, uids


def flat_logprobs(model, prompts, responses, attention):
    """What verl's engine returns: per unpadded token, log p(next token), concatenated over rows."""
    values = []
    for row in range(prompts.shape[0]):
        ids = torch.cat([prompts[row], responses[row]])[attention[row].bool()]
        logits = model(input_ids=ids[None]).logits[0]
        next_ids = torch.roll(ids, -1)
        values.append(logprobs_from_logits(logits, next_ids))
    return torch.cat(values)


def test_duca_hian_and_duca_fused_through_compute_advantage_and_ppo_loss():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config).double()
    prompts, responses, attention, response_mask, rewards, uids = verl_batch()

    # Driver side: verl's compute_advantage with the registered estimator.
    proto = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": response_mask}, non_tensors={"uid": uids}
    )
    proto = compute_advantage(proto, adv_estimator="duca_hian", config=AlgoConfig(adv_estimator="duca_hian"))
    advantages = proto.batch["advantages"].double()
    assert advantages[response_mask == 0].eq(0).all() and advantages.abs().sum() > 0

    with torch.no_grad():
        old = flat_logprobs(model, prompts, responses, attention)
    # The policy moved a little since the rollout: ratios differ from 1 and some tokens clip.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))

    def worker_data():
        data = TensorDict(
            {
                "prompts": prompts,
                "responses": responses,
                "attention_mask": attention,
                "response_mask": response_mask,
                "advantages": advantages,
                "old_log_probs": torch.zeros(len(ROWS), RESPONSE, dtype=torch.float64),
            },
            batch_size=[len(ROWS)],
        )
        # Old log-probs in the padded response layout, as the worker stores them.
        for row in range(len(ROWS)):
            start = int(attention[:row].sum())
            length = int(attention[row].sum()) - PROMPT
            data["old_log_probs"][row, :length] = old[start + PROMPT - 1 : start + PROMPT - 1 + length]
        tu.assign_non_tensor(
            data, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=len(ROWS)
        )
        return data

    results = {}
    for mode in ("vanilla", "duca_fused"):
        actor = actor_config(policy_loss={"loss_mode": mode}, loss_agg_mode="token-mean")
        model.zero_grad()
        log_probs = flat_logprobs(model, prompts, responses, attention)
        loss, metrics = ppo_loss(actor, {"log_probs": log_probs}, worker_data())
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results[mode] = (loss.detach(), grads, metrics)

    (ref_loss, ref_grads, ref_metrics), (loss, grads, metrics) = results["vanilla"], results["duca_fused"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-8, atol=1e-12)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert metrics[key].values == pytest.approx(ref_metrics[key].values, abs=1e-9), key
    assert metrics["actor/pg_clipfrac"].values[0] > 0  # some tokens clip: the clip path is exercised
    assert sum(g.abs().sum() for g in grads) > 0

    # The optimizer step the engine would take moves the policy.
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
