"""Scenario generation and the JSONL round trip, including malformed files."""

from __future__ import annotations

import json

import pytest

from duca_fast.env import SALES_COACHING, Scenario, generate_scenarios, load_scenarios, save_scenarios


def test_generator_is_seeded_and_diverse():
    scenarios = generate_scenarios()
    assert len(scenarios) == 300
    assert generate_scenarios(20, seed=5) == generate_scenarios(20, seed=5)
    assert generate_scenarios(20, seed=5) != generate_scenarios(20, seed=6)
    assert len({s.product.category for s in scenarios}) == 8
    assert len({s.rules.max_discount_percent for s in scenarios}) >= 4
    below_floor_budgets = sum(s.persona.budget < s.min_allowed_price for s in scenarios)
    assert 0 < below_floor_budgets < len(scenarios) / 2, (
        "some, not most, customers need a rule-breaking price"
    )


def test_jsonl_round_trip(tmp_path):
    scenarios = generate_scenarios(25, seed=2)
    path = tmp_path / "scenarios.jsonl"
    save_scenarios(path, scenarios)
    assert load_scenarios(path) == scenarios


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_malformed_jsonl_names_the_line(tmp_path):
    good = json.dumps(generate_scenarios(1)[0].to_dict())
    path = tmp_path / "bad.jsonl"

    _write_lines(path, [good, "", "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid scenario"):
        load_scenarios(path)

    missing = json.loads(good)
    del missing["persona"]
    _write_lines(path, [good, json.dumps(missing)])
    with pytest.raises(ValueError, match=r":2: .*missing the field 'persona'"):
        load_scenarios(path)

    broken = json.loads(good)
    broken["product"]["floor_price"] = broken["product"]["list_price"] * 2
    _write_lines(path, [json.dumps(broken)])
    with pytest.raises(ValueError, match=r":1: .*floor_price <= list_price"):
        load_scenarios(path)

    _write_lines(path, ["[1, 2]"])
    with pytest.raises(ValueError, match=r":1: .*must be a JSON object"):
        load_scenarios(path)

    path.write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_scenarios(path)


def test_scenario_invariants():
    scenario = generate_scenarios(1)[0]
    data = scenario.to_dict()
    data["persona"]["needs"] = ["teleportation"]
    with pytest.raises(ValueError, match="not product features"):
        Scenario.from_dict(data)


def test_every_feature_pitch_reads_as_that_feature_only():
    """Scripted sellers and the act twin say these sentences: the text reading must recognise them."""
    from duca_fast.env import read_agent_message

    for scenario in generate_scenarios(300):
        for feature in scenario.product.features:
            reading = read_agent_message(feature.pitch, scenario, set())
            assert reading.features_pitched == {feature.name}, (scenario.product.category, feature.pitch)
            assert not reading.close_attempt and reading.offered_price is None


def test_easy_mix_eases_only_the_persona():
    """The demo's "easy" mix: the study's draws with one need, a budget >= the list price and low skepticism,
    so a tiny untrained model can convert some sessions; products and rules stay the study's."""
    study, easy = generate_scenarios(200, seed=4), generate_scenarios(200, seed=4, mix="easy")
    assert generate_scenarios(200, seed=4, mix="study") == study
    for hard, soft in zip(study, easy):
        assert soft.scenario_id == "e" + hard.scenario_id[1:]
        assert (soft.product, soft.rules) == (hard.product, hard.rules)
        assert soft.persona.needs == hard.persona.needs[:1]
        assert hard.product.list_price <= soft.persona.budget <= 1.2 * hard.product.list_price + 0.01
        assert soft.persona.skepticism == pytest.approx(0.3 * hard.persona.skepticism, abs=1e-3)
        assert (soft.persona.patience, soft.persona.asks_if_bot) == (
            hard.persona.patience,
            hard.persona.asks_if_bot,
        )
    assert sum(len(s.persona.needs) > 1 for s in study) > 100, "the study's mix has multi-need customers"
    assert sum(s.persona.budget < s.product.list_price for s in study) > 50
    with pytest.raises(ValueError, match="mix must be one of"):
        generate_scenarios(3, mix="hard")


def test_coached_brief_ends_with_the_recipe_and_round_trips(tmp_path):
    plain, coached = generate_scenarios(3, seed=1)[0], generate_scenarios(3, seed=1, coached=True)[0]
    recipe = SALES_COACHING.format(price=coached.product.list_price)
    assert coached.agent_brief() == plain.agent_brief() + "\n" + recipe
    assert f"(${coached.product.list_price:.2f})" in recipe and "Would you like to order it?" in recipe
    path = tmp_path / "coached.jsonl"
    save_scenarios(path, [coached])
    assert load_scenarios(path) == [coached]
    legacy = plain.to_dict()
    del legacy["coached"]  # files written before the field existed
    assert Scenario.from_dict(legacy) == plain
