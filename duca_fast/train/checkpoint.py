"""Atomic checkpoints: written into a temporary directory, then renamed; the last K are kept.

A checkpoint holds the trainable parameters (adapter or full model, safetensors), the optimizer and
scheduler states, every RNG state and the data cursor, so that a resumed CPU run reproduces the
metrics of an uninterrupted one. A run killed at any moment (SIGKILL included) leaves either a
complete ``step_N`` directory or a ``.tmp-*`` directory that the next run removes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

DONE_MARKER = "COMPLETE"
SHARDED_DIR = "sharded"
"""Directory of a torch.distributed.checkpoint (multi-rank runs) inside a checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what to do."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def capture_rng() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (LoRA adapters, or every parameter of a full fine-tune)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_cursor: Mapping[str, Any],
    keep: int,
    export: Any = None,
    sharded: bool = False,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and delete all but the newest ``keep``.

    ``export(path)`` may write a user-facing copy of the model (e.g. peft ``save_pretrained``) inside.
    With ``sharded=True`` (an FSDP2 model under torch.distributed; every rank calls this) the trainable
    parameters and the optimizer go through torch.distributed.checkpoint, which can be loaded at any
    world size, 1 included. On any failure (a full disk included) the partial directory is removed,
    earlier checkpoints are untouched, and a CheckpointError explains what happened.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step}"
    main = not sharded or dist.get_rank() == 0
    # Ranks share the temporary directory, so its name must not depend on the process.
    tmp = root / (f".tmp-step_{step}" if sharded else f".tmp-step_{step}-{os.getpid()}")
    error: OSError | None = None
    try:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        if sharded:
            dist.barrier()
            _save_sharded(tmp / SHARDED_DIR, model, optimizer)
            dist.barrier()
        else:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        if main:
            torch.save(
                {
                    "optimizer": None if sharded else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": capture_rng(),
                },
                tmp / "trainer_state.pt",
            )
            (tmp / "cursor.json").write_text(json.dumps({"step": step, **data_cursor}))
            if export is not None:
                export(tmp / "model")
            (tmp / DONE_MARKER).write_text("ok\n")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    except OSError as caught:
        error = caught
        shutil.rmtree(tmp, ignore_errors=True)
    if sharded:
        dist.barrier()
    if error is not None:
        raise CheckpointError(
            f"could not write checkpoint step_{step} in {root} ({error.strerror or error}); "
            "earlier checkpoints are intact. Free disk space or point run_dir elsewhere, then resume."
        ) from error
    if main:
        prune_checkpoints(run_dir, keep)
    return final


def _state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Trainable parameters only (LoRA adapters, or everything in a full fine-tune).
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_state_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a torch.distributed.checkpoint at this world size (resharded as needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        with_optimizer = False
    else:
        with_optimizer = True
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_options())
    state = {"model": model_state}
    if with_optimizer:
        state["optim"] = optim_state
    dcp.load(state, checkpoint_id=str(path))
    # dcp.load already failed on any trainable key the checkpoint lacks; frozen weights are not in it.
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"] if with_optimizer else {},
        options=_state_options(strict=False),
    )


def _fsync_dir(path: Path) -> None:
    for file in [path, *path.iterdir()] if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first; leftovers of interrupted writes are removed."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    for leftover in root.glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = [p for p in root.glob("step_*") if (p / DONE_MARKER).exists()]
    return sorted(complete, key=lambda p: int(p.name.split("_")[1]))


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _load_trainable(path: Path, model: torch.nn.Module) -> None:
    state = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(k for k, p in params.items() if p.requires_grad and k not in state)
    unknown = sorted(k for k in state if k not in params)
    if missing or unknown:
        raise CheckpointError(
            f"{path} does not match the model: missing {missing[:5]}, unknown {unknown[:5]} "
            "(same model.path and model.lora_* settings as the run that wrote it?)"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, model has {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer=None, scheduler=None
) -> dict[str, Any]:
    """Load trainable parameters (and optimizer, scheduler, RNG states); return the data cursor."""
    path = Path(path)
    if not (path / DONE_MARKER).exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {DONE_MARKER} marker)")
    if (path / SHARDED_DIR).is_dir():
        _load_sharded(path / SHARDED_DIR, model, optimizer)
    else:
        _load_trainable(path, model)
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    if optimizer is not None and trainer_state["optimizer"] is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
    if scheduler is not None and trainer_state["scheduler"] is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    restore_rng(trainer_state["rng"])
    return json.loads((path / "cursor.json").read_text())
