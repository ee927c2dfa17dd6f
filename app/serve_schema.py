"""The subset of the OpenAI API that `pocketlm serve` speaks, as pydantic models: requests are checked against these
(a field out of range is a 400, never a 500), responses are built from them so that /openapi.json describes both.

Fields OpenAI clients send that a local engine has no use for (frequency/presence penalties, user, logit_bias...)
are accepted and ignored, as llama-server does: a client that sets them must not fail.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# One finish reason per choice, as OpenAI names them: "length" when max_tokens or the context ended the reply.
FinishReason = Literal["stop", "length"]
# Enough for any real prompt on a local model, and a bound on what one request can ask the server to hold.
_MAX_MESSAGES = 1024
_MAX_STOPS = 4
_MAX_ADAPTERS = 8  # LoRA adapters stacked on one request; each costs memory and time per token


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    """A content part of a message; only text parts exist for a text model."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class AdapterRequest(BaseModel):
    """A LoRA adapter for this request only: a stored adapter's name (`pocketlm adapter ls`), never a path on the
    server's disk, at `scale` (1 as trained, 0 off)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # a NaN scale would poison every logit
    name: str = Field(min_length=1, max_length=512)
    scale: float = Field(default=1.0, ge=-16, le=16)


class _Sampling(_Request):
    model: str = Field(min_length=1, max_length=512)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1  # one choice per request: a local engine decodes one sequence
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)  # accepted, ignored
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)  # accepted, ignored
    # vLLM's and llama-server's field (clients send it as extra_body): keep generating past end tokens, as benchmarks ask.
    ignore_eos: bool = False
    # pocketlm's own field (clients send it as extra_body): the adapters active for this request's reply alone.
    adapters: list[AdapterRequest] | None = Field(default=None, max_length=_MAX_ADAPTERS)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(stop for stop in stops if stop)


class ChatCompletionRequest(_Sampling):
    messages: list[MessageIn] = Field(min_length=1, max_length=_MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens; wins when both are set
    stop: str | list[str] | None = Field(default=None, max_length=_MAX_STOPS)


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="The text to continue, as it is (no chat template).")
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for /v1/completions
    stop: str | list[str] | None = Field(default=None, max_length=_MAX_STOPS)

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "".join(self.prompt)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class MessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: MessageOut
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pocketlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
