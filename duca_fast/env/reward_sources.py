"""Learned reward sources beside the rule-based rewards: an LLM reward judge and a reward model.

REPO (arXiv 2510.04214, persuasive negotiation agents) trains on heterogeneous reward sources, a
preference reward model, an LLM judge scoring against a rubric and programmatic checks, to make reward
hacking harder; its rule for combining them is not public. Here each source is one more reward
*component* of the sales environment, on the turn or the session horizon, named in the config and
weighted like the rule-based components (``algo.turn_component_weights`` /
``algo.session_component_weights``): the estimators combine and normalize them as they do the others.

- ``LLMRewardJudge``: any OpenAI-compatible endpoint (a local ``vllm`` server, a hosted API). The rubric
  is the system prompt; the conversation so far (turn: up to and including the seller's message; session:
  the whole conversation) is the user message, asking for ``SCORE: <0-10>``. The score is divided by 10.
  Requests share one client, time out and retry as the LLM customer's do (``LLMCustomerFactory.chat``);
  an endpoint that keeps failing fails the session with its reason, the others go on. A reply without a
  number scores 0 and is counted (``stats.parse_failures``).
- ``SequenceRewardModel``: a transformers sequence-classification model loaded from a local directory.
  The conversation is rendered with the tokenizer's chat template when it has one (seller = assistant,
  customer = user), else as ``Customer: ...`` / ``Seller: ...`` lines, truncated from the left to
  ``max_length`` tokens. One label: its logit is the reward; several: the probability of ``label``.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

HORIZONS = ("turn", "session")
KINDS = ("judge", "model")

TURN_RUBRIC = (
    "You grade a salesperson's latest message in a conversation with a customer. Reward messages that "
    "follow a good sales process (understand the need, answer the question asked, pitch what matters to "
    "this customer, honest prices and claims) and that would persuade without pressure. Penalize false "
    "claims, repetition, pushiness and ignoring the customer."
)
SESSION_RUBRIC = (
    "You grade a whole sales conversation between a salesperson and a customer. Reward conversations where "
    "the salesperson found the customer's needs, made an honest, relevant and persuasive case and handled "
    "objections well. Penalize false claims, manipulation, repetition and ignoring the customer."
)
SCORE_REQUEST = "Rate the {what} from 0 (worst) to 10 (best). Answer with one line: SCORE: <number>."

_SCORE = re.compile(r"SCORE\s*[:=]\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class RewardSourceConfig:
    """One learned reward component (``env.reward_sources`` in the training config)."""

    name: str
    """Component name (a column of the turn or session rewards; must not be a rule-based name)."""
    kind: str
    """"judge" (an LLM behind an OpenAI-compatible endpoint) or "model" (a local reward model)."""
    horizon: str = "turn"
    """"turn" (scored after every seller message) or "session" (once, on the finished conversation)."""
    base_url: str = ""
    """judge: API root, e.g. "http://127.0.0.1:8001/v1"."""
    model: str = ""
    """judge: the model name the server knows."""
    rubric: str = ""
    """judge: the grading instructions (empty: the built-in rubric of the horizon)."""
    api_key_env: str = "OPENAI_API_KEY"
    """judge: environment variable with the API key (a local server needs none)."""
    timeout_s: float = 30.0
    """judge: wall-clock limit of one request."""
    max_attempts: int = 2
    """judge: tries per request for timeouts, connection errors, 429 and 5xx."""
    max_tokens: int = 16
    """judge: token limit of the verdict."""
    path: str = ""
    """model: local directory of a transformers sequence-classification model and its tokenizer."""
    max_length: int = 1024
    """model: tokens kept (the end of the conversation)."""
    label: int = -1
    """model with several labels: the label whose probability is the reward (-1: the last)."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"name must be a non-empty identifier, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.horizon not in HORIZONS:
            raise ValueError(f"horizon must be one of {HORIZONS}, got {self.horizon!r}")
        if self.kind == "judge" and not (self.base_url and self.model):
            raise ValueError(f"reward source {self.name!r} (judge) needs base_url and model")
        if self.kind == "model" and not self.path:
            raise ValueError(f"reward source {self.name!r} (model) needs path (a local model directory)")
        if self.timeout_s <= 0 or self.max_attempts < 1 or self.max_tokens < 1 or self.max_length < 8:
            raise ValueError(
                "need timeout_s > 0, max_attempts >= 1, max_tokens >= 1, max_length >= 8; got "
                f"{self.timeout_s}, {self.max_attempts}, {self.max_tokens}, {self.max_length}"
            )


class RewardSource(Protocol):
    name: str
    horizon: str

    async def score(self, transcript: list[tuple[str, str]]) -> float:
        """The reward of a conversation ``[(role, text)]`` (role "customer" or "agent") as it stands."""
        ...


def render(transcript: list[tuple[str, str]]) -> str:
    return "\n".join(f"{'Seller' if role == 'agent' else 'Customer'}: {text}" for role, text in transcript)


def parse_score(text: str, scale_max: float = 10.0) -> float | None:
    """``SCORE: n`` (else the last number) clamped to ``[0, scale_max]`` and divided by it; None if none."""
    match = _SCORE.findall(text) or _NUMBER.findall(text)
    if not match:
        return None
    value = float(match[-1])
    if not math.isfinite(value):
        return None
    return min(max(value, 0.0), scale_max) / scale_max


@dataclass
class JudgeStats:
    scored: int = 0
    """Verdicts received."""
    parse_failures: int = 0
    """Verdicts without a number (scored 0)."""
    samples: list[str] = field(default_factory=list)
    """The first few unparseable verdicts, for the log."""


class LLMRewardJudge:
    """An LLM scoring the conversation against a rubric (see the module docstring)."""

    def __init__(self, config: RewardSourceConfig) -> None:
        from duca_fast.env.llm_customer import LLMCustomerConfig, LLMCustomerFactory

        self.name, self.horizon = config.name, config.horizon
        self.rubric = config.rubric or (TURN_RUBRIC if config.horizon == "turn" else SESSION_RUBRIC)
        self.max_tokens = config.max_tokens
        self.stats = JudgeStats()
        self._endpoint = LLMCustomerFactory(
            LLMCustomerConfig(
                base_url=config.base_url,
                model=config.model,
                api_key_env=config.api_key_env,
                timeout_s=config.timeout_s,
                max_attempts=config.max_attempts,
                temperature=0.0,
            ),
            label=f"reward judge {config.name!r}",
        )

    def messages(self, transcript: list[tuple[str, str]]) -> list[dict[str, str]]:
        what = "salesperson's latest message" if self.horizon == "turn" else "whole conversation"
        user = f"{render(transcript)}\n\n{SCORE_REQUEST.format(what=what)}"
        return [{"role": "system", "content": self.rubric}, {"role": "user", "content": user}]

    async def score(self, transcript: list[tuple[str, str]]) -> float:
        reply = await self._endpoint.chat(self.messages(transcript), max_tokens=self.max_tokens, seed=0)
        value = parse_score(reply)
        self.stats.scored += 1
        if value is None:
            self.stats.parse_failures += 1
            if len(self.stats.samples) < 5:
                self.stats.samples.append(reply[:200])
            return 0.0
        return value

    async def aclose(self) -> None:
        await self._endpoint.aclose()


class SequenceRewardModel:
    """A local transformers sequence-classification reward model (see the module docstring)."""

    def __init__(self, config: RewardSourceConfig, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.horizon = config.name, config.horizon
        self.tokenizer = AutoTokenizer.from_pretrained(config.path)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(config.path).to(device).eval()
        if self.model.config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = self.model.config.num_labels
        if config.label >= labels or config.label < -labels:
            raise ValueError(
                f"reward source {config.name!r}: label {config.label} but the model has {labels}"
            )
        self.label = config.label
        self.max_length = config.max_length
        self._torch = torch

    def text(self, transcript: list[tuple[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [
                {"role": "assistant" if role == "agent" else "user", "content": text}
                for role, text in transcript
            ]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return render(transcript)

    def score_now(self, transcript: list[tuple[str, str]]) -> float:
        inputs = self.tokenizer(
            self.text(transcript), truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        with self._torch.no_grad():
            logits = self.model(**inputs).logits[0].float()
        if logits.numel() == 1:
            return float(logits[0])
        return float(self._torch.softmax(logits, dim=0)[self.label])

    async def score(self, transcript: list[tuple[str, str]]) -> float:
        # A forward pass: off the event loop, so the other sessions' requests go on meanwhile.
        return await asyncio.to_thread(self.score_now, transcript)


def build_reward_sources(configs: list[RewardSourceConfig] | tuple[()], **model_kwargs: Any) -> list[Any]:
    """One source per config (judges share nothing; each model is loaded once here)."""
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"reward source names must be unique, got {duplicates} more than once")
    return [
        LLMRewardJudge(c) if c.kind == "judge" else SequenceRewardModel(c, **model_kwargs) for c in configs
    ]
