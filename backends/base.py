"""The Backend Protocol: what every inference engine (llama.cpp, PyTorch, MLX, a remote server) provides.

A backend loads a model into a ChatModel; a ChatModel streams a reply to a conversation as typed events:
any number of TextPiece (and, before the first piece, at most one ContextTrimmed and any Notice), then exactly
one GenerationStats. Cancelling is setting the threading.Event passed to `stream_chat`; the stream then ends
within one token with stop_reason "cancelled".
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

from pocketlm.models.errors import PocketError
from pocketlm.models.peft_adapter import AdapterError

if TYPE_CHECKING:
    import numpy as np

Role = Literal["system", "user", "assistant"]
# How many of the latest tokens SamplingParams.repeat_penalty weighs on, in every backend: llama.cpp's default window.
REPEAT_PENALTY_WINDOW = 64
StopReason = Literal["end_of_generation", "stop_string", "max_tokens", "context_full", "cancelled"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter, in a format the backend takes (Backend.adapter_formats), applied at `scale`: 1 is the adapter as
    trained, 0 is the base model, 0.5 half the change, as PEFT's set_scale means it."""

    path: Path
    scale: float = 1.0
    name: str = ""  # how the user knows it (its store name); the file or folder name when empty

    def __post_init__(self) -> None:
        # Refused here, once for every backend: a NaN or infinite scale would turn every logit into NaN.
        if not math.isfinite(self.scale):
            raise AdapterError(f"{self.label}'s scale {self.scale} is not a finite number.", "Give a scale such as 1, 0.5 or 0.")

    @property
    def label(self) -> str:
        path = Path(self.path)
        return self.name or (path.stem if path.suffix == ".gguf" else path.name)


@dataclass(frozen=True)
class LoadOptions:
    context_length: int | None = None  # None: the engine's default, bounded by what the model was trained for
    threads: int | None = None  # None: the engine picks (physical cores)
    gpu_layers: int = 0  # llama.cpp: layers to offload; -1 for all
    device: str | None = None  # PyTorch and MLX: "cuda", "cuda:1", "cpu", "mps"; None: the best this machine has
    dtype: str | None = None  # PyTorch: "float32", "float16", "bfloat16"; None: bf16/f16 on a GPU, float32 on a CPU
    adapters: tuple[AdapterSpec, ...] = ()  # applied once loaded, as set_adapters would
    force: bool = False  # load even when the memory estimate says it will not fit
    beside_ui: bool = False  # the app's UI thread shares the cores: an engine whose threads wait for each other keeps one free
    trust_remote_code: bool = False  # run a checkpoint's own Python code (transformers); only when the user asks
    # llama.cpp: open a GGUF not opened before in a child process first (llamacpp_probe); off where the caller already
    # runs in a child that a native abort may kill (the bench's cells), so that the load is timed alone.
    probe_crashes: bool = True


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 means greedy, which is deterministic
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int | None = None  # None: until end of generation or the context is full
    seed: int | None = None  # None: a fresh random seed per reply
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class ContextTrimmed:
    """The oldest turns were dropped so the conversation fits the context window."""

    dropped_messages: int
    prompt_tokens: int
    context_length: int


@dataclass(frozen=True)
class Notice:
    """A warning the user should read once, e.g. that the model's chat template failed and a standard one took over."""

    message: str


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float  # from the call to the first token: fitting, rendering, prefill and the first sample
    generation_s: float  # from the first token to the last
    stop_reason: StopReason
    # Of prompt_tokens, those the engine computed for this reply; the rest came from its cache (llama.cpp reuses the
    # prefix a conversation's previous reply left), so prompt processing speed is over these only.
    prompt_evaluated_tokens: int = 0
    prefill_s: float = 0.0  # evaluating those tokens and sampling the first token: prompt processing alone

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time they took (prompt processing excluded)."""
        if self.generated_tokens <= 1 or self.generation_s <= 0:
            return 0.0
        return (self.generated_tokens - 1) / self.generation_s

    @property
    def prompt_tokens_per_second(self) -> float:
        """Prompt processing speed: the tokens evaluated over the prefill's time (0.0 when either is 0)."""
        if self.prompt_evaluated_tokens <= 0 or self.prefill_s <= 0:
            return 0.0
        return self.prompt_evaluated_tokens / self.prefill_s


@dataclass(frozen=True)
class EngineTimings:
    """The engine's own count of the latest reply's work, without pocketlm's Python around it (llama.cpp:
    llama_perf_context), to set beside GenerationStats' figures."""

    prompt_tokens: int  # tokens evaluated in batches (the prompt)
    prompt_s: float
    generated_tokens: int  # tokens decoded one at a time (llama.cpp's n_eval): a reply's tokens but its last
    generation_s: float

    @property
    def prompt_tokens_per_second(self) -> float:
        if self.prompt_tokens <= 0 or self.prompt_s <= 0:
            return 0.0
        return self.prompt_tokens / self.prompt_s

    @property
    def tokens_per_second(self) -> float:
        if self.generated_tokens <= 0 or self.generation_s <= 0:
            return 0.0
        return self.generated_tokens / self.generation_s


GenerationEvent = TextPiece | ContextTrimmed | Notice | GenerationStats


@dataclass(frozen=True)
class ModelDescription:
    name: str
    backend: str
    architecture: str
    parameter_count: int
    quantization: str
    context_length: int  # the loaded context window, in tokens
    warnings: tuple[str, ...] = ()  # what the user should read once after loading (e.g. a replaced chat template)
    device: str = ""  # where this model runs, as loaded: "CPU", "CPU + GPU (all layers)", "CUDA: NVIDIA H200, bfloat16"
    adapters: tuple[AdapterSpec, ...] = ()  # the LoRA adapters active now, with their scales (set_adapters keeps it current)
    # False where count_tokens/prompt_tokens are estimates (a remote engine's tokenizer is out of reach): a context
    # meter says "about".
    exact_token_counts: bool = True


@runtime_checkable
class ChatModel(Protocol):
    description: ModelDescription

    def stream_chat(
        self, messages: list[ChatMessage], sampling: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GenerationEvent]:
        """Stream the assistant's reply to `messages`; the last event is GenerationStats."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def prompt_tokens(self, messages: list[ChatMessage]) -> int:
        """Tokens the conversation takes once rendered with the model's chat template."""
        ...

    def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        """Make `adapters`, each at its scale, the whole active set from the next token on, without reloading the base
        model; () detaches them all. An adapter used before is reused from memory (unless its files changed since), a
        new one read and checked first (AdapterError, one sentence, when it does not fit or is of a format the backend
        does not take; the active set is then unchanged). The same adapter (same resolved path) listed twice is refused
        (refuse_repeated_adapters), never summed. Waits for a streaming reply to finish. Keeps description.adapters
        current. On a closed model: closed_model_error."""
        ...

    def token_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """The logits after each of `tokens` (len(tokens) × vocabulary, float32), computed from scratch with the active
        adapters, as the model would score that text: for parity tests and perplexity. Leaves no state a reply reuses.
        No tokens, or more than the loaded context: require_token_count's PocketError. On a closed model:
        closed_model_error."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """`text` as a document, no chat template: the model's BOS first where its tokenizer adds one (a GGUF's
        add_bos_token; a transformers tokenizer that adds it itself), control-token strings in it tokenized as text."""
        ...

    def chat_prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        """The ids stream_chat would evaluate for `messages` before any fitting (prompt_tokens is their count)."""
        ...

    def stream_tokens(
        self, prompt: Sequence[int], sampling: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GenerationEvent]:
        """Continue `prompt` (ids: no template, no fitting) down stream_chat's own decode path, every prompt token
        evaluated (no cached prefix reused), for measurements: TextPieces, then GenerationStats. The prompt holds 1
        to context_length - 1 tokens (require_token_count's PocketError otherwise); the reply stops at max_tokens or
        at the context's end. On a closed model: closed_model_error."""
        ...

    def log_likelihood(self, tokens: Sequence[int]) -> np.ndarray:
        """ln p(tokens[i] | tokens[:i]) for i = 1 .. n-1 (n-1 float64 values), computed from scratch with the active
        adapters from the logits token_logits gives: for perplexity. 2 to context_length tokens (require_token_count's
        PocketError otherwise). On a closed model: closed_model_error."""
        ...

    def close(self) -> None:
        """Free the model's memory; the object is unusable afterwards."""
        ...


@runtime_checkable
class ReportsEngineTimings(Protocol):
    """A ChatModel whose engine times its own work (llama.cpp)."""

    def engine_timings(self) -> EngineTimings:
        """The engine's counters since the latest reply (stream_chat or stream_tokens) started."""
        ...


LoadedModel = TypeVar("LoadedModel", bound=ChatModel)


def with_adapters(model: LoadedModel, adapters: Sequence[AdapterSpec]) -> LoadedModel:
    """`model` with `adapters` made its active set (LoadOptions.adapters, or the app's choice after a load). A set it
    refuses closes it first: a model nobody holds must not keep its memory."""
    if adapters:
        try:
            model.set_adapters(adapters)
        except BaseException:
            model.close()
            raise
    return model


def closed_model_error(model_name: str) -> PocketError:
    """What every ChatModel raises when used after close(), checked under the model's lock (a close may be waiting)."""
    return PocketError(f"{model_name} was closed, so it cannot be used any more.", "Load the model again.")


def require_token_count(tokens: Sequence[int], context_length: int, method: str = "token_logits", fewest: int = 1, room: int = 0) -> None:
    """Refuse, as every backend's token_logits (log_likelihood: 2 at least; stream_tokens: 1 token of room for the
    reply) does, fewer than `fewest` tokens or more than the loaded context holds."""
    most = context_length - room
    if not fewest <= len(tokens) <= most:
        bound = "the loaded context" if not room else f"the loaded context of {context_length} less {room} for the reply"
        raise PocketError(f"{method} takes {fewest} to {most} tokens ({bound}), not {len(tokens)}.",
                          "Give fewer tokens, or load the model with a larger --ctx.")  # fmt: skip


def refuse_repeated_adapters(adapters: Sequence[AdapterSpec]) -> None:
    """Refuse, as every backend's set_adapters does, one adapter (the same resolved path) listed twice: summing the
    copies or keeping one would both surprise someone, and the user can say the scale they mean."""
    seen: set[Path] = set()
    for spec in adapters:
        path = Path(spec.path).expanduser().resolve()
        if path in seen:
            raise AdapterError(f"{spec.label} is listed twice.", "Give it once, with the scale you want.")
        seen.add(path)


class Backend(Protocol):
    """An engine. Registered under the entry-point group `pocketlm.backends`."""

    name: ClassVar[str]  # short id shown to users: "llama.cpp", "torch", "mlx"
    formats: ClassVar[frozenset[str]]  # model formats it loads: "gguf", "safetensors", "mlx", ...
    install_hint: ClassVar[str]  # what to run when is_available() is False
    adapter_formats: ClassVar[frozenset[str]]  # adapter formats set_adapters takes: "gguf-lora", "peft-lora", "mlx-lora"

    @classmethod
    def is_available(cls) -> bool:
        """Whether its engine library is installed; must not import it."""
        ...

    @classmethod
    def priority(cls, model_format: str) -> int:
        """Rank among the installed backends that load `model_format`: the lowest opens it by default (PyTorch before
        MLX for safetensors on Linux, MLX first on a Mac)."""
        ...

    @classmethod
    def device_summary(cls) -> str:
        """Where it would run on this machine, for `pocketlm backends`: "CUDA: NVIDIA H200, 139.8 GiB", "CPU, 2 cores".
        May import the engine library (never called by --help); only when is_available()."""
        ...

    def load(self, model_path: Path, options: LoadOptions) -> ChatModel:
        """Load the model at `model_path`: a file or folder, or for a backend of models without local files (remote)
        the synthetic reference the store gave it (LocalModel.path)."""
        ...
