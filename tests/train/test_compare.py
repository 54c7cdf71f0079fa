"""compare(): every algorithm x seed trained with the same budget, evaluated, tabulated (md, csv, json)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from duca_fast.train.checkpoint import save_checkpoint
from duca_fast.train.compare import TABLE_COLUMNS, compare
from duca_fast.train.loop import evaluate, train

from .acts_configs import tiny_acts_config


def test_two_algorithms_two_seeds_on_the_act_twin(tmp_path):
    config = tiny_acts_config(tmp_path / "unused", "checkpoint_every=0")
    out_dir = tmp_path / "compare"
    markdown = compare(config, ["duca", "grpo"], [0, 1], out_dir, train, evaluate, eval_sessions=8)

    lines = markdown.splitlines()
    assert lines[0] == "| Algorithm | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == ["| duca", "| grpo"]
    assert all(row.count("±") == len(TABLE_COLUMNS) for row in rows)
    assert "%)" in rows[0] or "(n/a)" in rows[0], "duca's cells carry the change vs grpo"
    assert "(" not in rows[1], "grpo is the baseline"
    assert (out_dir / "compare.md").read_text() == markdown

    for algo in ("duca", "grpo"):
        for seed in (0, 1):
            saved = (out_dir / f"{algo}_seed{seed}" / "config.yaml").read_text()
            assert f"name: {algo}" in saved and f"seed: {seed}" in saved
    with (out_dir / "compare.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    assert [(run["algo"], int(run["seed"])) for run in runs] == [
        ("duca", 0),
        ("duca", 1),
        ("grpo", 0),
        ("grpo", 1),
    ]
    report = json.loads((out_dir / "compare.json").read_text())
    duca_conversion = [float(run["conversion_rate"]) for run in runs if run["algo"] == "duca"]
    summary = report["summary"]["duca"]["conversion_rate"]
    assert summary["mean"] == pytest.approx(sum(duca_conversion) / 2)


def fake_train(config):
    """Stands in for a trainer: leaves a real (verifiable) checkpoint the way train does."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(
        config.run_dir, config.steps, model=model, optimizer=optimizer, scheduler=None, data_cursor={}, keep=1
    )
    return Path(config.run_dir)


def fake_eval(config, checkpoint, num_sessions, seed):
    """Deterministic numbers per (algo, seed) so the table's statistics can be checked by hand."""
    base = {"duca": 0.3, "grpo": 0.2, "gdpo": 0.0}[config.algo.name] + 0.1 * config.seed
    return {
        "conversion_rate": base,
        "repetition_rate": 0.1,
        "identity_detection_rate": 0.0,
        "compliance_violation_rate": 0.05,
        "mean_turn_reward": -0.5 + base,
    }


def test_table_statistics_and_relative_change_with_any_train_and_eval_pair(tmp_path):
    config = tiny_acts_config(tmp_path / "unused")
    markdown = compare(config, ["grpo", "duca", "gdpo"], [0, 1], tmp_path, fake_train, fake_eval, 4)
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in markdown.splitlines()[2:5]}
    # duca conversion: seeds give 0.3, 0.4 -> mean 0.35, std 0.0707; grpo mean 0.25 -> +40%.
    assert "0.350 ± 0.071 (+40.0%)" in rows["duca"]
    assert "0.250 ± 0.071 |" in rows["grpo"]
    assert "0.000 ± 0.000 (n/a)" in rows["gdpo"], "identity detection of grpo is 0: no ratio"
    assert "-0.150 ± 0.071 (+40.0%)" in rows["duca"], "turn reward -0.15 vs -0.25 is a 40% improvement"
    assert "-0.450 ± 0.071 (-80.0%)" in rows["gdpo"]


def test_compare_rejects_bad_arguments(tmp_path):
    config = tiny_acts_config(tmp_path / "unused")
    with pytest.raises(ValueError, match="algos must be"):
        compare(config, ["ppo"], [0], tmp_path, fake_train, fake_eval, 4)
    with pytest.raises(ValueError, match="must not repeat"):
        compare(config, ["duca", "duca"], [0], tmp_path, fake_train, fake_eval, 4)
    with pytest.raises(KeyError, match="conversion_rate"):
        compare(config, ["duca"], [0], tmp_path, fake_train, lambda *args: {"mean_turns": 1.0}, 4)
