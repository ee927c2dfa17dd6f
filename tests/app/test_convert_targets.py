"""The Convert screen's targets come from the converter registry, each with its own options: GGUF (output type,
quantization, importance matrix) and GPTQ (bits, group size, act-order, calibration). A tiny random checkpoint goes
to GPTQ through the screen with progress per layer; a cancelled conversion leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from textual.widgets import DataTable, Input, OptionList, Select, Static, Switch

from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.screens.convert import ConvertScreen, convertible
from pocketlm.app.widgets.conversion_options import GGUFOptions, GPTQOptions
from pocketlm.converters.gguf_settings import OUTTYPE_CHOICES, GGUFSettings
from pocketlm.converters.registry import conversion_targets
from pocketlm.models.locations import models_dir
from pocketlm.models.store import LocalModel, ModelStore
from tests.app.test_chat_app import SIZE, wait_for
from tests.app.test_convert_screen import open_convert_screen

from tests.app.conftest import TINY_SOURCE as SOURCE
# 60 distinct-enough words: calibration needs "a few paragraphs" (at least 50 words).
CALIBRATION = " ".join(f"The river number {i} flows past the old mill and into the sea." for i in range(12))


def target_values(screen: ConvertScreen) -> list[str]:
    select = screen.query_one("#convert-target", Select)
    return [str(value) for _, value in select._options if value != Select.NULL]


async def choose_gptq(pilot, screen: ConvertScreen, group_size: int = 32) -> None:  # type: ignore[no-untyped-def]
    screen.query_one("#convert-target", Select).value = "gptq"
    await pilot.pause()
    screen.query_one("#gptq-group-size", Select).value = group_size  # the tiny model's 64 inputs: 128 does not divide them
    await pilot.pause()


async def test_the_targets_are_the_registrys_with_their_summaries(tiny_store: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_convert_screen(pilot, SOURCE)
        targets = {t.format: t for t in conversion_targets()}
        assert target_values(screen) == list(targets) and {"gguf", "gptq"} <= set(targets)
        note = str(screen.query_one("#convert-target-note", Static).render())
        assert targets["gguf"].summary in note.replace("\n", " ")  # GGUF is chosen first


async def test_choosing_gptq_shows_its_options_and_hides_gguf_ones(tiny_store: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_convert_screen(pilot, SOURCE)
        gguf, gptq = screen.query_one(GGUFOptions), screen.query_one(GPTQOptions)
        assert gguf.display and not gptq.display
        await choose_gptq(pilot, screen)
        assert gptq.display and not gguf.display
        assert screen.query_one("#gptq-bits", Select).value == 4 and not screen.query_one("#gptq-act-order", Switch).value
        assert screen.query_one("#gptq-calibration", Input).value == "builtin"
        assert "Expected size ≈" in str(screen.query_one("#gptq-size", Static).render())
        note = str(screen.query_one("#convert-target-note", Static).render()).replace("\n", " ")
        assert next(t for t in conversion_targets() if t.format == "gptq").summary in note


async def test_a_tiny_checkpoint_becomes_gptq_through_the_screen_with_progress_per_layer(tiny_store: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_convert_screen(pilot, SOURCE)
        await choose_gptq(pilot, screen)
        screen.query_one("#gptq-act-order", Switch).value = True
        await pilot.click("#convert-start")  # the tiny model may be done by the time the click returns: no check of `running`
        await wait_for(pilot, lambda: not screen.running, timeout=300)
        last = screen.last_progress
        assert last is not None and last.description == "Quantizing layer 2 of 2" and last.completed == last.total == 2
        result = app.store.get(f"{SOURCE}:GPTQ-4bit-g32-act-order")
        assert result is not None and result.format == "gptq" and result.path.is_dir()
        assert (result.parent, result.lineage) == (SOURCE, "GPTQ 4-bit g32 act-order")
        assert not screen.query_one("#convert-open").disabled
        await pilot.press("escape", "f3")  # the new model is listed on the Models screen, with its GPTQ facts
        await wait_for(pilot, lambda: app.screen is app.models_screen and bool(app.models_screen.query("#local-models")))
        table = app.models_screen.query_one("#local-models", DataTable)
        await wait_for(pilot, lambda: table.row_count == 2)
        table.move_cursor(row=table.get_row_index(result.name))
        await pilot.pause()
        details = str(app.models_screen.query_one("#local-details", Static).render())
        assert "Format: gptq" in details and "Bits: 4" in details and "Group size: 32" in details and "Act-order: yes" in details


async def test_cancelling_a_gptq_conversion_leaves_nothing(tiny_store: ModelStore, tmp_path: Path) -> None:
    # The calibration text is a named pipe: the worker waits on it, so the cancel is certainly set before any layer
    # is quantized, whatever the machine's speed.
    pipe = tmp_path / "calibration.txt"
    os.mkfifo(pipe)
    app = PocketApp()
    try:
        async with app.run_test(size=SIZE) as pilot:
            screen = await open_convert_screen(pilot, SOURCE)
            await choose_gptq(pilot, screen)
            screen.query_one("#gptq-calibration", Input).value = str(pipe)
            await pilot.click("#convert-start")
            assert screen.running
            await pilot.press("escape")  # Escape cancels a running conversion (it goes back only when none runs)
            assert app.screen is screen and "Cancelling" in str(screen.query_one("#convert-label").render())
            await asyncio.wait_for(asyncio.to_thread(pipe.write_text, CALIBRATION, encoding="utf-8"), 60)
            await wait_for(pilot, lambda: not screen.running, timeout=120)
            assert "Conversion cancelled; nothing was written." in str(screen.query_one("#convert-label").render())
            assert [m.name for m in app.store.list()] == [SOURCE]
            assert not models_dir().exists() or list(models_dir().iterdir()) == []
    finally:
        _release(pipe)


def _release(pipe: Path) -> None:
    """Let a worker still waiting on the pipe (a failed test) read its end, so the test run can exit."""
    try:
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader: nobody is waiting
        pass


async def test_a_group_size_that_does_not_divide_the_model_is_refused_suggesting_one_that_does(tiny_store: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        screen = await open_convert_screen(pilot, SOURCE)
        await choose_gptq(pilot, screen, group_size=128)  # does not divide the tiny model's 64 inputs
        await pilot.click("#convert-start")
        await wait_for(pilot, lambda: not screen.running, timeout=120)
        label = " ".join(str(screen.query_one("#convert-label").render()).split())
        # The largest group size pocketlm writes that divides every layer of the tiny model (64 inputs) is 64.
        refusal = "Group size 128 does not divide the 64 inputs of some of this model's layers."
        suggestion = "Use group size 64, which divides every layer."
        assert refusal in label and suggestion in label
        assert app.store.get(f"{SOURCE}:GPTQ-4bit-g128") is None
        assert any(n.severity == "error" and f"{refusal}\n{suggestion}" in n.message for n in app._notifications)


async def test_an_importance_matrix_without_a_quantization_is_refused_before_any_work(tiny_store: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        screen = await open_convert_screen(pilot, SOURCE)
        quants = screen.query_one("#convert-quant", OptionList)
        quants.highlighted = 0  # "none: keep f16"
        screen.query_one("#convert-imatrix", Input).value = "builtin"
        await pilot.click("#convert-start")
        await pilot.pause()
        assert not screen.running
        assert "An importance matrix guides a quantization, and none is chosen." in str(screen.query_one("#convert-label").render())
        assert [m.name for m in app.store.list()] == [SOURCE]


def stored(format: str, quantization: str) -> LocalModel:
    return LocalModel(name="m", path=Path("/nowhere/m"), format=format, architecture="llama", parameter_count=0,
                      quantization=quantization, context_length=0, size_bytes=0, source="import:/nowhere/m")  # fmt: skip


def test_what_can_be_converted_follows_the_registered_converters() -> None:
    assert convertible(stored("safetensors", "BF16"))  # a checkpoint reaches GGUF and GPTQ
    assert convertible(stored("gguf", "F16"))  # an unquantized GGUF can go through the GGUF quantizer
    assert not convertible(stored("gguf", "Q4_K_M"))  # quantizing again would compound the loss
    assert not convertible(stored("gptq", "GPTQ 4-bit g128"))  # no converter starts from GPTQ


async def test_the_gguf_output_types_are_the_settings_own(tiny_store: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_convert_screen(pilot, SOURCE)
        select = screen.query_one("#convert-outtype", Select)
        assert [value for _, value in select._options if value != Select.NULL] == list(OUTTYPE_CHOICES)
        assert select.value == GGUFSettings().outtype
