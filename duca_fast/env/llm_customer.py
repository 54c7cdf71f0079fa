"""A customer played by an LLM behind any OpenAI-compatible endpoint (e.g. a local ``vllm`` server).

One ``LLMCustomerFactory`` holds the endpoint settings, a client and request statistics; the environment
calls it like ``ScriptedCustomer`` (``factory(scenario, seed)``) to get one ``LLMCustomer`` per session.
All sessions share the client, so ``step_many`` sends their requests concurrently.

The model plays the persona and ends a session by closing a reply with a tagged line
``DECISION: {"bought": true, "price": 899, "thinks_bot": false}``; on the last turn, if it has not decided,
it is asked for that JSON object alone. An unparseable decision never crashes the session: it counts as
not bought, not flagged, and ``Outcome.info["decision_parse_failed"]`` records it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import zlib
from dataclasses import dataclass

import openai

from duca_fast.env.customer import CustomerEndpointError, CustomerReply
from duca_fast.env.scenarios import Scenario
from duca_fast.env.text import AgentTurnReading, asks_if_bot

DECISION_TAG = "DECISION:"
DECISION_REQUEST = (
    "The conversation is over. Answer with only a JSON object: "
    '{"bought": true or false, "price": the price you paid or null, "thinks_bot": true or false}'
)


@dataclass(frozen=True)
class LLMCustomerConfig:
    """Where and how to query the customer model."""

    base_url: str
    """OpenAI-compatible API root, e.g. "http://127.0.0.1:8000/v1"."""
    model: str
    """Model name the server knows (vLLM: ``--served-model-name`` or the model path)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; a local server without a key works when it is unset."""
    timeout_s: float = 10.0
    """Wall-clock limit of one request, connecting and reading the whole answer included. A reply is at
    most ``max_tokens`` (96) tokens, which a GPU vLLM server returns in about a second even with many
    sessions in flight, so 10 s leaves ample headroom; raise it for a slow CPU server."""
    max_attempts: int = 2
    """Tries per request (1 = no retry) for timeouts, connection errors, 429 and 5xx answers (other
    errors fail at once). With the defaults a hung endpoint costs a step about 2 x 10 s + 0.5 s, once:
    its sessions fail on their first customer turn, concurrently."""
    backoff_s: float = 0.5
    """Wait before the second try; doubles after each failed try."""
    temperature: float = 0.8
    """Sampling temperature of customer replies."""
    max_tokens: int = 96
    """Token limit of a customer reply."""
    decision_max_tokens: int = 64
    """Token limit of the end-of-session decision."""

    def __post_init__(self) -> None:
        if not self.base_url or not self.model:
            raise ValueError("LLMCustomerConfig needs a base_url and a model")
        if self.timeout_s <= 0 or self.max_attempts < 1 or self.backoff_s < 0:
            raise ValueError(
                f"need timeout_s > 0, max_attempts >= 1, backoff_s >= 0; got {self.timeout_s}, "
                f"{self.max_attempts}, {self.backoff_s}"
            )


@dataclass
class LLMCustomerStats:
    """Request counters of one factory (all its sessions)."""

    requests: int = 0
    """HTTP requests started, retries included."""
    failed_requests: int = 0
    """Requests that raised (each retry counts)."""
    in_flight: int = 0
    """Requests running now."""
    max_in_flight: int = 0
    """Most requests running at once: above 1 means sessions really were concurrent."""
    decision_parse_failures: int = 0
    """Sessions whose decision could not be parsed."""


@dataclass(frozen=True)
class CustomerDecision:
    """The customer model's end-of-session decision."""

    bought: bool
    """It buys."""
    price: float | None
    """Price it states (None when it gave none)."""
    thinks_bot: bool
    """It thinks the seller is a bot."""


_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


def _as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"not a boolean: {value!r}")


def parse_decision(text: str) -> CustomerDecision | None:
    """The last JSON object in ``text`` that is a valid decision, or None when there is none."""
    for candidate in reversed(_JSON_OBJECT.findall(text)):
        try:
            data = json.loads(candidate)
            bought = _as_bool(data["bought"])
            thinks_bot = _as_bool(data.get("thinks_bot", False))
            price = data.get("price")
            if price is not None:
                price = float(price)
                if not math.isfinite(price) or price <= 0:
                    price = None
            return CustomerDecision(bought=bought, price=price, thinks_bot=thinks_bot)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return None


def persona_prompt(scenario: Scenario) -> str:
    """System prompt that makes the model play the scenario's customer."""
    persona, product = scenario.persona, scenario.product
    return (
        f"You are {persona.name}, a customer talking to a seller about the {product.name} "
        f"({product.category}). "
        f"You need: {', '.join(persona.needs)}. You will pay at most ${persona.budget:.0f}. "
        f"Your skepticism is {persona.skepticism:.1f} on a 0-1 scale. Answer in one to three short, natural "
        "sentences. If the seller sounds robotic, you may ask whether you are talking to a bot. "
        f"When you decide to buy or to leave, end your reply with one line: {DECISION_TAG} "
        '{"bought": true or false, "price": the price or null, "thinks_bot": true or false}'
    )


class LLMCustomerFactory:
    """Builds ``LLMCustomer`` sessions that share one client and one ``LLMCustomerStats``."""

    def __init__(self, config: LLMCustomerConfig, label: str = "customer") -> None:
        """``label`` names the endpoint in error messages (the reward judge reuses this client)."""
        self.config = config
        self.label = label
        self.stats = LLMCustomerStats()
        # local servers accept any key; the client insists on a non-empty one
        self._api_key = os.environ.get(config.api_key_env) or "EMPTY"
        self._client: openai.AsyncOpenAI | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, scenario: Scenario, seed: int) -> LLMCustomer:
        return LLMCustomer(self, scenario, seed)

    def _client_for_running_loop(self) -> openai.AsyncOpenAI:
        # an async HTTP client belongs to the event loop that created it; sync steps each run their own loop
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # A client of an earlier, finished loop cannot be closed from this one: the rollout driver
            # runs every round in one loop and closes the client in it (``aclose``) when it is done.
            self._client = openai.AsyncOpenAI(
                base_url=self.config.base_url,
                api_key=self._api_key,
                timeout=self.config.timeout_s,
                max_retries=0,  # retries are ours, so they show in the stats and the error message
            )
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client of the running loop (its connection pool); a later call opens a new one."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            await client.close()

    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int, seed: int) -> str:
        """One chat completion with retries; raises ``CustomerEndpointError`` naming the endpoint."""
        config = self.config
        client = self._client_for_running_loop()
        where = f"{self.label} endpoint {config.base_url} (model {config.model!r})"
        problem, reason = "", ""
        for attempt in range(config.max_attempts):
            if attempt:
                await asyncio.sleep(config.backoff_s * 2 ** (attempt - 1))
            self.stats.requests += 1
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
            try:
                # httpx's timeout bounds each read, not the request: a server trickling bytes would
                # never time out, so the whole request gets one deadline
                response = await asyncio.wait_for(
                    client.chat.completions.create(
                        model=config.model,
                        messages=messages,
                        max_tokens=max_tokens,
                        temperature=config.temperature,
                        seed=seed,
                    ),
                    timeout=config.timeout_s,
                )
                return response.choices[0].message.content or ""
            except (TimeoutError, openai.APITimeoutError):
                problem, reason = f"timed out after {config.timeout_s:g} s", "timeout"
            except openai.APIConnectionError as error:
                problem, reason = f"could not connect ({error.__cause__ or error})", "unreachable"
            except openai.APIStatusError as error:
                problem, reason = f"HTTP {error.status_code}: {error.message}", "server_error"
                if error.status_code != 429 and error.status_code < 500:
                    self.stats.failed_requests += 1
                    raise CustomerEndpointError(
                        f"{where} refused the request: {problem}", "rejected"
                    ) from error
            finally:
                self.stats.in_flight -= 1
            self.stats.failed_requests += 1
        raise CustomerEndpointError(
            f"{where} {problem}; gave up after {config.max_attempts} attempts", reason
        )


class LLMCustomer:
    """One session's LLM-played customer (follows the ``Customer`` protocol)."""

    def __init__(self, factory: LLMCustomerFactory, scenario: Scenario, seed: int) -> None:
        self.factory = factory
        self.scenario = scenario
        self._seed = zlib.crc32(f"{scenario.scenario_id}/{seed}".encode())
        self._messages = [{"role": "system", "content": persona_prompt(scenario)}]
        self._best_offer: float | None = None
        self._turn = 0

    def opening(self) -> str:
        # scripted, so that reset() needs no request; the model speaks from the first reply on
        product, need = self.scenario.product.name, self.scenario.persona.needs[0]
        text = f"Hi, I'm looking at the {product}. {need.capitalize()} matters to me."
        self._messages.append({"role": "assistant", "content": text})
        return text

    def respond(self, agent_message: str, reading: AgentTurnReading, final: bool) -> CustomerReply:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arespond(agent_message, reading, final))
        raise RuntimeError("step() was called inside a running event loop; use `await env.astep(...)` there")

    async def arespond(self, agent_message: str, reading: AgentTurnReading, final: bool) -> CustomerReply:
        messages = [*self._messages, {"role": "user", "content": agent_message}]
        seed = (self._seed + self._turn) % 2**31
        raw = await self.factory.chat(messages, max_tokens=self.factory.config.max_tokens, seed=seed)
        spoken, tag, tagged = raw.partition(DECISION_TAG)
        decision = parse_decision(tagged) if tag else None
        decision_text = tagged
        if decision is None and final:
            request = [
                *messages,
                {"role": "assistant", "content": raw},
                {"role": "user", "content": DECISION_REQUEST},
            ]
            decision_text = await self.factory.chat(
                request, max_tokens=self.factory.config.decision_max_tokens, seed=seed + 1
            )
            decision = parse_decision(decision_text)
            if decision is None:
                self.factory.stats.decision_parse_failures += 1
                return self._commit(
                    messages, raw, spoken, intent="left", ended=True, reason="decision_parse_failed",
                    info={"decision_parse_failed": True, "raw_decision": decision_text[:300]},
                )  # fmt: skip
        if reading.offered_price is not None:
            self._best_offer = min(self._best_offer or math.inf, reading.offered_price)
        if decision is None:
            return self._commit(messages, raw, spoken, intent="neutral")
        info = {"decision_parse_failed": False, "raw_decision": decision_text[:300]}
        if decision.bought:
            price = decision.price or self._best_offer or self.scenario.product.list_price
            return self._commit(
                messages, raw, spoken, intent="bought", ended=True, bought=True, price=price,
                reason="bought", flagged_bot=decision.thinks_bot, info=info,
            )  # fmt: skip
        reason = "max_turns" if final and not tag else "walked_away"
        return self._commit(
            messages, raw, spoken, intent="left", ended=True, reason=reason, flagged_bot=decision.thinks_bot,
            info=info,
        )  # fmt: skip

    def _commit(
        self, messages: list[dict[str, str]], raw: str, spoken: str, intent: str, **kwargs: object
    ) -> CustomerReply:
        """Record the exchange (only once the endpoint answered, so a failed call changes nothing)."""
        self._messages = [*messages, {"role": "assistant", "content": raw}]
        self._turn += 1
        text = spoken.strip()
        return CustomerReply(text=text, intent=intent, asks_if_bot=asks_if_bot(text), **kwargs)
