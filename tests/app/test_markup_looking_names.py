"""Names, titles, messages and paths that look like Rich/Textual markup are shown as written, in the app and the CLI.

Rich and Textual parse a plain str as markup: `evil[/]name` raises MarkupError (from a table's or a toast's rendering,
which ends the app, or from `pocketlm ls` for everyone once one such model is registered), and `[bold]x` loses its
brackets. Users pick these strings: `--name`, a file or folder name, a chat title, a message.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from textual.geometry import Region
from textual.widget import Widget
from textual.widgets import DataTable, OptionList, Select, Static
from textual.widgets._toast import Toast

from pocketlm.app.history import ConversationStore
from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.screens.convert import ConvertScreen
from pocketlm.app.screens.dialogs import ConfirmDialog
from pocketlm.app.screens.model_picker import ModelPicker
from pocketlm.app.screens.models import ModelsScreen
from pocketlm.app.widgets.conversation_list import ConversationList
from pocketlm.app.widgets.message_log import ChatMessageView
from pocketlm.app.widgets.status_line import StatusLine
from pocketlm.backends.base import LoadOptions
from pocketlm.models.locations import database_path
from pocketlm.models.store import ModelStore
from tests.app.test_chat_app import SIZE, wait_for
from tests.app.test_cli import pocketlm

# A closing tag with nothing to close (raises), a style (would be swallowed) and a link with a URL (would be swallowed).
MARKUP_NAMES = ("evil[/]name", "[bold]x", "a[link=http://x]b")
TITLE = "plan [/] for [b]bold[/b] ideas"
MESSAGE = "Is [/] a tag? And [red]this[/red]?"


def shown(widget: Widget) -> str:
    """The text the widget and the widgets in it put on the screen, one line per row."""
    parts = [widget, *widget.query("*")]
    return "\n".join(line.text for part in parts for line in part.render_lines(Region(0, 0, *part.outer_size)))


def toasts(app: PocketApp) -> list[str]:
    """The notifications on screen, as rendered (rendering is where markup would be parsed; `run_test` needs
    `notifications=True` to show them)."""
    return [str(toast.render()) for toast in app.screen.query(Toast)]


async def test_markup_looking_names_titles_and_messages_are_shown_as_written(store_with_starter: ModelStore, starter_gguf: Path,
                                                                              starter_checkpoint: Path, tmp_path: Path) -> None:  # fmt: skip
    for name in MARKUP_NAMES:
        copy = tmp_path / f"{name.replace('/', '_')}.gguf"
        shutil.copy(starter_gguf, copy)
        store_with_starter.register(copy, source=f"import:{copy}", name=name)
    store_with_starter.register(starter_checkpoint, source="import", name="ckpt[/]of [i]mine")
    history = ConversationStore(database_path())
    conversation = history.create(model="evil[/]name")  # the latest chat's model is the one the app opens
    history.update(conversation.id, title=TITLE)
    history.add_message(conversation.id, "user", MESSAGE)
    history.close()

    app = PocketApp(load_options=LoadOptions(context_length=2048))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        chat = app.chat_screen
        await wait_for(pilot, lambda: chat.model is not None)
        await pilot.pause()
        assert chat.model.description.name == "evil[/]name"
        assert "evil[/]name · llama.cpp" in shown(chat.query_one(StatusLine))
        assert TITLE in shown(chat.query_one(ConversationList))
        assert "Is [/] a tag? And [red]this[/red]?" in shown(chat.query_one(ChatMessageView))

        await pilot.press("f8")  # the delete question quotes the chat's title
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog))
        await pilot.pause()
        assert f"Delete the chat “{TITLE}”?" in shown(app.screen)
        await pilot.press("escape")

        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelPicker))
        await pilot.pause()
        picker = shown(app.screen.query_one(OptionList))
        assert all(f"{name}  gguf · Q4_1" in picker for name in MARKUP_NAMES), picker
        await pilot.press("escape")

        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        models: ModelsScreen = app.screen  # type: ignore[assignment]
        table = models.query_one("#local-models", DataTable)
        table.move_cursor(row=table.get_row_index("evil[/]name"))
        await pilot.pause()
        listing = shown(table)
        assert all(name in listing for name in (*MARKUP_NAMES, "ckpt[/]of [i]mine")), listing
        details = shown(models.query_one("#local-details", Static))
        assert "evil[/]name" in details and "Format: gguf" in details
        await pilot.press("f8")  # refused while the model is open in Chat: a notification naming it
        await wait_for(pilot, lambda: bool(toasts(app)), timeout=10)
        assert "evil[/]name is open in Chat; open another model first." in toasts(app)

        await pilot.press("f4")  # to Convert, with the checkpoint chosen
        await wait_for(pilot, lambda: isinstance(app.screen, ConvertScreen))
        convert: ConvertScreen = app.screen  # type: ignore[assignment]
        convert.query_one("#convert-source", Select).value = "ckpt[/]of [i]mine"
        await pilot.pause()
        assert "ckpt[/]of [i]mine  (safetensors" in shown(convert.query_one("#convert-source", Select))
        assert app.is_running


async def test_a_load_failure_naming_a_markup_looking_path_is_a_notification(store_with_starter: ModelStore, tmp_path: Path) -> None:
    missing = tmp_path / "bad[" / "]file.gguf"  # the message quotes the whole path: .../bad[/]file.gguf
    app = PocketApp(model=str(missing))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_for(pilot, lambda: bool(toasts(app)))
        assert any(f"{tmp_path}/bad[/]file.gguf does not exist" in text for text in toasts(app)), toasts(app)
        assert app.chat_screen.model is None and app.is_running


async def test_a_file_named_like_markup_that_is_not_gguf_is_named_as_written(store_with_starter: ModelStore, tmp_path: Path) -> None:
    junk = tmp_path / "[b]bad[i]file.gguf"
    junk.write_text("not a model, just text")
    app = PocketApp(model=str(junk))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_for(pilot, lambda: bool(toasts(app)))
        assert any("[b]bad[i]file.gguf is not a GGUF file" in text for text in toasts(app)), toasts(app)
        assert app.chat_screen.model is None and app.is_running


def test_cli_imports_lists_describes_and_removes_a_markup_looking_name(pocket_home: Path, starter_gguf: Path, tmp_path: Path) -> None:
    copy = tmp_path / "[red]weights.gguf"
    shutil.copy(starter_gguf, copy)
    imported = pocketlm("import", str(copy), "--name", "evil[/]name", home=pocket_home)
    assert imported.returncode == 0, imported.stderr
    assert "Imported evil[/]name (gguf, llama, 98.4 MB)." in imported.stdout
    by_file_name = pocketlm("import", str(copy), home=pocket_home)
    assert by_file_name.returncode == 0 and "Imported [red]weights (gguf" in by_file_name.stdout, by_file_name.stderr

    listing = pocketlm("ls", home=pocket_home)
    assert listing.returncode == 0, listing.stderr
    assert "evil[/]name" in listing.stdout and "[red]weights" in listing.stdout

    info = pocketlm("info", "evil", home=pocket_home)
    assert info.returncode == 0, info.stderr
    assert "evil[/]name" in info.stdout and str(copy) in info.stdout

    removed = pocketlm("rm", "-y", "evil", home=pocket_home)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith("Removed evil[/]name")
    assert "evil[/]name" not in pocketlm("ls", home=pocket_home).stdout and copy.exists()
