"""Loading a checkpoint never runs code from it (the trainer state is JSON + safetensors, not a pickle)."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

from duca_fast.train.checkpoint import (
    CheckpointError,
    _write_manifest,
    capture_rng,
    load_checkpoint,
    save_checkpoint,
)
from duca_fast.train.safe_state import (
    StateFormatError,
    decode_state,
    encode_state,
    safe_load_planner,
    safe_reader,
)
from tests.train.runs import cli

MARKER_NAME = "payload-ran"


class Payload:
    """What an attacker pickles: unpickling it creates a file (stands for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(checkpoint: Path, marker: Path) -> None:
    """Replace the trainer state by a pickle payload and recompute the manifest, as an attacker would."""
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (checkpoint / name).unlink()
    (checkpoint / "trainer_state.pt").write_bytes(pickle.dumps({"rng": Payload(marker)}))
    (checkpoint / "manifest.json").unlink()
    manifest = _manifest_fields(checkpoint)
    _write_manifest(checkpoint, **manifest)


def _manifest_fields(checkpoint: Path) -> dict:
    return {"run_id": None, "step": int(checkpoint.name.removeprefix("step_"))}


def tiny_training_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def test_the_trainer_state_round_trips_exactly_without_pickle():
    model, optimizer, scheduler = tiny_training_state()
    random.random(), np.random.rand(), torch.rand(1)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": capture_rng()}
    document, tensors = encode_state(state)
    back = decode_state(document, tensors)

    assert back["rng"]["python"] == random.getstate()  # tuples stay tuples (random.setstate needs them)
    numpy_back, numpy_now = back["rng"]["numpy"], np.random.get_state()
    assert numpy_back[0] == numpy_now[0] and numpy_back[1].dtype == numpy_now[1].dtype == np.uint32
    assert np.array_equal(numpy_back[1], numpy_now[1]) and numpy_back[2:] == numpy_now[2:]
    assert torch.equal(back["rng"]["torch"], torch.get_rng_state())
    assert back["scheduler"] == scheduler.state_dict()
    original = optimizer.state_dict()
    assert back["optimizer"]["param_groups"] == original["param_groups"]
    assert set(back["optimizer"]["state"]) == set(original["state"]) == {0, 1}  # int keys kept
    for index, entry in original["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["optimizer"]["state"][index][key], value), (index, key)
            assert back["optimizer"]["state"][index][key].dtype == value.dtype

    # And the restored optimizer takes the same next step as the original.
    fresh_model, fresh_optimizer, _ = tiny_training_state()
    fresh_optimizer.load_state_dict(back["optimizer"])
    inputs = torch.randn(5, 4)
    for net, opt in ((model, optimizer), (fresh_model, fresh_optimizer)):
        opt.zero_grad()
        net(inputs).square().sum().backward()
        opt.step()
    assert torch.equal(model.weight, fresh_model.weight)


@pytest.mark.parametrize(
    "document, message",
    [
        ({"format": 1, "state": {"__duca_state__": "global", "name": "os.system"}}, "unknown tag 'global'"),
        ({"format": 1, "state": {"__duca_state__": "tensor", "key": "t9"}}, "tensor 't9' is not in"),
        ({"format": 1, "state": {"__duca_state__": "ndarray", "key": "t0", "dtype": "|O"}}, "NumPy dtype"),
        ({"format": 2, "state": {}}, "format 1"),
    ],
)
def test_a_foreign_state_document_is_refused(document, message):
    with pytest.raises(StateFormatError, match=message):
        decode_state(document, {"t0": torch.zeros(2)})


def test_what_the_format_cannot_hold_is_named():
    with pytest.raises(TypeError, match=r"state\['rng'\]\[1\]: a set cannot be stored"):
        encode_state({"rng": [1, {2}]})


def save_tiny(run_dir: Path, step: int) -> Path:
    model, optimizer, scheduler = tiny_training_state()
    return save_checkpoint(
        run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, data_cursor={}, keep=5
    )


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    checkpoint = save_tiny(tmp_path / "run", 1)
    marker = tmp_path / MARKER_NAME
    plant_pickle(checkpoint, marker)
    model, optimizer, scheduler = tiny_training_state()
    with pytest.raises(CheckpointError, match=r"pickle .* --trust-checkpoint"):
        load_checkpoint(checkpoint, model, optimizer, scheduler)
    assert not marker.exists()
    # Only an explicit trust unpickles it (the user's own duca_fast 0.1 runs).
    with pytest.raises(CheckpointError):
        load_checkpoint(checkpoint, model, optimizer, scheduler, trust_pickle=True)
    assert marker.exists()


def test_a_legacy_checkpoint_loads_when_trusted(tmp_path):
    checkpoint = save_tiny(tmp_path / "run", 1)
    document_state = decode_state(
        json.loads((checkpoint / "trainer_state.json").read_text()),
        load_file(str(checkpoint / "trainer_state.safetensors")),
    )
    for name in ("trainer_state.json", "trainer_state.safetensors", "manifest.json"):
        (checkpoint / name).unlink()
    torch.save(document_state, checkpoint / "trainer_state.pt")
    _write_manifest(checkpoint, **_manifest_fields(checkpoint))
    model, optimizer, scheduler = tiny_training_state()
    with torch.no_grad():
        model.weight.zero_()
    load_checkpoint(checkpoint, model, optimizer, scheduler, trust_pickle=True)
    reference, _, _ = tiny_training_state()
    assert torch.equal(model.weight, reference.weight)
    assert scheduler.state_dict() == document_state["scheduler"]


def test_sharded_metadata_with_a_payload_is_refused(tmp_path):
    model, optimizer, _ = tiny_training_state()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    good = tmp_path / "good"
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(good))

    # The untampered checkpoint loads through the safe reader and planner (tensors and the param_groups'
    # non-tensor leaves alike).
    fresh, fresh_optimizer, _ = tiny_training_state()
    with torch.no_grad():
        fresh.weight.zero_()
    for group in fresh_optimizer.param_groups:
        group["lr"] = 0.0
    state_model, state_optim = get_state_dict(fresh, fresh_optimizer)
    state = {"model": state_model, "optim": state_optim}
    dcp.load(state, storage_reader=safe_reader(good), planner=safe_load_planner())
    assert torch.equal(state["model"]["weight"], model.weight)
    assert state["optim"]["param_groups"][0]["lr"] == optimizer.param_groups[0]["lr"]

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    marker = tmp_path / MARKER_NAME
    (bad / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointException, match=r"refers to pathlib\.\w*Path\.touch"):
        dcp.load(state, storage_reader=safe_reader(bad), planner=safe_load_planner())
    assert not marker.exists()


@pytest.mark.slow
def test_resume_and_eval_of_a_planted_pickle_print_one_line_and_run_nothing(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", "configs/acts.yaml", f"run_dir={run_dir}", "progress=false"]
    common.append("eval_before_after=false")
    trained = cli("train", *common, "steps=2", "checkpoint_every=1")
    assert trained.returncode == 0, trained.stderr[-2000:]
    step_2 = run_dir / "checkpoints" / "step_2"
    assert sorted(p.name for p in step_2.iterdir()) == [
        "cursor.json",
        "manifest.json",
        "trainable.safetensors",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    marker = tmp_path / MARKER_NAME
    run_id = json.loads((step_2 / "manifest.json").read_text())["run_id"]
    for name in ("trainer_state.json", "trainer_state.safetensors", "manifest.json"):
        (step_2 / name).unlink()
    (step_2 / "trainer_state.pt").write_bytes(pickle.dumps({"rng": Payload(marker)}))
    _write_manifest(step_2, run_id=run_id, step=2)

    for command in (["train", *common, "steps=3", "--resume"], ["eval", *common, "--sessions", "2"]):
        result = cli(*command)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("duca-fast")]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "keeps its trainer state as a pickle" in lines[0] and "--trust-checkpoint" in lines[0]
        assert not marker.exists(), command
