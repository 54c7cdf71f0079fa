"""A run directory belongs to one run: refused without --resume or --overwrite; resume; live owners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duca_fast.train.rundir import (
    RUN_FILE,
    ProcessTag,
    RunDirError,
    claim_run_dir,
    current_process,
    process_alive,
    read_run,
    read_run_id,
    release_run_dir,
)

ROOT = Path(__file__).resolve().parents[2]


def old_run(run_dir: Path) -> str:
    """A finished earlier run: run.json, metrics of steps 1..14 and a checkpoint directory."""
    run_id = claim_run_dir(run_dir, resume=False, overwrite=False)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 15)))
    (run_dir / "checkpoints" / "step_14").mkdir(parents=True)
    release_run_dir(run_dir)
    return run_id


def test_a_new_run_gets_a_fresh_id_in_a_missing_or_empty_directory(tmp_path):
    first = claim_run_dir(tmp_path / "a" / "b", resume=False, overwrite=False)
    (tmp_path / "empty").mkdir()
    second = claim_run_dir(tmp_path / "empty", resume=False, overwrite=False)
    assert first != second
    assert read_run_id(tmp_path / "a" / "b") == first
    info = read_run(tmp_path / "empty")
    assert info.run_id == second and info.owner == current_process()


def test_a_new_run_refuses_a_used_directory_and_touches_nothing(tmp_path):
    # Before: the old metrics.jsonl was deleted silently and the old checkpoints outlived the new ones.
    run_id = old_run(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(RunDirError, match=rf"not empty \(run {run_id}\); pass --resume .* --overwrite"):
        claim_run_dir(tmp_path, resume=False, overwrite=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 14


def test_a_directory_of_other_files_is_refused_and_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"not empty \(1 entries: notes.txt\).*--resume.*--overwrite"):
        claim_run_dir(tmp_path, resume=False, overwrite=False)
    with pytest.raises(RunDirError, match="does not look like a run directory"):
        claim_run_dir(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_removes_the_old_run_entirely(tmp_path):
    old_id = old_run(tmp_path)
    (tmp_path / "checkpoints" / ".tmp-step_15-x").mkdir()
    new_id = claim_run_dir(tmp_path, resume=False, overwrite=True)
    assert new_id != old_id
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_FILE]
    assert read_run_id(tmp_path) == new_id


def test_overwrite_of_a_run_from_an_older_version_without_run_json(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RunDirError, match=r"holds no run\.json"):
        claim_run_dir(tmp_path, resume=True, overwrite=False)
    claim_run_dir(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_FILE]


def test_resume_keeps_the_run_id_and_takes_ownership(tmp_path):
    run_id = old_run(tmp_path)
    assert read_run(tmp_path).owner is None, "a finished run released the directory"
    assert claim_run_dir(tmp_path, resume=True, overwrite=False) == run_id
    assert read_run(tmp_path).owner == current_process()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 14, "resume deletes nothing"


def test_resume_needs_a_run_and_excludes_overwrite(tmp_path):
    with pytest.raises(RunDirError, match=r"--resume: .* is empty; start without --resume"):
        claim_run_dir(tmp_path / "nothing", resume=True, overwrite=False)
    with pytest.raises(RunDirError, match="--resume and --overwrite exclude each other"):
        claim_run_dir(tmp_path, resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        claim_run_dir(tmp_path / "file", resume=False, overwrite=False)


def test_an_unreadable_run_json_is_one_clear_error(tmp_path):
    (tmp_path / RUN_FILE).write_text("{half")
    with pytest.raises(RunDirError, match=r"run.json is unreadable .*--overwrite"):
        claim_run_dir(tmp_path, resume=True, overwrite=False)
    claim_run_dir(tmp_path, resume=False, overwrite=True)
    assert read_run_id(tmp_path) is not None


def test_a_directory_owned_by_a_live_process_is_refused_whatever_the_flags(tmp_path):
    run_dir = tmp_path / "run"
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from duca_fast.train.rundir import claim_run_dir\n"
            f"print(claim_run_dir({str(run_dir)!r}, resume=False, overwrite=False), flush=True)\n"
            "time.sleep(120)\n",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = owner.stdout.readline().strip()
        assert run_id and read_run(run_dir).owner.pid == owner.pid
        for resume, overwrite in [(True, False), (False, True)]:
            busy = rf"in use by run {run_id} \(pid {owner.pid} on .*still running"
            with pytest.raises(RunDirError, match=busy):
                claim_run_dir(run_dir, resume=resume, overwrite=overwrite)
    finally:
        owner.kill()
        owner.wait()
    # The owner died without releasing (as after SIGKILL): the run can be resumed.
    assert claim_run_dir(run_dir, resume=True, overwrite=False) == run_id


def test_process_liveness_survives_pid_reuse_and_other_hosts():
    me = current_process()
    assert process_alive(me) is True
    assert process_alive(ProcessTag(me.host, me.pid, me.start + 1)) is False, "same pid, other process"
    assert process_alive(ProcessTag("some-other-host", me.pid, me.start)) is None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    time.sleep(0.05)
    assert process_alive(ProcessTag(me.host, gone.pid, 1)) is False


def test_release_only_by_the_owner(tmp_path):
    claim_run_dir(tmp_path, resume=False, overwrite=False)
    info = read_run(tmp_path)
    stranger = {**json.loads((tmp_path / RUN_FILE).read_text()), "owner": {"host": "h", "pid": 1, "start": 5}}
    (tmp_path / RUN_FILE).write_text(json.dumps(stranger))
    release_run_dir(tmp_path)
    assert read_run(tmp_path).owner == ProcessTag("h", 1, 5), "another process's claim is not released"
    (tmp_path / RUN_FILE).write_text(json.dumps({**stranger, "owner": info.owner.__dict__}))
    release_run_dir(tmp_path)
    assert read_run(tmp_path).owner is None
