"""The Convert screen driven with Pilot: pick the checkpoint and a quant, watch it run, open the result in Chat."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import OptionList, ProgressBar, Select

from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.screens.chat import ChatScreen
from pocketlm.app.screens.convert import ConvertScreen
from pocketlm.models.store import ModelStore
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
