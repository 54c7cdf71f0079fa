"""``env.scenario_mix`` and ``env.agent_coaching``: validated with the config, and both the training pool
and the held-out sessions are drawn with them."""

from __future__ import annotations

import pytest

from duca_fast.env import generate_scenarios, save_scenarios
from duca_fast.train.config import ConfigError, load_config
from duca_fast.train.loop import held_out_sessions, scenario_pool

DEMO_CONFIG = "configs/demo.yaml"


def test_easy_mix_reaches_training_and_held_out_scenarios():
    config = load_config(DEMO_CONFIG, ["env.scenario_mix=easy", "env.num_scenarios=20"])
    pool = scenario_pool(config)
    held_out, _ = held_out_sessions(config, 12, seed=0)
    for scenarios in (pool, held_out):
        assert all(s.scenario_id.startswith("e") and len(s.persona.needs) == 1 for s in scenarios)
        assert all(s.persona.budget >= s.product.list_price for s in scenarios)
    assert {s.scenario_id for s in pool}.isdisjoint(s.scenario_id for s in held_out)
    study = scenario_pool(load_config(DEMO_CONFIG, ["env.scenario_mix=study", "env.num_scenarios=20"]))
    assert [s.product for s in study] == [s.product for s in pool]


def test_agent_coaching_reaches_training_and_held_out_briefs():
    for coaching in (False, True):
        config = load_config(DEMO_CONFIG, [f"env.agent_coaching={coaching}", "env.num_scenarios=5"])
        scenarios = scenario_pool(config) + held_out_sessions(config, 3, seed=0)[0]
        assert all(s.coached == coaching for s in scenarios)
        assert all(("How to sell:" in s.agent_brief()) == coaching for s in scenarios)


def test_bad_scenario_mix_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"env\.scenario_mix must be one of \('study', 'easy'\)"):
        load_config(DEMO_CONFIG, ["env.scenario_mix=hard"])
    path = tmp_path / "scenarios.jsonl"
    save_scenarios(path, generate_scenarios(2))
    with pytest.raises(ConfigError, match=r"with env\.scenarios_path the file decides"):
        load_config(
            DEMO_CONFIG, ["env.scenario_mix=easy", "env.agent_coaching=false", f"env.scenarios_path={path}"]
        )
    plain = ["env.scenario_mix=study", "env.agent_coaching=false", f"env.scenarios_path={path}"]
    assert load_config(DEMO_CONFIG, plain).env.scenarios_path == str(path)
    with pytest.raises(ConfigError, match="each scenario's 'coached' field decides"):
        load_config(
            DEMO_CONFIG, ["env.scenario_mix=study", "env.agent_coaching=true", f"env.scenarios_path={path}"]
        )
