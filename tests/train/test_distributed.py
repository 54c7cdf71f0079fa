"""Two gloo ranks under torchrun (FSDP2) against one process, and resuming their checkpoint on one rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def overrides(run_dir: Path, cache: Path, steps: int) -> list[str]:
    return [
        "model.path=tiny",
        f"model.cache_dir={cache}",
        "model.lora_rank=4",
        "rollout.engine=hf",
        "rollout.groups_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=8",
        "env.max_turns=2",
        "env.num_scenarios=8",
        "optim.lr=1e-2",
        "eval_before_after=false",
        "checkpoint_every=1",
        f"steps={steps}",
        f"run_dir={run_dir}",
        "progress=false",
    ]


def launch(args: list[str], ranks: int = 1, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if ranks == 1:
        command = [sys.executable, "-m", "duca_fast.cli", *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "duca_fast.cli",
            *args,
        ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Trainable weights of a checkpoint, whichever format (safetensors or torch.distributed.checkpoint)."""
    if (checkpoint / "trainable.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(checkpoint / "trainable.safetensors"))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint / "sharded"), str(target))
    return torch.load(target, weights_only=False)["model"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dist_cache")


def test_two_ranks_match_one_and_resume_on_one(tmp_path, cache_dir):
    single, double = tmp_path / "single", tmp_path / "double"
    result = launch(["train", "--config", "configs/demo.yaml", *overrides(single, cache_dir, steps=3)])
    assert result.returncode == 0, result.stderr[-3000:]
    result = launch(
        ["train", "--config", "configs/demo.yaml", *overrides(double, cache_dir, steps=2)], ranks=2
    )
    assert result.returncode == 0, result.stderr[-3000:]

    one, two = metrics(single), metrics(double)
    for a, b in zip(one[:2], two):
        # Same sessions (seeded per session, not per rank), same global statistics and loss.
        for key in (
            "task/conversion_rate",
            "reward/turn/compliance",
            "advantage/fused/std",
            "train/loss_tokens",
        ):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss/total"] == pytest.approx(b["loss/total"], abs=1e-5)
    assert (double / "checkpoints" / "step_2" / "sharded").is_dir()
    w_one = adapter_weights(single / "checkpoints" / "step_2")
    w_two = adapter_weights(double / "checkpoints" / "step_2")
    # The sharded checkpoint also carries the tied lm_head (frozen, unchanged); all adapters are in both.
    assert set(w_one) <= set(w_two) and all("lora_" in name for name in w_one)
    # Adam divides by sqrt(v): where a gradient entry is a near-cancelling sum, the ranks' summation order
    # can move the weight by a visible share of one lr=1e-2 step (4e-6, 3.3e-5, 1.1e-4 measured on three
    # runs); the statistics and gradient norms above are the tight comparison, this one catches a wrong or
    # missing update (which moves weights by ~lr).
    for name in w_one:
        torch.testing.assert_close(w_two[name], w_one[name], rtol=1e-4, atol=1e-3)

    # The world-size-2 checkpoint resumes at world size 1 and continues like the single-rank run.
    result = launch(
        ["train", "--config", "configs/demo.yaml", "--resume", *overrides(double, cache_dir, steps=3)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = metrics(double)[-1]
    assert resumed["step"] == 3
    assert resumed["grad_norm"] == pytest.approx(one[2]["grad_norm"], rel=1e-3)
    assert resumed["task/conversion_rate"] == one[2]["task/conversion_rate"]


def test_carried_groups_are_split_over_the_ranks_and_resume_on_one(tmp_path, cache_dir):
    """rollout.carry_over on 2 ranks: each rank starts 2 groups, trains the first complete one and carries
    the other; the checkpoint holds both ranks' carried groups, and one process resuming it takes both."""
    run_dir = tmp_path / "carry"
    carry = ["rollout.oversample_groups=2", "rollout.driver=async", "rollout.carry_over=true"]
    args = ["train", "--config", "configs/demo.yaml", *carry]
    result = launch([*args, *overrides(run_dir, cache_dir, steps=2)], ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(run_dir)
    assert [row["rollout/carried_sessions"] for row in rows] == [4.0, 4.0]  # 2 ranks x 1 group x 2 sessions
    assert [row["rollout/resumed_sessions"] for row in rows] == [0.0, 4.0]
    cursor = json.loads((run_dir / "checkpoints" / "step_2" / "cursor.json").read_text())
    assert cursor["scenario_position"] == 6 and len(cursor["carried"]) == 2  # 4 drawn at step 1, 2 at step 2

    result = launch([*args, "--resume", *overrides(run_dir, cache_dir, steps=3)])
    assert result.returncode == 0, result.stderr[-3000:]
    last = metrics(run_dir)[-1]
    assert last["step"] == 3
    assert last["rollout/resumed_sessions"] == 4.0 and last["rollout/carried_sessions"] == 4.0
    cursor = json.loads((run_dir / "checkpoints" / "step_3" / "cursor.json").read_text())
    assert cursor["scenario_position"] == 8 and len(cursor["carried"]) == 2


def test_world_size_must_divide_the_groups(tmp_path, cache_dir):
    args = [
        "train",
        "--config",
        "configs/demo.yaml",
        *overrides(tmp_path / "odd", cache_dir, steps=1),
        "rollout.groups_per_step=3",
    ]
    result = launch(args, ranks=2)
    assert result.returncode != 0
    assert "not divisible by the world size 2" in result.stderr


DYING_RANK = """
import os
from duca_fast.train.distributed import DistributedError, all_gather_objects, init_distributed
ctx = init_distributed(timeout_s=20)
if ctx.rank == 1:
    os._exit(3)  # dies without a word, as a crashed or OOM-killed rank would
try:
    all_gather_objects(ctx, "still here")
except DistributedError as error:
    print(error, flush=True)
    os._exit(7)  # as the CLI does: interpreter teardown can abort on a broken process group
"""


def test_a_dying_rank_gives_the_others_a_clear_error_not_a_hang():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", DYING_RANK],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out, _ = processes[0].communicate(timeout=120)
    processes[1].communicate(timeout=30)  # also closes its pipes
    assert processes[1].returncode == 3
    assert processes[0].returncode == 7, out
    assert "another rank probably died or hung" in out


def test_ranks_with_different_configs_refuse_to_start(monkeypatch):
    from duca_fast.train import distributed

    ctx = distributed.DistContext(rank=0, world_size=3)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda ctx, value: [value, value, "0123456789ab"])
    with pytest.raises(distributed.DistributedError, match=r"ranks \[2\] run a different config"):
        distributed.check_same_config(ctx, "steps: 10\n")
    monkeypatch.setattr(distributed, "all_gather_objects", lambda ctx, value: [value] * 3)
    distributed.check_same_config(ctx, "steps: 10\n")


def test_ranks_run_as_many_micro_batches_as_the_busiest_rank(monkeypatch):
    from duca_fast.train.distributed import DistContext
    from duca_fast.train.tasks import sales
    from duca_fast.train.tasks.sales import MicroBatch, SalesTask

    chunks = [MicroBatch(slice(0, 10), 1), MicroBatch(slice(10, 30), 2)]
    fake = SalesTask.__new__(SalesTask)  # only the rank bookkeeping of _pad_for_ranks is exercised
    fake.dist = DistContext(rank=1, world_size=3)
    monkeypatch.setattr(sales, "all_gather_objects", lambda ctx, value: [4, value, 1])
    passes = fake._pad_for_ranks(chunks)
    # Two real passes, then the first micro-batch twice more with its loss masked out.
    assert passes == [(chunks[0], False), (chunks[1], False), (chunks[0], True), (chunks[0], True)]
    with pytest.raises(RuntimeError, match="every session of this rank failed"):
        fake._pad_for_ranks([])
    fake.dist = DistContext()
    assert fake._pad_for_ranks(chunks) == [(chunks[0], False), (chunks[1], False)]
