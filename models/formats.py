"""What a model on disk is, read from its files (never its name): format, architecture, size, quantization."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pocketlm.models.errors import ModelFileError
from pocketlm.models.gguf_info import read_gguf, read_gguf_header
from pocketlm.models.gguf_quants import SPLIT_PART
from pocketlm.models.mlx_adapter import is_mlx_adapter_config, read_mlx_adapter
from pocketlm.models.peft_adapter import read_peft_adapter
from pocketlm.models.safetensors_header import SafetensorsHeader, read_safetensors_header


class ModelFormat(StrEnum):
    GGUF = "gguf"
    SAFETENSORS = "safetensors"  # a Hugging Face checkpoint
    GPTQ = "gptq"
    MLX = "mlx"
    PYTORCH = "pytorch"  # a Hugging Face checkpoint with pickle weights, only ever pulled with --allow-pickle
    # LoRA adapters, applied on top of a base model, never chatted with alone; each backend takes one of them.
    PEFT_LORA = "peft-lora"  # PEFT's adapter_config.json + adapter_model.safetensors
    GGUF_LORA = "gguf-lora"  # a GGUF with general.type "adapter" (llama.cpp)
    MLX_LORA = "mlx-lora"  # mlx-lm's adapter_config.json + adapters.safetensors


ADAPTER_FORMATS = frozenset({ModelFormat.PEFT_LORA, ModelFormat.GGUF_LORA, ModelFormat.MLX_LORA})


# The files a checkpoint folder needs for inference and conversion (weights aside).
CHECKPOINT_SIDE_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "quantize_config.json", "adapter_config.json", "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
})  # fmt: skip
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PACKED_DTYPES = {"I32", "U32"}


@dataclass(frozen=True)
class ModelFacts:
    format: ModelFormat
    architecture: str
    parameter_count: int  # 0 when it cannot be read without loading (pickle weights)
    quantization: str
    context_length: int  # 0 when unknown
    files: tuple[Path, ...]  # everything the model consists of
    size_bytes: int
    base_model: str = ""  # for adapters: the model they were trained on
    location: Path | None = None  # what a backend opens when it is not the first file's folder (a GGUF file)
    gptq: GPTQFacts | None = None


@dataclass(frozen=True)
class GPTQFacts:
    """A GPTQ checkpoint's quantization, from its `quantization_config` (or quantize_config.json)."""

    bits: int
    group_size: int  # -1: one scale per output column, no groups
    act_order: bool  # desc_act: columns quantized in order of decreasing activation

    @property
    def description(self) -> str:
        """"GPTQ 4-bit g128", as the converter's lineage says it; " act-order" when desc_act."""
        groups = f"g{self.group_size}" if self.group_size > 0 else "per-column"
        return f"GPTQ {self.bits}-bit {groups}" + (" act-order" if self.act_order else "")


def read_gptq_facts(folder: Path) -> GPTQFacts | None:
    """The GPTQ settings of the checkpoint in `folder`; None when it is not a GPTQ checkpoint."""
    config_path = folder / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    quant_config = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    if quant_config.get("quant_method") != "gptq":
        if not (folder / "quantize_config.json").is_file():
            return None
        quant_config = _read_json(folder / "quantize_config.json")
    group = quant_config.get("group_size", 128)
    group_size = -1 if group == -1 else _whole(group, 128)
    return GPTQFacts(_whole(quant_config.get("bits"), 4), group_size, quant_config.get("desc_act") is True)


def checkpoint_weight_files(names: list[str]) -> list[str]:
    """The safetensors weights among a folder's top-level file names.

    Some repos carry the same weights twice (Mistral's consolidated.safetensors beside model-0000x-of-0000y); when
    transformers-named shards exist, only they are the checkpoint.
    """
    weights = [n for n in names if "/" not in n and n.endswith(".safetensors")]
    transformers_named = [n for n in weights if n.startswith("model")]
    return sorted(transformers_named or weights)


def inspect_model(path: Path) -> ModelFacts:
    """Facts about the GGUF file or Hugging Face-style folder at `path`; a damaged or unknown one is refused."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist.", "Check the path.")
    if path.is_file():
        return _inspect_gguf(path)
    return _inspect_folder(path)


def _inspect_gguf(path: Path) -> ModelFacts:
    parts = _split_parts(path)
    summaries = [read_gguf(part) for part in parts]
    first = summaries[0]
    if first.kind == "adapter":
        return _inspect_gguf_adapter(path)
    return ModelFacts(
        format=ModelFormat.GGUF,
        architecture=first.architecture,
        parameter_count=sum(s.parameter_count for s in summaries),
        quantization=first.quantization,
        context_length=first.context_length,
        files=tuple(parts),
        size_bytes=sum(s.file_size for s in summaries),
        location=parts[0],
    )


def _split_parts(path: Path) -> list[Path]:
    """Every part of a split GGUF (`x-00001-of-00003.gguf`, ...) given any one of them; [path] for a single file."""
    match = SPLIT_PART.search(path.name)
    if not match:
        return [path]
    count = int(match[2])
    stem = path.name[: match.start()]
    parts = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelFileError(f"{path.name} is one part of a split model, and {', '.join(missing)} is missing.", "Pull or copy every part.")
    return parts


def _whole(value: object, default: int) -> int:
    """A count from a config file, or `default` when it holds none (or nonsense: facts are shown, not relied on)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not 0 < value < 2**62:
        return default
    return int(value)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path.name} in {path.parent} cannot be read as JSON ({error}).") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path.name} in {path.parent} is not a JSON object.")
    return data


def _inspect_folder(folder: Path) -> ModelFacts:
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    weights = checkpoint_weight_files(names)
    if "adapter_config.json" in names:
        return _inspect_adapter(folder)
    if "config.json" not in names:
        raise ModelFileError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder.",
            "Give the folder that holds config.json and the *.safetensors weights, or a .gguf file.",
        )
    config = _read_json(folder / "config.json")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    architecture = str(config.get("model_type") or text_config.get("model_type") or "unknown")
    context_length = _whole(config.get("max_position_embeddings") or text_config.get("max_position_embeddings"), 0)
    side_files = [folder / n for n in names if n in CHECKPOINT_SIDE_FILES]
    if not weights:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if not pickles:
            raise ModelFileError(f"{folder} has a config.json but no weights (*.safetensors).", "Pull or copy the weight files too.")
        files = tuple(side_files + [folder / n for n in pickles])
        return ModelFacts(ModelFormat.PYTORCH, architecture, 0, "pickle", context_length, files, _size(files))
    headers = [read_safetensors_header(folder / n) for n in weights]
    files = tuple(side_files + [folder / n for n in weights])
    if (gptq := read_gptq_facts(folder)) is not None:
        params = _parameter_count(headers, gptq.bits, skip=(".qzeros", ".scales", ".g_idx"))
        return ModelFacts(ModelFormat.GPTQ, architecture, params, gptq.description, context_length, files, _size(files), gptq=gptq)
    mlx_quant = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
    if mlx_quant or any(h.metadata.get("format") == "mlx" for h in headers):
        if mlx_quant:
            params, quantization = _mlx_quantized(headers, mlx_quant)
        else:
            params, quantization = _parameter_count(headers), _dominant_dtype(headers)
        return ModelFacts(ModelFormat.MLX, architecture, params, quantization, context_length, files, _size(files))
    return ModelFacts(ModelFormat.SAFETENSORS, architecture, _parameter_count(headers), _dominant_dtype(headers), context_length, files, _size(files))


def _mlx_quantized(headers: list[SafetensorsHeader], quantization: dict) -> tuple[int, str]:
    """An MLX folder's parameter count and quantization ("4-bit g64", or "mixed 3/6-bit g64" for mlx-lm's mixed
    recipes). A recipe writes the top-level bits and group size as defaults and one entry per layer it quantized
    otherwise (`"model.layers.0.mlp.down_proj": {"bits": 6, "group_size": 64}`; False for a layer left float), so
    each packed weight is unpacked at its own layer's bits."""
    bits = _whole(quantization.get("bits"), 4)
    group_size = _whole(quantization.get("group_size"), 64)
    layers = {path: entry for path, entry in quantization.items() if isinstance(entry, dict)}
    layer_bits = {path: _whole(entry.get("bits"), bits) for path, entry in layers.items()}
    total = 0
    for header in headers:
        for tensor in header.tensors:
            if tensor.name.endswith((".scales", ".biases")):
                continue
            if tensor.dtype in _PACKED_DTYPES:
                total += tensor.element_count * 32 // layer_bits.get(tensor.name.rsplit(".", 1)[0], bits)
            else:
                total += tensor.element_count
    # A recipe's layer entries name every quantized layer, so the top-level bits may be used by none of them.
    used = sorted(set(layer_bits.values())) if layer_bits else [bits]
    groups = {_whole(entry.get("group_size"), group_size) for entry in layers.values()} or {group_size}
    group = f"g{group_size}" if len(groups) == 1 and group_size in groups else "g" + "/".join(str(g) for g in sorted(groups))
    if len(used) == 1:
        return total, f"{used[0]}-bit {group}"
    return total, f"mixed {'/'.join(str(b) for b in used)}-bit {group}"


def _inspect_adapter(folder: Path) -> ModelFacts:
    """A PEFT or mlx-lm adapter folder, read (and refused) as the backends will read it."""
    config = _read_json(folder / "adapter_config.json")
    if is_mlx_adapter_config(config):
        mlx = read_mlx_adapter(folder)
        files = (folder / "adapter_config.json", mlx.weights)
        ranks = {m.rank for m in mlx.modules}
        return ModelFacts(ModelFormat.MLX_LORA, "lora", mlx.parameter_count, _ranks(ranks), 0, files, _size(files), base_model=mlx.base_model)
    peft = read_peft_adapter(folder)
    files = (folder / "adapter_config.json", peft.weights)
    quantization = _ranks({m.rank for m in peft.modules}) + (", rsLoRA" if peft.use_rslora else "")
    return ModelFacts(ModelFormat.PEFT_LORA, "lora", peft.parameter_count, quantization, 0, files, _size(files), base_model=peft.base_model)


def _inspect_gguf_adapter(path: Path) -> ModelFacts:
    """A GGUF LoRA (llama.cpp's convert_lora_to_gguf, or pocketlm's converter): its architecture is its base's."""
    header = read_gguf_header(path)
    # ggml lists a tensor's row length first: lora_a is (in, rank) there, lora_b (rank, out).
    ranks = {t.shape[1] for t in header.tensors if t.name.endswith(".lora_a") and len(t.shape) == 2}
    metadata = header.metadata
    base = str(metadata.get("general.base_model.0.repo_url") or "").removeprefix("https://huggingface.co/").strip("/")
    base = base or str(metadata.get("general.base_model.0.name") or "")
    size = path.stat().st_size
    return ModelFacts(ModelFormat.GGUF_LORA, header.architecture, sum(t.n_elements for t in header.tensors), _ranks(ranks), 0,
                      (path,), size, base_model=base, location=path)  # fmt: skip


def _ranks(ranks: set[int]) -> str:
    """"rank 8"; "ranks 2-4" for an adapter whose rank_pattern gives some modules another rank."""
    if not ranks:
        return ""
    return f"rank {min(ranks)}" if len(ranks) == 1 else f"ranks {min(ranks)}-{max(ranks)}"


def _parameter_count(headers: list[SafetensorsHeader], packed_bits: int = 0, skip: tuple[str, ...] = ()) -> int:
    """Weights in the model; for packed quantized formats, the unpacked count (an int32 holds 32/bits weights)."""
    total = 0
    for header in headers:
        for tensor in header.tensors:
            if skip and tensor.name.endswith(skip):
                continue
            if packed_bits and tensor.dtype in _PACKED_DTYPES:
                total += tensor.element_count * 32 // packed_bits
            else:
                total += tensor.element_count
    return total


def _dominant_dtype(headers: list[SafetensorsHeader]) -> str:
    counts: Counter[str] = Counter()
    for header in headers:
        for tensor in header.tensors:
            counts[tensor.dtype] += tensor.element_count
    return counts.most_common(1)[0][0] if counts else "unknown"


def _size(files: tuple[Path, ...]) -> int:
    return sum(f.stat().st_size for f in files)
