"""Bad inputs to conversion: one sentence each, and never a half-written model left behind."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pocketlm.converters.base import ConversionError, ConvertOptions
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.converters.hf_to_gguf import HfToGGUF
from pocketlm.models.errors import Cancelled, ModelFileError
from pocketlm.models.progress import ProgressUpdate, ignore_progress
from tests.app.test_cli import assert_clean_failure, pocketlm
from tests.fixtures import pocketlm_executable


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def checkpoint_copy(starter_checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoint"
    shutil.copytree(starter_checkpoint, copy)
    return copy


def convert(folder: Path, output: Path, **options: object) -> Path:
    return HfToGGUF().convert(folder, output, ConvertOptions(**options), ignore_progress).path  # type: ignore[arg-type]


def test_missing_config(checkpoint_copy: Path, tmp_path: Path) -> None:
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(ConversionError, match="has no config.json"):
        convert(checkpoint_copy, tmp_path / "out" / "model.gguf")


def test_unsupported_architecture_names_the_supported_ones(checkpoint_copy: Path, tmp_path: Path) -> None:
    config = json.loads((checkpoint_copy / "config.json").read_text())
    (checkpoint_copy / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match="cannot convert GPT2LMHeadModel to GGUF yet") as refused:
        convert(checkpoint_copy, tmp_path / "model.gguf")
    assert "LlamaForCausalLM" in refused.value.hint and "Qwen3ForCausalLM" in refused.value.hint


def test_a_truncated_safetensors_file_leaves_nothing(checkpoint_copy: Path, tmp_path: Path) -> None:
    weights = checkpoint_copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match="is truncated"):
        convert(checkpoint_copy, out / "model.gguf")
    assert leftovers(out) == []


def test_cancel_midway_leaves_nothing(starter_checkpoint: Path, tmp_path: Path) -> None:
    cancel = threading.Event()

    def stop_halfway(update: ProgressUpdate) -> None:
        if update.total and update.completed >= update.total // 2:
            cancel.set()

    with pytest.raises(Cancelled):
        HfToGGUF().convert(starter_checkpoint, tmp_path / "model.gguf", ConvertOptions(cancel=cancel), stop_halfway)
    assert leftovers(tmp_path) == []


def test_cancel_during_quantization_keeps_nothing(converted_f16: Path, tmp_path: Path) -> None:
    from pocketlm.converters.gguf_quantize import GGUFQuantizer

    cancel = threading.Event()

    def stop_at_tensor_three(update: ProgressUpdate) -> None:
        if (update.completed or 0) >= 3:
            cancel.set()

    with pytest.raises(Cancelled):
        GGUFQuantizer().convert(converted_f16, tmp_path / "q.gguf", ConvertOptions(settings=GGUFSettings(quant="Q4_0"), cancel=cancel), stop_at_tensor_three)
    assert leftovers(tmp_path) == []


def test_a_config_missing_a_size_is_one_sentence(checkpoint_copy: Path, tmp_path: Path) -> None:
    config = json.loads((checkpoint_copy / "config.json").read_text())
    del config["intermediate_size"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="config.json has no usable 'intermediate_size'"):
        convert(checkpoint_copy, tmp_path / "out.gguf")
    assert leftovers(tmp_path) == ["checkpoint"]


def file_size_limit(limit: int) -> Callable[[], None]:
    """For `preexec_fn`: the child may write no file past `limit` bytes, as if the disk were that full. (Python ignores
    SIGXFSZ, so the write fails with EFBIG instead of killing the process.)"""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run_on_a_full_disk(limit: int, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([pocketlm_executable(), *args], capture_output=True, text=True, timeout=600, preexec_fn=file_size_limit(limit),
                          env={**os.environ, "POCKETLM_HOME": str(home)})  # fmt: skip


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


def test_no_room_to_write_during_convert_is_one_sentence_and_leaves_nothing(starter_checkpoint: Path, pocket_home: Path) -> None:
    # The f16 (270 MB) fails midway at 50 MB: EFBIG where a full disk gives ENOSPC, the same failed write.
    result = run_on_a_full_disk(50 * 2**20, pocket_home, "convert", str(starter_checkpoint), "--quant", "Q4_K_M")
    assert_clean_failure(result, "There was no room to write")
    assert files_in(pocket_home / "models") == []
    listed = pocketlm("ls", home=pocket_home)
    assert "Q4_K_M" not in listed.stdout and "F16" not in listed.stdout


def test_no_room_to_write_during_quantize_is_one_sentence_and_leaves_nothing(converted_f16: Path, pocket_home: Path) -> None:
    imported = pocketlm("import", str(converted_f16), "--name", "smol-f16", home=pocket_home)
    assert imported.returncode == 0, imported.stderr
    # llama.cpp's own writer hits the limit (Q4_K_M of this model is about 100 MB).
    result = run_on_a_full_disk(20 * 2**20, pocket_home, "quantize", "smol-f16", "Q4_K_M")
    assert_clean_failure(result, "There was no room to write smol-f16-Q4_K_M.gguf while quantizing to Q4_K_M; nothing was kept.")
    assert files_in(pocket_home / "models") == []
    assert "Q4_K_M" not in pocketlm("ls", home=pocket_home).stdout


def test_cli_convert_quantize_and_lineage(starter_checkpoint: Path, pocket_home: Path) -> None:
    imported = pocketlm("import", str(starter_checkpoint), "--name", "HuggingFaceTB/SmolLM2-135M-Instruct", home=pocket_home)
    assert imported.returncode == 0, imported.stderr
    converted = pocketlm("convert", "HuggingFaceTB/SmolLM2-135M-Instruct", "--outtype", "bf16", home=pocket_home)
    assert converted.returncode == 0, converted.stderr
    assert "HuggingFaceTB/SmolLM2-135M-Instruct:BF16 is ready" in converted.stdout
    quantized = pocketlm("quantize", "SmolLM2-135M-Instruct:BF16", "Q4_0", home=pocket_home)
    assert quantized.returncode == 0, quantized.stderr
    info = pocketlm("info", "HuggingFaceTB/SmolLM2-135M-Instruct:Q4_0", home=pocket_home).stdout
    assert "Quantization    Q4_0" in info
    assert "Lineage         HuggingFaceTB/SmolLM2-135M-Instruct:Q4_0 ← HuggingFaceTB/SmolLM2-135M-Instruct:BF16 ← HuggingFaceTB/SmolLM2-135M-Instruct" in info
    assert_clean_failure(pocketlm("quantize", "SmolLM2-135M-Instruct:Q4_0", "Q2_K", home=pocket_home), "is already quantized (Q4_0)")
    assert_clean_failure(pocketlm("quantize", "SmolLM2-135M-Instruct:BF16", "Q9_X", home=pocket_home), "'Q9_X' is not a quantization pocketlm knows.")
