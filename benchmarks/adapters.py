"""LoRA adapters on a loaded model, per backend: what attaching, switching, rescaling and detaching cost against
reloading the model with the adapter, and how far each backend's logits are from PEFT's.

    python benchmarks/adapters.py [--checkpoint FOLDER] [--gguf FILE] [--repetitions 5] [--backends llama.cpp,torch,mlx]

Two PEFT adapters (rank 8 on every attention and MLP projection, random A and B) are made on the checkpoint with PEFT
itself, then converted on demand to each backend's format, as `pocketlm chat --adapter` does. The switch figures are
the medians of `ChatModel.set_adapters` calls on one live model (the adapters already read once); "reload" is
loading the base model with the adapter from scratch, which is what llama.cpp, Ollama and mlx-lm ask of a user who
wants another adapter. Parity: `token_logits` of a 64-token text against transformers + PEFT on the same checkpoint in
float32; llama.cpp's row uses an f32 GGUF of the checkpoint for that (its Q4_1 base differs from the checkpoint by
quantization, not by the adapter), the timings use the Q4_1 starter model.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from pocketlm.backends.base import AdapterSpec, ChatModel, LoadOptions  # noqa: E402
from pocketlm.backends.registry import backend_for  # noqa: E402
from pocketlm.converters.adapter_settings import AdapterConversionSettings  # noqa: E402
from pocketlm.converters.base import ConvertOptions  # noqa: E402
from pocketlm.converters.registry import converter_for  # noqa: E402
from pocketlm.models.progress import ignore_progress  # noqa: E402
from tests.adapter_fixtures import build_peft_adapter  # noqa: E402

TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a cloth for "
        "the great lens. Ships passing the point at night counted on the beam, and he had not missed a night in years.")  # fmt: skip
CACHE = REPOSITORY / ".cache" / "models"


def median_ms(action: Callable[[], None], repetitions: int) -> float:
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def converted(adapter: Path, target_format: str, base: Path, folder: Path) -> Path:
    converter = converter_for("peft-lora", target_format)
    destination = folder / (f"{adapter.name}.{target_format}" + (".gguf" if target_format == "gguf-lora" else ""))
    options = ConvertOptions(settings=AdapterConversionSettings(base=base, outtype="f32"))
    return converter().convert(adapter, destination, options, ignore_progress).path


def peft_logits(checkpoint: Path, adapter: Path, tokens: list[int]):  # type: ignore[no-untyped-def]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def timings(backend_name: str, base: Path, specs: tuple[AdapterSpec, AdapterSpec], repetitions: int) -> dict[str, float]:
    backend = backend_for({"llama.cpp": "gguf", "torch": "safetensors", "mlx": "safetensors"}[backend_name], backend_name)
    first, second = specs
    start = time.perf_counter()
    backend.load(base, LoadOptions(adapters=(first,))).close()
    reload_ms = (time.perf_counter() - start) * 1000
    model: ChatModel = backend.load(base, LoadOptions())
    start = time.perf_counter()
    model.set_adapters([first])
    attach_ms = (time.perf_counter() - start) * 1000
    model.set_adapters([second])  # read once: the switches below reuse both from memory
    results = {
        "reload": reload_ms,
        "first attach": attach_ms,
        "switch": median_ms(lambda: (model.set_adapters([first]), model.set_adapters([second])) and None, repetitions) / 2,
        "rescale": median_ms(lambda: model.set_adapters([AdapterSpec(second.path, 0.5)]), repetitions),
        "stack two": median_ms(lambda: model.set_adapters([first, second]), repetitions),
        "detach": median_ms(lambda: model.set_adapters([]), repetitions),
    }
    model.close()
    return results


def parity(backend_name: str, base: Path, spec: AdapterSpec, reference, tokens: list[int]) -> float:  # type: ignore[no-untyped-def]
    import numpy as np

    backend = backend_for({"llama.cpp": "gguf", "torch": "safetensors", "mlx": "safetensors"}[backend_name], backend_name)
    model = backend.load(base, LoadOptions(adapters=(spec,)))
    try:
        return float(np.abs(model.token_logits(tokens) - reference).max())
    finally:
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CACHE / "SmolLM2-135M-Instruct-hf")
    parser.add_argument("--gguf", type=Path, default=CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--backends", default="llama.cpp,torch,mlx")
    arguments = parser.parse_args()
    from transformers import AutoTokenizer

    from pocketlm.backends.library_warnings import quiet_library_warnings

    quiet_library_warnings()
    from transformers.utils import logging as transformers_logging

    from pocketlm.backends.gptq_runtime import prepare_gptq

    transformers_logging.disable_progress_bar()
    prepare_gptq()  # peft imports gptqmodel, whose banner would land in the table's output
    logging.getLogger("gguf").setLevel(logging.WARNING)  # the GGUF writer's per-file notes
    console = Console(width=170)
    work = Path(tempfile.mkdtemp(prefix="pocketlm-adapter-bench-"))
    adapters = [build_peft_adapter(arguments.checkpoint, work / name, rank=8, alpha=16.0, seed=seed, spread=0.02)
                for seed, name in enumerate(("style", "facts"))]  # fmt: skip
    tokens = AutoTokenizer.from_pretrained(arguments.checkpoint)(TEXT)["input_ids"][:64]
    reference = peft_logits(arguments.checkpoint, adapters[0], tokens)
    table = Table(title=f"LoRA adapters on {arguments.checkpoint.name}: set_adapters on a live model (ms, median of {arguments.repetitions})")
    for column in ("backend", "reload with adapter", "first attach", "switch", "rescale", "stack two", "detach", "reload / switch", "max |Δlogit| vs PEFT"):
        table.add_column(column, justify="right")
    for backend_name in arguments.backends.split(","):
        if backend_name == "llama.cpp":
            from pocketlm.converters.gguf_settings import GGUFSettings
            from pocketlm.converters.hf_to_gguf import HfToGGUF

            f32 = HfToGGUF().convert(arguments.checkpoint, work / "f32.gguf", ConvertOptions(settings=GGUFSettings(outtype="f32")), ignore_progress).path
            paths = [converted(a, "gguf-lora", arguments.gguf, work) for a in adapters]
            base, parity_base = arguments.gguf, f32
        elif backend_name == "mlx":
            paths = [converted(a, "mlx-lora", arguments.checkpoint, work) for a in adapters]
            base = parity_base = arguments.checkpoint
        else:
            paths = adapters
            base = parity_base = arguments.checkpoint
        specs = (AdapterSpec(paths[0], 1.0, "style"), AdapterSpec(paths[1], 1.0, "facts"))
        try:
            figures = timings(backend_name, base, specs, arguments.repetitions)
            difference = parity(backend_name, parity_base, specs[0], reference, tokens)
        except Exception as error:  # noqa: BLE001 - a backend that cannot run here is a row that says why
            table.add_row(backend_name, f"[dim]{type(error).__name__}: {error}[/dim]", *[""] * 7)
            continue
        table.add_row(backend_name, *(f"{figures[k]:.1f}" for k in ("reload", "first attach", "switch", "rescale", "stack two", "detach")),
                      f"{figures['reload'] / max(figures['switch'], 1e-6):.0f}×", f"{difference:.2e}")  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    main()
