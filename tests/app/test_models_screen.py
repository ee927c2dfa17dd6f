"""The Models screen driven with Textual's Pilot: local models, Hub search, pull with live progress and cancel,
delete with confirmation, open in Chat. The Hub is the loopback server; the client is the real huggingface_hub."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, OptionList, ProgressBar, Static

from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.screens.chat import ChatScreen
from pocketlm.app.screens.dialogs import ConfirmDialog
from pocketlm.app.screens.models import ModelsScreen
from pocketlm.models.pull import parse_pull_spec, plan_pull, run_pull
from pocketlm.models.store import ModelStore
from tests.app.test_chat_app import SIZE, wait_for
from tests.hub.repos import GGUF_REPO, STARTER_FILE, TINY_CHECKPOINT
from tests.hub.server import LoopbackHub


def notifications(app: PocketApp) -> list[str]:
    return [n.message for n in app._notifications]


async def open_models(pilot) -> ModelsScreen:  # type: ignore[no-untyped-def]
    await pilot.press("f3")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ModelsScreen))
    return pilot.app.screen


async def search(pilot, screen: ModelsScreen, query: str) -> DataTable:  # type: ignore[no-untyped-def]
    await pilot.press("ctrl+f")
    screen.query_one("#hub-query", Input).value = query
    await pilot.press("enter")
    table = screen.query_one("#hub-results", DataTable)
    await wait_for(pilot, lambda: table.row_count > 0 and not table.loading)
    return table


def displayed(table: DataTable) -> list[str]:
    return [str(table.coordinate_to_cell_key((row, 0)).row_key.value) for row in range(table.row_count)]


def option_labels(screen: ModelsScreen) -> list[str]:
    options = screen.query_one("#hub-files", OptionList)
    return [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]


async def test_local_models_are_listed_with_details_and_sort_by_size(loopback_hub: LoopbackHub, store_with_starter: ModelStore) -> None:
    run_pull(plan_pull(parse_pull_spec(TINY_CHECKPOINT)), store_with_starter)
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot)
        table = screen.query_one("#local-models", DataTable)
        assert displayed(table) == [TINY_CHECKPOINT, "SmolLM2-135M-Instruct"]  # by name, case-insensitive
        details = str(screen.query_one("#local-details", Static).render())
        assert "Format: safetensors" in details and "Parameters: 90.4K" in details and "fits: needs about" in details
        size_header = sum(table.columns[key].get_render_width(table) for key in ("name", "format", "arch", "params", "quant")) + 2
        await pilot.click("#local-models", offset=(size_header, 0))  # sizes: biggest first
        assert displayed(table) == ["SmolLM2-135M-Instruct", TINY_CHECKPOINT]
        await pilot.click("#local-models", offset=(size_header, 0))
        assert displayed(table) == [TINY_CHECKPOINT, "SmolLM2-135M-Instruct"]
        table.move_cursor(row=1)
        await pilot.pause()
        assert "Quantization: Q4_1" in str(screen.query_one("#local-details", Static).render())


async def test_search_choose_a_quant_and_pull_it_with_progress_then_chat(loopback_hub: LoopbackHub, pocket_home) -> None:  # type: ignore[no-untyped-def]
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("escape")  # decline the starter offer: this user goes to the Hub instead
        screen = await open_models(pilot)
        table = await search(pilot, screen, "smollm2")
        assert str(table.coordinate_to_cell_key((0, 0)).row_key.value) == GGUF_REPO
        labels = option_labels(screen)
        assert labels[0] == "Q4_K_M  864 B  (default)"  # "(default)" in dim, as the snapshot shows
        assert "Q2_K  1.70 kB, 2 parts" in labels and "Q4_1  98.4 MB" in labels

        gate = loopback_hub.stall_transfers(STARTER_FILE)
        options = screen.query_one("#hub-files", OptionList)
        options.focus()
        options.highlighted = labels.index("Q4_1  98.4 MB")
        await pilot.press("enter")
        bar = screen.query_one("#pull-progress", ProgressBar)
        await wait_for(pilot, lambda: (bar.progress or 0) >= 2**20)
        assert bar.total == 98_362_432 and screen.pulling  # live progress while the transfer is under way
        gate.set()
        await wait_for(pilot, lambda: not screen.pulling)
        name = f"{GGUF_REPO}:Q4_1"
        assert f"{name} is ready: press Enter to chat with it." in notifications(app)
        assert app.store.get(name) is not None
        assert screen.selected_local_name() == name

        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))
        await wait_for(pilot, lambda: app.chat_screen.model is not None)
        assert app.chat_screen.model.description.name == name


async def test_cancel_a_pull_then_resume_it(loopback_hub: LoopbackHub, store_with_starter: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot)
        loopback_hub.stall_transfers(STARTER_FILE)
        screen.start_pull(f"{GGUF_REPO}:Q4_1")
        bar = screen.query_one("#pull-progress", ProgressBar)
        await wait_for(pilot, lambda: (bar.progress or 0) >= 2**20)
        await pilot.press("ctrl+x")  # the server is sending nothing: the cancel must not wait for it
        await wait_for(pilot, lambda: not screen.pulling, timeout=10)
        # The sentence, then the hint on its own line (app/notify.py).
        assert any("bytes are kept for next time.\nPull it again to resume." in m for m in notifications(app))
        assert app.store.get(f"{GGUF_REPO}:Q4_1") is None

        loopback_hub.release_stalls()
        screen.start_pull(f"{GGUF_REPO}:Q4_1")
        await wait_for(pilot, lambda: not screen.pulling)
        assert app.store.get(f"{GGUF_REPO}:Q4_1") is not None
        first, second = loopback_hub.transfers_of(STARTER_FILE)
        assert second.range_start >= 2**20 and second.range_start + second.bytes_sent == 98_362_432


async def test_pull_failure_is_a_notification(loopback_hub: LoopbackHub, store_with_starter: ModelStore) -> None:
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot)
        screen.start_pull("pocketlm-test/gated-llama-GGUF")
        await wait_for(pilot, lambda: not screen.pulling)
        assert any("is gated" in m for m in notifications(app))


async def test_delete_asks_first(loopback_hub: LoopbackHub, store_with_starter: ModelStore) -> None:
    model = run_pull(plan_pull(parse_pull_spec(TINY_CHECKPOINT)), store_with_starter)
    app = PocketApp(model="SmolLM2-135M-Instruct")
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot)
        table = screen.query_one("#local-models", DataTable)
        table.focus()
        table.move_cursor(row=table.get_row_index(TINY_CHECKPOINT))
        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog))
        await pilot.press("escape")  # cancelled: nothing happens
        assert app.store.get(TINY_CHECKPOINT) is not None
        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog))
        await pilot.click("#confirm")
        await wait_for(pilot, lambda: app.store.get(TINY_CHECKPOINT) is None)
        assert displayed(table) == ["SmolLM2-135M-Instruct"]
        assert not any(p.exists() for p in model.files)


async def test_an_unreachable_hub_is_a_state_of_the_hub_tab_until_a_search_gets_an_answer(
    loopback_hub: LoopbackHub, store_with_starter: ModelStore, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import socket

    # A port bound but not listening: every connection to it is refused, on any machine, while the socket is open.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    app = PocketApp()
    try:
        async with app.run_test(size=SIZE) as pilot:
            screen = await open_models(pilot)
            await pilot.press("ctrl+f")
            screen.query_one("#hub-query", Input).value = "smollm2"
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.hub_unreachable)
            offline = str(screen.query_one("#hub-offline", Static).render())
            assert "Can't reach the Hugging Face Hub." in offline and "Local models still work" in offline and "Ctrl+F" in offline
            assert not screen.query_one("#hub-browser").display  # in place of the results, until the Hub answers

            monkeypatch.setenv("HF_ENDPOINT", loopback_hub.url)  # the network is back
            table = await search(pilot, screen, "smollm2")
            assert not screen.hub_unreachable and screen.query_one("#hub-browser").display
            assert displayed(table) == [GGUF_REPO]
    finally:
        closed.close()


async def test_a_model_whose_files_cannot_be_deleted_is_a_notification_not_a_crash(model_store: ModelStore, tiny_llama: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "mine"))
    model = model_store.add(replace(model_store.register(folder, source="import:x", name="owner/mine"), owned=True))
    stuck = min(model.files)
    # The immutable flag refuses deletion even to root (the tests may run as root, whom file modes do not stop).
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable flag (chattr +i)")
    app = PocketApp()
    try:
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            screen = await open_models(pilot)
            table = screen.query_one("#local-models", DataTable)
            table.focus()
            table.move_cursor(row=table.get_row_index("owner/mine"))
            await wait_for(pilot, lambda: not app.chat_screen.loading)  # the app opened it at start-up...
            app.chat_screen.close_model()  # ...and the model open in Chat cannot be deleted
            await pilot.press("f8")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog))
            await pilot.click("#confirm")
            await wait_for(pilot, lambda: any("could not delete" in m for m in notifications(app)), timeout=30)
            assert app.is_running and app.screen is screen
            (shown,) = [n for n in app._notifications if "could not delete" in n.message]
            assert shown.severity == "error"
            assert shown.message == (f"Removed owner/mine from the list but could not delete {stuck} (permission denied).\n"
                                     "Check who owns it and its folder, then delete it yourself.")  # fmt: skip
            assert displayed(table) == []  # the list shows what is left: the entry went first (models/removal.py)
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)


async def test_a_broken_conversion_is_flagged_on_its_row_and_its_verdict_shown_in_red_with_the_advice(model_store: ModelStore, tiny_llama: Path,
                                                                                                     tiny_llama_f32_gguf: Path) -> None:  # fmt: skip
    from pocketlm.models.verification_record import VerificationRecord

    model_store.register(tiny_llama, source="import", name="tiny")
    model_store.register(tiny_llama_f32_gguf, source="convert", name="tiny:F32", parent="tiny", lineage="convert f32")
    advice = "Token 3 of the text is 17 for the reference but 18 for the model. Convert it again from the original checkpoint."
    # A recorded verdict is test data, as `pocketlm verify` would have stored it.
    model_store.record_verification(VerificationRecord(model="tiny:F32", reference="tiny", level="broken", summary="tokens differ, top-1 99.0%, KLD 0.001, PPL +0.1%",
                                                       advice=advice, scored_tokens=100, tokens_identical=False, top1_agreement=0.99,
                                                       mean_kld=0.001, perplexity_change=0.001, text="built-in", verified_at=1.0))  # fmt: skip
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot)
        table = screen.query_one("#local-models", DataTable)
        assert str(table.get_cell("tiny:F32", "name")) == "tiny:F32 ✗ broken" and str(table.get_cell("tiny", "name")) == "tiny"
        table.move_cursor(row=table.get_row_index("tiny:F32"))
        await pilot.pause()
        details = screen.query_one("#local-details", Static).render()
        line = next(line for line in str(details).splitlines() if line.startswith("Verified:"))
        assert "broken, tokens differ" in line and line.endswith(advice)
        start = str(details).index(line) + len("Verified: ")
        assert any("red" in str(span.style) and span.start <= start < span.end for span in details.spans)  # type: ignore[attr-defined]
        table.move_cursor(row=table.get_row_index("tiny"))  # imported: nothing to verify it against, so no row at all
        await pilot.pause()
        assert "Verified" not in str(screen.query_one("#local-details", Static).render())


async def test_a_quantizations_usual_loss_is_flagged_verified_in_plain_colour_with_no_advice(model_store: ModelStore, tiny_llama: Path,
                                                                                             tiny_llama_f32_gguf: Path) -> None:  # fmt: skip
    from pocketlm.models.verification_record import VerificationRecord

    model_store.register(tiny_llama, source="import", name="tiny")
    model_store.register(tiny_llama_f32_gguf, source="convert", name="tiny:Q4", parent="tiny", lineage="quantize Q4_K_M")
    summary = "tokens identical, top-1 98.7%, KLD 0.012, PPL +3.1%"  # the issue's own example
    # A recorded verdict is test data, as `pocketlm verify` would have stored it (an old record's advice is not shown).
    model_store.record_verification(VerificationRecord(model="tiny:Q4", reference="tiny", level="lossy", summary=summary, advice="Convert again.",
                                                       scored_tokens=100, tokens_identical=True, top1_agreement=0.987, mean_kld=0.012,
                                                       perplexity_change=0.031, text="built-in", verified_at=1.0))  # fmt: skip
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_models(pilot)
        table = screen.query_one("#local-models", DataTable)
        flag = table.get_cell("tiny:Q4", "name")
        assert str(flag) == "tiny:Q4 ✓" and not any(span.style for span in flag.spans)  # type: ignore[attr-defined]
        table.move_cursor(row=table.get_row_index("tiny:Q4"))
        await pilot.pause()
        details = screen.query_one("#local-details", Static).render()
        line = next(line for line in str(details).splitlines() if line.startswith("Verified:"))
        assert line == f"Verified: {summary} (against tiny, on the built-in text)."
        start = str(details).index(line) + len("Verified: ")
        assert not any("red" in str(span.style) or "yellow" in str(span.style) for span in details.spans if span.start <= start < span.end)  # type: ignore[attr-defined]
