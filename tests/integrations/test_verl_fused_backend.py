"""verl's ``use_fused_kernels`` path with ``impl_backend=duca``: log-probs and entropy equal verl's own
torch backend (values and parameter gradients), ``sum_pi_squared`` equals float64 from full logits, verl's
backend choice selects it, and verl's FSDP engine lays ``sum_pi_squared`` out instead of refusing it."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("verl")

from tensordict import TensorDict
from transformers import LlamaConfig, LlamaForCausalLM
from verl.models.transformers import monkey_patch
from verl.models.transformers.dense_common import forward_with_torch_backend
from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

import duca_fast.integrations.verl  # noqa: F401  (installs the backend)
from duca_fast.integrations import verl_kernels

VOCAB, TEMPERATURE = 96, 0.7


def tiny_llama():
    """A Llama of its own subclass: the backend patches the class forward, which must not leak."""

    class TinyLlama(LlamaForCausalLM):
        pass

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return TinyLlama(config)


def packed_inputs():
    """One packed row of three sequences, as verl's remove-padding path feeds the model."""
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 7, 4]
    input_ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return input_ids, position_ids, lengths


def run(forward, model, input_ids, position_ids):
    model.zero_grad(set_to_none=True)
    output = forward(
        model, input_ids=input_ids, position_ids=position_ids, temperature=TEMPERATURE, return_dict=True
    )
    weights = torch.linspace(-1.0, 1.0, output.log_probs.numel()).view_as(output.log_probs)
    ((output.log_probs * weights).sum() + 0.3 * (output.entropy * weights.flip(-1)).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


def test_log_probs_entropy_and_gradients_equal_verls_torch_backend():
    model = tiny_llama()
    input_ids, position_ids, _ = packed_inputs()
    expected, expected_grads = run(forward_with_torch_backend, model, input_ids, position_ids)
    ours, grads = run(verl_kernels.forward_with_duca_backend, model, input_ids, position_ids)
    torch.testing.assert_close(ours.log_probs, expected.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.entropy, expected.entropy, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sum_pi_squared_equals_float64_from_full_logits():
    model = tiny_llama()
    input_ids, position_ids, _ = packed_inputs()
    with torch.no_grad():
        ours = verl_kernels.forward_with_duca_backend(
            model, input_ids=input_ids, position_ids=position_ids, temperature=TEMPERATURE, return_dict=True
        )
        hidden = model.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        probs = (model.lm_head(hidden).double() / TEMPERATURE).softmax(-1)
    torch.testing.assert_close(ours.sum_pi_squared.double(), (probs**2).sum(-1), rtol=1e-5, atol=1e-7)
    assert ours.sum_pi_squared.shape == ours.log_probs.shape


def test_verls_backend_choice_selects_duca_and_leaves_the_others():
    model = tiny_llama()
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="duca")
    assert type(model).forward is verl_kernels.forward_with_duca_backend
    assert model._verl_fused_kernels_backend == "duca"
    other = tiny_llama()
    monkey_patch.patch_forward_with_backends(other, use_fused_kernels=True, fused_kernels_backend="torch")
    assert type(other).forward is not verl_kernels.forward_with_duca_backend
    vl = types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen2_vl"))
    with pytest.raises(ValueError, match="qwen2_vl"):
        verl_kernels.use_duca_backend(vl)


def test_fsdp_engine_lays_out_sum_pi_squared_for_the_duca_backend():
    """verl's own ``prepare_model_outputs`` (remove-padding layout, no sequence parallelism) on an engine
    stub: log_probs as verl lays them out, and sum_pi_squared the same way instead of an error."""
    model = tiny_llama()
    input_ids, position_ids, lengths = packed_inputs()
    with torch.no_grad():
        output = verl_kernels.forward_with_duca_backend(
            model, input_ids=input_ids, position_ids=position_ids, temperature=TEMPERATURE, return_dict=True
        )
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    nested = torch.nested.nested_tensor_from_jagged(input_ids[0], offsets)
    micro_batch = TensorDict({"input_ids": nested}, batch_size=[len(lengths)])
    tu.assign_non_tensor(
        micro_batch,
        use_remove_padding=True,
        use_fused_kernels=True,
        calculate_entropy=True,
        calculate_sum_pi_squared=True,
    )
    engine = types.SimpleNamespace(use_ulysses_sp=False)
    engine._gather_and_unpad_packed = types.MethodType(FSDPEngineWithLMHead._gather_and_unpad_packed, engine)
    output_args = {"input_ids_rmpad_rolled": input_ids[0], "temperature_rmpad": None, "pad_size": 0}
    result = FSDPEngineWithLMHead.prepare_model_outputs(engine, output, output_args, micro_batch, None)
    assert torch.equal(result["log_probs"].values(), output.log_probs[0])
    assert torch.equal(result["sum_pi_squared"].values(), output.sum_pi_squared[0])
    assert torch.equal(result["sum_pi_squared"].offsets(), offsets)
    assert tu.get_non_tensor_data(micro_batch, "calculate_sum_pi_squared", None) is True
    # Any other fused backend (no sum_pi_squared on its output) still gets verl's refusal.
    del output.sum_pi_squared
    with pytest.raises(NotImplementedError, match="sum_pi_squared"):
        FSDPEngineWithLMHead.prepare_model_outputs(engine, output, output_args, micro_batch, None)
