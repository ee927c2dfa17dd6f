"""GGUF LoRA adapters on a loaded llama.cpp model: read once per file, then switched and rescaled per context.

`llama_adapter_lora_init` reads an adapter's tensors into memory beside the model (the model frees them with itself);
`llama_set_adapters_lora` makes a list of them, with scales, the context's whole active set — no new context and no
reload, so a switch costs microseconds plus the graph re-plan at the next decode. What the KV cache holds was
computed with the old set; the caller forgets it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import llama_cpp

from pocketlm.backends.adapter_format import AdapterKey, adapter_key
from pocketlm.backends.base import AdapterSpec
from pocketlm.models.errors import PocketError
from pocketlm.models.gguf_info import read_gguf
from pocketlm.models.peft_adapter import AdapterError

_CONVERT_HINT = "Convert the PEFT adapter for this model first (pocketlm adapter convert), or give its .gguf LoRA."


class LoraAdapters:
    """The adapters read for one model, by file, and the set active on one context."""

    def __init__(self, model: llama_cpp.llama_model_p, context: llama_cpp.llama_context_p, architecture: str, model_name: str) -> None:
        self._model = model
        self._context = context
        self._architecture = architecture
        self._model_name = model_name
        # Keyed by the file's identity too: an adapter rewritten in place (a new conversion) is read again.
        self._handles: dict[AdapterKey, object] = {}  # llama_adapter_lora pointers
        self._active: tuple[tuple[AdapterKey, float], ...] = ()

    def apply(self, adapters: Sequence[AdapterSpec]) -> bool:
        """Make `adapters` (GGUF files, each once: adapter_format.check_adapter_set) the active set; every new file is
        read and checked before anything changes. Returns whether the set differs from before (the KV cache then no
        longer matches the weights)."""
        keys = [self._read(Path(spec.path).expanduser(), spec.label) for spec in adapters]
        # llama.cpp skips zero scales too.
        active = tuple((key, float(spec.scale)) for key, spec in zip(keys, adapters) if spec.scale != 0.0)
        if active == self._active:
            return False
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(active))(*(self._handles[key] for key, _ in active))
        factors = (ctypes.c_float * len(active))(*(scale for _, scale in active))
        if active:
            llama_cpp.llama_set_adapters_lora(self._context, handles, len(active), factors)
        else:  # the C side asserts that a NULL list comes with a zero count
            llama_cpp.llama_set_adapters_lora(self._context, None, 0, None)
        self._active = active
        return True

    def _read(self, path: Path, label: str) -> AdapterKey:
        """The key of `path`'s adapter, read into memory now unless it was before."""
        key = adapter_key(path)
        if key not in self._handles:
            self._check(path, label)
            handle = llama_cpp.llama_adapter_lora_init(self._model, os.fsencode(path))
            if not handle:
                raise AdapterError(f"llama.cpp refused the adapter {label} for {self._model_name}: its tensors do not match this model's "
                                   "(it was made for another model of the same architecture, or the file is damaged).",
                                   "Convert the PEFT adapter again with this model as its base.")  # fmt: skip
            self._handles[key] = handle
        return key

    def _check(self, path: Path, label: str) -> None:
        """Refuse, with a sentence, a GGUF file that is not a LoRA for this architecture, before llama.cpp reads it:
        llama.cpp aborts the process on some header damage, which read_gguf recognises."""
        try:
            summary = read_gguf(path)
        except PocketError as error:
            raise AdapterError(f"{label} cannot be used as a GGUF LoRA adapter: {error.message}", _CONVERT_HINT) from None
        if summary.kind != "adapter":
            raise AdapterError(f"{label} is a GGUF {summary.kind}, not a LoRA adapter (general.type is {summary.kind!r}).", _CONVERT_HINT)
        if summary.architecture != self._architecture:
            raise AdapterError(f"{label} is an adapter for a {summary.architecture!r} model; {self._model_name} is {self._architecture!r}.",
                               "Attach it to a model of the architecture it was made for.")  # fmt: skip
