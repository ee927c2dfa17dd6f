"""The PyTorch backend, on transformers: safetensors and GPTQ checkpoints, on CUDA when there is one, else the CPU.

Never pickle: weights load with use_safetensors=True, and a folder with only .bin weights is refused before torch is
imported. A checkpoint's own Python code runs only when the user asks (LoadOptions.trust_remote_code).
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pocketlm.backends.adapter_format import check_adapter_set
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
from pocketlm.backends.gptq_runtime import prepare_gptq
from pocketlm.backends.hf_chat import HFTokenizerChat
from pocketlm.backends.hf_tokenizer import HFChatTokens
from pocketlm.backends.library_warnings import quiet_library_warnings
from pocketlm.backends.streaming import ReplyEngine, TokenSteps, WindowDecoder
from pocketlm.backends.threads import engine_threads
from pocketlm.backends.torch_adapters import TorchAdapters
from pocketlm.models.errors import ModelFileError, NotEnoughMemory, PocketError
from pocketlm.models.fit import (
    DEFAULT_CONTEXT_LENGTH,
    DTYPE_BYTES,
    estimate_torch_memory,
    gib,
    physical_cores,
    require_fit,
    torch_default_placement,
)
from pocketlm.models.formats import ModelFacts, ModelFormat, inspect_model

if TYPE_CHECKING:
    import numpy as np
    import torch

TRUST_REMOTE_CODE_OPTION = "--trust-remote-code"


def _install_hint() -> str:
    # find_spec only: the hint is read by `pocketlm backends`, which must not wait for torch to import.
    if find_spec("torch") is not None and find_spec("transformers") is None:
        return "PyTorch is installed but transformers is not. Install both with: pip install 'pocketlm[torch]'"
    return "Install it with: pip install 'pocketlm[torch]' (GPTQ models: pip install 'pocketlm[gptq]')"


class TorchBackend:
    name: ClassVar[str] = "torch"
    formats: ClassVar[frozenset[str]] = frozenset({"safetensors", "gptq"})
    adapter_formats: ClassVar[frozenset[str]] = frozenset({"peft-lora"})
    install_hint: ClassVar[str] = _install_hint()

    @classmethod
    def is_available(cls) -> bool:
        return find_spec("torch") is not None and find_spec("transformers") is not None

    @classmethod
    def priority(cls, model_format: str) -> int:
        # On a Mac, MLX (10) runs safetensors models faster than PyTorch on the CPU or MPS.
        return 20 if model_format == "safetensors" and sys.platform == "darwin" else 10

    @classmethod
    def device_summary(cls) -> str:
        import torch

        if torch.cuda.is_available():
            devices = (torch.cuda.get_device_properties(index) for index in range(torch.cuda.device_count()))
            return "; ".join(f"CUDA: {device.name}, {device.total_memory / 2**30:.1f} GiB" for device in devices)
        return f"CPU (float32), {physical_cores()} cores"

    def load(self, model_path: Path, options: LoadOptions) -> TorchChatModel:
        if model_path.is_file():
            raise ModelFileError(f"{model_path.name} is a single file; the torch backend opens checkpoint folders.",
                                 "Give the folder that holds config.json and the *.safetensors weights.")  # fmt: skip
        facts = inspect_model(model_path)
        if facts.format == ModelFormat.PYTORCH:
            raise ModelFileError(
                f"{model_path.name} holds only pickle weights (.bin), which pocketlm never loads: unpickling can run any code.",
                "Pull or convert a safetensors build of this model.",
            )
        if options.gpu_layers != 0:
            raise PocketError(f"The torch backend places the whole model on one device; --gpu-layers {options.gpu_layers} is for llama.cpp.",
                              "Use --device cuda (or cuda:N) to run it on a GPU, or leave out --gpu-layers.")  # fmt: skip
        if facts.format not in (ModelFormat.SAFETENSORS, ModelFormat.GPTQ):
            raise ModelFileError(f"{model_path.name} is a {facts.format} model, which the torch backend does not load.", "See `pocketlm backends`.")
        config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
        if facts.format == ModelFormat.GPTQ:
            prepare_gptq()
        _refuse_remote_code(config, model_path, options.trust_remote_code)

        import torch

        device = _device(torch, options.device)
        dtype_name = _dtype_name(torch, device, options.dtype)
        trained = _trained_context(config)
        context_length = options.context_length or min(DEFAULT_CONTEXT_LENGTH, trained or DEFAULT_CONTEXT_LENGTH)
        if not options.force:
            weights = facts.size_bytes if facts.format == ModelFormat.GPTQ else facts.parameter_count * DTYPE_BYTES[dtype_name]
            require_fit(estimate_torch_memory(config, weights, DTYPE_BYTES[dtype_name], context_length, device), model_path.name)
        if device == "cpu":
            _set_threads_once(torch, options.threads or engine_threads(options.beside_ui))
        model, tokenizer = _load(torch, model_path, facts, device, getattr(torch, dtype_name), options.trust_remote_code)
        chat_model = TorchChatModel(model, tokenizer, facts, model_path, device, dtype_name, context_length)
        return with_adapters(chat_model, options.adapters)


_threads_lock = threading.Lock()
_threads_set = False


def _set_threads_once(torch: Any, threads: int) -> None:
    """Size torch's intra-op pool once per process: the first CPU load decides, later loads leave it as it is.

    The pool is process-wide (every model, and the GPTQ converter, share it) and loads run in worker threads: setting
    it on every load would change the speed of a model already chatting, and interleave with the converter's own
    save-and-restore around its work. Like llama.cpp's threads, torch's wait for each other at every operation, so
    beside the app's UI it keeps a core free (engine_threads)."""
    global _threads_set
    with _threads_lock:
        if not _threads_set:
            torch.set_num_threads(threads)
            _threads_set = True


def _refuse_remote_code(config: dict[str, Any], folder: Path, trusted: bool) -> None:
    """Refuse a checkpoint that needs its own code, unless trusted. One whose model_type transformers implements
    itself loads with that implementation (auto_map is then ignored), as transformers does."""
    if trusted or not config.get("auto_map"):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return
    raise PocketError(
        f"{folder.name} needs its own Python code to run (auto_map in config.json), and running a checkpoint's code is off.",
        f"Load it with {TRUST_REMOTE_CODE_OPTION} only if you trust where it came from.",
    )


def _device(torch: Any, requested: str | None) -> str:
    if requested is None:
        return torch_default_placement()[0]
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise PocketError(f"{requested!r} is not a device PyTorch knows.", "Use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PocketError(f"This machine has no CUDA device PyTorch can use (torch {torch.__version__}).",
                              "Use --device cpu, or install a CUDA build of PyTorch.")  # fmt: skip
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise PocketError(f"There is no CUDA device {index}: this machine has {torch.cuda.device_count()}.", "Use cuda:0.")
        return f"cuda:{index}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PocketError("This machine has no Metal (MPS) device PyTorch can use.", "Use --device cpu.")
    return device.type


def _dtype_name(torch: Any, device: str, requested: str | None) -> str:
    if requested is not None:
        if requested not in DTYPE_BYTES:
            raise PocketError(f"{requested!r} is not a dtype the torch backend loads.", f"Use one of: {', '.join(DTYPE_BYTES)}.")
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float16" if device == "mps" else "float32"  # float16 matmuls on a CPU are many times slower


def out_of_memory(torch: Any, device: str, while_doing: str, model_name: str) -> NotEnoughMemory:
    """torch's CUDA OutOfMemoryError as a sentence with the device's numbers, instead of a traceback."""
    try:
        free, total = torch.cuda.mem_get_info(torch.device(device))
        numbers = f" ({gib(free)} free of {gib(total)})"
    except RuntimeError:  # the device is in no state to answer
        numbers = ""
    return NotEnoughMemory(
        f"{device} ran out of memory{numbers} while {while_doing} {model_name}.",
        "Use a smaller context (--ctx), a smaller model or a GPTQ 4-bit one, --dtype float16, or --device cpu.",
    )


def _trained_context(config: dict[str, Any]) -> int:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else 0


def _load(torch: Any, folder: Path, facts: ModelFacts, device: str, dtype: Any, trust: bool) -> tuple[Any, Any]:
    quiet_library_warnings()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust}
    if device != "cpu" or facts.format == ModelFormat.GPTQ:
        settings["device_map"] = device
    from safetensors import SafetensorError
    from transformers.utils import logging

    # transformers draws a "Loading weights" bar on stderr, across the app's screen or the CLI's reply.
    bar_was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(folder, **settings)
    except torch.cuda.OutOfMemoryError:  # a RuntimeError: before the damaged-checkpoint case below
        raise out_of_memory(torch, device, "loading", folder.name) from None
    # A damaged shard: safetensors' own error (an Exception, not an OSError), or a tensor read short or of the wrong
    # shape, which surfaces from transformers' loading code as any of these.
    except (OSError, ValueError, RuntimeError, KeyError, ImportError, SafetensorError, TypeError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if facts.format == ModelFormat.GPTQ and device == "cpu" and not isinstance(error, SafetensorError):
            raise PocketError(
                f"transformers could not load the GPTQ checkpoint {folder.name} on the CPU in {str(dtype).removeprefix('torch.')}: {first_line}",
                "GPTQ on a CPU needs gptqmodel's torch kernel (pip install 'pocketlm[gptq]'); or load it on a CUDA device (--device cuda).",
            ) from None
        raise ModelFileError(
            f"transformers could not load {folder.name} (architecture {facts.architecture!r}): {first_line}",
            "The checkpoint may be damaged or incomplete (pull or convert it again), or of an architecture this transformers version does not support.",
        ) from None
    finally:
        if bar_was_on:
            logging.enable_progress_bar()
    return model.eval(), tokenizer


def _placement(device: str, dtype: str) -> str:
    """Where the loaded model runs, for the status line and `info`: "CPU, float32", "CUDA: NVIDIA H200, bfloat16"."""
    if device.startswith("cuda"):
        import torch

        return f"CUDA: {torch.cuda.get_device_name(device)}, {dtype}"
    return f"{device.upper()}, {dtype}"


class TokenSampler:
    """llama.cpp's sampler chain (backends/llamacpp_decoding.py) on a logits tensor, so a setting means the same on
    both engines: repetition penalty over the last 64 sampled tokens, then greedy at temperature 0, else top-k, top-p,
    min-p (each keeping at least one token), temperature, and a draw from a generator seeded with `seed`."""

    def __init__(self, sampling: SamplingParams, device: str) -> None:
        import secrets

        import torch

        self._sampling = sampling
        self._recent: deque[int] = deque(maxlen=REPEAT_PENALTY_WINDOW)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        import torch

        sampling = self._sampling
        if sampling.repeat_penalty != 1.0 and self._recent:
            # llama.cpp's penalty: positive logits divided, negative ones multiplied, once per distinct recent token.
            ids = torch.tensor(sorted(set(self._recent)), device=logits.device)
            values = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(values > 0, values / sampling.repeat_penalty, values * sampling.repeat_penalty)
        token = int(torch.argmax(logits)) if sampling.temperature <= 0 else self._draw(logits)
        if sampling.repeat_penalty != 1.0:
            self._recent.append(token)
        return token

    def _draw(self, logits: torch.Tensor) -> int:
        import torch

        sampling = self._sampling
        top_k = sampling.top_k if 0 < sampling.top_k < logits.numel() else logits.numel()
        values, ids = torch.topk(logits, top_k)  # sorted, largest first
        keep = len(values)
        if sampling.top_p < 1.0:
            # The fewest tokens whose probabilities (at temperature 1, as llama.cpp orders it) reach top_p.
            cumulative = torch.cumsum(torch.softmax(values, dim=0), dim=0)
            keep = min(keep, int(torch.searchsorted(cumulative, torch.tensor([sampling.top_p], device=values.device))[0]) + 1)
        if sampling.min_p > 0.0:
            # p >= min_p * p_max is logit >= max_logit + log(min_p).
            threshold = values[0] + math.log(sampling.min_p)
            keep = max(1, min(keep, int((values[:keep] >= threshold).sum())))
        probabilities = torch.softmax(values[:keep] / sampling.temperature, dim=0)
        return int(ids[int(torch.multinomial(probabilities, 1, generator=self._generator))])


class TorchChatModel(HFTokenizerChat):
    def __init__(self, model: Any, tokenizer: Any, facts: ModelFacts, folder: Path, device: str, dtype: str, context_length: int) -> None:
        name = folder.name
        self._model = model
        self._device = device
        self._lock = threading.Lock()
        # PEFT swaps the adapted layers inside `model` in place: the decode loop below calls `model` and sees them.
        self._adapters: TorchAdapters | None = TorchAdapters(model, name, folder, device)
        # transformers 5 renamed forward's `past_key_values` to `cache`; checkpoints' own code may still use the old name.
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        generation_config = getattr(model, "generation_config", None)
        self._tokens = HFChatTokens(tokenizer, facts.architecture, (getattr(generation_config, "eos_token_id", None), model.config.eos_token_id))
        self._engine = ReplyEngine(context_length, self._render, self._tokens.format.take_notice, self._decoding)
        self.description = ModelDescription(
            name=name,
            backend=TorchBackend.name,
            architecture=facts.architecture,
            parameter_count=facts.parameter_count,
            quantization=facts.quantization if facts.format == ModelFormat.GPTQ else dtype,
            context_length=context_length,
            warnings=(self._tokens.format.load_warning,) if self._tokens.format.load_warning else (),
            device=_placement(device, dtype),
        )

    @contextmanager
    def _decoding(self, prompt: list[int], sampling: SamplingParams) -> Iterator[TokenSteps]:
        """Prefill `prompt` into a fresh cache, then one token at a time: model.generate's own loop, without its
        logits processors and stopping criteria (a chat needs none of them) or a streamer thread."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self._model.config)
        latest: list[torch.Tensor] = [self._forward(torch.tensor([prompt], device=self._device), cache)]

        def advance(token: int) -> None:
            latest[0] = self._forward(torch.tensor([[token]], device=self._device), cache)

        sampler = TokenSampler(sampling, self._device)
        yield TokenSteps(
            next_token=lambda: sampler.sample(latest[0]),
            is_end=self._tokens.end_ids.__contains__,
            advance=advance,
            text=WindowDecoder(self._tokens.decode),
            prompt_evaluated=len(prompt),  # a fresh cache every reply
        )

    def _forward(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        """The next token's logits (float32, on the model's device) after `tokens`, which the cache then holds too."""
        import torch

        try:
            with torch.inference_mode():
                output = self._model(input_ids=tokens, use_cache=True, logits_to_keep=1, **{self._cache_argument: cache})
        except torch.cuda.OutOfMemoryError:  # the prompt's activations or the growing cache
            raise out_of_memory(torch, self._device, "generating with", self.description.name) from None
        return output.logits[0, -1].float()

    def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        """See ChatModel.set_adapters: PEFT LoRA folders (peft-lora), through backends/torch_adapters.py."""
        with self._lock:
            if self._adapters is None:
                raise closed_model_error(self.description.name)
            check_adapter_set(adapters, TorchBackend.adapter_formats, TorchBackend.name)
            self._adapters.activate(adapters)
            self.description = replace(self.description, adapters=tuple(adapters))

    def token_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """See ChatModel.token_logits: one forward pass over `tokens`, with no cache kept."""
        import torch

        with self._lock:
            if self._model is None:
                raise closed_model_error(self.description.name)
            require_token_count(tokens, self.description.context_length)
            try:
                with torch.inference_mode():
                    output = self._model(input_ids=torch.tensor([list(tokens)], device=self._device), use_cache=False)
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory(torch, self._device, "scoring text with", self.description.name) from None
            return output.logits[0].float().cpu().numpy()

    def close(self) -> None:
        """Frees the model once no reply is streaming (a running stream is cancelled by its caller first)."""
        with self._lock:
            self._model = None
            self._adapters = None  # its PEFT wrapper holds the model too
            import gc

            gc.collect()
            if self._device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
