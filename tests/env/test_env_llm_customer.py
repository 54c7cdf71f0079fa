"""The LLM customer: a real local vLLM server for the plumbing, a tiny local HTTP stub for failure modes."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from duca_fast.env import (
    CustomerEndpointError,
    LLMCustomerConfig,
    LLMCustomerFactory,
    SalesEnv,
    generate_scenarios,
    parse_decision,
    step_many,
)
from tests.env.conftest import SERVED_MODEL_NAME


def test_parse_decision_is_robust():
    assert parse_decision('ok\nDECISION: {"bought": true, "price": 899, "thinks_bot": false}').bought
    decision = parse_decision('{"x": 1} then {"bought": "no", "thinks_bot": "yes", "price": null}')
    assert decision is not None and not decision.bought and decision.thinks_bot and decision.price is None
    assert parse_decision('{"bought": true, "price": -5}').price is None
    for garbage in ("", "division USS accord", '{"bought": maybe}', '{"price": 3}', "{{{", '{"bought": [1]}'):
        assert parse_decision(garbage) is None


def test_real_vllm_server_concurrent_sessions_and_parse_failures(vllm_server):
    factory = LLMCustomerFactory(
        LLMCustomerConfig(
            base_url=vllm_server, model=SERVED_MODEL_NAME, max_tokens=16, decision_max_tokens=16
        )
    )
    scenarios = generate_scenarios(6, seed=12)
    envs = [SalesEnv(factory, max_turns=2) for _ in scenarios]
    for seed, (env, scenario) in enumerate(zip(envs, scenarios)):
        observation = env.reset(scenario, seed)
        assert observation.customer_message

    first = asyncio.run(step_many(envs, ["Hi! What do you need it for?"] * len(envs)))
    assert all(not isinstance(r, BaseException) for r in first), first
    assert factory.stats.max_in_flight > 1, "requests of different sessions must go out together"
    live = [env for env, result in zip(envs, first) if not result.done]
    final = asyncio.run(step_many(live, ["It is $500. Shall I place the order?"] * len(live)))
    assert all(not isinstance(r, BaseException) and r.done for r in final), final
    for result in [*first, *final]:
        assert isinstance(result.customer_message, str)
        if result.done:
            assert result.outcome.reason in {"bought", "walked_away", "max_turns", "decision_parse_failed"}
    # a random model writes gibberish: the decision cannot be parsed, which is recorded, never raised
    failures = [r for r in final if r.outcome.info.get("decision_parse_failed")]
    assert failures and all(not r.outcome.converted for r in failures)
    assert factory.stats.decision_parse_failures == len(failures)


def test_sync_step_works_against_the_real_server(vllm_server):
    factory = LLMCustomerFactory(
        LLMCustomerConfig(base_url=vllm_server, model=SERVED_MODEL_NAME, max_tokens=8)
    )
    env = SalesEnv(factory, max_turns=3)
    env.reset(generate_scenarios(1)[0], seed=0)
    assert isinstance(env.step("Hello, how can I help?").customer_message, str)
    assert isinstance(env.step("What matters to you?").customer_message, str)
    with pytest.raises(CustomerEndpointError, match="refused the request: HTTP 404") as error:
        bad = LLMCustomerFactory(
            LLMCustomerConfig(base_url=vllm_server, model="no-such-model", max_attempts=3)
        )
        bad_env = SalesEnv(bad)
        bad_env.reset(generate_scenarios(1)[0], seed=0)
        bad_env.step("Hello")
    assert bad.stats.requests == 1, "a 4xx answer is not retried"
    assert error.value.reason == "rejected"


class _Stub(BaseHTTPRequestHandler):
    """Fails the first ``fail_first`` requests with 503, sleeps ``delay_s``, then answers a completion."""

    fail_first = 0
    delay_s = 0.0
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).calls <= self.fail_first:
            body, status = b'{"error": {"message": "overloaded"}}', 503
        else:
            time.sleep(self.delay_s)
            message = {
                "role": "assistant",
                "content": 'Fine. DECISION: {"bought": false, "thinks_bot": true}',
            }
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            body = json.dumps(
                {"id": "x", "object": "chat.completion", "created": 0, "model": "stub", "choices": [choice]}
            ).encode()
            status = 200
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and went away

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    handler = type("Stub", (_Stub,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _stepped_env(base_url, **config):
    factory = LLMCustomerFactory(LLMCustomerConfig(base_url=base_url, model="stub", backoff_s=0.01, **config))
    env = SalesEnv(factory)
    env.reset(generate_scenarios(1)[0], seed=0)
    return factory, env


def test_retries_with_backoff_then_succeeds(stub_server):
    handler, url = stub_server
    handler.fail_first = 2
    factory, env = _stepped_env(url, max_attempts=3)
    result = env.step("Hello there, what do you need?")
    assert handler.calls == 3 and factory.stats.failed_requests == 2
    assert result.done and result.outcome.flagged_bot and not result.outcome.converted
    assert result.customer_message == "Fine."


def test_failing_endpoint_raises_and_keeps_the_session(stub_server):
    handler, url = stub_server
    handler.fail_first = 100
    _, env = _stepped_env(url, max_attempts=2)
    with pytest.raises(CustomerEndpointError, match=r"HTTP 503.*gave up after 2 attempts") as error:
        env.step("Hello")
    assert error.value.reason == "server_error"
    assert handler.calls == 2 and len(env.transcript) == 1 and not env.done


def test_timeout_raises_a_clear_error(stub_server):
    handler, url = stub_server
    handler.delay_s = 1.0
    _, env = _stepped_env(url, timeout_s=0.2, max_attempts=1)
    with pytest.raises(CustomerEndpointError, match=r"timed out after 0.2 s"):
        env.step("Hello")


def _closed_port_url():
    with socket.socket() as sock:  # bound, then closed: nobody listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_unreachable_endpoint_fails_fast_and_only_its_own_session():
    factory, dead_env = _stepped_env(_closed_port_url(), max_attempts=2)
    scripted = SalesEnv()
    scripted.reset(generate_scenarios(1)[0], seed=0)
    start = time.perf_counter()
    results = asyncio.run(step_many([dead_env, scripted], ["Hello", "Hello, what do you need it for?"]))
    assert time.perf_counter() - start < 3.0  # refused at once; only the 0.01 s backoff is waited
    assert isinstance(results[0], CustomerEndpointError) and "could not connect" in str(results[0])
    assert results[0].reason == "unreachable" and factory.stats.requests == 2
    assert "gave up after 2 attempts" in str(results[0])
    assert not isinstance(results[1], BaseException) and results[1].customer_message


@pytest.fixture
def silent_server():
    """A real TCP server on 127.0.0.1 that accepts connections and then writes ``trickle`` forever.

    ``trickle=b""`` never answers at all (a hung endpoint); otherwise it sends a 200 header promising
    a long body and then one byte of it every 0.1 s, so no single read ever waits long.
    """
    settings = {"trickle": b""}
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    connections = []

    def serve(connection):
        connection.recv(65536)
        if settings["trickle"]:
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            connection.sendall(b"Content-Length: 100000\r\n\r\n")
        while not stop.wait(0.1):
            try:
                connection.sendall(settings["trickle"])
            except OSError:
                return

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connections.append(connection)
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield settings, f"http://127.0.0.1:{listener.getsockname()[1]}/v1", connections
    stop.set()
    thread.join()
    for connection in connections:
        connection.close()
    listener.close()


@pytest.mark.parametrize("trickle", [b"", b" "], ids=["hung", "trickling"])
def test_hung_endpoint_times_out_within_the_budget(silent_server, trickle):
    settings, url, connections = silent_server
    settings["trickle"] = trickle
    factory, env = _stepped_env(url, timeout_s=0.4, max_attempts=2)
    start = time.perf_counter()
    with pytest.raises(
        CustomerEndpointError, match=r"timed out after 0.4 s; gave up after 2 attempts"
    ) as error:
        env.step("Hello")
    elapsed = time.perf_counter() - start
    assert error.value.reason == "timeout"
    assert 0.8 <= elapsed < 0.8 + 2.0, elapsed  # two 0.4 s tries and a 0.01 s backoff, not 30 s x 3
    assert len(connections) == 2 and factory.stats.failed_requests == 2
    assert len(env.transcript) == 1 and not env.done


def test_defaults_bound_a_hung_step():
    config = LLMCustomerConfig(base_url="http://127.0.0.1:1/v1", model="m")
    worst = config.max_attempts * config.timeout_s + config.backoff_s * (2 ** (config.max_attempts - 1) - 1)
    assert worst <= 25.0, "a hung customer endpoint must not stall a step for long by default"
    with pytest.raises(ValueError, match="timeout_s > 0"):
        LLMCustomerConfig(base_url="http://x/v1", model="m", timeout_s=0)
    with pytest.raises(ValueError, match="max_attempts >= 1"):
        LLMCustomerConfig(base_url="http://x/v1", model="m", max_attempts=0)
