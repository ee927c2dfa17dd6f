"""Chat opens a model with the backend the user picks among those that load its format (the default first), and
the status line says which backend runs it and on what device."""

from __future__ import annotations

import shutil
from pathlib import Path

from textual.widgets import OptionList, Select

from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.screens.model_picker import ModelPicker
from pocketlm.app.widgets.status_line import StatusLine
from pocketlm.backends.base import LoadOptions
from pocketlm.models.store import ModelStore
from tests.app.test_chat_app import SIZE, wait_for
from tests.app.test_markup_looking_names import toasts
from tests.converters.tiny_models import edit_config


def backend_options(picker: ModelPicker) -> list[str]:
    select = picker.query_one("#picker-backend", Select)
    return [str(label) for label, value in select._options if value != Select.NULL]


async def test_the_picker_offers_the_backends_of_the_highlighted_models_format_and_chat_uses_the_chosen_one(
    store_with_starter: ModelStore, tiny_llama: Path
) -> None:
    store_with_starter.register(tiny_llama, source=f"import:{tiny_llama}", name="owner/tiny")
    app = PocketApp(model="SmolLM2-135M-Instruct", load_options=LoadOptions(context_length=512))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat_screen.model is not None)
        status = app.chat_screen.query_one(StatusLine)
        assert status.backend == "llama.cpp" and status.device and "llama.cpp on CPU" in str(status.render())

        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelPicker))
        picker: ModelPicker = app.screen  # type: ignore[assignment]
        models = picker.query_one("#picker-models", OptionList)
        models.highlighted = next(i for i in range(models.option_count) if models.get_option_at_index(i).id == "SmolLM2-135M-Instruct")
        await pilot.pause()
        assert backend_options(picker) == ["auto (llama.cpp)", "llama.cpp"]
        models.highlighted = next(i for i in range(models.option_count) if models.get_option_at_index(i).id == "owner/tiny")
        await pilot.pause()
        assert backend_options(picker)[0] == "auto (torch)" and "torch" in backend_options(picker)
        picker.query_one("#picker-backend", Select).value = "torch"
        await pilot.pause()
        models.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat_screen.model is not None and app.chat_screen.model.description.name == "owner/tiny")
        await wait_for(pilot, lambda: status.state == "")
        assert status.backend == "torch" and "CPU" in status.device

        await pilot.press("f3")  # the Models screen's details say where the open model runs
        await wait_for(pilot, lambda: app.screen is app.models_screen and bool(app.models_screen.query("#local-models")))
        app.models_screen.refresh_local(select="owner/tiny")
        await pilot.pause()
        details = str(app.models_screen.query_one("#local-details").render())
        assert "Open in Chat: torch on CPU" in details and "weights as float32" in details


async def open_picker_on(pilot, name: str) -> ModelPicker:  # type: ignore[no-untyped-def]
    """Ctrl+O, with `name` highlighted in the model list."""
    await pilot.press("ctrl+o")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ModelPicker))
    picker: ModelPicker = pilot.app.screen
    models = picker.query_one("#picker-models", OptionList)
    models.highlighted = next(i for i in range(models.option_count) if models.get_option_at_index(i).id == name)
    await pilot.pause()
    models.focus()
    return picker


async def test_auto_in_the_picker_lets_the_registry_choose_even_when_the_app_was_started_with_another_backend(
    model_store: ModelStore, tiny_llama: Path
) -> None:
    model_store.register(tiny_llama, source=f"import:{tiny_llama}", name="owner/tiny")
    # Started with llama.cpp named (as `pocketlm app --backend llama.cpp` would) and no model named: the model the app
    # opens by itself is a checkpoint, which llama.cpp cannot load, so the registry's choice opens it.
    app = PocketApp(backend="llama.cpp", load_options=LoadOptions(context_length=512))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat_screen.model is not None)
        assert app.chat_screen.model.description.backend == "torch"  # type: ignore[union-attr]

        picker = await open_picker_on(pilot, "owner/tiny")
        assert picker.query_one("#picker-backend", Select).value == "auto:torch"  # "auto", not llama.cpp, is chosen
        app.chat_screen.close_model()
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat_screen.model is not None and not app.chat_screen.loading)
        assert app.chat_screen.model.description.backend == "torch"  # type: ignore[union-attr]
        assert app.chat_screen.query_one(StatusLine).state == ""


async def test_a_backend_picked_for_a_format_it_cannot_load_is_refused_naming_the_ones_that_can(
    model_store: ModelStore, tiny_llama: Path
) -> None:
    model_store.register(tiny_llama, source=f"import:{tiny_llama}", name="owner/tiny")
    # Model and backend both named on the command line go together: the mismatch is refused, not worked around.
    app = PocketApp(model="owner/tiny", backend="llama.cpp", load_options=LoadOptions(context_length=512))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_for(pilot, lambda: not app.chat_screen.loading)
        assert app.chat_screen.model is None
        await wait_for(pilot, lambda: bool(toasts(app)), timeout=10)
        (shown,) = toasts(app)
        assert "The llama.cpp backend loads gguf models, not safetensors." in shown and "torch" in shown


async def test_a_checkpoint_needing_its_own_code_is_refused_in_a_notification_saying_how_to_allow_it(
    model_store: ModelStore, tiny_llama: Path, tmp_path: Path
) -> None:
    remote = Path(shutil.copytree(tiny_llama, tmp_path / "remote-code"))
    model_store.register(tiny_llama, source=f"import:{tiny_llama}", name="owner/tiny")
    edit_config(remote, model_type="pocket-custom", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (remote / "modeling_custom.py").write_text("raise SystemExit('this code must never run')\n")
    model_store.register(remote, source=f"import:{remote}", name="owner/remote-code")
    app = PocketApp(model="owner/tiny", load_options=LoadOptions(context_length=512))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_for(pilot, lambda: app.chat_screen.model is not None)
        await open_picker_on(pilot, "owner/remote-code")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.chat_screen.loading)
        assert app.is_running and app.chat_screen.model is not None  # the open model stays
        assert app.chat_screen.model.description.name == "owner/tiny"
        status = app.chat_screen.query_one(StatusLine)
        assert (status.model_name, status.backend, status.state) == ("owner/tiny", "torch", "")  # and the status line says so
        await wait_for(pilot, lambda: any("own Python code" in t for t in toasts(app)), timeout=10)
        (shown,) = [t for t in toasts(app) if "own Python code" in t]
        assert "remote-code needs its own Python code to run (auto_map in config.json), and running a checkpoint's code is off." in shown
        assert "--trust-remote-code only if you trust where it came from." in shown
        (notification,) = [n for n in app._notifications if "own Python code" in n.message]
        assert notification.severity == "error" and notification.title == "Could not load the model"


async def test_the_models_screen_says_which_backend_opens_any_model_by_default_and_where(
    store_with_starter: ModelStore, tiny_llama: Path
) -> None:
    from pocketlm.backends.llamacpp import LlamaCppBackend
    from pocketlm.backends.pytorch import TorchBackend

    store_with_starter.register(tiny_llama, source=f"import:{tiny_llama}", name="owner/tiny")
    app = PocketApp(model="SmolLM2-135M-Instruct", load_options=LoadOptions(context_length=512))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat_screen.model is not None)
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen is app.models_screen and bool(app.models_screen.query("#local-models")))

        def details() -> str:
            return " ".join(str(app.models_screen.query_one("#local-details").render()).split())

        app.models_screen.refresh_local(select="owner/tiny")  # not open in Chat: still says where it would run
        await wait_for(pilot, lambda: "Opens by default with: torch on" in details() and "finding" not in details(), timeout=120)
        assert f"Opens by default with: torch on {TorchBackend.device_summary()}" in details()
        assert "Open in Chat" not in details()
        app.models_screen.refresh_local(select="SmolLM2-135M-Instruct")
        await wait_for(pilot, lambda: "Opens by default with: llama.cpp on" in details() and "finding" not in details(), timeout=60)
        assert f"Opens by default with: llama.cpp on {LlamaCppBackend.device_summary()}" in details()
