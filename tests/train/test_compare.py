"""compare(): algorithms x seeds, evaluated greedy and sampled, with CIs, permutation tests and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from duca_fast.cli import main
from duca_fast.train.checkpoint import save_checkpoint
from duca_fast.train.compare import TABLE_COLUMNS, compare, parse_seeds, parse_weights
from duca_fast.train.loop import train

from .acts_configs import ACTS_CONFIG, tiny_acts_config

PNG = b"\x89PNG\r\n\x1a\n"


def fake_train(config):
    """Stands in for a trainer: leaves a real (verifiable) checkpoint the way train does."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(
        config.run_dir, config.steps, model=model, optimizer=optimizer, scheduler=None, data_cursor={}, keep=1
    )
    return Path(config.run_dir)


def fake_eval(config, checkpoint, num_sessions, seed, *, sampled):
    """Conversion = algo base + 0.1 x training seed + 0.02 x eval seed (+ 0.5 when sampled)."""
    base = {"duca": 0.3, "grpo": 0.2, "gdpo": 0.0}[config.algo.name] + 0.1 * config.seed
    value = base + 0.02 * seed + (0.5 if sampled else 0.0)
    return {key: value for key, _ in TABLE_COLUMNS}


def pid_eval(config, checkpoint, num_sessions, seed, *, sampled):
    """Every metric is the id of the process that evaluated the run."""
    import os

    return {key: float(os.getpid()) for key, _ in TABLE_COLUMNS}


def test_llm_task_runs_each_get_a_fresh_process_even_with_one_worker(tmp_path):
    """An LLM run's engines do not give all their memory back in-process (a demo study was killed for
    memory after 8 runs): each run trains and evaluates in its own process; the twin's stay in-process."""
    import os

    from duca_fast.train.config import load_config

    config = load_config("configs/demo.yaml", [f"run_dir={tmp_path / 'unused'}"])
    compare(config, ["grpo", "duca"], [0, 1], tmp_path / "llm", fake_train, pid_eval, 1, eval_seeds=[0])
    rows = json.loads((tmp_path / "llm" / "compare.json").read_text())["runs"]
    pids = {row["greedy/conversion_rate"] for row in rows}
    assert len(pids) == 4 and os.getpid() not in pids
    twin = tiny_acts_config(tmp_path / "unused")
    compare(twin, ["grpo", "duca"], [0, 1], tmp_path / "twin", fake_train, pid_eval, 1, eval_seeds=[0])
    rows = json.loads((tmp_path / "twin" / "compare.json").read_text())["runs"]
    assert {row["greedy/conversion_rate"] for row in rows} == {os.getpid()}


def test_statistics_of_a_study_with_known_numbers(tmp_path):
    config = tiny_acts_config(tmp_path / "unused")
    markdown = compare(
        config, ["grpo", "duca", "gdpo"], [0, 1, 2], tmp_path, fake_train, fake_eval, 4, eval_seeds=[0, 1]
    )
    report = json.loads((tmp_path / "compare.json").read_text())
    duca = report["summary"]["greedy/conversion_rate"]["duca"]
    # Per seed 0.31, 0.41, 0.51 (eval seeds 0 and 1 averaged): mean 0.41, CI inside [0.31, 0.51].
    assert duca["mean"] == pytest.approx(0.41)
    assert 0.31 - 1e-9 <= duca["ci"][0] < 0.41 < duca["ci"][1] <= 0.51 + 1e-9
    # duca - grpo is +0.1 on every seed: CI [0.1, 0.1]; exact sign-flip p = 2 / 2^3.
    versus = duca["vs_baseline"]
    assert versus["difference"] == pytest.approx(0.1)
    assert versus["ci"] == pytest.approx([0.1, 0.1])
    assert versus["p_value"] == pytest.approx(0.25) and versus["exact"]
    assert "vs_baseline" not in report["summary"]["greedy/conversion_rate"]["grpo"]
    assert report["summary"]["sampled/conversion_rate"]["duca"]["mean"] == pytest.approx(0.91)
    with (tmp_path / "compare.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["label"], int(r["seed"])) for r in rows][:3] == [("grpo", 0), ("grpo", 1), ("grpo", 2)]
    assert float(rows[1]["greedy/conversion_rate"]) == pytest.approx(0.31)
    assert "0.410 [" in markdown and "Δ +0.100 [+0.100, +0.100] p=0.250" in markdown
    assert "| p (paired permutation) |" in markdown
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)


def test_a_tiny_twin_study_with_tuning_and_tradeoff_in_two_workers(tmp_path):
    config = tiny_acts_config(tmp_path / "unused", "checkpoint_every=0", "env.regime=paper")
    out = tmp_path / "study"
    compare(
        config,
        ["duca", "grpo"],
        [0, 1],
        out,
        train,
        eval_sessions=4,
        eval_seeds=[0, 1],
        tune=True,
        tune_lrs=[5e-3],
        tune_entropy=[0.0, 0.01],
        tune_seeds=1,
        tradeoff=[(1.0, 0.5)],
        workers=2,
        progress=False,
    )
    report = json.loads((out / "compare.json").read_text())
    phases = [run["phase"] for run in report["runs"]]
    assert phases.count("tune") == 4 and phases.count("main") == 4 and phases.count("tradeoff") == 4
    for algo in ("duca", "grpo"):
        assert report["best"][algo]["optim.lr"] == 5e-3
        assert report["best"][algo]["algo.loss.entropy_coef"] in (0.0, 0.01)
    for mode in ("greedy", "sampled"):
        entry = report["summary"][f"{mode}/conversion_rate"]["duca"]
        assert entry["ci"][0] <= entry["mean"] <= entry["ci"][1]
        assert 0 <= entry["vs_baseline"]["p_value"] <= 1
    main_run = next(run for run in report["runs"] if run["phase"] == "main")
    saved = (Path(main_run["run_dir"]) / "config.yaml").read_text()
    assert "regime: paper" in saved and "progress: false" in saved
    assert (out / "curves.png").read_bytes().startswith(PNG)
    assert (out / "tradeoff.png").read_bytes().startswith(PNG)
    assert "Sampled evaluation" in (out / "compare.md").read_text()


def test_a_finished_run_is_evaluated_without_retraining(tmp_path):
    config = tiny_acts_config(tmp_path / "unused")
    compare(config, ["duca"], [0], tmp_path, fake_train, fake_eval, 4, progress=False)

    def refuse(config):
        raise AssertionError("retrained a finished run")

    compare(config, ["duca"], [0], tmp_path, refuse, fake_eval, 4, progress=False)


def test_seed_and_weight_specs():
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds(2) == [0, 1]
    assert parse_seeds("21,22,23") == [21, 22, 23]
    for bad in ("0", "a", "1,1", "-1,2"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)
    assert parse_weights("1:0.25,0.5:1") == [(1.0, 0.25), (0.5, 1.0)]
    with pytest.raises(ValueError, match="tradeoff weights"):
        parse_weights("1:2:3")


def test_compare_rejects_bad_arguments(tmp_path, capsys):
    config = tiny_acts_config(tmp_path / "unused")
    with pytest.raises(ValueError, match="algos must be"):
        compare(config, ["ppo"], [0], tmp_path, fake_train, fake_eval, 4)
    with pytest.raises(ValueError, match="must not repeat"):
        compare(config, ["duca", "duca"], [0], tmp_path, fake_train, fake_eval, 4)
    with pytest.raises(KeyError, match="conversion_rate"):
        compare(config, ["duca"], [0], tmp_path, fake_train, lambda *a, **k: {"mean_turns": 1.0}, 4)
    assert main(["compare", "--config", str(ACTS_CONFIG), "--seeds", "x", f"run_dir={tmp_path}"]) == 2
    assert "seeds" in capsys.readouterr().err


def test_the_llm_task_through_compare_at_smoke_size(tmp_path):
    from duca_fast.train.config import load_config

    from .runs import ROOT, tiny_overrides

    overrides = tiny_overrides(tmp_path / "unused", tmp_path / "cache", "hf", steps=1)
    config = load_config(ROOT / "configs" / "demo.yaml", [*overrides, "checkpoint_every=0"])
    out = tmp_path / "llm"
    markdown = compare(
        config, ["grpo", "ppo_gae"], [0, 1], out, train, eval_sessions=2, eval_seeds=[0], progress=False
    )
    report = json.loads((out / "compare.json").read_text())
    assert report["modes"] == ["greedy", "sampled"]
    assert [(r["algo"], r["seed"]) for r in report["runs"]] == [
        ("grpo", 0),
        ("grpo", 1),
        ("ppo_gae", 0),
        ("ppo_gae", 1),
    ]
    for mode in report["modes"]:
        # The tiny random LLM may fail sessions (empty turns): rates are null unless a run finished one.
        rate = {(r["algo"], r["seed"]): r[f"{mode}/conversion_rate"] for r in report["runs"]}
        common = [s for s in (0, 1) if rate["grpo", s] is not None and rate["ppo_gae", s] is not None]
        entry = report["summary"][f"{mode}/conversion_rate"]["ppo_gae"]
        assert ("vs_baseline" in entry) == bool(common)
        if common:
            assert entry["vs_baseline"]["n"] == len(common) and 0 <= entry["vs_baseline"]["p_value"] <= 1
        assert all(r[f"{mode}/num_sessions"] == 2 for r in report["runs"])
    assert "Greedy evaluation" in markdown and "Sampled evaluation" in markdown
    assert (out / "curves.png").read_bytes().startswith(PNG)


def test_runs_that_finished_no_session_have_no_rate(tmp_path):
    def eval_gdpo_fails(config, checkpoint, num_sessions, seed, *, sampled):
        if config.algo.name == "gdpo":
            return {"failed_sessions": float(num_sessions), "num_sessions": float(num_sessions)}
        return fake_eval(config, checkpoint, num_sessions, seed, sampled=sampled)

    config = tiny_acts_config(tmp_path / "unused")
    markdown = compare(
        config, ["grpo", "gdpo"], [0, 1], tmp_path, fake_train, eval_gdpo_fails, 4, progress=False
    )
    summary = json.loads((tmp_path / "compare.json").read_text())["summary"]
    assert summary["greedy/conversion_rate"]["gdpo"] == {
        "mean": None,
        "ci": [None, None],
        "std": None,
        "n": 0,
    }
    assert "n/a (no finished session)" in markdown and "some runs finished no session" in markdown


def test_undefined_statistics_are_null_in_compare_json(tmp_path):
    """A run whose eval sessions all failed has no rates: compare.json writes null, never NaN."""
    config = tiny_acts_config(tmp_path / "unused")

    def failing_for_grpo(config, checkpoint, num_sessions, seed, *, sampled):
        if config.algo.name == "grpo":
            return {"failed_sessions": num_sessions, "num_sessions": num_sessions}
        return fake_eval(config, checkpoint, num_sessions, seed, sampled=sampled)

    compare(config, ["grpo", "duca"], [0, 1], tmp_path, fake_train, failing_for_grpo, 4, eval_seeds=[0])

    def refuse(constant):
        raise ValueError(f"{constant} in compare.json")

    report = json.loads((tmp_path / "compare.json").read_text(), parse_constant=refuse)
    grpo_runs = [run for run in report["runs"] if run["label"] == "grpo"]
    assert grpo_runs and all(run["greedy/conversion_rate"] is None for run in grpo_runs)
    assert report["summary"]["greedy/conversion_rate"]["duca"]["mean"] == pytest.approx(0.35)
