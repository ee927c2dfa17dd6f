"""`pocketlm serve` under load, on the real starter model: a reply that counts to the thousands keeps the model busy
for tens of seconds (about 4 ms a token on a fast core, far longer than each step below), and a client that hangs up
frees it at once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import openai
import requests
import pytest

from pocketlm.app.serve_routes import ServedRequest
from pocketlm.app.serve_settings import ServeSettings
from pocketlm.models.starter import STARTER
from pocketlm.models.store import ModelStore
from tests.app.serve_server import RunningServer, running_server

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
LONG = 3000  # tokens of counting: the model's greedy continuation of COUNTING goes on without an end token


def _client(server: RunningServer) -> openai.OpenAI:
    return server.client()


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Poll until `condition` holds; the deadline only bounds a failing test, it is never what the test measures."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


@contextmanager
def _busy_model(client: openai.OpenAI) -> Iterator[None]:
    """The model generating a long reply for a client that has read its first token; hung up on leaving."""
    stream = client.completions.create(model=STARTER.name, prompt=COUNTING, temperature=0, max_tokens=LONG, stream=True)
    try:
        next(iter(stream))
        yield
    finally:
        stream.close()


def _serving(store: ModelStore, **settings: object) -> RunningServer:  # type: ignore[misc]
    return running_server(store, ServeSettings(threads=1, context_length=4096, models=(STARTER.name,), **settings))  # type: ignore[arg-type, return-value]


def test_a_client_that_hangs_up_cancels_its_generation(store_with_starter: ModelStore) -> None:
    with _serving(store_with_starter) as server:
        client = _client(server)
        log: list[ServedRequest] = server.app.state.requests
        with _busy_model(client):
            pass
        _wait_for(lambda: len(log) == 1, "the cancelled request's record")
        assert log[0].stop_reason == "cancelled" and log[0].completion_tokens < LONG
        # The model's turn came back with the cancel: the next request runs.
        reply = client.completions.create(model=STARTER.name, prompt=COUNTING, temperature=0, max_tokens=5)
        assert reply.usage.completion_tokens == 5


def test_a_full_queue_answers_429_and_the_waiting_request_still_runs(store_with_starter: ModelStore) -> None:
    with _serving(store_with_starter, max_queue=1) as server, ThreadPoolExecutor(1) as background:
        client = _client(server)
        served = server.app.state.pool.resolve(STARTER.name)
        with _busy_model(client):
            waiting = background.submit(client.completions.create, model=STARTER.name, prompt=COUNTING, temperature=0, max_tokens=4)
            _wait_for(lambda: served.waiting == 1, "the second request to queue")
            with pytest.raises(openai.RateLimitError) as refused:
                client.completions.create(model=STARTER.name, prompt=COUNTING, max_tokens=4)
            error = refused.value.response.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert waiting.result(timeout=120).usage.completion_tokens == 4


def test_a_request_that_waits_too_long_answers_503(store_with_starter: ModelStore) -> None:
    with _serving(store_with_starter, queue_timeout_s=0.5) as server:
        client = _client(server)
        with _busy_model(client), pytest.raises(openai.InternalServerError) as timed_out:
            client.completions.create(model=STARTER.name, prompt=COUNTING, max_tokens=4)
        assert timed_out.value.status_code == 503
        assert timed_out.value.response.json()["error"]["code"] == "queue_timeout"


def test_four_concurrent_chat_streams_on_the_real_model_each_get_their_own_reply(store_with_starter: ModelStore) -> None:
    questions = ["What is the capital of France?", "Name a color.", "Count to five.", "Say hello in Spanish."]
    with _serving(store_with_starter) as server:
        client = _client(server)

        def ask(question: str) -> str:
            chunks = client.chat.completions.create(model=STARTER.name, messages=[{"role": "user", "content": question}],
                                                    temperature=0, max_tokens=24, stream=True)  # fmt: skip
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

        alone = [ask(question) for question in questions]
        with ThreadPoolExecutor(len(questions)) as pool:
            together = list(pool.map(ask, questions))
    assert len(set(alone)) == len(questions)
    # Each reply is decoded whole before the next begins, from a prompt the chat template renders the same way, so
    # the greedy tokens cannot differ (same engine, same thread count).
    assert together == alone


def test_a_client_that_gives_up_on_a_whole_reply_cancels_it_too(store_with_starter: ModelStore) -> None:
    with _serving(store_with_starter) as server:
        body = {"model": STARTER.name, "prompt": COUNTING, "temperature": 0, "max_tokens": LONG}
        with pytest.raises(requests.Timeout):  # the client hangs up after a second, long before the reply is done
            requests.post(f"{server.base_url}/completions", json=body, timeout=(10, 1))
        log: list[ServedRequest] = server.app.state.requests
        _wait_for(lambda: len(log) == 1, "the abandoned request's record")
        assert log[0].stop_reason == "cancelled" and log[0].completion_tokens < LONG


def test_ignore_eos_keeps_generating_past_the_end_token_as_benchmarks_ask(store_with_starter: ModelStore) -> None:
    # A one-word answer ends long before 48 tokens on its own; vLLM's and llama-server's ignore_eos asks for all 48.
    with running_server(store_with_starter, ServeSettings()) as server:
        client = _client(server)
        question = [{"role": "user", "content": "Answer with one word: is water wet?"}]
        ended = client.chat.completions.create(model=STARTER.name, messages=question, temperature=0, max_tokens=48)
        forced = client.chat.completions.create(model=STARTER.name, messages=question, temperature=0, max_tokens=48,
                                                extra_body={"ignore_eos": True})  # fmt: skip
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 48
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 48
