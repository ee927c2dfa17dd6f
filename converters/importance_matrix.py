"""Importance matrices: how strongly each input column of each weight matrix is used on real text, so the quantizer
spends its precision where it matters (what llama.cpp's `llama-imatrix` computes, here from the checkpoint).

For every linear layer, the importance of input column j is the mean over calibration tokens of x_j², measured with
transformers forward hooks; entries are named by the GGUF tensor they weigh (`blk.0.attn_q.weight`), which is how
llama.cpp's quantizer looks them up. llama-imatrix's own GGUF output files are read too.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketlm.converters.base import ConversionError
from pocketlm.converters.calibration import calibration_chunks
from pocketlm.models.errors import Cancelled
from pocketlm.models.progress import ProgressCallback, ProgressUpdate, ignore_progress

_CHUNK_TOKENS = 512
_MAX_CHUNKS = 64


@dataclass(frozen=True)
class ImportanceMatrix:
    """Per GGUF tensor name (`blk.0.attn_q.weight`), the mean squared input activation of each of its columns."""

    values: dict[str, np.ndarray]

    def __bool__(self) -> bool:
        return bool(self.values)


def compute_imatrix(checkpoint: Path, text: str, on_progress: ProgressCallback = ignore_progress,
                    cancel: threading.Event | None = None) -> ImportanceMatrix:  # fmt: skip
    """Mean squared input activation per column of every linear layer of `checkpoint`, named by GGUF tensor."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConversionError("Computing an importance matrix needs PyTorch and transformers.", "Install them: pip install 'pocketlm[torch]'.") from None
    import gguf

    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConversionError(f"Cannot read {checkpoint / 'config.json'} to compute the importance matrix ({error}).") from None
    from pocketlm.converters.gguf_architectures import ARCHITECTURES

    names = config.get("architectures") if isinstance(config, dict) else None
    architecture = next((ARCHITECTURES[n] for n in names if isinstance(n, str) and n in ARCHITECTURES), None) if isinstance(names, list) else None
    if architecture is None:
        raise ConversionError(f"No importance matrix for {names}: the architecture is not supported.")
    from pocketlm.converters.checkpoint_checks import read_hyperparameters

    sizes = read_hyperparameters(config, architecture)  # a damaged config.json is refused before transformers builds it
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, architecture.gguf_arch), sizes.layers)  # type: ignore[arg-type]
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # pocketlm shows its own progress
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    try:
        # use_safetensors: pickle weights beside (or instead of) the safetensors are never loaded (pickles can run code).
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, use_safetensors=True)
    except OSError as error:
        raise ConversionError(f"No safetensors weights to compute the importance matrix from in {checkpoint} ({error}).",
                              "pocketlm reads safetensors checkpoints only; pickle weights (*.bin) are never loaded.") from None  # fmt: skip
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(gguf_name: str):  # type: ignore[no-untyped-def]
        def record(module: object, inputs: tuple[torch.Tensor, ...]) -> None:
            activations = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[gguf_name] = sums.get(gguf_name, 0) + (activations**2).sum(dim=0)  # type: ignore[operator]
            counts[gguf_name] = counts.get(gguf_name, 0) + activations.shape[0]

        return record

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gguf_name = name_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
            if gguf_name is not None:
                handles.append(module.register_forward_pre_hook(hook_for(gguf_name)))
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = calibration_chunks(token_ids, _CHUNK_TOKENS, _MAX_CHUNKS)
    description = "Computing the importance matrix"
    try:
        with torch.no_grad():
            for done, chunk in enumerate(chunks, start=1):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("Cancelled while computing the importance matrix; nothing was written.")
                model(torch.tensor([chunk]))
                on_progress(ProgressUpdate(description, done, len(chunks)))
    finally:
        for handle in handles:
            handle.remove()
    return ImportanceMatrix({name: (sums[name] / counts[name]).to(torch.float32).numpy() for name in sums})


def read_imatrix_file(path: Path) -> ImportanceMatrix:
    """An importance matrix written by llama.cpp's `llama-imatrix` (GGUF format: `<tensor>.in_sum2` and `.counts`)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path} is not an importance matrix llama-imatrix wrote ({error}).",
                              "Give a GGUF imatrix file, a calibration text (.txt), or `builtin`.") from None  # fmt: skip
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    matrix = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            base = name.removesuffix(".in_sum2")
            count = tensors.get(base + ".counts")
            total = float(count.reshape(-1)[0]) if count is not None and count.size else 1.0
            if total > 0:  # a tensor the calibration never reached has no data: llama.cpp then quantizes it plainly
                matrix[base] = (sums.reshape(-1) / total).astype(np.float32)
    if not matrix:
        raise ConversionError(f"{path} holds no importance data (no *.in_sum2 tensors).", "Give a file llama-imatrix wrote.")
    return ImportanceMatrix(matrix)


@contextmanager
def as_quantize_parameter(matrix: dict[str, np.ndarray]) -> Iterator[ctypes.Array]:  # type: ignore[type-arg]
    """The matrix as llama.cpp's `llama_model_imatrix_data` array (ended by a null name), alive for the block."""
    import llama_cpp

    arrays = {name: np.ascontiguousarray(values, dtype=np.float32) for name, values in matrix.items()}
    entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for index, (name, values) in enumerate(arrays.items()):
        entries[index].name = name.encode()  # ctypes keeps the bytes alive with the array
        entries[index].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[index].size = values.size
    entries[len(arrays)].name = None
    try:
        yield entries
    finally:
        del arrays  # the float data lives exactly as long as the call that reads it
