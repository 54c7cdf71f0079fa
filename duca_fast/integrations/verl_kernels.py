"""verl's ``use_fused_kernels`` path on duca_fast's ``token_logprobs``: ``impl_backend: duca``.

verl 0.9.1 swaps a model's forward for a fused one when ``actor_rollout_ref.model.use_fused_kernels=True``
(``verl.models.transformers.monkey_patch.patch_forward_with_backends``; backends "torch", "liger",
"triton"): the forward returns per-token ``log_probs`` and ``entropy`` from the last hidden states and
the LM head without ``[tokens, vocab]`` logits. None of its backends gives the per-token sum of squared
probabilities, so verl's FSDP engine refuses ``calculate_sum_pi_squared`` (what its optimal-token-baseline
estimators need) with fused kernels (``FSDPEngineWithLMHead.prepare_model_outputs``).

Importing this module (``duca_fast.integrations.verl`` does) adds a fourth backend,
``actor_rollout_ref.model.fused_kernel_options.impl_backend=duca``: the forward runs verl's own
``forward_base_model``, then ``ops.token_logprobs(..., return_entropy=True, return_sum_p2=True)`` (our
Triton kernels on CUDA, the chunked torch path elsewhere), and puts ``sum_pi_squared`` on the output; the
FSDP engine's ``prepare_model_outputs`` is wrapped so that, for this backend only, it lays
``sum_pi_squared`` out as it lays out ``log_probs`` instead of refusing. Text models of verl's generic
forward only (its VL models have their own forwards: refused by name).
"""

from __future__ import annotations

import functools

import torch

from duca_fast import ops

BACKEND = "duca"
# verl 0.9.1 models with their own fused forwards (monkey_patch.patch_forward_with_backends).
_OWN_FORWARDS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe")


def forward_with_duca_backend(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    cache_position=None,
    logits_to_keep=0,
    temperature=1.0,
    shift_labels=None,
    **loss_kwargs,
):
    """verl's fused forward contract (``CausalLMOutputForPPO`` with ``log_probs``, ``entropy``) plus
    ``sum_pi_squared``, all ``[batch, seq]`` float32, the labels rolled as verl rolls them."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    if not return_dict:
        raise NotImplementedError("the duca fused-kernel forward has to return_dict (as verl's own)")
    outputs = forward_base_model(
        self,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        cache_position=cache_position,
    )
    hidden = outputs[0]
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("the duca fused-kernel forward needs labels, shift_labels or input_ids")
    head = self.lm_head
    if torch.is_tensor(temperature):
        temperature = float(temperature.reshape(-1)[0])
    logprobs, entropy, sum_p2 = ops.token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        rolled.reshape(-1).long(),
        temperature=float(temperature),
        bias=head.bias,
        return_entropy=True,
        return_sum_p2=True,
    )
    shape = hidden.shape[:-1]
    result = CausalLMOutputForPPO(
        log_probs=logprobs.view(shape),
        entropy=entropy.view(shape),
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )
    result.sum_pi_squared = sum_p2.view(shape)
    return result


def use_duca_backend(model: torch.nn.Module) -> None:
    """What ``patch_forward_with_backends(model, True, "duca")`` does: the model's class forward."""
    model_type = model.config.model_type
    if model_type in _OWN_FORWARDS:
        raise ValueError(
            f"impl_backend=duca covers verl's generic text forward; {model_type!r} has its own fused forward "
            "in verl (use impl_backend torch or triton for it)"
        )
    model._verl_fused_kernels_backend = BACKEND
    model.__class__.forward = forward_with_duca_backend


def _patch_backend_choice() -> None:
    from verl.models.transformers import monkey_patch

    original = monkey_patch.patch_forward_with_backends
    if getattr(original, "_duca", False):
        return

    @functools.wraps(original)
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if use_fused_kernels and fused_kernels_backend == BACKEND:
            use_duca_backend(model)
            print(f"Using duca_fast backend for fused kernels in {model.__class__.__name__}")
            return
        return original(
            model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend
        )

    patch_forward_with_backends._duca = True
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


def _patch_engine_outputs() -> None:
    try:
        from verl.utils import tensordict_utils as tu
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    except ImportError:  # pragma: no cover - engines that cannot import here are not patched
        return
    original = FSDPEngineWithLMHead.prepare_model_outputs
    if getattr(original, "_duca", False):
        return

    @functools.wraps(original)
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        def flag(key: str, default=False):
            return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)

        ours = getattr(output, "sum_pi_squared", None)
        if not (flag("calculate_sum_pi_squared") and flag("use_fused_kernels") and ours is not None):
            return original(self, output, output_args, micro_batch, logits_processor_func)
        # verl refuses sum_pi_squared with fused kernels: run it without, then lay ours out like log_probs.
        tu.assign_non_tensor(micro_batch, calculate_sum_pi_squared=False)
        try:
            model_output = original(self, output, output_args, micro_batch, logits_processor_func)
        finally:
            tu.assign_non_tensor(micro_batch, calculate_sum_pi_squared=True)
        cu_seqlens = micro_batch["input_ids"].offsets()
        if flag("use_remove_padding", True):
            packed = self._gather_and_unpad_packed(ours.squeeze(0), output_args["pad_size"])
        else:
            lengths = cu_seqlens.diff()
            columns = torch.arange(ours.shape[1], device=ours.device)
            packed = ours[columns < lengths.unsqueeze(1)]
        model_output["sum_pi_squared"] = torch.nested.nested_tensor_from_jagged(packed, cu_seqlens)
        return model_output

    prepare_model_outputs._duca = True
    FSDPEngineWithLMHead.prepare_model_outputs = prepare_model_outputs


def install() -> None:
    """Register ``impl_backend: duca`` with verl (idempotent)."""
    _patch_backend_choice()
    _patch_engine_outputs()
