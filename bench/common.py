"""Shared benchmark plumbing: timing, the run's identity (device, commit, date) and CSV/Markdown output."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# `duca-fast bench --out DIR` sets this; the scripts run by hand write the committed bench/results/.
RESULTS_DIR = Path(os.environ.get("DUCA_FAST_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def git_commit() -> str:
    """Short commit of this checkout (``-dirty`` with local changes); DUCA_BENCH_COMMIT overrides it, for
    copies of the tree without .git such as the device machine's."""
    if os.environ.get("DUCA_BENCH_COMMIT"):
        return os.environ["DUCA_BENCH_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_identity(device: torch.device | str) -> dict[str, str]:
    return {
        "device": device_name(device),
        "commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
    }


def time_call(
    fn: Callable[[], object], *, device: torch.device | str, repeats: int, warmup: int = 1
) -> float:
    """Median wall time of ``fn`` in seconds (CUDA-synchronised on GPU)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def write_results(
    name: str, rows: list[dict[str, object]], identity: dict[str, str], notes: str = ""
) -> Path:
    """Write `results/<name>.csv` and `.md`, with the run identity in every CSV row and the MD header."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    csv_path = RESULTS_DIR / f"{name}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*columns, *identity])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **identity})
    md_path = RESULTS_DIR / f"{name}.md"
    md_path.write_text(
        f"# {name}\n\n"
        + "".join(f"- {key}: {value}\n" for key, value in identity.items())
        + (f"\n{notes}\n" if notes else "")
        + "\n"
        + markdown_table(rows)
    )
    return md_path


def markdown_table(rows: list[dict[str, object]]) -> str:
    columns = list(rows[0])

    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def add_variant_arguments(parser, variants: Sequence[str]) -> None:
    """The hidden ``--variant`` / ``--model-dir`` a script passes to its own fresh processes."""
    import argparse

    parser.add_argument("--variant", choices=variants, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)


def rows_per_variant(script: str, args, variants: Sequence[str], measure, forwarded: Sequence[str]):
    """In a variant's own process (``args.variant`` set): print ``measure(args)`` as JSON and return None.
    Otherwise run ``script`` once per variant in a fresh process (a clean resident-set baseline) on
    SmolLM2-135M (converted once), forwarding the ``forwarded`` arguments, and return the rows."""
    if args.variant:
        print(json.dumps(measure(args)))
        return None
    import tempfile

    from duca_fast.rollout.models import load_default_model_dir

    model_dir = load_default_model_dir(Path(tempfile.gettempdir()) / "duca_fast_models")
    rows = []
    for variant in variants:
        command = [sys.executable, script, "--variant", variant, "--model-dir", str(model_dir)]
        for name in forwarded:
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        print(f"measuring {variant} ...", flush=True)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows
