"""The tiny random Llama loaded on every installed engine, for tests that hold each backend to the same measurement."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pocketlm.backends.base import ChatModel, LoadOptions

# llama.cpp reads tiny_llama_f32_gguf (float32: the very weights), PyTorch and MLX the checkpoint itself.
ENGINES = ("llama.cpp", "torch", "mlx")


def engine_loader(engine: str, checkpoint: Path, gguf: Path) -> Callable[[int], ChatModel] | None:
    """A function loading the tiny model on `engine` with a given context length; None when it is not installed."""
    if engine == "llama.cpp":
        from pocketlm.backends.llamacpp import LlamaCppBackend

        return lambda context_length: LlamaCppBackend().load(gguf, LoadOptions(context_length=context_length))
    if engine == "torch":
        from pocketlm.backends.pytorch import TorchBackend

        if not TorchBackend.is_available():
            return None
        return lambda context_length: TorchBackend().load(checkpoint, LoadOptions(context_length=context_length))
    from pocketlm.backends.mlx import MLXBackend

    if not MLXBackend.is_available():
        return None
    return lambda context_length: MLXBackend().load(checkpoint, LoadOptions(context_length=context_length))
