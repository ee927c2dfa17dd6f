"""The llama.cpp sampler chain pocketlm builds, on hand-written logits: what each setting does to the distribution.

No model is involved, so every number here is IEEE arithmetic on a few floats and holds on any CPU.
"""

from __future__ import annotations

import ctypes
import math

import pytest

from pocketlm.backends.base import SamplingParams
from pocketlm.backends.llamacpp_decoding import Sampler


def apply_chain(sampling: SamplingParams, logits: dict[int, float], history: list[int]) -> tuple[dict[int, float], int]:
    """Run `sampling`'s chain over `logits` after it has seen `history`: each token's logit and probability as the
    chain leaves them, and the token it picks."""
    import llama_cpp

    sampler = Sampler(sampling, seed=7, n_vocab=16)
    try:
        for token in history:
            llama_cpp.llama_sampler_accept(sampler.chain, token)
        data = (llama_cpp.llama_token_data * len(logits))(*(llama_cpp.llama_token_data(t, l, 0.0) for t, l in logits.items()))
        candidates = llama_cpp.llama_token_data_array(data, len(logits), -1, False)
        llama_cpp.llama_sampler_apply(sampler.chain, ctypes.byref(candidates))
        after = {candidates.data[i].id: candidates.data[i].logit for i in range(candidates.size)}
        probabilities = {candidates.data[i].id: candidates.data[i].p for i in range(candidates.size)}
        return (after if sampling.temperature <= 0 else probabilities), candidates.data[candidates.selected].id
    finally:
        sampler.close()


def test_repeat_penalty_divides_a_repeated_tokens_positive_logit() -> None:
    # Token 5 was just used and leads narrowly; penalised by 1.5 its logit 3.0 becomes 2.0, below token 9's 2.5.
    logits = {5: 3.0, 9: 2.5, 11: -1.0}
    plain, plain_pick = apply_chain(SamplingParams(temperature=0), logits, history=[5])
    penalised, penalised_pick = apply_chain(SamplingParams(temperature=0, repeat_penalty=1.5), logits, history=[5])
    assert plain_pick == 5 and plain[5] == pytest.approx(3.0)
    assert penalised_pick == 9 and penalised[5] == pytest.approx(2.0) and penalised[9] == pytest.approx(2.5)


def test_repeat_penalty_multiplies_a_repeated_tokens_negative_logit() -> None:
    penalised, _ = apply_chain(SamplingParams(temperature=0, repeat_penalty=1.5), {5: 3.0, 11: -1.0}, history=[11])
    assert penalised[11] == pytest.approx(-1.5) and penalised[5] == pytest.approx(3.0)


def test_penalised_probabilities_follow_the_softmax_of_the_penalised_logits() -> None:
    # Two tokens with the same logit; the one in the history loses exactly the share the divided logit gives it.
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=2.0)
    probabilities, _ = apply_chain(sampling, {1: 4.0, 2: 4.0}, history=[1])
    assert probabilities[1] + probabilities[2] == pytest.approx(1.0, abs=1e-6)
    assert probabilities[1] / probabilities[2] == pytest.approx(math.exp(4.0 / 2.0 - 4.0), rel=1e-4)


def test_no_penalty_leaves_the_logits_alone() -> None:
    unchanged, pick = apply_chain(SamplingParams(temperature=0), {5: 3.0, 9: 2.5}, history=[5, 5, 5])
    assert unchanged == {5: pytest.approx(3.0), 9: pytest.approx(2.5)} and pick == 5
