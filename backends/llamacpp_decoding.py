"""The per-token loop on llama.cpp's C API, for the llama.cpp backend.

llama-cpp-python's `Llama.generate` costs about 0.7 ms of Python per token (batch set-up, numpy bookkeeping,
sampler wrappers): 10% of a 135M model's decode step. This loop makes three C calls per token, keeps its own
record of what the KV cache holds, and reuses the longest shared prefix between turns of a conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from pocketlm.backends.base import REPEAT_PENALTY_WINDOW, SamplingParams
from pocketlm.models.errors import PocketError

if TYPE_CHECKING:
    from llama_cpp import Llama


class Sampler:
    """A llama.cpp sampler chain for one reply; free it with close()."""

    def __init__(self, sampling: SamplingParams, seed: int, n_vocab: int) -> None:
        # Greedy without a penalty is the largest logit, which DecodeLoop.sample reads straight from the logits: the
        # chain would first copy the whole vocabulary into a candidate array: 52 µs a token against 6 µs for the
        # argmax (49k-token vocabulary, 2 cores), 0.6% of a 135M model's 7.3 ms decode step. The chain is built all
        # the same: it is the definition of what each setting means.
        self.greedy = sampling.temperature <= 0 and sampling.repeat_penalty == 1.0
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        stages = []
        if sampling.repeat_penalty != 1.0:
            # The vocabulary size comes first in the bundled llama.cpp's prototype (llama.h). Called without it, as an
            # earlier version of this file did, the window was read from whatever the register held: the penalty
            # came and went with the machine's state.
            stages.append(llama_cpp.llama_sampler_init_penalties(n_vocab, REPEAT_PENALTY_WINDOW, sampling.repeat_penalty, 0.0, 0.0))
        if sampling.temperature <= 0:
            stages.append(llama_cpp.llama_sampler_init_greedy())
        else:
            if sampling.top_k > 0:
                stages.append(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            stages += [
                llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1),
                llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1),
                llama_cpp.llama_sampler_init_temp(sampling.temperature),
                llama_cpp.llama_sampler_init_dist(seed),
            ]
        for stage in stages:  # the chain owns its stages and frees them with itself
            llama_cpp.llama_sampler_chain_add(self.chain, stage)

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.chain)


class DecodeLoop:
    def __init__(self, llm: Llama) -> None:
        self._context = llm._ctx.ctx
        self._memory = llama_cpp.llama_get_memory(self._context)
        self._batch_size = llm.n_batch
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(llm._model.vocab)
        self._cached: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self._one_token = (llama_cpp.llama_token * 1)()
        self._one_token_batch = llama_cpp.llama_batch_get_one(self._one_token, 1)

    @property
    def position(self) -> int:
        """Tokens in the context so far."""
        return len(self._cached)

    def prefill(self, prompt: list[int]) -> int:
        """Make the cache hold exactly `prompt`, decoding only what differs from what it holds now; returns how many
        of its tokens were decoded."""
        shared = 0
        for cached, wanted in zip(self._cached, prompt):
            if cached != wanted:
                break
            shared += 1
        # The last prompt token is always decoded again: its logits are what the first sample reads.
        shared = min(shared, len(prompt) - 1)
        if not llama_cpp.llama_memory_seq_rm(self._memory, -1, shared, -1):
            # Recurrent models cannot drop a suffix of their state: start over.
            llama_cpp.llama_memory_clear(self._memory, True)
            shared = 0
        del self._cached[shared:]
        for start in range(shared, len(prompt), self._batch_size):
            chunk = prompt[start : start + self._batch_size]
            tokens = (llama_cpp.llama_token * len(chunk))(*chunk)  # named: the batch only points at it
            self._decode(llama_cpp.llama_batch_get_one(tokens, len(chunk)))
            self._cached += chunk
        return len(prompt) - shared

    def forget(self) -> None:
        """Empty the cache: what it holds was computed with weights (adapters) that no longer apply."""
        llama_cpp.llama_memory_clear(self._memory, True)
        self._cached.clear()

    def score(self, tokens: Sequence[int], n_vocab: int) -> np.ndarray:
        """The logits after each of `tokens` (len × n_vocab float32), decoded from an empty cache, which is left empty."""
        self.forget()
        rows = np.empty((len(tokens), n_vocab), dtype=np.float32)
        batch = llama_cpp.llama_batch_init(self._batch_size, 0, 1)
        try:
            for start in range(0, len(tokens), self._batch_size):
                chunk = tokens[start : start + self._batch_size]
                for i, token in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, True
                    batch.seq_id[i][0] = 0
                batch.n_tokens = len(chunk)
                self._decode(batch)
                # With a logits flag on every token, llama.cpp stores one row per token, in batch order.
                logits = llama_cpp.llama_get_logits(self._context)
                rows[start : start + len(chunk)] = np.ctypeslib.as_array(logits, shape=(len(chunk), n_vocab))
        finally:
            llama_cpp.llama_batch_free(batch)
            self.forget()
        return rows

    def sample(self, sampler: Sampler) -> int:
        if sampler.greedy:
            logits = llama_cpp.llama_get_logits_ith(self._context, -1)
            if logits:  # argmax is the first largest, as llama.cpp's greedy sampler picks
                return int(np.ctypeslib.as_array(logits, shape=(self._n_vocab,)).argmax())
        return int(llama_cpp.llama_sampler_sample(sampler.chain, self._context, -1))

    def advance(self, token: int) -> None:
        """Decode `token`, so the next sample follows it."""
        self._one_token[0] = token
        self._decode(self._one_token_batch)
        self._cached.append(token)

    def _decode(self, batch: llama_cpp.llama_batch) -> None:
        status = llama_cpp.llama_decode(self._context, batch)
        if status != 0:
            # The cache no longer matches our record; forget it so the next prompt is decoded whole.
            llama_cpp.llama_memory_clear(self._memory, True)
            self._cached.clear()
            raise PocketError(f"llama.cpp failed to decode (llama_decode returned {status}).", "Try a smaller context (--ctx), or restart.")

