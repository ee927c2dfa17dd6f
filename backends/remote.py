"""The remote backend: a model served by any OpenAI-compatible endpoint (vLLM, TGI's Messages API, llama-server,
Ollama, LM Studio, `pocketlm serve`), through the official `openai` client.

A "model file" here is models/remote_endpoints.py's synthetic reference `ENDPOINT[/MODEL]`; the endpoint's address
and key variable come from the endpoints table. The engine runs elsewhere, so what only the weights can tell (logits,
exact token ids) is refused with a sentence, and token counts are estimates (ModelDescription.exact_token_counts).
"""

from __future__ import annotations

import importlib.util
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pocketlm.backends.base import (
    AdapterSpec,
    ChatMessage,
    GenerationEvent,
    GenerationStats,
    LoadOptions,
    ModelDescription,
    SamplingParams,
    StopReason,
    TextPiece,
    closed_model_error,
    require_token_count,
)
from pocketlm.models.errors import BackendUnavailable, ModelNotFound, PocketError
from pocketlm.models.remote_endpoints import REMOTE_FORMAT, RemoteEndpoint, RemoteEndpoints, parse_remote_reference

if TYPE_CHECKING:
    import numpy as np
    from openai import OpenAI

# English prose and code run about 4 characters a token in the usual BPE vocabularies: the estimate where the
# server does not count (a context meter, not a limit the server enforces).
CHARACTERS_PER_TOKEN = 4
# Per message: the chat template's role markers and separators, about this many tokens in ChatML-like templates.
TOKENS_PER_MESSAGE = 4
DEFAULT_CONTEXT_LENGTH = 4096  # when neither the user (--ctx) nor the server says
CONNECT_TIMEOUT_S = 10.0
# A reply may wait in the server's queue and stream for minutes; only a silent connection counts as dead.
READ_TIMEOUT_S = 600.0
_FINISH_REASONS: dict[str, StopReason] = {"stop": "end_of_generation", "length": "max_tokens", "content_filter": "end_of_generation"}


@dataclass(frozen=True)
class RemoteModelInfo:
    id: str
    context_length: int | None  # what the server reports (vLLM's max_model_len, llama-server's n_ctx_train), if any


def openai_client(endpoint: RemoteEndpoint, timeout_s: float = READ_TIMEOUT_S) -> OpenAI:
    """A client for `endpoint`, its key from the environment; never OPENAI_API_KEY, which is not this server's."""
    from openai import OpenAI

    httpx = _http_library()

    # The openai client insists on a key; a server that needs none ignores this placeholder (vLLM's docs use "EMPTY").
    key = endpoint.api_key() or "EMPTY"
    return OpenAI(base_url=endpoint.base_url, api_key=key, max_retries=0, timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S))


def _http_library() -> Any:
    """The openai client's own HTTP library: httpx2 in openai 3, httpx before."""
    try:
        import httpx2
    except ImportError:
        import httpx

        return httpx
    return httpx2


@contextmanager
def remote_errors(endpoint: RemoteEndpoint) -> Iterator[None]:
    """openai's exceptions as one sentence each: unreachable, wrong key, unknown model, refused request."""
    import openai

    where = f"{endpoint.name} ({endpoint.base_url})"
    try:
        yield
    except openai.APITimeoutError:
        raise PocketError(f"{where} did not answer in time.", "Check that the server is running and reachable, then try again.") from None
    except openai.APIConnectionError:
        raise PocketError(f"{where} cannot be reached.", "Check that the server is running and the address is right (`pocketlm remote ls`).") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError):
        variable = endpoint.api_key_env
        hint = (f"Set {variable} to the server's API key." if variable else
                f"Give its key variable: `pocketlm remote add {endpoint.name} {endpoint.base_url} --api-key-env VAR`.")  # fmt: skip
        raise PocketError(f"{where} refused the API key.", hint) from None
    except openai.NotFoundError as error:
        raise ModelNotFound(f"{where} answered 404: {_server_message(error)}", f"See the models it serves: `pocketlm remote ls {endpoint.name}`.") from None
    except openai.APIStatusError as error:
        raise PocketError(f"{where} refused the request ({error.status_code}): {_server_message(error)}",
                          "Check the request's limits (max tokens, context) against the server's.") from None  # fmt: skip


def _server_message(error: Any) -> str:
    """The server's own words from an OpenAI-style error body, else the client's."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if isinstance(message, str) and message:
            return message.rstrip(".") + "."
    return str(getattr(error, "message", error)).rstrip(".") + "."


def list_remote_models(endpoint: RemoteEndpoint, timeout_s: float = CONNECT_TIMEOUT_S) -> list[RemoteModelInfo]:
    """The models `endpoint` serves (GET /v1/models); a PocketError sentence when it cannot be reached or refuses."""
    with remote_errors(endpoint):
        page = openai_client(endpoint, timeout_s).models.list()
        return [RemoteModelInfo(model.id, _reported_context(model.model_extra or {})) for model in page.data]


def _reported_context(extra: dict[str, Any]) -> int | None:
    for value in (extra.get("max_model_len"), extra.get("context_length"), (extra.get("meta") or {}).get("n_ctx_train")):
        if isinstance(value, int) and value > 0:
            return value
    return None


def estimate_tokens(text: str) -> int:
    """About how many tokens `text` takes: CHARACTERS_PER_TOKEN characters each, rounded up (an estimate)."""
    return math.ceil(len(text) / CHARACTERS_PER_TOKEN)


class RemoteBackend:
    name: ClassVar[str] = "remote"
    formats: ClassVar[frozenset[str]] = frozenset({REMOTE_FORMAT})
    install_hint: ClassVar[str] = "pip install 'pocketlm[remote]'"
    adapter_formats: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("openai") is not None

    @classmethod
    def priority(cls, model_format: str) -> int:
        return 0

    @classmethod
    def device_summary(cls) -> str:
        return "OpenAI-compatible servers (`pocketlm remote ls`)"

    def load(self, model_path: Path, options: LoadOptions) -> RemoteChatModel:
        """Open `ENDPOINT[/MODEL]` (models/remote_endpoints.remote_reference): checks the server answers and serves
        the model; a bare ENDPOINT means the one model it serves."""
        from pocketlm.models.locations import database_path

        if options.adapters:
            raise BackendUnavailable("The remote backend cannot attach LoRA adapters.", "Load the adapter on the server itself.")
        endpoint_name, wanted = parse_remote_reference(model_path)
        endpoints = RemoteEndpoints(database_path())
        try:
            endpoint = endpoints.require(endpoint_name)
        finally:
            endpoints.close()
        served = list_remote_models(endpoint)
        info = _pick_model(endpoint, served, wanted)
        context = options.context_length or info.context_length or DEFAULT_CONTEXT_LENGTH
        return RemoteChatModel(endpoint, info.id, context)


def _pick_model(endpoint: RemoteEndpoint, served: list[RemoteModelInfo], wanted: str | None) -> RemoteModelInfo:
    ids = ", ".join(model.id for model in served) or "none"
    if wanted is None:
        if len(served) == 1:
            return served[0]
        raise ModelNotFound(f"{endpoint.name} serves {len(served)} models ({ids}), so its name alone does not say which.",
                            f"Name one as {endpoint.name}/MODEL.")  # fmt: skip
    for model in served:
        if model.id == wanted:
            return model
    raise ModelNotFound(f"{endpoint.name} does not serve {wanted!r} (it serves: {ids}).", f"Name one as {endpoint.name}/MODEL.")


class RemoteChatModel:
    """A model on a remote server. Replies stream over HTTP; cancelling closes the stream, which a server that
    watches for disconnects (vLLM, llama-server, pocketlm serve) takes as the end of the generation."""

    def __init__(self, endpoint: RemoteEndpoint, model_id: str, context_length: int) -> None:
        self.endpoint = endpoint
        self.model_id = model_id
        self._client = openai_client(endpoint)
        self._closed = False
        self.description = ModelDescription(name=f"{endpoint.name}/{model_id}", backend=RemoteBackend.name, architecture="remote",
                                            parameter_count=0, quantization="", context_length=context_length,
                                            device=f"remote: {endpoint.base_url}", exact_token_counts=False)  # fmt: skip

    def _check_open(self) -> None:
        if self._closed:
            raise closed_model_error(self.description.name)

    def stream_chat(self, messages: list[ChatMessage], sampling: SamplingParams, cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """Stream the server's reply. Stats: TTFT and decode speed measured here (network included); token counts
        from the server's usage where it reports it, else estimates (a token a streamed piece; prompt_tokens for the prompt)."""
        self._check_open()
        wire = [{"role": m.role, "content": m.content} for m in messages]
        yield from self._stream(lambda: self._client.chat.completions.create(model=self.model_id, messages=wire, stream=True, stream_options={"include_usage": True},
                                                                             **_request_sampling(sampling)),
                                sampling, cancel, lambda: self.prompt_tokens(messages))  # fmt: skip

    def _stream(self, create: Callable[[], Any], sampling: SamplingParams, cancel: threading.Event | None,
                estimated_prompt: Callable[[], int]) -> Iterator[GenerationEvent]:  # fmt: skip
        """One streamed request (chat or completion chunks) as TextPieces, then GenerationStats."""
        cancel = cancel or threading.Event()
        started = time.perf_counter()
        first: float | None = None
        last = started
        pieces = 0
        usage, finish = None, None
        with remote_errors(self.endpoint):
            stream = create()
            try:
                for chunk in stream:
                    if cancel.is_set():
                        break
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                        delta = getattr(choice, "delta", None)
                        text = delta.content if delta is not None else getattr(choice, "text", None)
                        if text:
                            last = time.perf_counter()
                            first = first or last
                            pieces += 1
                            yield TextPiece(text)
            finally:
                stream.close()  # on cancel, or a caller that stopped reading: the server sees the disconnect
        first = first or last
        stop: StopReason = "cancelled" if cancel.is_set() else _FINISH_REASONS.get(finish or "stop", "end_of_generation")
        if stop == "max_tokens" and sampling.max_tokens is None:
            stop = "context_full"
        prompt = usage.prompt_tokens if usage else estimated_prompt()
        # Without usage, each streamed piece counts as one token: servers send one a token (an estimate all the same).
        generated = usage.completion_tokens if usage and not cancel.is_set() else pieces
        yield GenerationStats(prompt_tokens=prompt, generated_tokens=generated, time_to_first_token_s=first - started,
                              generation_s=last - first, stop_reason=stop, prompt_evaluated_tokens=prompt, prefill_s=first - started)  # fmt: skip

    def count_tokens(self, text: str) -> int:
        """An estimate (CHARACTERS_PER_TOKEN characters a token): the server's tokenizer is not reachable through
        the OpenAI API."""
        return estimate_tokens(text)

    def prompt_tokens(self, messages: list[ChatMessage]) -> int:
        """An estimate: each message's text (count_tokens) plus TOKENS_PER_MESSAGE for its template markers."""
        return sum(estimate_tokens(message.content) + TOKENS_PER_MESSAGE for message in messages)

    def tokenize(self, text: str) -> list[int]:
        """The server's own ids, where it has a tokenizer route (llama-server's and vLLM's POST /tokenize, beside
        /v1): the OpenAI API itself has none. Elsewhere refused with a sentence: invented ids would mislead a
        measurement."""
        self._check_open()
        httpx = _http_library()
        root = re.sub(r"/v\d+$", "", self.endpoint.base_url)
        # Both servers' field names at once: each reads its own and ignores the other's.
        body = {"model": self.model_id, "prompt": text, "content": text, "add_special": True, "add_special_tokens": True}
        try:
            answer = httpx.post(f"{root}/tokenize", json=body, headers={"Authorization": f"Bearer {self._client.api_key}"}, timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError:
            raise PocketError(f"{self.endpoint.name} ({self.endpoint.base_url}) cannot be reached.", "Check that the server is running.") from None
        tokens = answer.json().get("tokens") if answer.status_code == 200 and "json" in answer.headers.get("content-type", "") else None
        if not isinstance(tokens, list) or not all(isinstance(token, int) for token in tokens):
            raise self._not_offered("tokenize text into the model's token ids")
        return tokens

    def chat_prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        """Not offered: the server renders its own chat template; prompt_tokens estimates the count."""
        raise self._not_offered("tokenize a conversation into the model's token ids")

    def stream_tokens(self, prompt: Sequence[int], sampling: SamplingParams, cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """Continue `prompt` (ids from tokenize) through POST /v1/completions, which vLLM, llama-server and OpenAI
        take as a list of ids; a server that takes only text refuses it with its own words.

        Every prompt token must be evaluated, as stream_tokens promises: llama-server would otherwise serve a repeated
        prompt from its slot's cache (a bench's pp512 measured 2,100 tokens/s where the engine does 170), so the
        request says cache_prompt false, which llama-server reads and vLLM ignores (an unknown field)."""
        self._check_open()
        require_token_count(prompt, self.description.context_length, "stream_tokens", room=1)
        yield from self._stream(lambda: self._client.completions.create(model=self.model_id, prompt=list(prompt), stream=True,
                                                                        stream_options={"include_usage": True},
                                                                        **_request_sampling(sampling, cache_prompt=False)),
                                sampling, cancel, lambda: len(prompt))  # fmt: skip

    def token_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Not offered: the OpenAI API returns sampled tokens, not the logits."""
        raise self._not_offered("give the logits of each token")

    def log_likelihood(self, tokens: Sequence[int]) -> np.ndarray:
        """Not offered (see token_logits): a remote model's perplexity cannot be measured here."""
        raise self._not_offered("give each token's log-likelihood")

    def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        """() is the remote model as it is; any adapter is refused: the server decides what it has loaded."""
        self._check_open()
        if adapters:
            raise self._not_offered("attach LoRA adapters (load them on the server)")

    def _not_offered(self, what: str) -> PocketError:
        self._check_open()
        return PocketError(f"The remote engine serving {self.description.name} does not offer a way to {what}.",
                           "Run that with a local model (a GGUF or checkpoint in `pocketlm ls`).")  # fmt: skip

    def close(self) -> None:
        """Closes the HTTP connections; the model itself stays on the server."""
        if not self._closed:
            self._closed = True
            self._client.close()


def _request_sampling(sampling: SamplingParams, **extra: object) -> dict[str, Any]:
    """SamplingParams as OpenAI request fields, with `extra` fields beyond OpenAI's. top_k, min_p and repeat_penalty
    are not OpenAI fields: the server's own defaults apply (sending them as extra fields would make strict servers
    refuse the request)."""
    fields: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.max_tokens is not None:
        fields["max_tokens"] = sampling.max_tokens
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    if sampling.stop:
        fields["stop"] = list(sampling.stop)
    if sampling.ignore_eos:
        extra["ignore_eos"] = True  # vLLM's and llama-server's name for it
    if extra:
        fields["extra_body"] = extra
    return fields
