"""The Convert screen driven with Pilot: pick the checkpoint and a quant, watch it run (and the result verified against
the checkpoint, unless the switch is off), open the result in Chat."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import DataTable, Label, OptionList, ProgressBar, Select, Static, Switch

from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.screens.chat import ChatScreen
from pocketlm.app.screens.convert import ConvertScreen
from pocketlm.models.store import ModelStore
from tests.app.conftest import TINY_SOURCE
from tests.app.test_chat_app import SIZE, wait_for


async def open_convert_screen(pilot, source: str) -> ConvertScreen:  # type: ignore[no-untyped-def]
    """F4 from Chat, then `source` chosen as the model to convert."""
    await pilot.press("f4")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ConvertScreen))
    screen: ConvertScreen = pilot.app.screen
    screen.query_one("#convert-source", Select).value = source
    await pilot.pause()
    return screen


async def test_convert_a_checkpoint_to_q4_k_m_and_chat_with_it(store_with_starter: ModelStore, starter_checkpoint: Path) -> None:
    store_with_starter.register(starter_checkpoint, source="import", name="HuggingFaceTB/SmolLM2-135M-Instruct")
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_convert_screen(pilot, "HuggingFaceTB/SmolLM2-135M-Instruct")
        quants = screen.query_one("#convert-quant", OptionList)
        labels = [str(quants.get_option_at_index(i).prompt) for i in range(quants.option_count)]
        assert labels[0].startswith("none: keep f16") and "269.0 MB" in labels[0]  # 134.5M parameters at 2 bytes
        highlighted = quants.get_option_at_index(quants.highlighted or 0)
        assert highlighted.id == "Q4_K_M" and "balanced: the usual choice" in str(highlighted.prompt)

        await pilot.click("#convert-start")
        assert screen.running and screen.query_one("#convert-progress", ProgressBar).display
        await wait_for(pilot, lambda: not screen.running, timeout=300)
        last = screen.last_progress  # the newest progress the worker reported, as the screen showed it
        assert last is not None and last.description.startswith("Quantizing") and last.completed == last.total == 272
        result = app.store.get("HuggingFaceTB/SmolLM2-135M-Instruct:Q4_K_M")
        assert result is not None and result.quantization == "Q4_K_M"
        assert (result.parent, result.lineage) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "convert f16, quantize Q4_K_M")

        await pilot.click("#convert-open")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))
        await wait_for(pilot, lambda: app.chat_screen.model is not None and app.chat_screen.model.description.name == result.name)


def highlight_quant(screen: ConvertScreen, quant: str) -> None:
    quants = screen.query_one("#convert-quant", OptionList)
    quants.highlighted = next(i for i in range(quants.option_count) if quants.get_option_at_index(i).id == quant)


async def test_converting_verifies_the_result_by_default_and_the_models_screen_flags_it(store_with_starter: ModelStore, starter_checkpoint: Path) -> None:
    store_with_starter.register(starter_checkpoint, source="import", name="HuggingFaceTB/SmolLM2-135M-Instruct")
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_convert_screen(pilot, "HuggingFaceTB/SmolLM2-135M-Instruct")
        assert screen.query_one("#convert-verify", Switch).value  # on unless the user turns it off
        highlight_quant(screen, "none")  # an f16 GGUF: a float conversion, faithful to its checkpoint
        await pilot.click("#convert-start")
        await wait_for(pilot, lambda: not screen.running, timeout=300)
        assert screen.last_verification_progress is not None and screen.last_verification_progress.description.startswith("Comparing")
        assert screen.result is not None and screen.verification is not None and screen.verification.record is not None
        assert screen.verification.record.level == "faithful" and app.store.verification_of(screen.result.name) == screen.verification.record
        label = str(screen.query_one("#convert-label", Label).render())
        assert f"{screen.result.name} is ready" in label and "Verified: faithful, tokens identical" in label

        await pilot.press("escape", "f3")  # the Models screen flags the verified model and shows the verdict
        await wait_for(pilot, lambda: app.screen is app.models_screen and bool(app.models_screen.query("#local-models")))
        table = app.models_screen.query_one("#local-models", DataTable)
        await wait_for(pilot, lambda: screen.result.name in table.rows)  # type: ignore[union-attr]
        assert str(table.get_cell(screen.result.name, "name")).endswith(" ✓")
        table.move_cursor(row=table.get_row_index(screen.result.name))
        await pilot.pause()
        assert "Verified: faithful, tokens identical" in str(app.models_screen.query_one("#local-details", Static).render())


async def test_with_the_verify_switch_off_the_result_is_not_verified(tiny_store: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_convert_screen(pilot, TINY_SOURCE)
        screen.query_one("#convert-verify", Switch).value = False
        highlight_quant(screen, "none")
        await pilot.click("#convert-start")
        await wait_for(pilot, lambda: not screen.running, timeout=120)
        assert screen.result is not None and screen.verification is None and screen.last_verification_progress is None
        assert app.store.verification_of(screen.result.name) is None
        assert "Verified" not in str(screen.query_one("#convert-label", Label).render())
