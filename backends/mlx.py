"""The MLX backend, on mlx-lm: MLX models (folders with MLX weights, 4/8-bit or float) and plain safetensors
checkpoints, on Metal on a Mac and on MLX's CPU device on Linux.

On a CPU it computes in float32: MLX's bfloat16/float16 kernels (quantized matmuls included) are an order of magnitude
slower there. Weights load from safetensors only (mlx.core.load), never by unpickling; a checkpoint's own model code
(`model_file`) runs only when the user asks (LoadOptions.trust_remote_code).
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pocketlm.backends.base import (
    REPEAT_PENALTY_WINDOW,
    AdapterSpec,
    LoadOptions,
    ModelDescription,
    SamplingParams,
    closed_model_error,
    require_token_count,
    with_adapters,
)
from pocketlm.backends.hf_chat import HFTokenizerChat
from pocketlm.backends.hf_tokenizer import HFChatTokens, generation_config_end_ids
from pocketlm.backends.library_warnings import quiet_library_warnings
from pocketlm.backends.streaming import ReplyEngine, TokenSteps, WindowDecoder
from pocketlm.models.errors import ModelFileError, PocketError
from pocketlm.models.fit import DEFAULT_CONTEXT_LENGTH, DTYPE_BYTES, estimate_torch_memory, physical_cores, require_fit
from pocketlm.models.formats import ModelFacts, ModelFormat, inspect_model

if TYPE_CHECKING:
    import mlx.core as mx
    import numpy as np

INSTALL_HINT = "Install it with: pip install 'pocketlm[mlx]'"
# mlx-lm's own prefill chunk (generate_step's prefill_step_size): bounds the prompt's activations.
_PREFILL_CHUNK = 2048


def unavailable_reason() -> str | None:
    """Why MLX cannot run here, or None. find_spec and file checks only: `pocketlm backends` and the registry ask this
    without waiting for (or crashing on) the import of mlx."""
    if sys.platform == "darwin":
        if find_spec("mlx") is None or find_spec("mlx_lm") is None:
            return "MLX is not installed."
        return None
    if not sys.platform.startswith("linux"):
        return f"MLX does not run on {sys.platform}: it has builds for macOS (Metal) and Linux only."
    spec = find_spec("mlx")
    if spec is None or find_spec("mlx_lm") is None:
        return "MLX is not installed."
    # On Linux the `mlx` wheel is only the Python layer; the engine (libmlx.so) comes from mlx-cpu or mlx-cuda, and
    # without it `import mlx.core` fails.
    roots = [Path(location) for location in (spec.submodule_search_locations or ())]
    if not any((root / "lib" / "libmlx.so").is_file() for root in roots):
        return "MLX is installed without an engine for Linux (the mlx-cpu package), so it cannot run."
    return None


def _install_hint() -> str:
    reason = unavailable_reason()
    if reason is not None and "engine" in reason:
        return "Install MLX's CPU engine with: pip install 'pocketlm[mlx]' (it pulls mlx[cpu])"
    return INSTALL_HINT


class MLXBackend:
    name: ClassVar[str] = "mlx"
    formats: ClassVar[frozenset[str]] = frozenset({"mlx", "safetensors"})
    install_hint: ClassVar[str] = _install_hint()
    adapter_formats: ClassVar[frozenset[str]] = frozenset({"mlx-lora"})

    @classmethod
    def is_available(cls) -> bool:
        return unavailable_reason() is None

    @classmethod
    def priority(cls, model_format: str) -> int:
        # MLX models open with MLX everywhere; plain checkpoints with MLX first on a Mac (Metal beats PyTorch's MPS),
        # after PyTorch (10) on Linux, where MLX has only the CPU.
        if model_format == "mlx":
            return 0
        return 10 if sys.platform == "darwin" else 30

    @classmethod
    def device_summary(cls) -> str:
        mx = _import_mlx()
        if mx.default_device() == mx.gpu:
            info = mx.metal.device_info() if mx.metal.is_available() else {}
            name = str(info.get("device_name", "Apple GPU"))
            memory = info.get("memory_size")
            return f"Metal GPU ({name}, {memory / 2**30:.1f} GiB)" if isinstance(memory, int) else f"Metal GPU ({name})"
        return f"CPU (float32), {physical_cores()} cores"

    def load(self, model_path: Path, options: LoadOptions) -> MLXChatModel:
        if model_path.is_file():
            raise ModelFileError(f"{model_path.name} is a single file; the mlx backend opens model folders.",
                                 "Give the folder that holds config.json and the *.safetensors weights.")  # fmt: skip
        facts = inspect_model(model_path)
        if facts.format not in (ModelFormat.MLX, ModelFormat.SAFETENSORS):
            raise ModelFileError(f"{model_path.name} is a {facts.format} model, which the mlx backend does not load.", "See `pocketlm backends`.")
        if options.gpu_layers != 0:
            raise PocketError(f"The mlx backend places the whole model on one device; --gpu-layers {options.gpu_layers} is for llama.cpp.",
                              "Leave out --gpu-layers.")  # fmt: skip
        if (reason := unavailable_reason()) is not None:
            raise PocketError(f"The mlx backend cannot run here: {reason}", _install_hint())
        config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
        if config.get("model_file") and not options.trust_remote_code:
            raise PocketError(
                f"{model_path.name} needs its own Python code to run (model_file in config.json), and running a checkpoint's code is off.",
                "Load it with --trust-remote-code only if you trust where it came from.",
            )
        mx = _import_mlx()
        device = _device(mx, options.device)
        dtype = _compute_dtype(mx, device, options.dtype, facts)
        trained = facts.context_length
        context_length = options.context_length or min(DEFAULT_CONTEXT_LENGTH, trained or DEFAULT_CONTEXT_LENGTH)
        if not options.force:
            quantized = facts.format == ModelFormat.MLX and isinstance(config.get("quantization"), dict)
            weights = facts.size_bytes if quantized else facts.parameter_count * DTYPE_BYTES[dtype]
            require_fit(estimate_torch_memory(config, weights, DTYPE_BYTES[dtype], context_length, "cpu"), model_path.name)
        model, tokenizer = _load(mx, model_path, config, facts, getattr(mx, dtype), options.trust_remote_code)
        chat = MLXChatModel(model, tokenizer, config, facts, model_path.name, device, dtype, context_length)
        return with_adapters(chat, options.adapters)


def _import_mlx() -> Any:
    """mlx.core, or a sentence where its engine cannot load (no wheel for this CPU, a glibc older than it needs)."""
    try:
        import mlx.core as mx
    except (ImportError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PocketError(f"MLX is installed but cannot run on this machine: {first_line}", _install_hint()) from None
    return mx


def _device(mx: Any, requested: str | None) -> Any:
    if requested is None:
        return mx.default_device()
    if requested == "cpu":
        return mx.cpu
    if requested in ("gpu", "metal", "mps"):
        if not mx.is_available(mx.gpu):
            raise PocketError("This machine has no GPU MLX can use (MLX runs on Metal on a Mac).", "Use --device cpu, or leave out --device.")
        return mx.gpu
    raise PocketError(f"{requested!r} is not a device MLX knows.", "Use cpu or gpu (Metal, on a Mac).")


def _compute_dtype(mx: Any, device: Any, requested: str | None, facts: ModelFacts) -> str:
    if requested is not None:
        if requested not in DTYPE_BYTES:
            raise PocketError(f"{requested!r} is not a dtype the mlx backend computes in.", f"Use one of: {', '.join(DTYPE_BYTES)}.")
        return requested
    if device == mx.cpu:
        return "float32"  # MLX's half-precision CPU kernels are many times slower than its float32 ones
    # On Metal, the checkpoint's own half-precision dtype; float32 weights are halved (Metal is fastest in float16).
    return facts.quantization if facts.quantization in ("float16", "bfloat16") else "float16"


def rope_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes RoPE's theta and scaling under `rope_parameters`; mlx-lm 0.32 reads only top-level
    `rope_theta` and `rope_scaling`, and without them runs at theta 10000: a SmolLM (theta 100000) then talks nonsense.
    The top-level keys mlx-lm needs, copied out (nothing where the config has them already)."""
    parameters = config.get("rope_parameters")
    if not isinstance(parameters, dict) or "rope_theta" in config or not isinstance(parameters.get("rope_theta"), (int, float)):
        return {}
    overrides: dict[str, Any] = {"rope_theta": parameters["rope_theta"]}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default" and "rope_scaling" not in config:
        overrides["rope_scaling"] = {"type": rope_type, **{k: v for k, v in parameters.items() if k != "rope_theta"}}
    return overrides


def _load(mx: Any, folder: Path, config: dict[str, Any], facts: ModelFacts, dtype: Any, trust: bool) -> tuple[Any, Any]:
    from mlx_lm.utils import load_model

    quiet_library_warnings()
    from transformers import AutoTokenizer

    try:
        # The same Hugging Face tokenizer the PyTorch backend uses, so a conversation counts the same tokens on both.
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
        model, _ = load_model(folder, lazy=True, model_config=rope_overrides(config), trust_remote_code=trust)
        # Every floating parameter (a quantized layer's scales and biases too) in the compute dtype; packed weights stay.
        model.set_dtype(dtype)
        mx.eval(model.parameters())
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(
            f"mlx-lm could not load {folder.name} (architecture {facts.architecture!r}): {first_line}",
            "The model may be damaged or incomplete (pull or convert it again), or of an architecture this mlx-lm version does not support.",
        ) from None
    return model.eval() if hasattr(model, "eval") else model, tokenizer


class TokenSampler:
    """llama.cpp's sampler chain (backends/llamacpp_decoding.py) on MLX arrays, lazily (no wait for the logits), so a
    setting means the same on every engine: repetition penalty over the last 64 sampled tokens, then greedy at
    temperature 0, else top-k, top-p, min-p (each keeping at least one token), temperature, and a draw from a key
    seeded with `seed`."""

    def __init__(self, mx: Any, sampling: SamplingParams) -> None:
        import secrets

        self._mx = mx
        self._sampling = sampling
        self._recent: list[mx.array] = []
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        self._key = mx.random.key(seed)

    def sample(self, logits: mx.array) -> mx.array:
        """The next token, as a lazy 0-d array."""
        mx = self._mx
        sampling = self._sampling
        if sampling.repeat_penalty != 1.0 and self._recent:
            # llama.cpp's penalty: positive logits divided, negative ones multiplied, once per distinct recent token
            # (a repeated index writes the same value twice).
            ids = mx.concatenate(self._recent)
            values = logits[ids]
            logits = mx.array(logits)
            logits[ids] = mx.where(values > 0, values / sampling.repeat_penalty, values * sampling.repeat_penalty)
        token = mx.argmax(logits) if sampling.temperature <= 0 else self._draw(logits)
        if sampling.repeat_penalty != 1.0:
            self._recent = [*self._recent[-(REPEAT_PENALTY_WINDOW - 1) :], token.reshape(1)]
        return token

    def _draw(self, logits: mx.array) -> mx.array:
        mx = self._mx
        sampling = self._sampling
        vocabulary = logits.shape[-1]
        top_k = sampling.top_k if 0 < sampling.top_k < vocabulary else vocabulary
        ids = mx.argpartition(-logits, kth=top_k - 1)[:top_k] if top_k < vocabulary else mx.arange(vocabulary)
        values = logits[ids]
        order = mx.argsort(-values)  # largest first
        ids, values = ids[order], values[order]
        keep = mx.array(top_k)
        if sampling.top_p < 1.0:
            # The fewest tokens whose probabilities (at temperature 1, as llama.cpp orders it) reach top_p.
            cumulative = mx.cumsum(mx.softmax(values), axis=0)
            keep = mx.minimum(keep, (cumulative < sampling.top_p).sum() + 1)
        if sampling.min_p > 0.0:
            # p >= min_p * p_max is logit >= max_logit + log(min_p).
            threshold = values[0] + math.log(sampling.min_p)
            keep = mx.maximum(1, mx.minimum(keep, (values >= threshold).sum()))
        scaled = mx.where(mx.arange(top_k) < keep, values / sampling.temperature, -mx.inf)
        self._key, draw_key = mx.random.split(self._key)
        return ids[mx.random.categorical(scaled, key=draw_key)]


class _Decoder:
    """One reply's steps, pipelined as mlx-lm's generate_step does: while the caller reads token n (the one wait
    per token), the step that computes token n+1 from it is already queued (mx.async_eval), so the CPU or GPU never
    waits on Python. The queued step writes its token into the cache before the caller decides to keep it; the
    cache is the reply's own, so a reply that stops there leaves nothing behind."""

    def __init__(self, mx: Any, model: Any, stream: Any, prompt: list[int], sampler: TokenSampler) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self._mx = mx
        self._model = model
        self._stream = stream
        self._sampler = sampler
        self._cache = make_prompt_cache(model)
        with mx.stream(stream):
            tokens = mx.array(prompt)
            for start in range(0, len(prompt) - 1, _PREFILL_CHUNK):
                model(tokens[start : min(start + _PREFILL_CHUNK, len(prompt) - 1)][None], cache=self._cache)
                mx.eval([entry.state for entry in self._cache])
            self._current = self._step(tokens[-1:])
        mx.async_eval(self._current)
        self._following: Any = None

    def _step(self, token: mx.array) -> mx.array:
        with self._mx.stream(self._stream):
            logits = self._model(token.reshape(1, 1), cache=self._cache)[0, -1]
            return self._sampler.sample(logits.astype(self._mx.float32))

    def next_token(self) -> int:
        if self._following is None:
            self._following = self._step(self._current)
            self._mx.async_eval(self._following)
        return int(self._current.item())

    def advance(self, token: int) -> None:
        # `token` is always the one next_token returned: the queued step already follows it.
        self._current, self._following = self._following, None


class MLXChatModel(HFTokenizerChat):
    def __init__(self, model: Any, tokenizer: Any, config: dict[str, Any], facts: ModelFacts, name: str, device: Any, dtype: str,
                 context_length: int) -> None:  # fmt: skip
        import mlx.core as mx

        self._mx = mx
        self._model = model
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        # A stream per thread: the app loads in one worker thread and replies in others.
        self._stream = mx.new_thread_local_stream(device)
        folder = facts.files[0].parent if facts.files else Path(name)
        self._tokens = HFChatTokens(tokenizer, facts.architecture, (generation_config_end_ids(folder), config.get("eos_token_id")))
        self._engine = ReplyEngine(context_length, self._render, self._tokens.format.take_notice, self._decoding)
        self._adapters: Any = None  # an MLXAdapters once the first adapter is set (mlx_lora imports mlx.nn)
        place = "Metal GPU" if device == mx.gpu else "CPU"
        self.description = ModelDescription(
            name=name,
            backend=MLXBackend.name,
            architecture=facts.architecture,
            parameter_count=facts.parameter_count,
            quantization=facts.quantization if facts.format == ModelFormat.MLX and "-bit" in facts.quantization else dtype,
            context_length=context_length,
            warnings=(self._tokens.format.load_warning,) if self._tokens.format.load_warning else (),
            device=f"{place}, {dtype}",
        )

    @contextmanager
    def _decoding(self, prompt: list[int], sampling: SamplingParams) -> Iterator[TokenSteps]:
        decoder = _Decoder(self._mx, self._model, self._stream, prompt, TokenSampler(self._mx, sampling))
        try:
            yield TokenSteps(
                next_token=decoder.next_token,
                is_end=self._tokens.end_ids.__contains__,
                advance=decoder.advance,
                text=WindowDecoder(self._tokens.decode),
                prompt_evaluated=len(prompt),  # a fresh cache every reply
            )
        finally:
            del decoder
            self._mx.clear_cache()

    def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        from pocketlm.backends.adapter_format import check_adapter_set

        with self._lock:  # a streaming reply holds it: the set changes between replies, never within one
            self._require_open()
            check_adapter_set(adapters, MLXBackend.adapter_formats, MLXBackend.name)
            if self._adapters is None:
                from pocketlm.backends.mlx_lora import MLXAdapters

                self._adapters = MLXAdapters(self._model, self.description.name)
            self._adapters.activate(adapters)
            # Every reply builds its own prompt cache (_Decoder), so no key or value computed with the old set is reused.
            self.description = replace(self.description, adapters=tuple(adapters))

    def token_logits(self, tokens: Sequence[int]) -> np.ndarray:
        import numpy as np
        from mlx_lm.models.cache import make_prompt_cache

        with self._lock:
            self._require_open()
            require_token_count(tokens, self.description.context_length)
            mx = self._mx
            cache = make_prompt_cache(self._model)  # fresh: the reply after this one builds its own again
            rows = []
            with mx.stream(self._stream):
                ids = mx.array(list(tokens))
                for start in range(0, len(tokens), _PREFILL_CHUNK):
                    logits = self._model(ids[start : start + _PREFILL_CHUNK][None], cache=cache)[0].astype(mx.float32)
                    mx.eval(logits)
                    rows.append(np.array(logits))
            del cache
            mx.clear_cache()
            return np.concatenate(rows)

    def _require_open(self) -> None:
        if self._model is None:
            raise closed_model_error(self.description.name)

    def close(self) -> None:
        """Frees the model once no reply is streaming (a running stream is cancelled by its caller first)."""
        with self._lock:
            self._model = None
            self._adapters = None
            import gc

            gc.collect()
            self._mx.clear_cache()
