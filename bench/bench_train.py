"""End to end: trainer steps per second and the time split rollout / advantage / train / sync.

Runs ``duca-fast train`` for a few steps of ``configs/demo.yaml`` (by default on the embedded
SmolLM2-135M-Instruct) and summarizes its metrics.jsonl, skipping the first step (warm-up).

Usage: python bench/bench_train.py [--steps 4] [key=value overrides ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table, run_identity, write_results  # noqa: E402

PHASES = ("time/rollout", "time/advantage", "time/train", "time/sync", "time/step")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="steps to run (the first is not counted)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rollout.engine=hf")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is a warm-up)")

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [
            sys.executable,
            "-m",
            "duca_fast.cli",
            "train",
            "--config",
            args.config,
            f"steps={args.steps}",
            f"run_dir={run_dir}",
            "checkpoint_every=0",
            "progress=false",
            *args.overrides,
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"training failed:\n{result.stderr[-3000:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
        config_text = (run_dir / "config.yaml").read_text()

    summary = {"steps_measured": len(rows)}
    for key in PHASES:
        summary[f"{key.split('/')[1]}_s"] = statistics.median(row[key] for row in rows)
    summary["rollout_share"] = summary["rollout_s"] / summary["step_s"]
    summary["train_share"] = summary["train_s"] / summary["step_s"]
    summary["sync_share"] = summary["sync_s"] / summary["step_s"]
    summary["tokens_per_s"] = statistics.median(row["tokens_per_s"] for row in rows)
    summary["generated_tokens_per_s"] = statistics.median(
        row["rollout/generated_tokens_per_s"] for row in rows
    )
    summary["logprob_gap"] = statistics.median(row.get("sync/logprob_gap", float("nan")) for row in rows)
    model = next((line.split(":", 1)[1].strip() for line in config_text.splitlines() if "path:" in line), "?")
    notes = (
        f"`{Path(args.config).name}` with overrides {args.overrides or 'none'} (model.path: {model}); "
        f"median over steps 2..{args.steps} of {args.steps}."
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = write_results(f"train_{device}", [summary], run_identity(device), notes=notes)
    print(markdown_table([summary]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
