"""The remote backend against a real OpenAI-compatible HTTP peer on loopback (tests/backends/openai_peer.py: FastAPI +
uvicorn answering with llama.cpp on the tiny GGUF)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from pocketlm.app.model_loading import choose_model, load_model
from pocketlm.backends.base import ChatMessage, ChatModel, GenerationStats, LoadOptions, SamplingParams, TextPiece
from pocketlm.backends.remote import RemoteBackend
from pocketlm.models.errors import ModelNotFound, PocketError
from pocketlm.models.remote_endpoints import RemoteEndpoint, RemoteEndpoints
from pocketlm.models.store import ModelStore
from tests.backends.openai_peer import PeerRecord, openai_peer
from tests.backends.tiny_gguf import tiny_llama_gguf_path

HELLO = [ChatMessage("user", "hello there")]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture
def peer(tiny_engine: ChatModel, model_store: ModelStore) -> Iterator[PeerRecord]:
    """The peer, added as endpoint `peer` serving one model, `tiny`."""
    with openai_peer(tiny_engine, "tiny") as (url, record):
        _endpoints(model_store).add(RemoteEndpoint("peer", url))
        yield record


def _endpoints(store: ModelStore) -> RemoteEndpoints:
    return RemoteEndpoints(store.database)


def _reply(model: ChatModel, sampling: SamplingParams = GREEDY, cancel: threading.Event | None = None) -> tuple[str, GenerationStats]:
    events = list(model.stream_chat(HELLO, sampling, cancel))
    stats = events[-1]
    assert isinstance(stats, GenerationStats)
    assert all(isinstance(event, TextPiece) for event in events[:-1])
    return "".join(event.text for event in events[:-1] if isinstance(event, TextPiece)), stats


def test_a_remote_model_streams_the_servers_reply_with_its_usage(model_store: ModelStore, peer: PeerRecord) -> None:
    model = load_model(choose_model(model_store, "peer"), LoadOptions())
    try:
        text, stats = _reply(model)
        assert text
        assert model.description.backend == "remote"
        assert model.description.name == "peer"
        assert model.description.context_length == 256  # the server's max_model_len
        assert not model.description.exact_token_counts
        assert 1 <= stats.generated_tokens <= 8  # the server's usage, not a count of pieces made up here
        assert stats.prompt_tokens > 0 and stats.time_to_first_token_s > 0
        assert stats.stop_reason in ("max_tokens", "end_of_generation")
        sent = peer.requests[-1]
        assert sent["model"] == "tiny" and sent["max_tokens"] == 8 and sent["temperature"] == 0 and sent["stream"] is True
    finally:
        model.close()


def test_stop_strings_and_seed_reach_the_server(model_store: ModelStore, peer: PeerRecord) -> None:
    model = load_model(choose_model(model_store, "peer/tiny"), LoadOptions())
    try:
        _reply(model, SamplingParams(temperature=0.5, max_tokens=4, seed=7, stop=("\n\n", "END")))
    finally:
        model.close()
    assert peer.requests[-1]["seed"] == 7 and peer.requests[-1]["stop"] == ["\n\n", "END"]


def test_a_model_the_endpoint_does_not_serve_is_refused_with_a_sentence_naming_those_it_does(model_store: ModelStore, peer: PeerRecord) -> None:
    with pytest.raises(ModelNotFound, match=r"peer does not serve 'llama-70b' \(it serves: tiny\)\."):
        load_model(choose_model(model_store, "peer/llama-70b"), LoadOptions())


def test_cancelling_closes_the_stream_and_ends_the_reply_as_cancelled(model_store: ModelStore, peer: PeerRecord) -> None:
    model = load_model(choose_model(model_store, "peer"), LoadOptions())
    cancel = threading.Event()
    pieces = 0
    try:
        for event in model.stream_chat(HELLO, SamplingParams(temperature=0, max_tokens=200), cancel):
            if isinstance(event, TextPiece):
                pieces += 1
                cancel.set()
            else:
                assert isinstance(event, GenerationStats)
                assert event.stop_reason == "cancelled"
        assert pieces == 1  # the stream was closed at the next chunk: no piece after the cancel reached the caller
        # The connection is usable again at once: the next reply is whole.
        _, stats = _reply(model)
        assert stats.stop_reason != "cancelled"
    finally:
        model.close()


def test_an_unreachable_endpoint_is_one_sentence(model_store: ModelStore) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens once it is closed
    _endpoints(model_store).add(RemoteEndpoint("gone", f"http://127.0.0.1:{port}"))
    with pytest.raises(PocketError) as unreachable:
        load_model(choose_model(model_store, "gone"), LoadOptions())
    assert unreachable.value.message == f"gone (http://127.0.0.1:{port}/v1) cannot be reached."
    assert "pocketlm remote ls" in unreachable.value.hint


def test_a_wrong_key_is_one_sentence_naming_the_variable(tiny_engine: ChatModel, model_store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with openai_peer(tiny_engine, "tiny", api_key="right-key") as (url, _):
        _endpoints(model_store).add(RemoteEndpoint("keyed", url, api_key_env="KEYED_API_KEY"))
        monkeypatch.setenv("KEYED_API_KEY", "wrong-key")
        with pytest.raises(PocketError, match=r"refused the API key") as refused:
            load_model(choose_model(model_store, "keyed"), LoadOptions())
        assert refused.value.hint == "Set KEYED_API_KEY to the server's API key."
        monkeypatch.setenv("KEYED_API_KEY", "right-key")
        model = load_model(choose_model(model_store, "keyed"), LoadOptions())
        try:
            assert _reply(model)[0]
        finally:
            model.close()


def test_what_only_the_weights_can_tell_is_refused_with_a_sentence(model_store: ModelStore, peer: PeerRecord) -> None:
    model = load_model(choose_model(model_store, "peer"), LoadOptions())
    try:
        for call in (lambda: model.token_logits([1, 2]), lambda: model.log_likelihood([1, 2]), lambda: model.chat_prompt_tokens(HELLO),
                     lambda: model.set_adapters([object()])):  # type: ignore[list-item]  # fmt: skip
            with pytest.raises(PocketError, match=r"^The remote engine serving peer does not offer a way to "):
                call()
        model.set_adapters(())  # no adapters is the model as it is
        assert model.count_tokens("four") == 1  # an estimate, about 4 characters a token
        assert model.prompt_tokens(HELLO) > model.count_tokens(HELLO[0].content)  # the template's markers count too
    finally:
        model.close()
    with pytest.raises(PocketError, match="was closed"):
        list(model.stream_chat(HELLO, GREEDY))


def test_token_ids_come_from_the_servers_tokenizer_and_continue_through_completions(tiny_engine: ChatModel, model_store: ModelStore,
                                                                                    peer: PeerRecord) -> None:  # fmt: skip
    """Where the server has a /tokenize route (llama-server, vLLM), bench's path works: its ids, then /v1/completions."""
    model = load_model(choose_model(model_store, "peer"), LoadOptions())
    try:
        ids = model.tokenize("the cat sat on the mat")
        assert ids == tiny_engine.tokenize("the cat sat on the mat")  # token ids are exact, no rounding involved
        events = list(model.stream_tokens(ids, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)))
        stats = events[-1]
        assert isinstance(stats, GenerationStats) and all(isinstance(event, TextPiece) for event in events[:-1])
        assert stats.prompt_tokens == len(ids) and stats.generated_tokens == 5 and stats.stop_reason == "max_tokens"
        assert peer.requests[-1]["prompt"] == ids and peer.requests[-1]["ignore_eos"] is True
        with pytest.raises(PocketError, match="stream_tokens takes 1 to 255 tokens"):
            list(model.stream_tokens([], GREEDY))
    finally:
        model.close()


def test_the_remote_backend_is_registered_and_needs_no_engine_library_to_list() -> None:
    from pocketlm.backends.registry import backend_for

    assert isinstance(backend_for("remote"), RemoteBackend)
    assert RemoteBackend.is_available()


def test_pocketlm_serve_is_a_remote_endpoint_like_any_other(model_store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The remote backend against pocketlm's own server (app/serve_app.py), serving the tiny GGUF, its key enforced."""
    from pocketlm.app.serve_app import create_app
    from pocketlm.app.serve_settings import ServeSettings
    from tests.backends.openai_peer import serving

    model_store.register(tiny_llama_gguf_path(), source="import:tiny", name="tiny-served")
    app = create_app(model_store, ServeSettings(api_key="served-key", threads=1, context_length=256))
    with serving(app) as url:
        _endpoints(model_store).add(RemoteEndpoint("pocket", url, api_key_env="POCKET_SERVE_KEY"))
        monkeypatch.delenv("POCKET_SERVE_KEY", raising=False)
        with pytest.raises(PocketError) as refused:
            load_model(choose_model(model_store, "pocket/tiny-served"), LoadOptions())
        assert refused.value.message == f"pocket ({url}) refused the API key."
        assert refused.value.hint == "Set POCKET_SERVE_KEY to the server's API key."
        monkeypatch.setenv("POCKET_SERVE_KEY", "served-key")
        model = load_model(choose_model(model_store, "pocket/tiny-served"), LoadOptions())
        try:
            text, stats = _reply(model, SamplingParams(temperature=0, max_tokens=6))
            assert text
            assert 1 <= stats.generated_tokens <= 6 and stats.prompt_tokens > 0
            assert stats.stop_reason in ("max_tokens", "end_of_generation")
            cancel = threading.Event()
            events = model.stream_chat(HELLO, SamplingParams(temperature=0, max_tokens=200), cancel)
            assert isinstance(next(events), TextPiece)
            cancel.set()
            assert [type(event) for event in events] == [GenerationStats]
            with pytest.raises(PocketError, match=r"^The remote engine serving pocket/tiny-served does not offer a way to tokenize"):
                model.tokenize("no /tokenize route on pocketlm serve")
        finally:
            model.close()
