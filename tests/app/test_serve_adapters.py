"""LoRA adapters per request in `pocketlm serve` (`"adapters": [{"name", "scale"}]`, sent by the official `openai`
client as extra_body), on the tiny random Llama as a float32 GGUF on llama.cpp with PEFT adapters PEFT itself saved.

The tiny model's text is gibberish: replies are compared with each other (an adapter moves the greedy reply; the same
request gives the same greedy reply on the same engine and thread count), never with expected words."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from pocketlm.app.adapter_import import register_adapter
from pocketlm.app.adapter_loading import conversions_of
from pocketlm.app.serve_settings import ServeSettings
from pocketlm.models.store import ModelStore
from tests.app.serve_server import RunningServer, running_server

BASE = "tiny"
PROMPT = "Hello there, how"
# One thread: a request's greedy tokens are then the same whenever it runs (llama.cpp splits work by thread).
SETTINGS = ServeSettings(threads=1, context_length=256, models=(BASE,))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_llama_f32_gguf: Path, tiny_adapters: dict[str, Path]) -> Iterator[ModelStore]:
    store = ModelStore(tmp_path_factory.mktemp("serve-adapters-home") / "pocketlm.db")
    base = store.register(tiny_llama_f32_gguf, source=f"import:{tiny_llama_f32_gguf}", name=BASE)
    for name in ("plain", "second"):
        register_adapter(store, tiny_adapters[name], source=f"import:{tiny_adapters[name]}", name=name, base=base)
    yield store
    store.close()


@pytest.fixture(scope="module")
def server(store: ModelStore) -> Iterator[RunningServer]:
    with running_server(store, SETTINGS) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return server.client()


def complete(client: openai.OpenAI, *adapters: tuple[str, float], max_tokens: int = 10) -> str:
    extra = {"adapters": [{"name": name, "scale": scale} for name, scale in adapters]} if adapters else None
    reply = client.completions.create(model=BASE, prompt=PROMPT, temperature=0, max_tokens=max_tokens, extra_body=extra)
    assert reply.usage.completion_tokens == max_tokens
    return reply.choices[0].text


def chat_streamed(client: openai.OpenAI, *adapters: tuple[str, float]) -> str:
    extra = {"adapters": [{"name": name, "scale": scale} for name, scale in adapters]} if adapters else None
    chunks = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=24,
                                            stream=True, extra_body=extra)  # fmt: skip
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def error_of(call) -> dict[str, object]:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    assert caught.value.status_code == 400
    body = caught.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == "adapters" and "Traceback" not in body["error"]["message"]
    return body["error"]


def test_an_adapter_moves_the_greedy_reply_and_the_next_request_without_it_gets_the_bare_model(client: openai.OpenAI) -> None:
    bare = complete(client)
    adapted = complete(client, ("plain", 1.0))
    assert adapted != bare
    assert complete(client) == bare  # the adapter was this request's only: it does not stay attached
    assert complete(client, ("plain", 1.0)) == adapted


def test_scale_zero_is_the_bare_model(client: openai.OpenAI) -> None:
    assert complete(client, ("plain", 0.0)) == complete(client)


def test_stacked_adapters_differ_from_either_alone(client: openai.OpenAI) -> None:
    both = complete(client, ("plain", 1.0), ("second", 1.0))
    assert both != complete(client, ("plain", 1.0)) or both != complete(client, ("second", 1.0))


def test_the_conversion_for_the_engine_is_made_once_and_reused(client: openai.OpenAI, store: ModelStore) -> None:
    complete(client, ("plain", 1.0))
    converted = conversions_of(store, store.get("plain"))
    assert [c.format for c in converted] == ["gguf-lora"]
    complete(client, ("plain", 0.5))
    assert conversions_of(store, store.get("plain")) == converted


def test_concurrent_requests_with_and_without_an_adapter_each_get_their_own_reply(client: openai.OpenAI) -> None:
    alone = {"bare": chat_streamed(client), "plain": chat_streamed(client, ("plain", 1.0))}
    assert alone["bare"] != alone["plain"]
    wanted = ["bare", "plain"] * 3
    with ThreadPoolExecutor(len(wanted)) as pool:
        replies = list(pool.map(lambda name: chat_streamed(client, *([("plain", 1.0)] if name == "plain" else [])), wanted))
    assert replies == [alone[name] for name in wanted]


def test_an_unknown_adapter_is_400_with_an_openai_error(client: openai.OpenAI) -> None:
    detail = error_of(lambda: complete(client, ("no-such-adapter", 1.0)))
    assert detail["code"] == "adapter_not_found" and "no-such-adapter" in str(detail["message"])


def test_a_path_is_not_an_adapter_name(client: openai.OpenAI, tiny_adapters: dict[str, Path], store: ModelStore) -> None:
    detail = error_of(lambda: complete(client, (str(tiny_adapters["rslora"]), 1.0)))
    assert detail["code"] == "adapter_not_found" and "not a path" in str(detail["message"])
    assert not store.models_at(tiny_adapters["rslora"])  # nothing was registered from the server's disk


def test_a_model_named_as_an_adapter_is_400(client: openai.OpenAI) -> None:
    detail = error_of(lambda: complete(client, (BASE, 1.0)))
    assert detail["code"] == "adapter_not_applicable" and "not a LoRA adapter" in str(detail["message"])


def test_an_adapter_for_another_model_is_400_and_the_server_goes_on(client: openai.OpenAI, store: ModelStore, tmp_path: Path) -> None:
    from tests.adapter_fixtures import build_peft_adapter
    from tests.converters.tiny_models import build_tiny_model, train_sentencepiece_tokenizer

    # Qwen3 with 32-wide heads: its q_proj gives 128 outputs where the tiny Llama's gives 64.
    other = build_tiny_model("qwen3", tmp_path / "qwen3", train_sentencepiece_tokenizer(tmp_path / "tokenizer"), vocab_size=600)
    register_adapter(store, build_peft_adapter(other, tmp_path / "qwen-lora"), source="test", name="qwen-lora", base=None, check=False)
    detail = error_of(lambda: complete(client, ("qwen-lora", 1.0)))
    assert detail["code"] == "adapter_not_applicable" and "another size" in str(detail["message"])
    assert complete(client, max_tokens=3)


def test_a_scale_that_is_not_a_finite_number_is_a_bad_body(server: RunningServer) -> None:
    import requests

    body = '{"model": "tiny", "prompt": "hi", "adapters": [{"name": "plain", "scale": NaN}]}'
    response = requests.post(f"{server.base_url}/completions", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_body"
