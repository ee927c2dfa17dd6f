"""Hugging Face safetensors checkpoint → GGUF, written with the `gguf` package.

Tensors stream from the memory-mapped safetensors files to the GGUF one at a time (header and tensor index first,
then each tensor converted and written), so peak memory is about the largest tensor, not the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pocketlm.converters.base import ConversionError, ConversionResult, ConvertOptions, atomic_output, check_cancel, settings_of
from pocketlm.converters.gguf_settings import OUTTYPE_CHOICES, GGUFSettings
from pocketlm.converters.gguf_tokenizer import write_tokenizer
from pocketlm.models.formats import checkpoint_weight_files
from pocketlm.models.progress import ProgressCallback, ProgressUpdate
from pocketlm.models.safetensors_header import TensorEntry, read_float_tensor, read_safetensors_header

# numpy (and the architecture tables, which need it) load when a conversion runs: the registry imports this module
# for `pocketlm convert --help`, which must stay fast.
if TYPE_CHECKING:
    import numpy as np

    from pocketlm.converters.checkpoint_checks import Hyperparameters
    from pocketlm.converters.gguf_architectures import Architecture, Config

OUTTYPES = OUTTYPE_CHOICES  # auto: bf16 for a bf16 checkpoint (f16 could overflow), else f16
# Bytes per weight of each GGUF output type (Q8_0: 34 bytes per block of 32 weights); auto is sized as f16.
OUTTYPE_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.0625, "auto": 2.0}
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16
_SKIPPED = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class _Tensor:
    gguf_name: str
    file: Path
    entry: TensorEntry  # its name in the checkpoint, dtype, shape and bytes in `file`

    @property
    def source_name(self) -> str:
        return self.entry.name

    @property
    def dtype(self) -> str:
        return self.entry.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape


class HfToGGUF:
    name: ClassVar[str] = "hf-to-gguf"
    source_formats: ClassVar[frozenset[str]] = frozenset({"safetensors"})
    target_format: ClassVar[str] = "gguf"
    label: ClassVar[str] = "GGUF (llama.cpp)"
    summary: ClassVar[str] = "One file for llama.cpp on any CPU or GPU; f16 keeps the checkpoint's quality, a quant (Q4_K_M) is about a third of its size."
    output_is_folder: ClassVar[bool] = False
    install_hint: ClassVar[str] = "Install them with: pip install gguf numpy"
    settings_type: ClassVar[type] = GGUFSettings

    @classmethod
    def is_available(cls) -> bool:
        return all(find_spec(module) is not None for module in ("gguf", "numpy"))

    @classmethod
    def quantizes(cls, settings: object) -> bool:
        return False  # q8_0 aside, it writes float types; the quantizer's step makes K-quants

    @classmethod
    def output_label(cls, settings: object) -> str:
        return _gguf_settings(settings).outtype.upper()

    @classmethod
    def expected_size(cls, parameter_count: int, settings: object) -> int:
        # An unknown type is sized as f32 here and refused with a sentence when the conversion starts.
        return int(parameter_count * OUTTYPE_BYTES_PER_WEIGHT.get(_gguf_settings(settings).outtype, 4.0))

    def convert(self, source: Path, destination: Path, options: ConvertOptions, on_progress: ProgressCallback) -> ConversionResult:
        import gguf
        import numpy as np

        from pocketlm.converters.checkpoint_checks import read_hyperparameters

        requested = settings_of(self, options).outtype  # type: ignore[attr-defined]
        if requested not in OUTTYPES:
            raise ConversionError(f"{requested!r} is not an output type for GGUF conversion.", f"Choose one of {', '.join(OUTTYPES)}.")
        config = read_checkpoint_config(source)
        architecture = gguf_architecture(config)
        sizes = read_hyperparameters(config, architecture)  # before anything else: a bad size must not reach a loop
        arch = getattr(gguf.MODEL_ARCH, architecture.gguf_arch)
        tensors = _tensors(source, config, arch, architecture, sizes)
        outtype = resolve_outtype(requested, [t.dtype for t in tensors if len(t.shape) >= 2])
        description = f"Converting {options.model_name or source.name} to GGUF {outtype}"
        on_progress(ProgressUpdate(description, 0, len(tensors)))
        with atomic_output(destination) as temporary, _closing(gguf.GGUFWriter(temporary, gguf.MODEL_ARCH_NAMES[arch])) as writer:
            parameters = sum(int(np.prod(t.shape)) for t in tensors)
            _write_metadata(writer, source, config, sizes, outtype, options.model_name or source.name, parameters)
            architecture.metadata(writer, config)
            extra = _extra_tensors(config)
            planned = [(t, _output_type(t.gguf_name, t.shape, outtype)) for t in tensors]
            for tensor, qtype in planned:
                _add_info(writer, tensor.gguf_name, tensor.shape, qtype)
            for name, data in extra:
                writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for done, (tensor, qtype) in enumerate(planned, start=1):
                check_cancel(options)
                data = architecture.transform(tensor.source_name, read_float_tensor(tensor.file, tensor.entry), config)
                writer.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(data), qtype))
                on_progress(ProgressUpdate(description, done, len(tensors)))
            for _, data in extra:
                writer.write_tensor_data(data)
        return ConversionResult(destination, f"convert {outtype}")


def _gguf_settings(settings: object) -> GGUFSettings:
    if not isinstance(settings, GGUFSettings):
        raise ConversionError(f"The GGUF converters take GGUFSettings, not {type(settings).__name__}.")
    return settings


def resolve_outtype(outtype: str, matrix_dtypes: list[str]) -> str:
    if outtype != "auto":
        return outtype
    return "bf16" if matrix_dtypes and matrix_dtypes[0] == "BF16" else "f16"


@contextmanager
def _closing(writer: object) -> Iterator[object]:
    try:
        yield writer
    finally:
        writer.close()  # type: ignore[attr-defined]  # on failure too: the temporary file must be closed to go


def read_checkpoint_config(folder: Path) -> Config:
    """The checkpoint's config.json, refused with a sentence when missing or not a JSON object."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json, so it cannot be converted.", "Give the folder of a Hugging Face checkpoint.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path} cannot be read as JSON ({error}).") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a JSON object.")
    return config


def gguf_architecture(config: Config) -> Architecture:
    """The GGUF converter's recipe for the checkpoint's architecture; one it does not know is refused with a sentence."""
    from pocketlm.converters.gguf_architectures import ARCHITECTURES, supported_names

    names = config.get("architectures") or []
    names = [names] if isinstance(names, str) else names
    for name in names if isinstance(names, list) else []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    shown = ", ".join(map(str, names)) if names else f"model_type {config.get('model_type')!r}"
    raise ConversionError(f"pocketlm cannot convert {shown} to GGUF yet.", f"Supported: {supported_names()}.")


def _tensors(folder: Path, config: Config, arch: object, architecture: Architecture, sizes: Hyperparameters) -> list[_Tensor]:
    from pocketlm.converters.checkpoint_checks import check_tensors
    from pocketlm.converters.gguf_architectures import setting

    """Every tensor to write, with its GGUF name and where its bytes are; headers and shapes are checked first."""
    import gguf

    names = sorted(p.name for p in folder.iterdir())
    weights = checkpoint_weight_files(names)
    if not weights:
        raise ConversionError(f"{folder} has no *.safetensors weights.", "Pull or copy the weight files too.")
    # Each header is checked whole (known dtypes, byte ranges matching shapes, inside the file) before any data is read.
    entries = [(folder / file_name, entry) for file_name in weights for entry in read_safetensors_header(folder / file_name).tensors]
    check_tensors(sizes, ((entry.name, entry.shape) for _, entry in entries))
    name_map = gguf.get_tensor_name_map(arch, sizes.layers)  # type: ignore[arg-type]
    tied = bool(setting(config, "tie_word_embeddings", False)) or architecture.drops_output
    tensors = []
    for path, entry in sorted(entries, key=lambda item: (item[0].name, item[1].name)):
        if entry.name.endswith(_SKIPPED) or (tied and entry.name == "lm_head.weight"):
            continue
        if entry.dtype not in ("F32", "F16", "BF16"):
            raise ConversionError(f"{path.name} stores {entry.name} as {entry.dtype}; only F32, F16 and BF16 checkpoints convert.",
                                  "An already-quantized checkpoint (GPTQ, FP8, ...) cannot become a GGUF here.")  # fmt: skip
        gguf_name = name_map.get_name(entry.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"{path.name} holds a tensor pocketlm does not know how to place: {entry.name}.",
                                  "This checkpoint has parts its architecture's converter does not expect.")  # fmt: skip
        tensors.append(_Tensor(gguf_name, path, entry))
    return tensors


def _output_type(name: str, shape: tuple[int, ...], outtype: str) -> object:
    """1-D tensors (norms, biases) stay F32, as llama.cpp's own converter keeps them; matrices take the outtype."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[outtype]


def _add_info(writer: object, name: str, shape: tuple[int, ...], qtype: object) -> None:
    import gguf
    import numpy as np

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]  # type: ignore[index]
    n_bytes = int(np.prod(shape)) // block * type_size
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype) if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else shape  # type: ignore[arg-type]
    dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)  # type: ignore[call-overload]
    writer.add_tensor_info(name, byte_shape, np.dtype(dtype), n_bytes, raw_dtype=qtype)  # type: ignore[attr-defined]


def _extra_tensors(config: Config) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that the checkpoint does not hold: Llama 3.1's RoPE frequency factors."""
    from pocketlm.converters.gguf_architectures import llama3_rope_factors, rope_settings

    if rope_settings(config)["rope_type"] == "llama3":
        return [("rope_freqs.weight", llama3_rope_factors(config))]
    return []


def _write_metadata(writer: object, folder: Path, config: Config, sizes: Hyperparameters, outtype: str, name: str, parameters: int) -> None:
    import gguf

    from pocketlm.converters.gguf_architectures import rope_settings, setting

    w = writer  # a gguf.GGUFWriter
    # Name, license, base model and the rest of the model card, as llama.cpp's converter reads them.
    metadata = gguf.Metadata.load(None, folder, name.rsplit("/", 1)[-1], parameters)
    w.add_type(gguf.GGUFType.MODEL)  # type: ignore[attr-defined]
    metadata.set_gguf_meta_model(w)  # type: ignore[arg-type]
    w.add_context_length(sizes.context_length)  # type: ignore[attr-defined]
    w.add_embedding_length(sizes.hidden_size)  # type: ignore[attr-defined]
    w.add_feed_forward_length(sizes.intermediate_size)  # type: ignore[attr-defined]
    w.add_block_count(sizes.layers)  # type: ignore[attr-defined]
    w.add_head_count(sizes.heads)  # type: ignore[attr-defined]
    w.add_head_count_kv(sizes.kv_heads)  # type: ignore[attr-defined]
    w.add_layer_norm_rms_eps(float(setting(config, "rms_norm_eps", 1e-6)))  # type: ignore[attr-defined, arg-type]
    w.add_vocab_size(sizes.vocab_size)  # type: ignore[attr-defined]
    # Models that rotate only part of each head (Phi-3's partial_rotary_factor) say how much.
    w.add_rope_dimension_count(sizes.rotary_dims)  # type: ignore[attr-defined]
    if sizes.head_dim * sizes.heads != sizes.hidden_size:
        w.add_key_length(sizes.head_dim)  # type: ignore[attr-defined]
        w.add_value_length(sizes.head_dim)  # type: ignore[attr-defined]
    rope = rope_settings(config)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))  # type: ignore[attr-defined, arg-type]
    rope_type = rope["rope_type"]
    if rope_type in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if rope_type == "linear" else gguf.RopeScalingType.YARN)  # type: ignore[attr-defined]
        if not isinstance(rope.get("factor"), (int, float)):
            raise ConversionError(f"config.json asks for {rope_type} RoPE scaling but gives no factor.", "Check the checkpoint's config.json.")
        w.add_rope_scaling_factor(float(rope["factor"]))  # type: ignore[attr-defined, arg-type]
        if rope_type == "yarn" and rope.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))  # type: ignore[attr-defined, arg-type]
    elif rope_type not in ("default", "llama3"):
        raise ConversionError(f"RoPE scaling {rope_type!r} is not supported yet.", "Look for a ready-made GGUF of this model.")
    w.add_file_type(_FILE_TYPES[outtype])  # type: ignore[attr-defined]
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # type: ignore[attr-defined]
    write_tokenizer(writer, folder, sizes.vocab_size)
