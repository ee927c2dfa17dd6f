"""MLX as users reach it: `pocketlm convert --to mlx` with its own options (bits, group size, dtype, recipe,
--no-quant), `pocketlm info` saying which backend and device open the result, and the Convert screen's MLX panel.
Real mlx-lm on this machine's CPU, real subprocesses for the CLI, Textual's pilot for the screen."""

from __future__ import annotations

import sys
from pathlib import Path

from textual.widgets import Select, Static

from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.widgets.conversion_options import GGUFOptions, MLXOptions
from pocketlm.converters.mlx import MLXSettings
from pocketlm.models.store import ModelStore
from tests.app.conftest import TINY_SOURCE as SOURCE
from tests.app.test_chat_app import SIZE, wait_for
from tests.app.test_cli import assert_clean_failure, pocketlm
from tests.app.test_convert_screen import open_convert_screen
from tests.converters.test_convert_cli import row


def test_a_checkpoint_becomes_4_bit_mlx_from_the_cli_and_info_says_what_opens_it(tiny_llama: Path, pocket_home: Path, tmp_path: Path) -> None:
    output = tmp_path / "exported" / "tiny-mlx"
    converted = pocketlm("convert", str(tiny_llama), "--to", "mlx", "--bits", "4", "--group-size", "32", "--output", str(output), home=pocket_home)
    assert converted.returncode == 0, converted.stderr
    assert "llama:MLX-4bit-g32 is ready" in converted.stdout and "MLX 4-bit g32 of llama" in converted.stdout
    assert "llama:MLX-4bit-g32" in pocketlm("ls", home=pocket_home).stdout

    info = pocketlm("info", "llama:MLX-4bit-g32", home=pocket_home)
    assert info.returncode == 0, info.stderr
    assert (row(info.stdout, "Format"), row(info.stdout, "Quantization")) == ("mlx", "4-bit g32")  # bits 4, group size 32
    opens = row(info.stdout, "Opens by default with")
    # On Linux MLX runs on its CPU device and computes in float32 there; info says so.
    expected = "mlx on Metal GPU" if sys.platform == "darwin" else "mlx on CPU (float32), "
    assert opens.startswith(expected), opens


def test_no_quant_keeps_float_weights_in_the_dtype_asked_for(tiny_llama: Path, pocket_home: Path, tmp_path: Path) -> None:
    converted = pocketlm("convert", str(tiny_llama), "--to", "mlx", "--no-quant", "--dtype", "float32", home=pocket_home)
    assert converted.returncode == 0, converted.stderr
    assert "llama:MLX-F32 is ready" in converted.stdout and "MLX float32 of llama" in converted.stdout
    info = pocketlm("info", "llama:MLX-F32", home=pocket_home)
    assert (row(info.stdout, "Format"), row(info.stdout, "Quantization")) == ("mlx", "F32")


def test_mlx_options_are_refused_for_other_targets_and_no_quant_with_bits(tiny_llama: Path, pocket_home: Path) -> None:
    assert_clean_failure(pocketlm("convert", str(tiny_llama), "--dtype", "float16", home=pocket_home), "--dtype does not apply to GGUF (llama.cpp).")
    refused = pocketlm("convert", str(tiny_llama), "--to", "gptq", "--recipe", "mixed_3_6", home=pocket_home)
    assert_clean_failure(refused, "--recipe does not apply to GPTQ")
    assert_clean_failure(pocketlm("convert", str(tiny_llama), "--to", "gptq", "--no-quant", home=pocket_home), "--no-quant does not apply to GPTQ")
    both = pocketlm("convert", str(tiny_llama), "--to", "mlx", "--no-quant", "--bits", "8", home=pocket_home)
    assert_clean_failure(both, "--no-quant asks for float weights, and --bits or --recipe asks for quantized ones.")
    assert "No models yet" in pocketlm("ls", home=pocket_home).stdout  # all refused before the source was imported


def test_a_mixed_recipe_is_written_and_listed_as_mixed(tiny_llama: Path, pocket_home: Path) -> None:
    converted = pocketlm("convert", str(tiny_llama), "--to", "mlx", "--recipe", "mixed_3_6", "--group-size", "32", home=pocket_home)
    assert converted.returncode == 0, converted.stderr
    assert "llama:MLX-mixed-3-6-g32 is ready" in converted.stdout
    info = pocketlm("info", "llama:MLX-mixed-3-6-g32", home=pocket_home)
    assert row(info.stdout, "Quantization") == "mixed 3/6-bit g32"


async def test_choosing_mlx_shows_its_options_with_mlx_lms_defaults(tiny_store: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_convert_screen(pilot, SOURCE)
        mlx = screen.query_one(MLXOptions)
        assert not mlx.display
        screen.query_one("#convert-target", Select).value = "mlx"
        await pilot.pause()
        assert mlx.display and not screen.query_one(GGUFOptions).display
        assert mlx.settings() == MLXSettings()  # 4-bit, group 64, float16, no recipe
        assert "Expected size ≈" in str(screen.query_one("#mlx-size", Static).render())
        screen.query_one("#mlx-bits", Select).value = 0  # unquantized: the group size no longer applies
        await pilot.pause()
        assert mlx.settings().bits is None and screen.query_one("#mlx-group-size", Select).disabled


async def test_a_tiny_checkpoint_becomes_mlx_through_the_screen(tiny_store: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_convert_screen(pilot, SOURCE)
        screen.query_one("#convert-target", Select).value = "mlx"
        await pilot.pause()
        screen.query_one("#mlx-bits", Select).value = 8
        screen.query_one("#mlx-group-size", Select).value = 32
        await pilot.pause()
        await pilot.click("#convert-start")
        await wait_for(pilot, lambda: not screen.running, timeout=300)
        result = app.store.get(f"{SOURCE}:MLX-8bit-g32")
        assert result is not None and result.format == "mlx" and result.path.is_dir()
        assert (result.parent, result.lineage, result.quantization) == (SOURCE, "MLX 8-bit g32", "8-bit g32")
        assert not screen.query_one("#convert-open").disabled
