"""Log-probabilities of given tokens from a model's logits: what perplexity and model comparisons are made of.

One place, so every backend's log_likelihood and the model comparison score logits the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def token_log_probabilities(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """ln softmax(logits[i])[targets[i]] for each row i, in float64 (n rows × vocabulary in, n values out).

    Stable: each row's maximum is subtracted before exponentiating, so large logits (float16 models reach the
    thousands) neither overflow nor lose the small probabilities to rounding. The rows are computed one block at a
    time, so a long text's logits never need a second full-size float64 copy.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(targets):
        raise ValueError(f"{logits.shape[0] if logits.ndim else 0} rows of logits cannot score {len(targets)} targets.")
    scores = np.empty(len(targets), dtype=np.float64)
    block = 256
    for start in range(0, len(targets), block):
        rows = log_softmax(logits[start : start + block])
        scores[start : start + block] = rows[np.arange(len(rows)), targets[start : start + block]]
    return scores


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise ln softmax of a block of logits (rows × vocabulary), as a new float64 array: each row's maximum is
    subtracted before exponentiating. Callers pass blocks, not a whole text's logits, to bound the float64 copy."""
    rows = logits.astype(np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    rows -= np.log(np.exp(rows).sum(axis=1, keepdims=True))
    return rows
