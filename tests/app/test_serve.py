"""`pocketlm serve` driven by the official `openai` client over loopback HTTP, on the tiny random GGUF (fast) and the
real starter model (where a reply must be long enough to interrupt)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import openai
import pytest
from click.testing import CliRunner

from pocketlm.app.cli import cli
from pocketlm.app.serve_settings import ServeSettings
from pocketlm.models.store import ModelStore
from tests.app.serve_server import RunningServer, running_server
from tests.backends.tiny_gguf import tiny_llama_gguf_path

TINY = "tiny"
# Thread count fixed, so a request's greedy tokens are the same whenever it runs (llama.cpp splits work by thread).
SETTINGS = ServeSettings(threads=1, models=(TINY,))


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelStore]:
    store = ModelStore(tmp_path_factory.mktemp("serve-home") / "pocketlm.db")
    store.register(tiny_llama_gguf_path(), source="test", name=TINY)
    yield store
    store.close()


@pytest.fixture(scope="module")
def tiny_server(tiny_store: ModelStore) -> Iterator[RunningServer]:
    with running_server(tiny_store, SETTINGS) as server:
        yield server


@pytest.fixture
def client(tiny_server: RunningServer) -> openai.OpenAI:
    return tiny_server.client()


def _ask(client: openai.OpenAI, content: str = "hello there", **extra: object):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": content}], temperature=0, **extra)


def _error_of(call) -> openai.APIStatusError:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def _assert_openai_error_body(error: openai.APIStatusError, status: int) -> dict[str, object]:
    assert error.status_code == status
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"].endswith(".") and "Traceback" not in body["error"]["message"]
    return body["error"]


def test_models_lists_the_stores_models(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [TINY]


def test_a_chat_reply_reports_its_usage_and_stops_at_max_tokens(client: openai.OpenAI) -> None:
    reply = _ask(client, max_tokens=7)
    assert reply.model == TINY and reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens > len("hello there".split())  # the chat template's tokens count too
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7


def test_max_completion_tokens_is_max_tokens_new_name(client: openai.OpenAI) -> None:
    assert _ask(client, max_completion_tokens=5).usage.completion_tokens == 5


def test_a_streamed_reply_is_the_same_reply_in_pieces(client: openai.OpenAI) -> None:
    whole = _ask(client, max_tokens=12)
    chunks = list(_ask(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_a_stream_ends_with_done(tiny_server: RunningServer) -> None:
    body = {"model": TINY, "prompt": "the cat", "max_tokens": 3, "stream": True, "temperature": 0}
    lines = requests.post(f"{tiny_server.base_url}/completions", json=body, timeout=60).text.split("\n\n")
    events = [line.removeprefix("data: ") for line in lines if line]
    assert events[-1] == "[DONE]"
    assert all(json.loads(event)["object"] == "text_completion" for event in events[:-1])


def test_a_completion_continues_the_raw_prompt(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=TINY, prompt="the cat", temperature=0, max_tokens=6)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    # No chat template around it: the prompt is its own tokens (and the BOS the tiny model's tokenizer adds).
    assert reply.usage.prompt_tokens <= len("the cat") + 1


def test_completions_default_to_16_tokens_as_openai_does(client: openai.OpenAI) -> None:
    assert client.completions.create(model=TINY, prompt="the cat", temperature=0).usage.completion_tokens == 16


def test_a_stop_string_ends_the_reply_before_it(client: openai.OpenAI) -> None:
    free = client.completions.create(model=TINY, prompt="the cat", temperature=0, max_tokens=12).choices[0].text
    stop = free[3:5]  # a piece the greedy continuation is known to produce
    stopped = client.completions.create(model=TINY, prompt="the cat", temperature=0, max_tokens=12, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[: free.index(stop)]


def test_an_unknown_model_is_404_with_an_openai_error(client: openai.OpenAI) -> None:
    error = _error_of(lambda: client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}]))
    detail = _assert_openai_error_body(error, 404)
    assert detail["code"] == "model_not_found" and "no-such-model" in str(detail["message"])


def test_a_bad_body_is_400_not_422(tiny_server: RunningServer) -> None:
    response = requests.post(f"{tiny_server.base_url}/chat/completions", json={"model": TINY, "messages": "hi"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error" and response.json()["error"]["param"] == "messages"
    not_json = requests.post(f"{tiny_server.base_url}/chat/completions", data=b"{", headers={"content-type": "application/json"}, timeout=30)
    assert not_json.status_code == 400


def test_more_tokens_than_the_context_holds_is_400(client: openai.OpenAI) -> None:
    detail = _assert_openai_error_body(_error_of(lambda: _ask(client, max_tokens=100_000)), 400)
    assert detail["code"] == "context_length_exceeded" and detail["param"] == "max_tokens"
    long_prompt = "hello " * 1000  # the tiny model's context is 256 tokens
    assert _assert_openai_error_body(_error_of(lambda: _ask(client, long_prompt)), 400)["code"] == "context_length_exceeded"


def test_a_body_over_the_limit_is_413(tiny_server: RunningServer) -> None:
    body = {"model": TINY, "messages": [{"role": "user", "content": "x" * (SETTINGS.max_body_bytes + 1)}]}
    response = requests.post(f"{tiny_server.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_frequency_and_presence_penalties_are_accepted_and_ignored(client: openai.OpenAI) -> None:
    plain = _ask(client, max_tokens=5).choices[0].message.content
    assert _ask(client, max_tokens=5, frequency_penalty=1.0, presence_penalty=0.5).choices[0].message.content == plain


def test_the_same_seed_gives_the_same_sampled_reply(client: openai.OpenAI) -> None:
    first, again = (client.completions.create(model=TINY, prompt="the cat", temperature=1.0, seed=-7, max_tokens=10) for _ in range(2))
    assert first.choices[0].text == again.choices[0].text


def test_four_concurrent_streams_each_get_exactly_their_own_tokens(client: openai.OpenAI) -> None:
    prompts = ["the cat", "a dog sat", "this is", "on the mat"]

    def completion(prompt: str, stream: bool) -> str:
        if not stream:
            return client.completions.create(model=TINY, prompt=prompt, temperature=0, max_tokens=40).choices[0].text
        chunks = client.completions.create(model=TINY, prompt=prompt, temperature=0, max_tokens=40, stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)

    alone = [completion(prompt, stream=False) for prompt in prompts]
    assert len(set(alone)) > 1  # otherwise a mix-up could not show
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda prompt: completion(prompt, stream=True), prompts))
    assert together == alone


def test_an_api_key_is_enforced(tiny_store: ModelStore) -> None:
    with running_server(tiny_store, ServeSettings(threads=1, api_key="sesame")) as server:
        wrong = server.client("open-up")
        assert _assert_openai_error_body(_error_of(lambda: wrong.models.list()), 401)["code"] == "invalid_api_key"
        assert requests.get(f"{server.base_url}/models", timeout=30).status_code == 401
        right = server.client("sesame")
        assert [model.id for model in right.models.list()] == [TINY]


def test_serving_beyond_loopback_without_a_key_is_refused_with_a_sentence(pocket_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POCKETLM_API_KEY", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "without an API key" in result.output and "--api-key" in result.output and "Traceback" not in result.output


def test_an_idle_model_is_unloaded_and_loads_again_on_demand(tiny_store: ModelStore) -> None:
    with running_server(tiny_store, ServeSettings(threads=1, idle_unload_s=1, models=(TINY,))) as server:
        pool = server.app.state.pool
        deadline = time.monotonic() + 30
        while pool.loaded_names() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool.loaded_names() == []
        client = server.client()
        assert _ask(client, max_tokens=3).usage.completion_tokens == 3


def test_serving_an_unknown_model_is_refused_before_the_server_starts(pocket_home: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "no-such-model", "--port", "0"])
    assert result.exit_code == 1
    assert "no-such-model" in result.output and "Traceback" not in result.output


def test_serving_on_a_port_in_use_is_a_sentence(pocket_home: Path, tiny_server: RunningServer) -> None:
    port = tiny_server.base_url.rsplit(":", 1)[1].split("/")[0]
    result = CliRunner().invoke(cli, ["serve", "--port", port])
    assert result.exit_code == 1
    assert f"Cannot listen on 127.0.0.1:{port}" in result.output and "Traceback" not in result.output


def test_the_serve_command_answers_and_stops_cleanly_on_ctrl_c(pocket_home: Path) -> None:
    with socket.socket() as probe:  # a free port for the command (uvicorn's own port 0 could not be told to the test)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from pocketlm.app.cli import main; main()", "serve", str(tiny_llama_gguf_path()), "--port", str(port), "--threads", "1"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "POCKETLM_HOME": str(pocket_home)})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                names = [model.id for model in client.models.list()]
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read() if server.stderr else ""
                time.sleep(0.1)
        assert names == ["tiny-random-llama-v1"]  # a model named by its path is served under its file name
        reply = client.chat.completions.create(model=names[0], messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.usage.completion_tokens == 3
    finally:
        server.send_signal(signal.SIGINT)
        _, errors = server.communicate(timeout=60)
    assert server.returncode == 0, errors
    assert "Serving on http://127.0.0.1:" in errors and "Traceback" not in errors


@pytest.mark.parametrize("arguments", [["--help"], ["serve", "--help"]])
def test_help_does_not_import_the_server_stack(arguments: list[str]) -> None:
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom pocketlm.app.cli import cli\n"
        f"result = CliRunner().invoke(cli, {arguments!r})\nassert result.exit_code == 0 and 'serve' in result.output, result.output\n"
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'pydantic', 'llama_cpp', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
