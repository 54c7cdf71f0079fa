"""Checkpoints under real faults: full disks, corrupt files, foreign runs, concurrent readers, dead writers.

Every case works on real files (a real tmpfs or a real file-size limit, real truncation and flipped
bytes, real writer subprocesses); nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from duca_fast.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from duca_fast.train.rundir import claim_run_dir, current_process

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096


def tiny(width: int = 8, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(width, width)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def save(run_dir: Path, step: int, model, optimizer, **kwargs) -> Path:
    kwargs.setdefault("keep", 5)
    return save_checkpoint(
        run_dir, step, model=model, optimizer=optimizer, scheduler=None, data_cursor={"pos": step}, **kwargs
    )


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def two_checkpoints(run_dir: Path) -> tuple[dict, dict]:
    """step_1 and step_2 of one run, with different weights; returns both parameter sets."""
    model, optimizer = tiny()
    save(run_dir, 1, model, optimizer)
    first = params(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    save(run_dir, 2, model, optimizer)
    return first, params(model)


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".tmp-*"))


def python(script: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, **popen
    )


# ---------------------------------------------------------------------------------------------- manifest


def test_the_manifest_lists_every_file_with_size_and_sha256_and_the_run(tmp_path):
    run_id = claim_run_dir(tmp_path, resume=False, overwrite=False)
    model, optimizer = tiny()
    path = save(
        tmp_path, 3, model, optimizer, export=lambda out: (out.mkdir(), (out / "w.txt").write_text("x"))
    )
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["run_id"] == run_id and manifest["step"] == 3
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in on_disk if f != MANIFEST]
    assert manifest["files"]["model/w.txt"]["size"] == 1
    assert verify_checkpoint(path, run_id=run_id) == manifest
    assert leftovers(tmp_path) == []


def flip_last_tensor_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    header = int.from_bytes(data[:8], "little")
    assert len(data) > 8 + header, "the file has tensor data after its header"
    data[-1] ^= 0x40  # the high byte of the last float32: its value changes, the file stays well-formed
    file.write_bytes(bytes(data))


def truncate_half(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "truncated safetensors": ("trainable.safetensors", truncate_half, "has .* bytes, the manifest says"),
    "half a trainer state": ("trainer_state.safetensors", truncate_half, "has .* bytes, the manifest says"),
    "missing cursor.json": ("cursor.json", Path.unlink, "is missing"),
    "flipped byte in tensor data": ("trainable.safetensors", flip_last_tensor_byte, "SHA-256 differs"),
    "missing manifest": (MANIFEST, Path.unlink, "no manifest.json"),
    "garbled manifest": (MANIFEST, lambda f: f.write_text('{"files": 3'), "manifest.json is unreadable"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupt_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, caplog, case):
    name, corrupt, reason = CORRUPTIONS[case]
    first, _ = two_checkpoints(tmp_path)
    corrupt(tmp_path / "checkpoints" / "step_2" / name)

    with caplog.at_level(logging.WARNING, logger="duca_fast.train.checkpoint"):
        found = latest_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints" / "step_1"
    skipped = [m for m in caplog.messages if m.startswith("skipping checkpoint") and "step_2: " in m]
    assert len(skipped) == 1 and name in skipped[0] and re.search(reason, skipped[0]), caplog.messages
    assert any("using checkpoint" in m and "step_1" in m for m in caplog.messages)

    model, optimizer = tiny(seed=7)
    with pytest.raises(CheckpointError, match=f"step_2.*{reason}"):
        load_checkpoint(tmp_path / "checkpoints" / "step_2", model, optimizer)
    assert all(not torch.equal(v, first[k]) for k, v in params(model).items()), "nothing was restored"
    assert load_checkpoint(found, model, optimizer) == {"step": 1, "pos": 1}
    assert all(torch.equal(v, first[k]) for k, v in params(model).items())


def test_a_flipped_byte_loads_silently_without_verification(tmp_path):
    """The failure the manifest exists for: safetensors itself accepts the changed value."""
    _, second = two_checkpoints(tmp_path)
    flip_last_tensor_byte(tmp_path / "checkpoints" / "step_2" / "trainable.safetensors")
    model, optimizer = tiny(seed=7)
    load_checkpoint(tmp_path / "checkpoints" / "step_2", model, optimizer, verify=False)
    changed = {k: int((v != second[k]).sum()) for k, v in params(model).items()}
    assert sorted(changed.values()) == [0, 1], f"one value changed and nothing noticed: {changed}"


@pytest.mark.parametrize(
    "name,corrupt",
    [
        ("trainer_state.safetensors", truncate_half),
        ("cursor.json", Path.unlink),
        ("trainable.safetensors", truncate_half),
    ],
)
def test_unverified_reads_still_name_the_file(tmp_path, name, corrupt):
    # Before: half a (pickled) trainer_state.pt gave "OSError: [Errno 22] Invalid argument" naming no file.
    two_checkpoints(tmp_path)
    corrupt(tmp_path / "checkpoints" / "step_2" / name)
    model, optimizer = tiny()
    with pytest.raises(CheckpointError, match=rf"step_2: cannot read {name}"):
        load_checkpoint(tmp_path / "checkpoints" / "step_2", model, optimizer, verify=False)


def test_no_checkpoint_verifies(tmp_path, caplog):
    two_checkpoints(tmp_path)
    for step in (1, 2):
        (tmp_path / "checkpoints" / f"step_{step}" / "cursor.json").unlink()
    with caplog.at_level(logging.WARNING, logger="duca_fast.train.checkpoint"):
        assert latest_checkpoint(tmp_path) is None
    assert "no checkpoint under" in caplog.messages[-1] and "step_2, step_1" in caplog.messages[-1]


# ------------------------------------------------------------------------------------------------- runs


def test_latest_never_returns_another_runs_checkpoint(tmp_path, caplog):
    run_id = claim_run_dir(tmp_path, resume=False, overwrite=False)
    model, optimizer = tiny()
    save(tmp_path, 1, model, optimizer)
    # A checkpoint of another run copied (or left) into this run's directory, at a later step.
    save(tmp_path / "other", 5, model, optimizer, run_id="someone-else")
    shutil.copytree(tmp_path / "other" / "checkpoints" / "step_5", tmp_path / "checkpoints" / "step_5")
    with caplog.at_level(logging.WARNING, logger="duca_fast.train.checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_1"
    assert any(f"belongs to run someone-else, not to this run ({run_id})" in m for m in caplog.messages)
    assert latest_checkpoint(tmp_path, run_id="someone-else") == tmp_path / "checkpoints" / "step_5"
    with pytest.raises(CheckpointError, match="belongs to run someone-else"):
        load_checkpoint(tmp_path / "checkpoints" / "step_5", model, optimizer, run_id=run_id)


def test_a_resumed_run_replaces_the_abandoned_later_checkpoints(tmp_path):
    # Before: pruning kept the later steps of the abandoned timeline and deleted the new ones.
    model, optimizer = tiny()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, optimizer, keep=3)
    save(tmp_path, 3, model, optimizer, keep=3)  # resumed from step 2 (say step 3 and 4 were corrupt)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_3"]
    save(tmp_path, 4, model, optimizer, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_4"]


def test_keep_must_be_positive(tmp_path):
    model, optimizer = tiny()
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        save(tmp_path, 1, model, optimizer, keep=0)


# ------------------------------------------------------------------------- temporary directories, writers

BLOCKED_WRITER = """
import sys, time
from pathlib import Path
import torch
from duca_fast.train.checkpoint import save_checkpoint
run_dir, signal_file, go_file = map(Path, sys.argv[1:4])
torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
optimizer = torch.optim.AdamW(model.parameters())

def export(path):
    # Stops mid-save, after the weights and trainer state are written, until told to go on.
    signal_file.write_text("writing")
    while not go_file.exists():
        time.sleep(0.01)
    path.mkdir()
    (path / "exported.txt").write_text("done")

save_checkpoint(run_dir, 2, model=model, optimizer=optimizer, scheduler=None, data_cursor={}, keep=2,
                export=export)
print("saved", flush=True)
"""


def blocked_writer(run_dir: Path) -> tuple[subprocess.Popen, Path]:
    signal_file, go_file = run_dir.parent / "in-export", run_dir.parent / "go"
    writer = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_WRITER, str(run_dir), str(signal_file), str(go_file)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not signal_file.exists():
        assert writer.poll() is None, writer.communicate()
        assert time.time() < deadline, "the writer never reached the middle of its save"
        time.sleep(0.01)
    return writer, go_file


def test_a_reader_during_a_live_save_does_not_break_it(tmp_path):
    # Before: latest_checkpoint() (e.g. `eval --checkpoint latest`) deleted the live writer's temp dir
    # and the training run died with "SafetensorError: No such file or directory".
    run_dir = tmp_path / "run"
    model, optimizer = tiny(64)
    save(run_dir, 1, model, optimizer)
    writer, go_file = blocked_writer(run_dir)
    try:
        (temp,) = leftovers(run_dir)
        assert temp.startswith(".tmp-step_2-") and temp.endswith(f"-{writer.pid}-" + temp.split("-")[-1])
        for _ in range(3):
            assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_1"
            assert [p.name for p in list_checkpoints(run_dir)] == ["step_1"]
        assert leftovers(run_dir) == [temp], "the live writer's directory was left alone"
        go_file.write_text("go")
        out, err = writer.communicate(timeout=120)
    finally:
        writer.kill()
    assert writer.returncode == 0 and "saved" in out, err
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_2"
    assert (run_dir / "checkpoints" / "step_2" / "model" / "exported.txt").read_text() == "done"
    assert leftovers(run_dir) == []


def test_readers_hammering_a_writer_that_saves_many_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    writer = python(
        "import time, torch\n"
        "from duca_fast.train.checkpoint import save_checkpoint\n"
        "model = torch.nn.Linear(256, 256); optimizer = torch.optim.AdamW(model.parameters())\n"
        "for step in range(1, 31):\n"
        f"    save_checkpoint({str(run_dir)!r}, step, model=model, optimizer=optimizer, scheduler=None,\n"
        "                    data_cursor={}, keep=2)\n"
        "    time.sleep(0.05)  # lets a starved reader see several steps on a busy machine\n",
        stderr=subprocess.PIPE,
        text=True,
    )
    answers = []
    while writer.poll() is None:
        found = latest_checkpoint(run_dir)
        answers.append(found.name if found is not None else None)
    assert writer.returncode == 0, writer.stderr.read()
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_30"
    first = next(i for i, name in enumerate(answers) if name is not None)
    assert None not in answers[first:], "once a checkpoint exists, a reader always finds one"
    steps = [int(name.removeprefix("step_")) for name in answers[first:]]
    assert steps == sorted(steps), "readers never go back in time"
    assert len(set(steps)) >= 3, f"the reader ran while the writer saved: {sorted(set(steps))}"


def test_a_killed_writers_leftover_is_removed_and_the_previous_checkpoint_used(tmp_path):
    run_dir = tmp_path / "run"
    model, optimizer = tiny(64)
    save(run_dir, 1, model, optimizer)
    writer, _ = blocked_writer(run_dir)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert len(leftovers(run_dir)) == 1
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_1"
    assert leftovers(run_dir) == []


def test_leftovers_of_live_or_unknown_writers_are_kept(tmp_path, caplog):
    model, optimizer = tiny()
    save(tmp_path, 1, model, optimizer)
    me = current_process()
    live = tmp_path / "checkpoints" / f".tmp-step_2-{me.host}-{me.pid}-{me.start}"
    remote = tmp_path / "checkpoints" / f".tmp-step_2-elsewhere-{me.pid}-{me.start}"
    legacy = tmp_path / "checkpoints" / ".tmp-step_2"
    for path in (live, remote, legacy):
        path.mkdir()
    with caplog.at_level(logging.WARNING, logger="duca_fast.train.checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_1"
    assert live.is_dir() and remote.is_dir() and legacy.is_dir()
    assert any("leaving" in m and ".tmp-step_2 alone" in m for m in caplog.messages)


# ----------------------------------------------------------------------------------------- full disks


def one_line(error: CheckpointError) -> str:
    text = str(error)
    assert "\n" not in text
    return text


@pytest.fixture
def small_tmpfs():
    """A real 300 KiB file system (tmpfs); needs root and mount permission."""
    mount = Path(tempfile.mkdtemp(prefix="duca-tmpfs-"))
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        mount.rmdir()
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.strip()}); the file-size-limit tests cover it"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()


def pages(size: int) -> int:
    return math.ceil(size / PAGE)


WRITE_ORDER = [
    "trainable.safetensors",
    "trainer_state.safetensors",
    "trainer_state.json",
    "cursor.json",
    MANIFEST,
]


@pytest.mark.parametrize("failing", WRITE_ORDER)
def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path, small_tmpfs, failing):
    # Before: "SafetensorError ... No space left on device" traceback and a .tmp-step_* left behind.
    model, optimizer = tiny(128)  # 66 KB of weights: step_1 fits, step_2 does not
    reference = save(tmp_path / "reference", 2, model, optimizer)
    sizes = {f.name: f.stat().st_size for f in reference.iterdir()}
    room = sum(pages(sizes[name]) for name in WRITE_ORDER[: WRITE_ORDER.index(failing)]) * PAGE

    run_dir = small_tmpfs / "run"
    save(run_dir, 1, model, optimizer)
    stat = os.statvfs(small_tmpfs)
    (small_tmpfs / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - room))
    with pytest.raises(CheckpointError) as caught:
        save(run_dir, 2, model, optimizer)
    message = one_line(caught.value)
    assert f"could not write checkpoint step_2 in {run_dir / 'checkpoints'}: {failing}:" in message
    assert "earlier checkpoints are intact" in message and "MiB free" in message
    assert "No space left on device" in message
    assert leftovers(run_dir) == []
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_1"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_1"]

    (small_tmpfs / "filler").unlink()
    assert save(run_dir, 2, model, optimizer) == latest_checkpoint(run_dir), "space freed: saving works again"


LIMITED_WRITER = """
import resource, signal, sys
import torch
from duca_fast.train.checkpoint import CheckpointError, save_checkpoint
run_dir, limit, blob = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

class Scheduler:
    def state_dict(self):
        return {"blob": torch.ones(blob)}

torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
kwargs = dict(model=model, optimizer=optimizer, scheduler=Scheduler(), data_cursor={}, keep=3)
save_checkpoint(run_dir, 1, **kwargs)
# From here on no file may grow past `limit` bytes: writes fail with EFBIG instead of killing us.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    save_checkpoint(run_dir, 2, **kwargs)
except CheckpointError as error:
    print(error)
    sys.exit(3)
"""


@pytest.mark.parametrize(
    "failing,blob,text",
    [("trainable.safetensors", 1, "File too large"), ("trainer_state.safetensors", 16384, "File too large")],
)
def test_a_write_past_the_file_size_limit_keeps_the_previous_checkpoint(tmp_path, failing, blob, text):
    """Works without root: RLIMIT_FSIZE makes the real write fail (safetensors' or torch.save's)."""
    run_dir = tmp_path / "run"
    limit = 8192 if failing == "trainable.safetensors" else 40000  # weights are 16.9 KB, the blob 64 KB
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_WRITER, str(run_dir), str(limit), str(blob)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    (line,) = result.stdout.splitlines()
    assert f"step_2 in {run_dir / 'checkpoints'}: {failing}: " in line and text in line
    assert "earlier checkpoints are intact" in line
    assert leftovers(run_dir) == []
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_1"
    weights = load_file(str(run_dir / "checkpoints" / "step_1" / "trainable.safetensors"))
    assert weights["weight"].shape == (64, 64)


SHARDED_WRITER = """
import resource, signal, sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from duca_fast.train.checkpoint import CheckpointError, save_checkpoint

run_dir, failing_rank = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
kwargs = dict(model=model, optimizer=torch.optim.AdamW(model.parameters()), scheduler=None, data_cursor={},
              keep=3, sharded=True)
save_checkpoint(run_dir, 1, **kwargs)
if dist.get_rank() == failing_rank:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

def say(text):  # one write of the whole line: the two ranks share the pipe (PIPE_BUF keeps it whole)
    sys.stdout.buffer.write((text + "\\n").encode())
    sys.stdout.buffer.flush()

try:
    save_checkpoint(run_dir, 2, **kwargs)
    say(f"rank {dist.get_rank()} saved")
except CheckpointError as error:
    say(f"rank {dist.get_rank()}: {error}")
dist.barrier()  # gloo may abort a rank whose peer tears down first
dist.destroy_process_group()
"""


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_a_write_error_on_one_rank_of_a_sharded_save_reaches_every_rank(tmp_path):
    """FSDP2 on two gloo ranks; only rank 1's shard (torch.distributed.checkpoint) hits the size limit."""
    script = tmp_path / "writer.py"
    script.write_text(SHARDED_WRITER)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [*TORCHRUN, str(script), str(run_dir), "1"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[:8000]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, result.stdout
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank {rank}: could not write checkpoint step_2") and "sharded/: " in line
        assert "File too large" in line and "earlier checkpoints are intact" in line
    assert leftovers(run_dir) == []
    found = latest_checkpoint(run_dir)
    assert found == run_dir / "checkpoints" / "step_1"
    listed = json.loads((found / MANIFEST).read_text())["files"]
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(listed)


def test_an_error_that_is_not_a_write_error_still_leaves_no_partial_directory(tmp_path):
    model, optimizer = tiny()
    save(tmp_path, 1, model, optimizer)

    def broken_export(path):
        raise KeyError("adapter_config")

    with pytest.raises(KeyError, match="adapter_config"):
        save(tmp_path, 2, model, optimizer, export=broken_export)
    assert leftovers(tmp_path) == []
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_1"
