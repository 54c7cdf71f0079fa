"""Task metrics over a batch of finished sessions (the paper's, plus compliance and length)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from duca_fast.env.base import Outcome


@dataclass(frozen=True)
class SalesMetrics:
    """Batch metrics; every rate lies in [0, 1]."""

    num_sessions: int
    """Sessions in the batch."""
    conversion_rate: float
    """Share of sessions where the customer bought."""
    repetition_rate: float
    """Inter-sentence repetition rate: share of agent sentences that mostly repeat earlier agent sentences."""
    identity_detection_rate: float
    """Share of sessions where the customer flagged the agent as a bot."""
    compliance_violation_rate: float
    """Share of agent turns with at least one compliance violation."""
    mean_turns: float
    """Mean agent turns per session."""

    def __post_init__(self) -> None:
        rates = (self.conversion_rate, self.repetition_rate, self.identity_detection_rate)
        if any(not 0 <= rate <= 1 for rate in (*rates, self.compliance_violation_rate)):
            raise ValueError(f"SalesMetrics: rates must lie in [0, 1], got {self}")

    def as_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def compute_metrics(outcomes: Sequence[Outcome]) -> SalesMetrics:
    """Metrics of finished sessions; reads ``num_sentences``, ``num_repeated_sentences`` and
    ``num_violation_turns`` from ``Outcome.info`` (absent keys, e.g. of an errored session, count as 0)."""
    if not outcomes:
        raise ValueError("compute_metrics needs at least one Outcome")
    for index, outcome in enumerate(outcomes):
        if not isinstance(outcome, Outcome):
            raise ValueError(f"outcomes[{index}] is a {type(outcome).__name__}, not an Outcome")
    sentences = sum(int(o.info.get("num_sentences", 0)) for o in outcomes)
    repeated = sum(int(o.info.get("num_repeated_sentences", 0)) for o in outcomes)
    turns = sum(o.num_turns for o in outcomes)
    violation_turns = sum(int(o.info.get("num_violation_turns", 0)) for o in outcomes)
    return SalesMetrics(
        num_sessions=len(outcomes),
        conversion_rate=sum(o.converted for o in outcomes) / len(outcomes),
        repetition_rate=repeated / sentences if sentences else 0.0,
        identity_detection_rate=sum(o.flagged_bot for o in outcomes) / len(outcomes),
        compliance_violation_rate=violation_turns / turns if turns else 0.0,
        mean_turns=turns / len(outcomes),
    )
