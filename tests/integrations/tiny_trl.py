"""A tiny random Llama whose generations can be scripted, a chat tokenizer with a tool-capable template,
and GRPO arguments for CPU runs: shared by the TRL adapter tests (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

# Script: (row of the batch in the first generate call, decoded context) -> text to force (then EOS), or
# None to let the model sample freely.
Script = Callable[[int, str], str | None]


def chat_tokenizer():
    """SmolLM2's tokenizer (local GGUF) with TRL's Qwen2.5 chat template, which renders tool calls."""
    from trl.chat_template_utils import qwen2_5_chat_template

    from duca_fast.rollout.models import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template
    return tokenizer


class _ForceScript(LogitsProcessor):
    def __init__(self, tokenizer, script: Script):
        self.tokenizer, self.script = tokenizer, script
        self.start: int | None = None
        self.forced: list[list[int] | None] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
            for row, ids in enumerate(input_ids.tolist()):
                text = self.script(row, self.tokenizer.decode(ids))
                forced = None
                if text is not None:
                    forced = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                    forced.append(self.tokenizer.eos_token_id)
                self.forced.append(forced)
        position = input_ids.shape[1] - self.start
        for row, forced in enumerate(self.forced):
            if forced is not None and position < len(forced):
                scores[row] = float("-inf")
                scores[row, forced[position]] = 0.0
        return scores


class ScriptedLlama(LlamaForCausalLM):
    """A real Llama (its forward and gradients untouched) whose ``generate`` follows ``self.script``."""

    script: Script | None = None
    scripted_tokenizer = None

    def generate(self, *args, **kwargs):
        if self.script is not None:
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            processors.append(_ForceScript(self.scripted_tokenizer, self.script))
            kwargs["logits_processor"] = processors
        return super().generate(*args, **kwargs)


def tiny_model(tokenizer, script: Script | None = None, seed: int = 0) -> ScriptedLlama:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = ScriptedLlama(config)
    model.script, model.scripted_tokenizer = script, tokenizer
    return model


def grpo_args(tmp_path, **overrides):
    from trl import GRPOConfig

    fields = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    fields.update(overrides)
    return GRPOConfig(**fields)


class Recording:
    """Mixin recording every scored batch of a trainer (the dict the loss receives) in ``recorded``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded = []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.recorded.append(output)
        return output
