"""PEFT LoRA adapter → GGUF LoRA adapter for llama.cpp, written with the `gguf` package.

llama.cpp adds `s · B (A x)` to each adapted weight's product with s = adapter.lora.alpha / rank_of_that_tensor × the
user's scale (llama-adapter.h, get_scale). PEFT's factor is alpha / r, or alpha / √r with rsLoRA, and rank_pattern /
alpha_pattern change it per module. So the file's alpha is PEFT's alpha (alpha·√r with rsLoRA: llama.cpp's own
convert_lora_to_gguf.py writes plain alpha and silently drops use_rslora), and any module whose factor still differs
has the ratio folded into its B. Tensors are named as the base's GGUF names them (`blk.N.attn_q.weight.lora_a`), A
stored rank × in and B out × rank (numpy order), and B's rows are permuted exactly as the base converter permuted q/k
(Llama's rotary halves → interleaved pairs), or the adapter would add its change to the wrong rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pocketlm.converters.adapter_settings import ADAPTER_OUTTYPES, AdapterConversionSettings
from pocketlm.converters.base import ConversionError, ConversionResult, ConvertOptions, atomic_output, check_cancel, settings_of
from pocketlm.models.progress import ProgressCallback, ProgressUpdate

if TYPE_CHECKING:
    import numpy as np

    from pocketlm.converters.gguf_architectures import Config, TensorTransform
    from pocketlm.models.adapter_fit import BaseShapes
    from pocketlm.models.peft_adapter import LoraModule, PeftAdapter

_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
_BASE_HINT = "Give the base model the adapter is for: its GGUF file, or its Hugging Face folder (--base)."


@dataclass(frozen=True)
class GGUFBase:
    """What an adapter's GGUF file depends on in its base model."""

    name: str
    arch_name: str  # the GGUF architecture string: "llama"
    layers: int
    config: Config  # the head counts the q/k row permutation needs
    transform: TensorTransform  # the base converter's own tensor transform, applied to B as to the weight
    tensor_names: frozenset[str]  # the GGUF names of the base's weights (output.weight absent when tied)
    shapes: BaseShapes  # layer count and module shapes, as models/adapter_fit reads them for its fit check


class PeftToGGUFLora:
    name: ClassVar[str] = "lora-to-gguf"
    source_formats: ClassVar[frozenset[str]] = frozenset({"peft-lora"})
    target_format: ClassVar[str] = "gguf-lora"
    label: ClassVar[str] = "GGUF LoRA (llama.cpp)"
    summary: ClassVar[str] = "The adapter as llama.cpp applies it on top of a GGUF of its base model, any quantization."
    output_is_folder: ClassVar[bool] = False
    install_hint: ClassVar[str] = "Install them with: pip install gguf numpy"
    settings_type: ClassVar[type] = AdapterConversionSettings

    @classmethod
    def is_available(cls) -> bool:
        return all(find_spec(module) is not None for module in ("gguf", "numpy"))

    @classmethod
    def quantizes(cls, settings: object) -> bool:
        return False

    @classmethod
    def output_label(cls, settings: object) -> str:
        outtype = settings.outtype if isinstance(settings, AdapterConversionSettings) else "auto"
        return "GGUF-LoRA" if outtype == "auto" else f"GGUF-LoRA-{outtype.upper()}"

    @classmethod
    def expected_size(cls, parameter_count: int, settings: object) -> int:
        outtype = settings.outtype if isinstance(settings, AdapterConversionSettings) else "auto"
        return parameter_count * _BYTES.get(outtype, 4)

    def convert(self, source: Path, destination: Path, options: ConvertOptions, on_progress: ProgressCallback) -> ConversionResult:
        import gguf

        from pocketlm.models.adapter_fit import check_fits
        from pocketlm.models.peft_adapter import read_peft_adapter

        settings: AdapterConversionSettings = settings_of(self, options)  # type: ignore[assignment]
        if settings.outtype not in ADAPTER_OUTTYPES:
            raise ConversionError(f"{settings.outtype!r} is not an output type for a GGUF LoRA.", f"Choose one of {', '.join(ADAPTER_OUTTYPES)}.")
        if settings.base is None:
            raise ConversionError(f"Converting {source.name} to a GGUF LoRA needs the base model it will be applied to.", _BASE_HINT)
        adapter = read_peft_adapter(source)
        base = read_base(Path(settings.base))
        check_fits(adapter, base.shapes)  # layers, modules and widths, each difference said in a sentence
        names = plan_tensor_names(adapter, base, source.name)
        outtype = settings.outtype if settings.outtype != "auto" else ("f32" if adapter.dtype == "F32" else "f16")
        file_alpha = adapter.alpha * (adapter.rank**0.5 if adapter.use_rslora else 1.0)
        description = f"Converting {options.model_name or source.name} to a GGUF LoRA ({outtype})"
        on_progress(ProgressUpdate(description, 0, len(adapter.modules)))
        with atomic_output(destination) as temporary:
            writer = gguf.GGUFWriter(temporary, base.arch_name)
            try:
                _write_metadata(writer, options.model_name or source.name, base, file_alpha)
                qtype = _output_types()[outtype]
                for module, gguf_name in zip(adapter.modules, names):
                    for suffix, rows, columns in ((".lora_a", module.rank, module.in_features), (".lora_b", module.out_features, module.rank)):
                        _add_info(writer, gguf_name + suffix, (rows, columns), qtype)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for done, module in enumerate(adapter.modules, start=1):
                    check_cancel(options)
                    a, b = gguf_pair(adapter, module, base, file_alpha)
                    writer.write_tensor_data(gguf.quants.quantize(a, qtype))
                    writer.write_tensor_data(gguf.quants.quantize(b, qtype))
                    on_progress(ProgressUpdate(description, done, len(adapter.modules)))
            finally:
                writer.close()  # on failure too: the temporary file must be closed to go
        return ConversionResult(destination, f"convert LoRA to GGUF {outtype} for {base.name}")


def _output_types() -> dict[str, object]:
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}


def gguf_pair(adapter: PeftAdapter, module: LoraModule, base: GGUFBase, file_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of `module` as llama.cpp must read them: B folded so that file_alpha / rank gives PEFT's factor, and its
    rows in the base GGUF's order."""
    import numpy as np

    a, b = adapter.load_pair(module)
    fold = module.scale / (file_alpha / module.rank)
    if abs(fold - 1.0) > 1e-7:  # rank/alpha patterns; a uniform adapter's B is written as PEFT saved it
        b = b * np.float32(fold)
    b = base.transform(module.module + ".weight", b, base.config)
    return np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)


def plan_tensor_names(adapter: PeftAdapter, base: GGUFBase, adapter_name: str) -> list[str]:
    """The base's GGUF tensor name of each adapted module (the adapter fits the base: adapter_fit.check_fits)."""
    import gguf

    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == base.arch_name)
    name_map = gguf.get_tensor_name_map(arch, base.layers)
    names = []
    for module in adapter.modules:
        gguf_name = name_map.get_name(module.module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ConversionError(f"{adapter_name} changes {module.module}, which has no counterpart in a {base.arch_name} GGUF.",
                                  "Convert it with the base model it was trained on, or train it without that module.")  # fmt: skip
        if gguf_name not in base.tensor_names:
            tied = "; the base shares it with the token embeddings (tied), which llama.cpp cannot adapt" if gguf_name == "output.weight" else ""
            raise ConversionError(f"{adapter_name} changes {module.module}, which {base.name} does not have as a weight of its own{tied}.",
                                  "Train the adapter without that module (target_modules), or convert it for another base.")  # fmt: skip
        names.append(gguf_name)
    return names


def read_base(path: Path) -> GGUFBase:
    """The base model's architecture, layer count, head counts and weight shapes, from a GGUF file or an HF folder."""
    if path.is_file():
        return _gguf_base(path)
    if (path / "config.json").is_file():
        return _hf_base(path)
    if path.is_dir():
        raise ConversionError(f"{path} holds neither a GGUF nor a config.json, so it cannot be the adapter's base model.", _BASE_HINT)
    raise ConversionError(f"The base model {path} does not exist.", _BASE_HINT)


def _transform_for(arch_name: str, base_name: str) -> TensorTransform:
    """The tensor transform pocketlm's GGUF converter (and llama.cpp's, which permutes the same) uses for that arch."""
    import gguf

    from pocketlm.converters.gguf_architectures import ARCHITECTURES

    for architecture in ARCHITECTURES.values():
        if gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, architecture.gguf_arch)] == arch_name:
            return architecture.transform
    known = sorted({gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, a.gguf_arch)] for a in ARCHITECTURES.values()})
    raise ConversionError(f"{base_name} is a {arch_name!r} model; pocketlm cannot write LoRA adapters for that architecture yet.",
                          f"Supported GGUF architectures: {', '.join(known)}.")  # fmt: skip


def _gguf_base(path: Path) -> GGUFBase:
    from pocketlm.models.adapter_fit import read_base_shapes
    from pocketlm.models.formats import ModelFormat, inspect_model
    from pocketlm.models.gguf_info import read_gguf

    facts = inspect_model(path)  # every part of a split GGUF; what is not a GGUF, or is damaged, refused with a sentence
    if facts.format != ModelFormat.GGUF:
        kind = "adapter" if facts.format == ModelFormat.GGUF_LORA else str(facts.format)
        raise ConversionError(f"{path.name} is a GGUF {kind}, not a model: it cannot be an adapter's base.", _BASE_HINT)
    summary = read_gguf(facts.location or path)  # the first part holds the metadata
    transform = _transform_for(summary.architecture, path.name)
    shapes = read_base_shapes(path, summary.name or path.stem, facts)
    config: Config = {"num_attention_heads": summary.head_count, "num_key_value_heads": summary.head_count_kv}
    return GGUFBase(summary.name or path.stem, summary.architecture, summary.block_count, config, transform, shapes.tensor_names, shapes)


def _hf_base(folder: Path) -> GGUFBase:
    import gguf

    from pocketlm.converters.gguf_architectures import setting
    from pocketlm.converters.hf_to_gguf import gguf_architecture, read_checkpoint_config
    from pocketlm.models.adapter_fit import read_base_shapes

    config = read_checkpoint_config(folder)
    architecture = gguf_architecture(config)  # refuses an architecture the GGUF converter does not know, with a sentence
    shapes = read_base_shapes(folder)  # a damaged weight file is refused with a sentence
    arch = getattr(gguf.MODEL_ARCH, architecture.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, shapes.layer_count)
    # What the GGUF converter would write: a tied model (or one whose architecture drops it) has no output.weight.
    tied = bool(setting(config, "tie_word_embeddings", False)) or architecture.drops_output
    modules = {name.rsplit(".", 1)[0] for name in shapes.tensor_names}  # q_proj of q_proj.weight, and of a GPTQ's q_proj.qweight
    names = {name_map.get_name(f"{module}.weight", try_suffixes=(".weight",)) for module in modules if not (tied and module == "lm_head")}
    names.discard(None)
    return GGUFBase(folder.name, gguf.MODEL_ARCH_NAMES[arch], shapes.layer_count, config, architecture.transform, frozenset(names), shapes)  # type: ignore[arg-type]


def _write_metadata(writer: object, name: str, base: GGUFBase, file_alpha: float) -> None:
    import gguf

    w = writer  # a gguf.GGUFWriter
    w.add_type(gguf.GGUFType.ADAPTER)  # type: ignore[attr-defined]
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")  # type: ignore[attr-defined]
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(file_alpha))  # type: ignore[attr-defined]
    w.add_name(name)  # type: ignore[attr-defined]
    w.add_base_model_count(1)  # type: ignore[attr-defined]
    w.add_base_model_name(0, base.name)  # type: ignore[attr-defined]


def _add_info(writer: object, name: str, shape: tuple[int, int], qtype: object) -> None:
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * shape[1] * 4)  # type: ignore[attr-defined]
    elif qtype == Q.F16:
        writer.add_tensor_info(name, shape, np.dtype(np.float16), shape[0] * shape[1] * 2)  # type: ignore[attr-defined]
    else:  # bf16: the writer takes raw bytes with their type, the shape given in bytes
        writer.add_tensor_info(name, (shape[0], shape[1] * 2), np.dtype(np.uint8), shape[0] * shape[1] * 2, raw_dtype=qtype)  # type: ignore[attr-defined]
