"""`pocketlm convert` and `quantize` as users run them: any registered target, --output anywhere (still registered),
options of another format refused, an uninstalled target named with what to install. Real subprocesses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.app.test_cli import assert_clean_failure, pocketlm

# The CLI with a library hidden: find_spec answers None for a module set to None in sys.modules, as when it is absent.
WITHOUT_MODULE = """
import sys
sys.modules[sys.argv[1]] = None
from pocketlm.app.cli import main
sys.argv = ["pocketlm", *sys.argv[2:]]
main()
"""


def row(output: str, label: str) -> str:
    match = re.search(rf"^{label} +(.+)$", output, re.MULTILINE)
    assert match, f"no {label} row in: {output}"
    return match[1]


def test_a_checkpoint_folder_becomes_gptq_where_asked_and_info_and_rm_know_it_by_its_path(tiny_llama: Path, pocket_home: Path, tmp_path: Path) -> None:
    output = tmp_path / "exported" / "tiny-gptq"
    converted = pocketlm("convert", str(tiny_llama), "--to", "gptq", "--group-size", "32", "--output", str(output), home=pocket_home)
    assert converted.returncode == 0, converted.stderr
    assert "llama:GPTQ-4bit-g32 is ready" in converted.stdout and "GPTQ 4-bit g32 of llama" in converted.stdout
    assert (output / "config.json").is_file() and (output / "model.safetensors").is_file()
    listed = pocketlm("ls", home=pocket_home).stdout
    assert "llama:GPTQ-4bit-g32" in listed and "imported" in listed  # the source folder was imported first: lineage has a parent

    info = pocketlm("info", str(output), home=pocket_home)  # named by its folder
    assert info.returncode == 0, info.stderr
    assert (row(info.stdout, "Format"), row(info.stdout, "Quantization")) == ("gptq", "GPTQ 4-bit g32")
    assert (row(info.stdout, "Bits"), row(info.stdout, "Group size"), row(info.stdout, "Act-order")) == ("4", "32", "no")
    assert row(info.stdout, "Lineage") == "llama:GPTQ-4bit-g32 ← llama"

    (output / "quant_log.csv").write_text("an extra file the format does not list")
    removed = pocketlm("rm", str(output) + os.sep, "-y", home=pocket_home)
    assert removed.returncode == 0, removed.stderr
    assert "Removed llama:GPTQ-4bit-g32, freed" in removed.stdout
    assert not output.exists() and tiny_llama.is_dir()  # the whole folder pocketlm wrote; never its source


def test_an_option_of_another_format_is_refused_with_a_sentence(tiny_llama: Path, pocket_home: Path) -> None:
    result = pocketlm("convert", str(tiny_llama), "--to", "gptq", "--quant", "Q4_K_M", home=pocket_home)
    assert_clean_failure(result, "--quant does not apply to GPTQ")
    assert "--bits" in result.stderr and "--group-size" in result.stderr
    assert_clean_failure(pocketlm("convert", str(tiny_llama), "--bits", "4", home=pocket_home), "--bits does not apply to GGUF (llama.cpp).")
    assert "No models yet" in pocketlm("ls", home=pocket_home).stdout  # refused before the source was imported


def test_an_uninstalled_target_is_one_sentence_with_its_install_hint(tiny_llama: Path, pocket_home: Path) -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_MODULE, "torch", "convert", str(tiny_llama), "--to", "gptq"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "POCKETLM_HOME": str(pocket_home)})  # fmt: skip
    assert_clean_failure(result, "Converting to GPTQ (transformers, vLLM) needs libraries that are not installed.")
    assert "pip install 'pocketlm[gptq]'" in result.stderr
    help_text = subprocess.run([sys.executable, "-c", WITHOUT_MODULE, "torch", "convert", "--help"], capture_output=True, text=True, timeout=120)
    assert "gptq: GPTQ (transformers, vLLM) (not installed)" in " ".join(help_text.stdout.split())


def test_quantize_writes_where_asked_and_registers_the_result(tiny_f16: Path, pocket_home: Path, tmp_path: Path) -> None:
    chosen = tmp_path / "quants"
    chosen.mkdir()
    result = pocketlm("quantize", str(tiny_f16), "Q4_0", "--output", str(chosen), "--name", "tiny-small", home=pocket_home)
    assert result.returncode == 0, result.stderr
    assert (chosen / "tiny-small.gguf").is_file()
    info = pocketlm("info", "tiny-small", home=pocket_home)
    assert row(info.stdout, "Quantization") == "Q4_0" and row(info.stdout, "Made by") == "quantize Q4_0"
    assert str(chosen / "tiny-small.gguf") in info.stdout
