"""Checkpoints that prove themselves: written atomically, verified on load, never crossing runs.

A checkpoint holds the trainable parameters (adapter or full model, safetensors), the optimizer and
scheduler states, every RNG state and the data cursor, so that a resumed CPU run reproduces the
metrics of an uninterrupted one. Loading a checkpoint someone handed you runs no code from it: the
trainer state is JSON plus safetensors (``safe_state``), a sharded checkpoint's torch.distributed.checkpoint
files go through an allow-listed unpickler and ``weights_only`` loads, and a pickled ``trainer_state.pt``
of duca_fast 0.1 is refused unless the caller trusts it explicitly.

It is written into ``.tmp-step_N-<host>-<pid>-<start>``; when every
file is on disk (fsync), ``manifest.json`` (run id, step, size and SHA-256 of every file) is written
last and the directory is renamed to ``step_N``. A run killed at any moment (SIGKILL included) leaves
either a complete ``step_N`` or a temporary directory, which is removed once its writer is gone (never
while it is alive: an ``eval`` during training must not break the save). ``latest_checkpoint`` skips,
with a message naming the file, any checkpoint that fails verification or belongs to another run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from duca_fast.train.rundir import ProcessTag, RunDirError, current_process, process_alive, read_run_id
from duca_fast.train.safe_state import (
    StateFormatError,
    decode_state,
    encode_state,
    safe_load_planner,
    safe_reader,
)

MANIFEST = "manifest.json"
"""Written last; a checkpoint without it is incomplete or unverifiable and is never used."""
MANIFEST_FORMAT = 1
SHARDED_DIR = "sharded"
"""Directory of a torch.distributed.checkpoint (multi-rank runs) inside a checkpoint."""
STEP_DIR = re.compile(r"step_(\d+)")
TEMP_DIR = re.compile(r"\.tmp-step_(?P<step>\d+)(?P<old>\.old)?-(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d+)")
"""A checkpoint being written, or (``.old``) one being deleted; named by the process doing it."""
TRAINER_STATE = "trainer_state"
"""Optimizer, scheduler and RNG states: ``trainer_state.json`` + ``trainer_state.safetensors``."""
LEGACY_TRAINER_STATE = "trainer_state.pt"
"""The pickled trainer state of duca_fast 0.1; loaded only with ``trust_pickle=True``."""
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError, CheckpointException)
"""What a failed write raises: OSError (json, fsync, rename), RuntimeError (torch), SafetensorError
(safetensors), CheckpointException (torch.distributed.checkpoint)."""
READ_ERRORS = (*WRITE_ERRORS, ValueError, EOFError, KeyError, TypeError, pickle.UnpicklingError)

logger = logging.getLogger(__name__)


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
    run_id: str | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically with its manifest and delete all but the newest ``keep``.

    ``run_id`` (default: the one in ``run_dir/run.json``, see ``rundir.claim_run_dir``) is recorded in the
    manifest. ``export(path)`` may write a user-facing copy of the model (e.g. peft ``save_pretrained``)
    inside. With ``sharded=True`` (an FSDP2 model under torch.distributed; every rank calls this) the
    trainable parameters and the optimizer go through torch.distributed.checkpoint, which can be loaded at
    any world size, 1 included. Checkpoints of later steps (an abandoned timeline: this run resumed from an
    earlier one) are removed. On any write error (a full disk included, on any rank) the partial directory
    is removed, earlier checkpoints are untouched, and every rank raises one CheckpointError line.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step}"
    main = not sharded or dist.get_rank() == 0
    writer = current_process()
    if sharded:
        # Ranks share the temporary directory: rank 0's process names it.
        shared = [writer]
        dist.broadcast_object_list(shared, src=0)
        writer = shared[0]
    tmp = root / _temp_name(step, writer)

    error = None
    if main:
        error = _attempt("the checkpoint directory", lambda: tmp.mkdir(parents=True))
    if sharded:
        error = _first_error(error)
        if error is None:
            error = _first_error(
                _attempt(f"{SHARDED_DIR}/", lambda: _save_sharded(tmp / SHARDED_DIR, model, optimizer))
            )
    if main and error is None:
        writing = "run.json"
        try:
            if run_id is None:
                run_id = _run_id_of(run_dir)
            writing = "trainable.safetensors"
            if not sharded:
                save_file(trainable_state(model), str(tmp / writing))
            document, tensors = encode_state(
                {
                    "optimizer": None if sharded else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": capture_rng(),
                }
            )
            writing = f"{TRAINER_STATE}.safetensors"
            save_file(tensors, str(tmp / writing))
            writing = f"{TRAINER_STATE}.json"
            (tmp / writing).write_text(json.dumps(document))
            writing = "cursor.json"
            (tmp / writing).write_text(json.dumps({"step": step, **data_cursor}))
            if export is not None:
                writing = "model/ (export)"
                export(tmp / "model")
            writing = MANIFEST
            _write_manifest(tmp, run_id=run_id, step=step)
            writing = f"step_{step} (rename)"
            _publish(root, tmp, final, step)
        except WRITE_ERRORS as caught:
            error = f"{writing}: {_reason(caught)}"
        except BaseException:
            # Not a write error (a bug in ``export``, Ctrl-C): still leave no partial directory behind.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if sharded:
        error = _first_error(error)
    if error is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        free = _free_bytes(root)
        raise CheckpointError(
            f"could not write checkpoint step_{step} in {root}: {error}{free}; earlier checkpoints are "
            "intact. Free disk space or point run_dir elsewhere, then resume."
        )
    if main:
        prune_checkpoints(run_dir, keep)
    return final


def _temp_name(step: int, writer: ProcessTag, *, old: bool = False) -> str:
    return f".tmp-step_{step}{'.old' if old else ''}-{writer.host}-{writer.pid}-{writer.start}"


def _remove_checkpoint(path: Path) -> None:
    """Rename out of sight first, so a reader sees the whole checkpoint or none of it, then delete."""
    doomed = path.with_name(_temp_name(_step_of(path), current_process(), old=True))
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def _attempt(what: str, write: Callable[[], Any]) -> str | None:
    """Run one write; on failure return ``"<what>: <reason>"`` (picklable, so ranks can share it)."""
    try:
        write()
    except WRITE_ERRORS as error:
        return f"{what}: {_reason(error)}"
    return None


def _reason(error: BaseException) -> str:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    text = str(error).strip()
    # safetensors wraps the OS error: IoError(Os { code: 28, kind: StorageFull, message: "No space ..." })
    found = re.search(r'message: "([^"]+)"', text)
    if found:
        return found.group(1)
    return text.splitlines()[-1] if text else type(error).__name__


def _free_bytes(root: Path) -> str:
    for path in (root, *root.parents):
        if path.exists():
            free = shutil.disk_usage(path).free
            return f" ({free / 2**20:.1f} MiB free on that file system)"
    return ""


def _first_error(error: str | None) -> str | None:
    """The first rank's error, on every rank (so all ranks take the same path)."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _run_id_of(run_dir: str | Path) -> str | None:
    try:
        return read_run_id(run_dir)
    except RunDirError as error:
        raise CheckpointError(str(error)) from error


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(tmp: Path, *, run_id: str | None, step: int) -> None:
    """fsync every file, then write the manifest of their sizes and SHA-256 (read back from disk)."""
    files = _files(tmp)
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    manifest = {
        "format": MANIFEST_FORMAT,
        "run_id": run_id,
        "step": step,
        "files": {
            file.relative_to(tmp).as_posix(): {"size": file.stat().st_size, "sha256": _sha256(file)}
            for file in files
        },
    }
    with open(tmp / MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    for directory in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(directory)


def _publish(root: Path, tmp: Path, final: Path, step: int) -> None:
    # Checkpoints of this or later steps belong to an abandoned timeline (the run resumed before them).
    for path in _step_dirs(root):
        if _step_of(path) >= step:
            _remove_checkpoint(path)
    os.replace(tmp, final)
    _fsync_dir(root)


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
    dcp.load(state, storage_reader=safe_reader(path), planner=safe_load_planner())
    # dcp.load already failed on any trainable key the checkpoint lacks; frozen weights are not in it.
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"] if with_optimizer else {},
        options=_state_options(strict=False),
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step_N`` directory (verified or not), oldest first."""
    found = [p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=_step_of)


def remove_dead_leftovers(run_dir: str | Path) -> list[Path]:
    """Remove temporary checkpoint directories whose writer process is gone; return them.

    One being written by a live process (or by a process on another host, which cannot be checked) is
    left alone, so a reader never breaks a running save.
    """
    removed = []
    for leftover in sorted(checkpoint_dir(run_dir).glob(".tmp-step_*")):
        found = TEMP_DIR.fullmatch(leftover.name)
        if found is None:
            logger.warning(
                "leaving %s alone: its name does not say which process wrote it (an older duca_fast?); "
                "delete it by hand when no run writes there",
                leftover,
            )
            continue
        writer = ProcessTag(found["host"], int(found["pid"]), int(found["start"]))
        if process_alive(writer) is False:
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints with a manifest (not yet verified), oldest first; dead writers' leftovers are removed."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    remove_dead_leftovers(run_dir)
    return [p for p in _step_dirs(root) if (p / MANIFEST).is_file()]


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoint directories (by step; unverifiable ones included)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    remove_dead_leftovers(run_dir)
    for old in _step_dirs(root)[:-keep]:
        with contextlib.suppress(OSError):
            _remove_checkpoint(old)


def verify_checkpoint(path: str | Path, *, run_id: str | None = None) -> dict[str, Any]:
    """Check the manifest of a checkpoint against its files (sizes, SHA-256) and return the manifest.

    With ``run_id`` the checkpoint must have been written by that run. Raises CheckpointError naming the
    checkpoint and the first file that fails (missing, truncated or changed) or the missing manifest.
    """
    path = Path(path)
    where = f"checkpoint {path}"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = {
            name: (int(entry["size"]), str(entry["sha256"])) for name, entry in manifest["files"].items()
        }
        step = int(manifest["step"])
    except FileNotFoundError as error:
        raise CheckpointError(
            f"{where}: no {MANIFEST} (an interrupted or foreign write, or an older duca_fast), so it cannot "
            "be verified"
        ) from error
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{where}: {MANIFEST} is unreadable ({error})") from error
    if STEP_DIR.fullmatch(path.name) and _step_of(path) != step:
        raise CheckpointError(f"{where}: {MANIFEST} is for step {step}, not {path.name}")
    if run_id is not None and manifest.get("run_id") != run_id:
        raise CheckpointError(f"{where} belongs to run {manifest.get('run_id')}, not to this run ({run_id})")
    for name, (size, sha256) in files.items():
        file = path / name
        try:
            found = file.stat().st_size
            digest = _sha256(file) if found == size else None
        except FileNotFoundError as error:
            raise CheckpointError(f"{where}: {name} is missing") from error
        except OSError as error:
            raise CheckpointError(f"{where}: cannot read {name} ({_reason(error)})") from error
        if found != size:
            raise CheckpointError(f"{where}: {name} has {found} bytes, the manifest says {size} (truncated?)")
        if digest != sha256:
            raise CheckpointError(f"{where}: {name} is corrupt (its SHA-256 differs from the manifest)")
    return manifest


def latest_checkpoint(run_dir: str | Path, *, run_id: str | None = None) -> Path | None:
    """The newest checkpoint of this run that verifies, or None.

    ``run_id`` defaults to the run recorded in ``run_dir/run.json`` (any run when there is none).
    Checkpoints that fail verification or belong to another run are skipped with a warning on the
    ``duca_fast.train.checkpoint`` logger that names the checkpoint and the file.
    """
    if run_id is None:
        run_id = _run_id_of(run_dir)
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    remove_dead_leftovers(run_dir)
    skipped: list[str] = []
    candidates = list(reversed(_step_dirs(root)))
    while candidates:
        path = candidates.pop(0)
        try:
            verify_checkpoint(path, run_id=run_id)
        except CheckpointError as error:
            if not path.exists():
                # Pruned or replaced by a live writer while we read it: newer ones exist now.
                candidates = [p for p in reversed(_step_dirs(root)) if p.name not in skipped]
                continue
            logger.warning("skipping %s; trying an earlier checkpoint", error)
            skipped.append(path.name)
            continue
        if skipped:
            logger.warning("using checkpoint %s (skipped %s)", path, ", ".join(skipped))
        return path
    if skipped:
        logger.warning("no checkpoint under %s verifies (skipped %s)", root, ", ".join(skipped))
    return None


@contextlib.contextmanager
def _reading(path: Path, name: str) -> Iterator[None]:
    try:
        yield
    except READ_ERRORS as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path}: cannot read {name} ({_reason(error)})") from error


def _load_trainable(path: Path, model: torch.nn.Module) -> None:
    with _reading(path, "trainable.safetensors"):
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
    path: str | Path,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    *,
    run_id: str | None = None,
    verify: bool = True,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Load trainable parameters (and optimizer, scheduler, RNG states); return the data cursor.

    The checkpoint is verified first (``verify_checkpoint``; with ``run_id`` it must be that run's);
    every read error is a CheckpointError naming the file. Nothing is restored unless every file reads.
    No file is unpickled: a duca_fast 0.1 checkpoint (pickled ``trainer_state.pt``) raises CheckpointError
    unless ``trust_pickle`` (the CLI's ``--trust-checkpoint``, for the user's own old runs).
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path, run_id=run_id)
    elif not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    trainer_state = _read_trainer_state(path, trust_pickle)
    with _reading(path, f"{TRAINER_STATE}.json"):
        rng = trainer_state["rng"]
    with _reading(path, "cursor.json"):
        cursor = json.loads((path / "cursor.json").read_text())
    if (path / SHARDED_DIR).is_dir():
        with _reading(path, f"{SHARDED_DIR}/"):
            _load_sharded(path / SHARDED_DIR, model, optimizer)
    else:
        _load_trainable(path, model)
    with _reading(path, f"{TRAINER_STATE} (optimizer, scheduler and RNG states)"):
        if optimizer is not None and trainer_state["optimizer"] is not None:
            optimizer.load_state_dict(trainer_state["optimizer"])
        if scheduler is not None and trainer_state["scheduler"] is not None:
            scheduler.load_state_dict(trainer_state["scheduler"])
        restore_rng(rng)
    return cursor


def _read_trainer_state(path: Path, trust_pickle: bool) -> dict[str, Any]:
    if not (path / f"{TRAINER_STATE}.json").is_file() and (path / LEGACY_TRAINER_STATE).is_file():
        if not trust_pickle:
            raise CheckpointError(
                f"checkpoint {path} keeps its trainer state as a pickle ({LEGACY_TRAINER_STATE}, duca_fast "
                "0.1), and loading a pickle can run code hidden in it; if you wrote this run yourself, pass "
                "--trust-checkpoint once (its next checkpoint is written without pickle), otherwise do not "
                "load it"
            )
        logger.warning("loading the pickled %s of %s (trusted by the caller)", LEGACY_TRAINER_STATE, path)
        with _reading(path, LEGACY_TRAINER_STATE):
            return torch.load(path / LEGACY_TRAINER_STATE, weights_only=False)
    with _reading(path, f"{TRAINER_STATE}.json"):
        document = json.loads((path / f"{TRAINER_STATE}.json").read_text())
    with _reading(path, f"{TRAINER_STATE}.safetensors"):
        tensors = load_file(str(path / f"{TRAINER_STATE}.safetensors"))
    with _reading(path, f"{TRAINER_STATE}.json"):
        try:
            state = decode_state(document, tensors)
        except StateFormatError as error:
            raise CheckpointError(f"checkpoint {path}: {TRAINER_STATE}.json: {error}") from error
        if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= state.keys():
            raise CheckpointError(f"checkpoint {path}: {TRAINER_STATE}.json lacks optimizer/scheduler/rng")
        return state
