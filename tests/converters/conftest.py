from __future__ import annotations

from pathlib import Path

import pytest

from pocketlm.converters.base import ConvertOptions
from pocketlm.converters.gguf_quantize import GGUFQuantizer
from pocketlm.converters.hf_to_gguf import HfToGGUF
from pocketlm.models.progress import ignore_progress
from tests.fixtures import starter_checkpoint_path


@pytest.fixture(scope="session")
def starter_checkpoint() -> Path:
    return starter_checkpoint_path()


@pytest.fixture(scope="session")
def converted_f16(starter_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("converted") / "SmolLM2-135M-Instruct-F16.gguf"
    return HfToGGUF().convert(starter_checkpoint, destination, ConvertOptions(outtype="f16"), ignore_progress).path


@pytest.fixture(scope="session")
def quantized_q4_k_m(converted_f16: Path) -> Path:
    destination = converted_f16.with_name("SmolLM2-135M-Instruct-Q4_K_M.gguf")
    return GGUFQuantizer().convert(converted_f16, destination, ConvertOptions(quant="Q4_K_M"), ignore_progress).path
