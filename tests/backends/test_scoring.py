"""token_log_probabilities: the log-softmax every backend's log_likelihood scores its logits with."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pocketlm.backends.scoring import token_log_probabilities


def direct_log_softmax(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    """The textbook formula, in Python floats, row by row: slow and plain, for small cases only."""
    scores = []
    for row, target in zip(logits.tolist(), targets):
        total = sum(math.exp(value) for value in row)
        scores.append(row[target] - math.log(total))
    return np.array(scores)


def test_each_row_is_scored_against_its_own_target() -> None:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, 7)).astype(np.float32)
    targets = [0, 6, 3, 3, 1]
    np.testing.assert_allclose(token_log_probabilities(logits, targets), direct_log_softmax(logits, targets), rtol=0, atol=1e-12)


def test_scores_are_float64_log_probabilities_that_sum_to_one_over_the_vocabulary() -> None:
    logits = np.random.default_rng(4).standard_normal((3, 11)).astype(np.float32)
    every = np.stack([token_log_probabilities(logits, [token] * 3) for token in range(11)], axis=1)
    assert every.dtype == np.float64 and (every <= 0).all()
    np.testing.assert_allclose(np.exp(every).sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_huge_logits_neither_overflow_nor_lose_the_small_probabilities() -> None:
    # exp(1000) overflows float64: the naive formula would give nan; shifting every logit changes no probability.
    logits = np.random.default_rng(5).standard_normal((4, 9))
    targets = [8, 0, 4, 2]
    shifted = token_log_probabilities(logits + 1000.0, targets)
    assert np.isfinite(shifted).all()
    np.testing.assert_allclose(shifted, token_log_probabilities(logits, targets), rtol=0, atol=1e-9)
    # A token 50 nats below the likeliest keeps its log-probability instead of rounding to log(0).
    assert token_log_probabilities(np.array([[0.0, -50.0]]), [1])[0] == pytest.approx(-50.0, abs=1e-9)


def test_half_precision_logits_are_scored_in_float64() -> None:
    logits = np.random.default_rng(6).standard_normal((6, 5)).astype(np.float16)
    targets = [1, 2, 3, 4, 0, 1]
    expected = direct_log_softmax(logits.astype(np.float64), targets)
    np.testing.assert_allclose(token_log_probabilities(logits, targets), expected, rtol=0, atol=1e-12)


def test_more_rows_than_one_block_are_all_scored() -> None:
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((600, 13)).astype(np.float32)
    targets = rng.integers(0, 13, size=600).tolist()
    np.testing.assert_allclose(token_log_probabilities(logits, targets), direct_log_softmax(logits, targets), rtol=0, atol=1e-12)


def test_rows_and_targets_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="3 rows of logits cannot score 2 targets"):
        token_log_probabilities(np.zeros((3, 4)), [0, 1])
