"""Which adapter format a path holds, sniffed from its file names (and adapter_config.json's keys), the one
sentence every backend gives for an adapter of a format it does not take, and the identity backends reuse an adapter
they read before by.

A sniff, not a reading: the backend that takes the format reads the adapter whole afterwards (models/peft_adapter.py,
models/mlx_adapter.py, llama.cpp's own header checks) and refuses damage there with its own sentence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pocketlm.backends.base import AdapterSpec, refuse_repeated_adapters
from pocketlm.models.mlx_adapter import MLX_ADAPTER_WEIGHTS, is_mlx_adapter_config
from pocketlm.models.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError

# An adapter's identity: its resolved path, then (file name, mtime_ns, size) of each file it is read from.
AdapterKey = tuple[Path, tuple[tuple[str, int, int], ...]]
# How a format is named to users, beside the name `pocketlm adapter ls` shows.
_KINDS = {"peft-lora": "PEFT LoRA", "gguf-lora": "GGUF LoRA", "mlx-lora": "MLX LoRA"}


def sniff_adapter_format(path: Path) -> str | None:
    """"peft-lora", "gguf-lora" or "mlx-lora" by the files at `path`; None when it looks like none of them."""
    if path.is_file():
        return "gguf-lora" if path.suffix.lower() == ".gguf" else None
    if not path.is_dir():
        return None
    config = _config(path / ADAPTER_CONFIG)
    if config is not None:
        return "mlx-lora" if is_mlx_adapter_config(config) else "peft-lora"
    # No readable config: the weights file's name still says whose format it is.
    if (path / MLX_ADAPTER_WEIGHTS).is_file():
        return "mlx-lora"
    if (path / ADAPTER_WEIGHTS).is_file():
        return "peft-lora"
    return None


def check_adapter_set(adapters: Sequence[AdapterSpec], wanted: frozenset[str], backend_name: str) -> None:
    """What every backend's set_adapters refuses before reading any adapter: one listed twice, one of another format."""
    refuse_repeated_adapters(adapters)
    for spec in adapters:
        require_adapter_format(Path(spec.path), spec.label, wanted, backend_name)


def require_adapter_format(path: Path, label: str, wanted: frozenset[str], backend_name: str) -> None:
    """Refuse, with one sentence naming the formats `backend_name` takes, an adapter at `path` of any other format."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdapterError(f"There is no adapter at {path}.", "Check the path, or run `pocketlm adapter ls`.")
    found = sniff_adapter_format(path)
    if found in wanted:
        return
    takes = " or ".join(f"{_KINDS.get(name, name)} adapters ({name})" for name in sorted(wanted))
    if found:
        kind = _KINDS[found]
        what = f"{'an' if kind[0] in 'AEIMO' else 'a'} {kind} adapter ({found})"
    else:
        what = "not a LoRA adapter pocketlm knows"
    sentence = f"{label} is {what}; the {backend_name} backend takes {takes}."
    if found == "peft-lora":
        hint = f"Attach it by its store name so pocketlm converts it for {backend_name}, or convert it first with `pocketlm adapter convert`."
    elif found:
        hint = f"Attach the PEFT adapter it was made from by its store name, so pocketlm converts that for {backend_name}."
    else:
        hint = "Give a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), or its conversion for this backend."
    raise AdapterError(sentence, hint)


def adapter_key(path: Path) -> AdapterKey:
    """What a backend keeps a read adapter under: the same path with its files rewritten since (retrained, converted
    again) is another adapter, read again."""
    path = Path(path).expanduser().resolve()
    files = [path] if path.is_file() else [path / name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MLX_ADAPTER_WEIGHTS)]
    identity = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue  # absent: the reader refuses a missing file with its own sentence
        identity.append((file.name, stat.st_mtime_ns, stat.st_size))
    return path, tuple(identity)


def _config(path: Path) -> dict | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return config if isinstance(config, dict) else None
