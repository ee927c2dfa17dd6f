"""The llama.cpp backend, on llama-cpp-python: GGUF models on CPU, Metal or CUDA."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pocketlm.backends.base import (
    AdapterSpec,
    ChatMessage,
    EngineTimings,
    GenerationEvent,
    LoadOptions,
    ModelDescription,
    SamplingParams,
    closed_model_error,
    require_token_count,
    with_adapters,
)
from pocketlm.backends.chat_template import ChatFormat, RenderedPrompt
from pocketlm.backends.llamacpp_probe import ensure_llama_cpp_survives
from pocketlm.backends.streaming import BytePieces, PromptTokenizer, ReplyEngine, TokenSteps, stream_prompt, stream_reply
from pocketlm.backends.threads import engine_threads
from pocketlm.models.errors import ModelFileError, PocketError
from pocketlm.models.fit import DEFAULT_CONTEXT_LENGTH, estimate_gguf_memory, physical_cores, require_fit
from pocketlm.models.gguf_info import GGUFSummary, read_gguf

if TYPE_CHECKING:
    import numpy as np
    from llama_cpp import Llama

# llama.cpp's default seed value, which asks it for a random one.
_RANDOM_SEED = 0xFFFFFFFF


class LlamaCppBackend:
    name: ClassVar[str] = "llama.cpp"
    formats: ClassVar[frozenset[str]] = frozenset({"gguf"})
    install_hint: ClassVar[str] = "Install it with: pip install 'pocketlm[llama]'"
    adapter_formats: ClassVar[frozenset[str]] = frozenset({"gguf-lora"})

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("llama_cpp") is not None

    @classmethod
    def priority(cls, model_format: str) -> int:
        return 0  # the only engine for GGUF

    @classmethod
    def device_summary(cls) -> str:
        import llama_cpp

        where = "CPU, GPU offload supported" if llama_cpp.llama_supports_gpu_offload() else "CPU"
        return f"{where}, {physical_cores()} physical cores"

    def load(self, model_path: Path, options: LoadOptions) -> LlamaCppChatModel:
        gpu_layers = _gpu_layers(options)
        summary = read_gguf(model_path)
        # The default never exceeds what the model was trained for; an explicit --ctx is the user's call.
        context_length = min(options.context_length or min(DEFAULT_CONTEXT_LENGTH, summary.context_length), 2**24)
        if not options.force:
            require_fit(estimate_gguf_memory(summary, context_length), model_path.name)

        threads = options.threads or engine_threads(options.beside_ui)
        # llama.cpp aborts the whole process on some damage no header check foresees: a file it has never opened on
        # this machine is opened in a child process first, which dies in our place (ModelFileError with its reason).
        if options.probe_crashes:
            ensure_llama_cpp_survives(model_path, gpu_layers, threads)

        from llama_cpp import Llama

        settings = dict(
            model_path=str(model_path),
            n_ctx=context_length,
            n_batch=min(512, context_length),
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=gpu_layers,
            seed=_RANDOM_SEED,
            verbose=False,
        )
        try:
            llm = self._create(Llama, settings)
        except (ValueError, RuntimeError) as error:
            raise ModelFileError(
                f"llama.cpp could not load {model_path.name} (architecture {summary.architecture!r}): {error}.",
                "The file may be damaged, or of an architecture this llama.cpp build does not support.",
            ) from None
        model = LlamaCppChatModel(llm, summary, context_length, _placement(gpu_layers))
        return with_adapters(model, options.adapters)

    @staticmethod
    def _create(llama_class: type[Llama], settings: dict) -> Llama:  # type: ignore[type-arg]
        # llama.cpp itself defaults to flash attention where the device has it (10% faster decoding here); the
        # bindings can only force it on or off, so where a context with it is refused, make one without.
        llama_class = _without_chat_templates(llama_class)
        try:
            return llama_class(**settings, flash_attn=True)
        except ValueError as error:
            if "context" not in str(error).lower():
                raise
        return llama_class(**settings, flash_attn=False)


def _gpu_layers(options: LoadOptions) -> int:
    """The layers to offload, from the options llama.cpp has; the PyTorch-only ones are refused rather than ignored.

    --device cpu means what it says to a llama.cpp user too (no offload); a GPU device is not how llama.cpp places
    layers (--gpu-layers is), and a GGUF's tensors run in their own stored types, so --dtype has no meaning here."""
    if options.dtype is not None:
        raise PocketError("llama.cpp runs the GGUF's own types; --dtype is for the torch backend.",
                          "Leave out --dtype, or pick a GGUF of another quantization (see `pocketlm convert`).")  # fmt: skip
    if options.device is None:
        return options.gpu_layers
    if options.device == "cpu":
        if options.gpu_layers != 0:
            raise PocketError(f"--device cpu and --gpu-layers {options.gpu_layers} disagree: llama.cpp would offload layers to a GPU.",
                              "Give one of them: --gpu-layers 0 (or --device cpu) runs on the CPU only.")  # fmt: skip
        return 0
    raise PocketError(f"llama.cpp does not take a device ({options.device!r}); it offloads layers to its GPU with --gpu-layers.",
                      "Use --gpu-layers N (-1 for all layers) instead of --device.")  # fmt: skip


@lru_cache(maxsize=1)
def _without_chat_templates(llama_class: type[Llama]) -> type[Llama]:
    """`llama_class`, blind to the file's chat templates.

    llama-cpp-python compiles every chat template in the file when a model loads, for chat handlers pocketlm never
    uses, and a template that does not compile raises from the constructor. pocketlm renders templates itself
    (backends/chat_template.py) and replaces a broken one; so the metadata the constructor reads leaves them out.
    """

    class TemplateBlindLlama(llama_class):  # type: ignore[misc, valid-type]
        @property
        def metadata(self) -> dict[str, str]:
            return self._pocketlm_metadata

        @metadata.setter
        def metadata(self, value: dict[str, str]) -> None:
            self._pocketlm_metadata = {key: text for key, text in value.items() if not key.startswith("tokenizer.chat_template")}

    return TemplateBlindLlama


def _special_tokens(vocab: object) -> tuple[dict[str, int], dict[str, int]]:
    """The vocabulary's control (and unknown) token strings, which llama.cpp turns into tokens only when asked to
    parse special tokens, and its user-defined ones, which it turns into tokens always."""
    import llama_cpp

    control, user_defined = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN, llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    get_attr, get_text = llama_cpp.llama_vocab_get_attr, llama_cpp.llama_vocab_get_text
    controls: dict[str, int] = {}
    always: dict[str, int] = {}
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attributes = get_attr(vocab, token)
        if attributes & (control | user_defined):
            text = (get_text(vocab, token) or b"").decode("utf-8", errors="replace")
            if text:
                (controls if attributes & control else always).setdefault(text, token)
    return controls, always


def _placement(gpu_layers: int) -> str:
    """Where llama.cpp runs the loaded model: offloading is asked with gpu_layers and happens only in a GPU build."""
    import llama_cpp

    if gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
        return "CPU"
    return "CPU + GPU (all layers)" if gpu_layers < 0 else f"CPU + GPU ({gpu_layers} layers)"


class LlamaCppChatModel:
    def __init__(self, llm: Llama, summary: GGUFSummary, context_length: int, device: str = "CPU") -> None:
        import llama_cpp

        from pocketlm.backends.llamacpp_adapters import LoraAdapters
        from pocketlm.backends.llamacpp_decoding import DecodeLoop

        self._llm = llm
        self._summary = summary
        self._lock = threading.Lock()
        self._closed = False  # set by close(), under the lock: the C pointers below dangle from then on
        self._vocab = llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._token_to_piece = llama_cpp.llama_token_to_piece
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._loop = DecodeLoop(llm)
        self._context_length = context_length
        self._adapters = LoraAdapters(llm._model.model, llm._ctx.ctx, summary.architecture, summary.path.name)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        controls, user_defined = _special_tokens(self._vocab)
        self._format = ChatFormat(summary.chat_template, summary.architecture, summary.bos_token, summary.eos_token,
                                  control_tokens=frozenset(controls), user_defined_tokens=frozenset(user_defined))  # fmt: skip
        # The strings escaped in messages, by token id: the control tokens and the template's user-defined turn markers.
        self._control_ids = {**controls, **{text: user_defined[text] for text in self._format.markers}}
        marker_ids = frozenset(user_defined[text] for text in self._format.markers)
        self._prompt_tokenizer = PromptTokenizer(self._control_ids, marker_ids, self._format.control_pattern, self._tokenize_text)
        self._engine = ReplyEngine(context_length, self._render, self._format.take_notice, self._decoding)
        self.description = ModelDescription(
            name=summary.path.stem,
            backend=LlamaCppBackend.name,
            architecture=summary.architecture,
            parameter_count=summary.parameter_count,
            quantization=summary.quantization,
            context_length=context_length,
            warnings=(self._format.load_warning,) if self._format.load_warning else (),
            device=device,
        )

    def _render(self, messages: list[ChatMessage]) -> list[int]:
        prompt = self._format.render(messages)
        # Templates that write the BOS token themselves must not get a second one.
        add_bos = self._summary.add_bos_token and not (self._summary.bos_token and prompt.text.startswith(self._summary.bos_token))
        if not prompt.escaped:  # no message holds a control token's text: llama.cpp parses the template's own
            return self._llm.tokenize(prompt.text.encode("utf-8"), add_bos=add_bos, special=True)
        return self._tokenize_template_controls(prompt, add_bos)

    def _tokenize_template_controls(self, prompt: RenderedPrompt, add_bos: bool) -> list[int]:
        """Tokens of `prompt` with control tokens parsed only where the template wrote them (streaming.PromptTokenizer)."""
        return ([self._llm.token_bos()] if add_bos else []) + self._prompt_tokenizer.tokens(prompt)

    def _tokenize_text(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def prompt_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self._render(messages))

    def chat_prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        self._require_open()
        return self._render(messages)

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def tokenize(self, text: str) -> list[int]:
        """See ChatModel.tokenize: the GGUF's add_bos_token decides the BOS, as for a chat prompt."""
        self._require_open()
        return self._llm.tokenize(text.encode("utf-8"), add_bos=self._summary.add_bos_token, special=False)

    def _require_open(self) -> None:
        # Read without the lock: tokenizing reads the vocabulary only, which a streaming reply leaves alone.
        if self._closed:
            raise closed_model_error(self.description.name)

    def _piece(self, token: int) -> bytes:
        length = self._token_to_piece(self._vocab, token, self._piece_buffer, len(self._piece_buffer), 0, False)
        if length < 0:  # the buffer was too small; llama.cpp says how big it must be
            self._piece_buffer = ctypes.create_string_buffer(-length)
            length = self._token_to_piece(self._vocab, token, self._piece_buffer, -length, 0, False)
        return self._piece_buffer.raw[: max(length, 0)]

    def stream_chat(
        self, messages: list[ChatMessage], sampling: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GenerationEvent]:
        with self._lock:
            if self._closed:  # the context is freed: decoding on it would crash the process
                raise closed_model_error(self.description.name)
            yield from stream_reply(self._engine, messages, sampling, cancel or threading.Event())

    def stream_tokens(
        self, prompt: Sequence[int], sampling: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GenerationEvent]:
        """See ChatModel.stream_tokens: the cache is emptied first, so the prefill decodes every prompt token."""
        with self._lock:
            if self._closed:
                raise closed_model_error(self.description.name)
            self._loop.forget()
            yield from stream_prompt(self._engine, prompt, sampling, cancel or threading.Event())

    def engine_timings(self) -> EngineTimings:
        """See ReportsEngineTimings: llama_perf_context, reset when each reply's prefill starts. llama.cpp counts a
        batch of one token as generation, so a prefill of one token is left out (counted neither as prompt nor as
        generation: reset again after it); a reply's tokens but its last are decoded (the last is sampled, never fed back)."""
        import llama_cpp

        with self._lock:
            if self._closed:
                raise closed_model_error(self.description.name)
            data = llama_cpp.llama_perf_context(self._llm._ctx.ctx)
        # llama_perf_context reports a count of 0 as 1 (max(1, n)): a count without time is none.
        return EngineTimings(prompt_tokens=data.n_p_eval if data.t_p_eval_ms > 0 else 0, prompt_s=data.t_p_eval_ms / 1000,
                             generated_tokens=data.n_eval if data.t_eval_ms > 0 else 0, generation_s=data.t_eval_ms / 1000)  # fmt: skip

    @contextmanager
    def _decoding(self, prompt: list[int], sampling: SamplingParams) -> Iterator[TokenSteps]:
        import llama_cpp

        from pocketlm.backends.llamacpp_decoding import Sampler

        llama_cpp.llama_perf_context_reset(self._llm._ctx.ctx)  # engine_timings counts this reply only
        evaluated = self._loop.prefill(prompt)
        if evaluated == 1:
            # llama.cpp counts a one-token batch as generation, when the batch's work is waited for: wait for it now
            # and start the counters again, so that they hold the reply's decodes alone.
            llama_cpp.llama_synchronize(self._llm._ctx.ctx)
            llama_cpp.llama_perf_context_reset(self._llm._ctx.ctx)
        sampler = Sampler(sampling, _RANDOM_SEED if sampling.seed is None else sampling.seed, self._n_vocab)
        try:
            yield TokenSteps(
                next_token=lambda: self._loop.sample(sampler),
                is_end=lambda token: self._is_eog(self._vocab, token),
                advance=self._loop.advance,
                text=BytePieces(self._piece),
                prompt_evaluated=evaluated,
            )
        finally:
            sampler.close()

    def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        from pocketlm.backends.adapter_format import check_adapter_set

        with self._lock:
            # After close() the model's memory is freed: llama_adapter_lora_init on it would crash the process.
            if self._closed:
                raise closed_model_error(self.description.name)
            check_adapter_set(adapters, LlamaCppBackend.adapter_formats, LlamaCppBackend.name)
            if self._adapters.apply(adapters):
                # The cached prefix's keys and values were computed with the old adapters: the next reply must not reuse them.
                self._loop.forget()
            self.description = dataclasses.replace(self.description, adapters=tuple(adapters))

    def token_logits(self, tokens: Sequence[int]) -> np.ndarray:
        with self._lock:
            if self._closed:
                raise closed_model_error(self.description.name)
            require_token_count(tokens, self._context_length)
            return self._loop.score(list(tokens), self._n_vocab)

    def log_likelihood(self, tokens: Sequence[int]) -> np.ndarray:
        """See ChatModel.log_likelihood: the last token's logits predict nothing scored, so they are not computed."""
        from pocketlm.backends.scoring import token_log_probabilities

        with self._lock:
            if self._closed:
                raise closed_model_error(self.description.name)
            require_token_count(tokens, self._context_length, "log_likelihood", fewest=2)
            logits = self._loop.score(list(tokens[:-1]), self._n_vocab)
        return token_log_probabilities(logits, tokens[1:])

    def close(self) -> None:
        """Frees the model once no reply is streaming (a running stream is cancelled by its caller first)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._llm.close()
