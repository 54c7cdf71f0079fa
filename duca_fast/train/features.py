"""State features for ProxMO's proximity baseline: the twin's observation vector, or for the text task a
TF-IDF vector of the customer's last message before each agent turn.

The TF-IDF vectorizer is fitted on the whole step's messages, as the official code fits it on each batch's
observations (``GithubX-F/ProxMO-RL``, ``proxmo/core_proxmo.py``, ``step_soft_reward``: scikit-learn's
``TfidfVectorizer(max_features=1024)``, defaults otherwise). A step whose messages have no vocabulary at
all (every message empty) gets zero features: every turn is then equally close to every other.
"""

from __future__ import annotations

import torch

MAX_FEATURES = 1024


def customer_messages(transcripts: list[list[dict[str, str]]], turn_session, turn_index) -> list[str]:
    """For every agent turn, the text of the last customer (``user``) message before it ("" if none)."""
    before_turn: list[list[str]] = []
    for messages in transcripts:
        last, per_turn = "", []
        for message in messages:
            if message["role"] == "user":
                last = message["content"]
            elif message["role"] == "assistant":
                per_turn.append(last)
        before_turn.append(per_turn)
    out = []
    for session, index in zip(turn_session.tolist(), turn_index.tolist()):
        turns = before_turn[session]
        if index >= len(turns):
            raise ValueError(
                f"turn {index} of session {session} has no assistant message in the transcript "
                f"({len(turns)} agent messages)"
            )
        out.append(turns[index])
    return out


def tfidf_features(texts: list[str], max_features: int = MAX_FEATURES) -> torch.Tensor:
    """``[len(texts), <= max_features]`` float32 TF-IDF rows fitted on ``texts`` (scikit-learn)."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError as error:  # pragma: no cover - installed by `make install`
        raise ImportError(
            "algo.name=proxmo on the text task needs scikit-learn (`pip install scikit-learn`, "
            "part of the project's train extras)"
        ) from error
    if not texts:
        return torch.zeros(0, 1)
    try:
        matrix = TfidfVectorizer(max_features=max_features).fit_transform(texts)
    except ValueError:
        # No vocabulary (every text empty or only stop characters): no proximity information.
        return torch.zeros(len(texts), 1)
    return torch.tensor(matrix.toarray(), dtype=torch.float32)
