"""Learned reward sources: the LLM judge through a real local vLLM server and a stub, a tiny reward model,
both as turn and session components of the sales environment and in a training run."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import torch

from duca_fast.env import SalesEnv, generate_scenarios, step_many
from duca_fast.env.base import aclose_all
from duca_fast.env.customer import CustomerEndpointError
from duca_fast.env.reward_sources import (
    LLMRewardJudge,
    RewardSourceConfig,
    SequenceRewardModel,
    build_reward_sources,
    parse_score,
)
from duca_fast.train.config import ConfigError, load_config
from tests.env.conftest import SERVED_MODEL_NAME


def test_parse_score():
    assert parse_score("SCORE: 7") == 0.7
    assert parse_score("Good job.\nscore = 9.5") == 0.95
    assert parse_score("I'd say 3 out of... SCORE: 12") == 1.0  # clamped
    assert parse_score("SCORE: -2") == 0.0
    assert parse_score("between 4 and 6") == 0.6  # no tag: the last number
    assert parse_score("no idea") is None and parse_score("") is None


def judge(base_url, name="judge_sop", horizon="turn", model=SERVED_MODEL_NAME, **extra):
    config = RewardSourceConfig(
        name=name, kind="judge", horizon=horizon, base_url=base_url, model=model, **extra
    )
    return LLMRewardJudge(config)


def play(env, messages):
    """Step ``env`` through ``messages`` in one event loop (as the rollout driver does), closing its
    reward sources' clients at the end."""
    env.reset(generate_scenarios(1, seed=3)[0], seed=0)

    async def steps():
        results = []
        try:
            for message in messages:
                results.append(await env.astep(message))
                if results[-1].done:
                    break
        finally:
            await env.aclose()
        return results

    return asyncio.run(steps())


def test_judge_through_a_real_vllm_server(vllm_server):
    turn, session = judge(vllm_server), judge(vllm_server, name="judge_deal", horizon="session")
    envs = [SalesEnv(max_turns=2, reward_sources=[turn, session]) for _ in range(3)]
    assert envs[0].turn_reward_names[-1] == "judge_sop" and envs[0].session_reward_names[-1] == "judge_deal"
    for seed, env in enumerate(envs):
        env.reset(generate_scenarios(3, seed=1)[seed], seed=seed)

    async def two_turns():
        first = await step_many(envs, ["Hello! What are you looking for?"] * 3)
        second = await step_many(envs, ["It costs $500 and fits your needs."] * 3)
        await aclose_all(envs)
        return first + second

    results = asyncio.run(two_turns())
    assert all(not isinstance(r, BaseException) for r in results), results
    for result in results:
        assert 0.0 <= result.turn_rewards["judge_sop"] <= 1.0
    finished = [r for r in results if r.done]
    assert finished and all(0.0 <= r.session_rewards["judge_deal"] <= 1.0 for r in finished)
    # A random model rarely writes a number: those verdicts score 0 and are counted, never raised.
    assert turn.stats.scored == 6 and session.stats.scored == len(finished)
    assert turn.stats.parse_failures <= turn.stats.scored
    assert turn._endpoint._client is None  # closed by aclose_all
    with pytest.raises(CustomerEndpointError, match=r"reward judge 'bad' endpoint .* HTTP 404"):
        play(SalesEnv(reward_sources=[judge(vllm_server, name="bad", model="no-such-model")]), ["Hi"])


class _Verdicts(BaseHTTPRequestHandler):
    """Answers every chat completion with ``verdict``; fails the first ``fail_first`` with 503."""

    verdict = "SCORE: 7"
    fail_first = 0
    seen: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        if len(type(self).seen) <= self.fail_first:
            payload, status = b'{"error": {"message": "busy"}}', 503
        else:
            message = {"role": "assistant", "content": self.verdict}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            payload = json.dumps(
                {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]}
            ).encode()
            status = 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def verdicts():
    handler = type("Verdicts", (_Verdicts,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_scores_turns_and_sessions_with_its_rubric_and_retries(verdicts):
    handler, url = verdicts
    handler.fail_first = 1
    sources = [
        judge(url, rubric="Grade honesty."),
        judge(url, name="judge_deal", horizon="session"),
    ]
    env = SalesEnv(max_turns=2, reward_sources=sources)
    results = play(env, ["Hello, what do you need?", "The price is $450."])
    assert [r.turn_rewards["judge_sop"] for r in results] == [0.7, 0.7]
    assert results[-1].done and results[-1].session_rewards["judge_deal"] == 0.7
    assert "judge_deal" not in results[-1].turn_rewards
    # 1 failed try + 2 turn verdicts + 1 session verdict; the rubric is the system prompt, the turn
    # verdict sees the conversation up to the seller's message, the session verdict the customer's reply.
    assert len(handler.seen) == 4
    first = handler.seen[1]["messages"]
    assert first[0] == {"role": "system", "content": "Grade honesty."}
    assert (
        first[1]["content"].endswith("SCORE: <number>.")
        and "Seller: Hello, what do you need?" in first[1]["content"]
    )
    # The turn and session verdicts of the last turn are requested concurrently: find the session's.
    (session_prompt,) = [
        body["messages"][1]["content"]
        for body in handler.seen
        if "whole conversation" in body["messages"][1]["content"]
    ]
    assert session_prompt.count("Customer:") == 3
    # The sync step runs (and closes) its own event loop for the judges.
    sync_judge = judge(url, name="judge_sync")
    sync_env = SalesEnv(max_turns=1, reward_sources=[sync_judge])
    sync_env.reset(generate_scenarios(1, seed=3)[0], seed=0)
    assert sync_env.step("Hi, what do you need?").turn_rewards["judge_sync"] == 0.7
    assert sync_judge._endpoint._client is None
    handler.verdict = "I cannot judge this."
    env = SalesEnv(max_turns=1, reward_sources=[sources[0]])
    assert play(env, ["Hi"])[0].turn_rewards["judge_sop"] == 0.0
    assert sources[0].stats.parse_failures == 1 and sources[0].stats.samples == ["I cannot judge this."]


def tiny_reward_model(path, num_labels):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from duca_fast.rollout.models import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    torch.manual_seed(num_labels)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels,
        pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_scores_the_rendered_conversation(tmp_path, num_labels):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tiny_reward_model(tmp_path / "rm", num_labels)
    source = SequenceRewardModel(
        RewardSourceConfig(name="rm", kind="model", horizon="session", path=str(path))
    )
    transcript = [("customer", "Hi, I need a laptop."), ("agent", "This one has 16 GB.")]
    tokenizer, model = (
        AutoTokenizer.from_pretrained(path),
        AutoModelForSequenceClassification.from_pretrained(path),
    )
    text = source.text(transcript)
    assert "Hi, I need a laptop." in text and "This one has 16 GB." in text
    logits = model(**tokenizer(text, return_tensors="pt")).logits[0].detach()
    expected = float(logits[0]) if num_labels == 1 else float(torch.softmax(logits, 0)[-1])
    assert asyncio.run(source.score(transcript)) == pytest.approx(expected, abs=1e-5)
    env = SalesEnv(max_turns=1, reward_sources=[source])
    (result,) = play(env, ["This laptop has all you need for $500."])
    assert result.done and math.isfinite(result.session_rewards["rm"])
    with pytest.raises(ValueError, match="label 5 but the model has"):
        SequenceRewardModel(RewardSourceConfig(name="rm", kind="model", path=str(path), label=5))


def test_config_names_weights_and_refusals():
    config = load_config(
        None,
        [
            'env.reward_sources=[{name: judge_sop, kind: judge, base_url: "http://x/v1", model: m}, '
            "{name: rm, kind: model, horizon: session, path: /nowhere}]",
            "algo.turn_component_weights={judge_sop: 0.5}",
            "algo.session_component_weights={rm: 2.0}",
        ],
    )
    assert [s.name for s in config.env.reward_sources] == ["judge_sop", "rm"]
    for overrides, message in [
        (["env.reward_sources=[{name: x, kind: judge}]"], "needs base_url and model"),
        (['env.reward_sources=[{name: x, kind: judge, base_url: "u", model: m, horizon: week}]'], "horizon"),
        (["env.reward_sources=[{name: compliance, kind: model, path: p}]"], "not rule-based reward names"),
        (["algo.turn_component_weights={judge_sop: 1.0}"], "unknown reward component .judge_sop."),
        (
            ["env.name=sales-acts", "env.reward_sources=[{name: rm, kind: model, path: p}]"],
            "apply to env.name=sales",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    with pytest.raises(ValueError, match="unique"):
        build_reward_sources([RewardSourceConfig(name="a", kind="model", path="p")] * 2)
