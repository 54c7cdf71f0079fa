"""A run directory belongs to one run: ``run.json`` names its run id and the process that owns it.

A new run refuses a directory that already holds anything (``--resume`` continues the run there,
``--overwrite`` removes it first); a resumed run keeps its run id, so every checkpoint it writes can be
matched to the run. A directory whose owner process is still alive is refused whatever the flags.
No torch here: the CLI checks the directory before it loads a model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

RUN_FILE = "run.json"
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "events", "plots", "samples")
"""What a run writes; ``--overwrite`` only empties a directory holding one of these or ``run.json``."""


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says which flag or path to use."""


@dataclass(frozen=True)
class ProcessTag:
    """Identifies one process across pid reuse: host name, pid and the process start time."""

    host: str
    pid: int
    start: int
    """Start time in clock ticks since boot (Linux /proc); 0 where it cannot be read."""

    def text(self) -> str:
        return f"pid {self.pid} on {self.host}"


def process_start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot, 0 when unknown (no /proc), -1 when no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return -1
    except OSError:
        return 0
    # The command name (field 2) may contain spaces and parentheses; fields after it are plain.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def current_process() -> ProcessTag:
    return ProcessTag(socket.gethostname(), os.getpid(), max(process_start_time(os.getpid()), 0))


def process_alive(tag: ProcessTag) -> bool | None:
    """True / False for a process on this host, None for another host (liveness unknown)."""
    if tag.host != socket.gethostname():
        return None
    start = process_start_time(tag.pid)
    if start == -1:
        return False
    if start == 0 or tag.start == 0:
        # No /proc: fall back to whether any process has that pid.
        try:
            os.kill(tag.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return start == tag.start


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    created: str
    """UTC time the run was started (ISO 8601)."""
    owner: ProcessTag | None
    """The process running the run now; None once it released the directory (finished or failed)."""


def read_run(run_dir: str | Path) -> RunInfo | None:
    """The run recorded in ``run_dir``, or None when there is no ``run.json``."""
    path = Path(run_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text())
        owner = ProcessTag(**data["owner"]) if data["owner"] is not None else None
        return RunInfo(data["run_id"], data["created"], owner)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RunDirError(f"{path} is unreadable ({error}); --overwrite starts a new run there") from error


def read_run_id(run_dir: str | Path) -> str | None:
    info = read_run(run_dir)
    return info.run_id if info is not None else None


def _write_run(run_dir: Path, info: RunInfo) -> None:
    target = run_dir / RUN_FILE
    staging = run_dir / f".{RUN_FILE}.{os.getpid()}"
    with open(staging, "w") as handle:
        json.dump(asdict(info), handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, target)


def _refuse_live_owner(run_dir: Path, info: RunInfo | None) -> None:
    if info is None or info.owner is None or info.owner == current_process():
        return
    if process_alive(info.owner):
        raise RunDirError(
            f"{run_dir} is in use by run {info.run_id} ({info.owner.text()}, still running); "
            "wait for it to finish or choose another run_dir"
        )


def release_run_dir(run_dir: str | Path) -> None:
    """Mark the run as no longer running (call when the run ends, in a ``finally``); no-op if not ours."""
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    if info is not None and info.owner == current_process():
        _write_run(run_dir, RunInfo(info.run_id, info.created, None))


def claim_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> str:
    """Make ``run_dir`` this process's run and return the run id (call before writing anything there).

    - new run (neither flag): the directory must be missing or empty; a fresh run id is written.
    - ``resume``: the directory must hold a run (``run.json``); its run id is kept.
    - ``overwrite``: everything in the directory is removed first, then a fresh run id is written.
    Raises RunDirError with a one-line message naming ``--resume`` / ``--overwrite`` otherwise, and
    whatever the flags while another live process owns the directory. Pair with ``release_run_dir``.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: continue the run or replace it")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir {run_dir} is a file, not a directory")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    try:
        info = read_run(run_dir) if entries else None
    except RunDirError:
        if not overwrite:
            raise
        info = None
    _refuse_live_owner(run_dir, info)
    now = current_process()
    if resume:
        if info is None:
            what = "is empty" if not entries else "holds no run.json (an older duca_fast or not a run)"
            raise RunDirError(
                f"--resume: {run_dir} {what}; start without --resume (or with --overwrite to replace it)"
            )
        _write_run(run_dir, RunInfo(info.run_id, info.created, now))
        return info.run_id
    if entries:
        if not overwrite:
            listed = ", ".join(entries[:3])
            held = f"run {info.run_id}" if info is not None else f"{len(entries)} entries: {listed}"
            raise RunDirError(
                f"run_dir {run_dir} is not empty ({held}); pass --resume to continue that run, "
                "--overwrite to delete it and start again, or choose another run_dir"
            )
        if not any(name in (RUN_FILE, *RUN_OUTPUTS) for name in entries):
            raise RunDirError(
                f"--overwrite: {run_dir} does not look like a run directory ({', '.join(entries[:3])}); "
                "remove it yourself or choose another run_dir"
            )
        for name in entries:
            entry = run_dir / name
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as error:
                reason = error.strerror or error
                raise RunDirError(f"--overwrite: cannot remove {entry} ({reason})") from error
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    _write_run(run_dir, RunInfo(run_id, datetime.now(timezone.utc).isoformat(timespec="seconds"), now))
    return run_id
