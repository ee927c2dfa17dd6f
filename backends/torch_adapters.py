"""LoRA adapters on a loaded transformers model, through PEFT: loaded once each, then switched, rescaled, stacked and
turned off in place, without reloading the base model.

PEFT wraps the model once (the first adapter) and swaps each targeted linear layer for a LoRA layer in place, so the
transformers model the backend calls goes through the adapters with no change to its decode loop. Every adapter stays
loaded under its own PEFT name; the active set is PEFT's `set_adapter([...])`. Each LoRA layer's `scaling[name]` is set
here, to the user's scale × that module's scale as models/peft_adapter.py reads it (alpha / r, or alpha / √r with
rsLoRA, pattern entries included): PEFT's own set_scale ignored rsLoRA in older
peft versions (huggingface/peft#2733), and
our reading is the one the GGUF and MLX conversions use too. An empty set disables the adapter layers: the base model.

An adapter is read and checked against the base model's files (models/adapter_fit.py: layers, modules, widths) before
PEFT touches the model: PEFT ignores tensors for modules a model lacks, and fails half-way, with a traceback, when a
shape does not fit. What PEFT still refuses becomes a sentence too, and what it left of the adapter is removed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from pocketlm.backends.adapter_format import AdapterKey, adapter_key
from pocketlm.backends.base import AdapterSpec
from pocketlm.backends.library_warnings import quiet_library_warnings
from pocketlm.models.errors import BackendUnavailable
from pocketlm.models.peft_adapter import AdapterError, read_peft_adapter

# What PEFT or torch raise when an adapter that passed our checks still does not load into the model.
_PEFT_ERRORS = (RuntimeError, ValueError, KeyError, OSError, TypeError, AttributeError, IndexError)


@dataclass(frozen=True)
class _Loaded:
    name: str  # its PEFT adapter name
    scales: dict[str, float]  # module ("model.layers.0.self_attn.q_proj") -> its PEFT scale at strength 1


class TorchAdapters:
    """The adapters loaded into one transformers model, and which of them are active at what scale."""

    def __init__(self, model: Any, model_name: str, base_path: Path, device: str) -> None:
        self._model = model
        self._model_name = model_name
        self._base_path = base_path
        self._device = device
        self._peft: Any = None  # the PeftModel around self._model, once the first adapter is loaded
        self._loaded: dict[AdapterKey, _Loaded] = {}
        self._lora_layers: dict[str, Any] = {}  # module name -> the PEFT LoraLayer that replaced it
        self._active: list[tuple[_Loaded, float]] = []  # the adapters active now, with their user scales
        self._count = 0  # adapters ever loaded: keeps PEFT names unique

    def activate(self, adapters: Sequence[AdapterSpec]) -> None:
        """Make `adapters` (PEFT LoRA folders, each once: adapter_format.check_adapter_set) the active set; new ones
        are loaded first, and a refusal leaves the set as it was."""
        # Keyed by the files' identity too: an adapter retrained in the same folder is read again.
        keys = [adapter_key(Path(spec.path)) for spec in adapters]
        try:
            for spec, key in zip(adapters, keys):
                if key not in self._loaded:
                    self._loaded[key] = self._load(spec, key[0])
        except BaseException:
            self._apply(self._active)  # PEFT makes the first adapter it wraps the model with active
            raise
        self._apply([(self._loaded[key], spec.scale) for spec, key in zip(adapters, keys)])
        self._drop_stale(keys)

    def _apply(self, active: list[tuple[_Loaded, float]]) -> None:
        """Set PEFT's active adapters and each LoRA layer's scale for them: user scale × the module's own scale."""
        self._active = active
        if self._peft is None:
            return  # nothing was ever attached: the model is the base model already
        if not active:
            self._peft.base_model.disable_adapter_layers()
            return
        self._peft.base_model.enable_adapter_layers()
        self._peft.base_model.set_adapter([loaded.name for loaded, _ in active])
        for module, layer in self._lora_layers.items():
            for loaded, scale in active:
                if loaded.name in layer.scaling:  # a layer this adapter does not change has no entry
                    # A module PEFT made from the config but the file holds no tensors for keeps PEFT's zero lora_B:
                    # any scale adds nothing there.
                    layer.scaling[loaded.name] = scale * loaded.scales.get(module, 0.0)

    def _load(self, spec: AdapterSpec, folder: Path) -> _Loaded:
        from pocketlm.models.adapter_fit import check_adapter_fits

        adapter = read_peft_adapter(folder)
        check_adapter_fits(adapter, self._base_path, self._model_name)
        self._count += 1
        name = f"{re.sub(r'[^A-Za-z0-9_]', '_', spec.label)[:40]}_{self._count}"  # PEFT names take no dots
        _quiet_peft_import()
        if find_spec("peft") is None:
            raise BackendUnavailable("Attaching LoRA adapters on the torch backend needs peft, which is not installed.",
                                     "Install it with: pip install 'pocketlm[torch]'")  # fmt: skip
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._model, str(folder), adapter_name=name, torch_device=self._device)
            else:
                self._peft.load_adapter(str(folder), adapter_name=name, torch_device=self._device)
        except _PEFT_ERRORS as error:
            self._forget(name)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise AdapterError(f"PEFT could not attach {spec.label} to {self._model_name}: {first_line}",
                               f"Check that {spec.label} was trained on {self._model_name}'s base model.") from None  # fmt: skip
        self._peft.eval()
        self._lora_layers = {module: layer for module, layer in self._model.named_modules() if isinstance(layer, LoraLayer)}
        return _Loaded(name, {module.module: module.scale for module in adapter.modules})

    def _drop_stale(self, active_keys: list[AdapterKey]) -> None:
        """Free the older copies of adapters whose folder was just read again (retrained in place): nothing selects them now."""
        current = {key[0]: key for key in active_keys}
        for key in [key for key in self._loaded if key[0] in current and key != current[key[0]]]:
            self._forget(self._loaded.pop(key).name)

    def _forget(self, name: str) -> None:
        """Remove adapter `name` (or what a failed load left of it) from the model's layers."""
        from peft.tuners.lora import LoraLayer

        for module in self._model.modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                with suppress(*_PEFT_ERRORS):
                    module.delete_adapter(name)
        if self._peft is not None:
            self._peft.peft_config.pop(name, None)


def _quiet_peft_import() -> None:
    """PEFT imports gptqmodel when it is installed (to wrap GPTQ layers), whose banner prints on stdout and whose CPU
    pool waits for ever unless told its size: ready it as a GPTQ load does. torchao's and torch's notes are quieted."""
    quiet_library_warnings()
    if find_spec("gptqmodel") is not None:
        from pocketlm.backends.gptq_runtime import prepare_gptq

        with suppress(BackendUnavailable):  # optimum missing: nothing loads GPTQ, but PEFT still imports gptqmodel
            prepare_gptq()
