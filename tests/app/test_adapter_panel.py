"""The Chat screen's LoRA adapter panel and the Models screen's adapters, driven with Pilot against the real llama.cpp
backend: the tiny random Llama as an f32 GGUF, PEFT adapters made on its checkpoint (converted to GGUF LoRAs on their
first attach, as a user's would be). Every change must reach the very model object that is open (no reload), and the
status line must say what that model now runs with."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Button, DataTable, OptionList, Static, Switch

from pocketlm.app.adapter_import import register_adapter
from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.screens.adapter_picker import AdapterPicker
from pocketlm.app.screens.chat import ChatScreen
from pocketlm.app.screens.models import ModelsScreen
from pocketlm.app.widgets.adapter_panel import AdapterPanel, AdapterRow, AttachedAdapter
from pocketlm.app.widgets.local_models import table_rows
from pocketlm.app.widgets.scale_slider import ScaleSlider
from pocketlm.app.widgets.status_line import StatusLine
from pocketlm.backends.base import ChatModel, LoadOptions, SamplingParams
from pocketlm.models.store import ModelStore
from tests.app.conftest import TINY_SOURCE
from tests.app.test_chat_app import SIZE, wait_for

BASE = "tiny-gguf"


@pytest.fixture(scope="module")
def misfit_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter made on a tiny Qwen3 whose heads are twice as wide: its q/k/v/o shapes do not fit tiny_llama."""
    from tests.adapter_fixtures import build_peft_adapter
    from tests.converters.tiny_models import build_tiny_model

    folder = tmp_path_factory.mktemp("misfit")
    other = build_tiny_model("qwen3", folder / "qwen3", tiny_llama, vocab_size=600)
    return build_peft_adapter(other, folder / "misfit", rank=4, alpha=8.0)


@pytest.fixture
def adapter_store(tiny_store: ModelStore, tiny_llama_f32_gguf: Path, tiny_adapters: dict[str, Path], misfit_adapter: Path) -> ModelStore:
    """The tiny checkpoint and its f32 GGUF; adapters "style" (rank 4, every projection) and "facts" (rank 2, q/v)
    trained on the checkpoint, and "misfit", trained on a model the store does not hold."""
    tiny_store.register(tiny_llama_f32_gguf, source=f"import:{tiny_llama_f32_gguf}", name=BASE)
    checkpoint = tiny_store.get(TINY_SOURCE)
    for name, folder in (("style", tiny_adapters["plain"]), ("facts", tiny_adapters["second"])):
        register_adapter(tiny_store, folder, source=f"import:{folder}", name=name, base=checkpoint)
    register_adapter(tiny_store, misfit_adapter, source=f"import:{misfit_adapter}", name="misfit", base=None, check=False)
    return tiny_store


def tiny_app() -> PocketApp:
    return PocketApp(model=BASE, load_options=LoadOptions(context_length=256), default_sampling=SamplingParams(temperature=0, max_tokens=8))


def active(model: ChatModel) -> list[tuple[str, float]]:
    return [(spec.label, spec.scale) for spec in model.description.adapters]


def lora_part(status: StatusLine) -> str:
    """The status line's part naming the adapters ("" when it names none)."""
    return next((part for part in str(status.render()).split(" · ") if part.startswith("LoRA: ")), "")


def row(panel: AdapterPanel, name: str) -> AdapterRow:
    (found,) = [r for r in panel.query(AdapterRow) if r.adapter.name == name]
    return found


async def open_panel(pilot) -> tuple[ChatScreen, ChatModel, AdapterPanel]:  # type: ignore[no-untyped-def]
    screen = pilot.app.chat_screen
    await wait_for(pilot, lambda: screen.model is not None)
    await pilot.press("f5")
    panel = screen.query_one(AdapterPanel)
    assert panel.display
    return screen, screen.model, panel


async def attach(pilot, panel: AdapterPanel, name: str) -> None:  # type: ignore[no-untyped-def]
    """Attach `name` the way a user does: Add adapter, then choose it in the picker."""
    await pilot.click("#add-adapter")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, AdapterPicker))
    options = pilot.app.screen.query_one(OptionList)
    options.focus()
    options.highlighted = [options.get_option_at_index(i).id for i in range(options.option_count)].index(name)
    await pilot.press("enter")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ChatScreen))


async def until_active(pilot, panel: AdapterPanel, model: ChatModel, expected: list[tuple[str, float]]) -> None:  # type: ignore[no-untyped-def]
    """Wait for the panel's worker to have given `model` the adapters `expected` (a minute at most: a first attach
    converts the adapter)."""
    await wait_for(pilot, lambda: not panel.applying and active(model) == expected, timeout=60)
    await pilot.pause()


async def test_attach_toggle_and_rescale_an_adapter_on_the_live_model(adapter_store: ModelStore) -> None:
    app = tiny_app()
    async with app.run_test(size=SIZE) as pilot:
        screen, model, panel = await open_panel(pilot)
        status = screen.query_one(StatusLine)
        assert "LoRA" not in status.render()

        await attach(pilot, panel, "style")
        await until_active(pilot, panel, model, [("style", 1.0)])
        assert screen.model is model
        assert lora_part(status) == "LoRA: style"  # at 1, the name alone, as the CLI and the history say it
        # The PEFT adapter was converted for llama.cpp on this first attach and kept, with its base, as its child.
        (conversion,) = [m for m in adapter_store.list() if m.parent == "style"]
        assert conversion.format == "gguf-lora" and conversion.base_model == BASE

        await pilot.click(row(panel, "style").query_one(Switch))
        await until_active(pilot, panel, model, [])
        assert screen.model is model and "LoRA" not in status.render()

        await pilot.click(row(panel, "style").query_one(Switch))
        await until_active(pilot, panel, model, [("style", 1.0)])

        slider = row(panel, "style").query_one(ScaleSlider)
        slider.focus()
        await pilot.press(*["left"] * 10)  # ten steps of 0.05
        await until_active(pilot, panel, model, [("style", 0.5)])
        assert slider.value == 0.5 and screen.model is model
        assert lora_part(status) == "LoRA: style ×0.5"

        await attach(pilot, panel, "facts")
        await until_active(pilot, panel, model, [("style", 0.5), ("facts", 1.0)])
        assert lora_part(status) == "LoRA: style ×0.5 + facts"

        await pilot.click(row(panel, "style").query_one(".adapter-remove"))
        await until_active(pilot, panel, model, [("facts", 1.0)])
        assert screen.model is model
        assert panel.adapters == (AttachedAdapter("facts", 1.0),)


async def test_each_reply_is_recorded_with_the_adapters_set_in_the_panel_before_it(adapter_store: ModelStore) -> None:
    from pocketlm.app.widgets.prompt_input import PromptInput

    async def send(text: str) -> None:
        prompt = screen.query_one(PromptInput)
        prompt.focus()
        prompt.text = text
        await pilot.press("enter")
        await wait_for(pilot, lambda: not screen.generating)

    app = tiny_app()
    async with app.run_test(size=SIZE) as pilot:
        screen, model, panel = await open_panel(pilot)
        await attach(pilot, panel, "style")
        await until_active(pilot, panel, model, [("style", 1.0)])
        await send("hello")
        slider = row(panel, "style").query_one(ScaleSlider)
        slider.focus()
        await pilot.press(*["right"] * 4)
        await until_active(pilot, panel, model, [("style", 1.2)])
        await send("again")
        await pilot.click(row(panel, "style").query_one(Switch))
        await until_active(pilot, panel, model, [])
        await send("and without")
        replies = [m for m in app.history.messages(screen.conversation_id) if m.role == "assistant"]  # type: ignore[arg-type]
        assert [[(a.name, a.scale) for a in reply.adapters] for reply in replies] == [[("style", 1.0)], [("style", 1.2)], []]


async def test_an_adapter_that_does_not_fit_is_a_notification_and_changes_nothing(adapter_store: ModelStore) -> None:
    app = tiny_app()
    async with app.run_test(size=SIZE) as pilot:
        screen, model, panel = await open_panel(pilot)
        await attach(pilot, panel, "style")
        await until_active(pilot, panel, model, [("style", 1.0)])

        await attach(pilot, panel, "misfit")
        await wait_for(pilot, lambda: any(n.severity == "error" for n in app._notifications) and not panel.applying)
        await pilot.pause()
        (notification,) = [n for n in app._notifications if n.severity == "error"]
        assert notification.title == "Could not apply the adapters" and "trained on a model of another size" in notification.message
        assert screen.model is model and active(model) == [("style", 1.0)]
        assert panel.adapters == (AttachedAdapter("style", 1.0),)  # the refused one is off the panel again
        assert lora_part(screen.query_one(StatusLine)) == "LoRA: style"


def test_adapters_are_listed_under_their_base_and_orphans_last(adapter_store: ModelStore) -> None:
    rows = table_rows(adapter_store, adapter_store.list(), ("name", False))
    misfit = adapter_store.get("misfit")
    assert misfit is not None
    assert [(r.model.name if r.model else r.heading, r.depth) for r in rows] == [
        (TINY_SOURCE, 0), ("facts", 1), ("style", 1), (BASE, 0), (f"{misfit.base_model} (not stored)", 0), ("misfit", 1)]
    # Sorted the other way, the models swap and each keeps its adapters under it.
    rows = table_rows(adapter_store, adapter_store.list(), ("name", True))
    assert [r.model.name for r in rows if r.model][:4] == [BASE, TINY_SOURCE, "facts", "style"]


async def test_models_screen_shows_an_adapters_rank_and_base_and_enter_attaches_it(adapter_store: ModelStore) -> None:
    app = tiny_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await wait_for(pilot, lambda: screen.model is not None)
        model = screen.model
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        table = app.screen.query_one("#local-models", DataTable)
        table.focus()
        table.move_cursor(row=table.get_row_index("style"))
        await pilot.pause()
        details = str(app.screen.query_one("#local-details", Static).render())
        assert "Format: peft-lora" in details and "Rank: 4" in details and f"Base model: {TINY_SOURCE}" in details
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))
        panel = screen.query_one(AdapterPanel)
        await until_active(pilot, panel, model, [("style", 1.0)])
        assert panel.display and screen.model is model


async def test_a_scale_beyond_the_sliders_range_is_shown_as_it_is_and_kept(adapter_store: ModelStore) -> None:
    app = tiny_app()
    async with app.run_test(size=SIZE) as pilot:
        screen, model, panel = await open_panel(pilot)
        await panel.attach("style", 3.0)
        await until_active(pilot, panel, model, [("style", 3.0)])
        slider = row(panel, "style").query_one(ScaleSlider)
        assert slider.value == 3.0 and slider.maximum >= 3.0 and str(slider.render()).endswith("3.00")
        assert lora_part(screen.query_one(StatusLine)) == "LoRA: style ×3"
        slider.focus()
        await pilot.press("left")  # one step down from where it is, never a jump to the old 2.0 end
        await until_active(pilot, panel, model, [("style", 2.95)])


async def test_the_panel_lets_go_of_the_model_when_another_one_starts_loading(adapter_store: ModelStore) -> None:
    """Ctrl+O loads the next model in a worker and closes the open one when it is ready: a change made in the panel
    meanwhile must start no worker on the model being closed."""
    app = tiny_app()
    async with app.run_test(size=SIZE) as pilot:
        screen, old, panel = await open_panel(pilot)
        screen.begin_loading(BASE)
        await panel.attach("style")
        await wait_for(pilot, lambda: not screen.loading and screen.model is not old, timeout=60)
        await wait_for(pilot, lambda: not panel.applying, timeout=60)
        assert active(old) == []  # whatever the timing, no worker touched the model being replaced
        assert panel.adapters == tuple(AttachedAdapter(s.label, s.scale) for s in screen.model.description.adapters)  # type: ignore[union-attr]


async def test_removing_an_adapter_while_it_is_being_applied_ends_without_it_and_without_an_error(adapter_store: ModelStore) -> None:
    """Removed while its first attach converts it: the conversion is cancelled (or, had it just ended, the set without
    it is applied next); either way the model ends without it, and a cancel is no error to show."""
    app = tiny_app()
    async with app.run_test(size=SIZE) as pilot:
        screen, model, panel = await open_panel(pilot)
        await panel.attach("style")
        assert panel.applying
        row(panel, "style").query_one(".adapter-remove", Button).press()
        await wait_for(pilot, lambda: panel.adapters == () and not panel.applying, timeout=60)
        await pilot.pause()
        assert active(model) == [] and screen.model is model
        assert not [n for n in app._notifications if n.severity == "error"]
