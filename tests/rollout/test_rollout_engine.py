import sys

import pytest
import torch

from duca_fast.rollout import HFEngine, SamplingConfig, VLLMEngine, trainer_logprobs

GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)


def _prompts(tokenizer):
    chats = [
        [{"role": "user", "content": "Hi, what tea do you have?"}],
        [{"role": "user", "content": "Price?"}],
    ]
    return [
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        for chat in chats
    ]


def test_vllm_generate_returns_sampler_logprobs(engine, tokenizer, trainer_model):
    prompts = _prompts(tokenizer)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7)
    first = engine.generate(prompts, sampling, seeds=[1, 2])
    again = engine.generate(prompts, sampling, seeds=[1, 2])
    assert first == again
    for prompt, completion in zip(prompts, first, strict=True):
        assert len(completion.token_ids) == len(completion.logprobs) == 6
        assert completion.finish_reason == "length"
        ours = trainer_logprobs(trainer_model, prompt, completion.token_ids, temperature=0.7)
        assert torch.allclose(ours, torch.tensor(completion.logprobs), atol=1e-3)


def test_vllm_per_request_token_limits(engine, tokenizer):
    completions = engine.generate(_prompts(tokenizer), GREEDY, max_new_tokens=[2, 5])
    assert [len(c.token_ids) for c in completions] == [2, 5]


def test_prompt_longer_than_engine_raises_naming_request(engine):
    ok = [1, 2, 3]
    too_long = [5] * engine.max_model_len
    with pytest.raises(ValueError, match="request 1 has 512 prompt tokens"):
        engine.generate([ok, too_long], GREEDY)
    assert engine.generate([ok], GREEDY)[0].token_ids


def test_hf_backend_matches_vllm_greedy_and_trainer_logprobs(
    engine, tiny_model_dir, tokenizer, trainer_model
):
    hf = HFEngine(tiny_model_dir, max_model_len=512)
    prompts = _prompts(tokenizer)
    assert [c.token_ids for c in hf.generate(prompts, GREEDY)] == [
        c.token_ids for c in engine.generate(prompts, GREEDY)
    ]
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.8)
    first = hf.generate(prompts, sampling, seeds=[3, 4])
    assert first == hf.generate(prompts, sampling, seeds=[3, 4])
    for prompt, completion in zip(prompts, first, strict=True):
        ours = trainer_logprobs(trainer_model, prompt, completion.token_ids, temperature=0.8)
        assert torch.allclose(ours, torch.tensor(completion.logprobs), atol=1e-4)


def test_hf_engine_that_died_or_closed_raises(tiny_model_dir, monkeypatch):
    hf = HFEngine(tiny_model_dir, max_model_len=64)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(hf.model, "generate", broken)
    with pytest.raises(RuntimeError, match="failed while generating 1 requests"):
        hf.generate([[1, 2]], GREEDY)
    with pytest.raises(RuntimeError, match="is dead"):
        hf.generate([[1, 2]], GREEDY)
    closed = HFEngine(tiny_model_dir, max_model_len=64)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.generate([[1, 2]], GREEDY)


def test_missing_vllm_gives_install_hint(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'duca-fast\[cpu\]'"):
        VLLMEngine(tiny_model_dir)


def test_sleep_mode_needs_cuda(engine):
    with pytest.raises(RuntimeError, match="needs CUDA"):
        engine.sleep()
    with pytest.raises(RuntimeError, match="needs CUDA"):
        engine.wake_up(["weights"])
