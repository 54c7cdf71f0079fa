"""ProxMO's state features on the text task: the customer's last message per turn, TF-IDF over the step."""

import pytest
import torch

from duca_fast.train.features import customer_messages, tfidf_features


def test_each_turn_gets_the_customer_message_before_it():
    transcripts = [
        [
            {"role": "system", "content": "brief"},
            {"role": "user", "content": "hello, I need a laptop"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "too expensive"},
            {"role": "assistant", "content": "a2"},
        ],
        [{"role": "system", "content": "brief"}, {"role": "assistant", "content": "opening"}],
    ]
    texts = customer_messages(transcripts, torch.tensor([1, 0, 0]), torch.tensor([0, 1, 0]))
    assert texts == ["", "too expensive", "hello, I need a laptop"]
    with pytest.raises(ValueError, match="turn 1 of session 1 has no assistant message"):
        customer_messages(transcripts, torch.tensor([1]), torch.tensor([1]))


def test_tfidf_rows_are_unit_vectors_and_close_for_shared_words():
    features = tfidf_features(["too expensive", "too expensive for me", "what warranty do you give"])
    assert features.shape[0] == 3
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    cosine = features @ features.T
    assert cosine[0, 1] > 0.5 and cosine[0, 2] == 0.0
    # No vocabulary at all: zero features, no error.
    assert tfidf_features(["", ""]).abs().sum().item() == 0.0
