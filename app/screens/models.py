"""The Models screen: local models (sortable, with details and lineage), Hub search with quant choices, pull with
live progress and cancel, delete with confirmation, and open in Chat. Each area is a widget owning its state
(widgets/local_models.py, hub_search.py, pull_panel.py); the screen lays them out and routes between them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, TabbedContent, TabPane

from pocketlm.app.notify import notify_error
from pocketlm.app.screens.dialogs import ConfirmDialog
from pocketlm.app.widgets.hub_search import HubSearch
from pocketlm.app.widgets.local_models import LocalModels
from pocketlm.app.widgets.pull_panel import PullPanel

from pocketlm.models.errors import PocketError

if TYPE_CHECKING:
    from pocketlm.app.pocket_app import PocketApp


def deletion_failed(name: str, error: OSError, unregistered: bool) -> PocketError:
    """An OSError from deleting a model's files as one sentence: what could not be deleted and why, and whether the
    model is already off the list (removal unregisters first, then deletes; models/removal.py)."""
    what = str(error.filename) if error.filename else f"the files of {name}"
    why = "permission denied" if isinstance(error, PermissionError) else (error.strerror or str(error) or type(error).__name__).rstrip(".")
    done = f"Removed {name} from the list but could not delete" if unregistered else "Could not delete"
    hint = "Check who owns it and its folder, then delete it yourself." if isinstance(error, PermissionError) else (
        "Close any program using it, then delete it yourself.")  # fmt: skip
    return PocketError(f"{done} {what} ({why}).", hint)


class ModelsScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "back", "Chat"),
        Binding("enter", "open_in_chat", "Open in chat", show=False),
        Binding("f8,delete", "delete_model", "Delete"),
        Binding("ctrl+f", "focus_search", "Search Hub"),
        Binding("ctrl+x", "cancel_pull", "Cancel pull"),
        Binding("f4", "convert_selected", "Convert"),
        Binding("f6", "app.show_bench", "Bench"),
    ]

    app: PocketApp  # type: ignore[assignment]

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="models-tabs"):
            with TabPane("Local", id="local"):
                yield LocalModels(id="local-pane")
            with TabPane("Hugging Face Hub", id="hub"):
                yield HubSearch(id="hub-pane")
        yield PullPanel(id="pull-panel")
        yield Footer()

    @property
    def local(self) -> LocalModels:
        return self.query_one(LocalModels)

    @property
    def pull_panel(self) -> PullPanel:
        return self.query_one(PullPanel)

    def on_screen_resume(self) -> None:
        self.refresh_local()

    def refresh_local(self, select: str | None = None) -> None:
        self.local.refresh_models(select)

    def selected_local_name(self) -> str | None:
        return self.local.selected_name()

    @property
    def pulling(self) -> bool:
        return self.pull_panel.pulling

    @property
    def hub_unreachable(self) -> bool:
        return self.query_one(HubSearch).unreachable

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel_pull":
            return self.pulling
        if action in ("delete_model", "open_in_chat"):
            return self.query_one(TabbedContent).active == "local"
        return True

    # Local models ----------------------------------------------------------------------------------------------

    @on(LocalModels.OpenRequested)
    async def _open_requested(self, message: LocalModels.OpenRequested) -> None:
        await self._open(message.name)

    async def action_open_in_chat(self) -> None:
        if name := self.selected_local_name():
            await self._open(name)

    async def _open(self, name: str) -> None:
        """Chat with the model `name`; an adapter is attached to the model open in Chat instead."""
        chosen = self.app.store.get(name)
        self.app.pop_screen()
        if chosen is not None and chosen.is_adapter:
            await self.app.chat_screen.attach_adapter(name)
        else:
            self.app.chat_screen.begin_loading(name)

    def action_delete_model(self) -> None:
        from pocketlm.models.removal import plan_removal, remove_model

        if (endpoint := self.local.selected_endpoint()) is not None:  # nothing of it is on this machine to delete
            self.notify(f"{endpoint.name} is a remote endpoint: forget it with `pocketlm remote rm {endpoint.name}`.", markup=False)
            return
        model = self.local.selected()
        if model is None:
            return
        if self.app.chat_screen.model is not None and self.app.chat_screen.model.description.name == model.name:
            self.notify(f"{model.name} is open in Chat; open another model first.", severity="warning", markup=False)
            return
        question = plan_removal(self.app.store, model).summary(model.name)

        def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            try:
                remove_model(self.app.store, model)
            except OSError as error:  # a read-only folder, a file in use: a notification, never the app's end
                unregistered = self.app.store.get(model.name) is None
                notify_error(self, deletion_failed(model.name, error, unregistered), title="Could not delete the model")
            else:
                self.notify(f"Deleted {model.name}.", markup=False)
            self.refresh_local()  # what is left (a partial removal shows as it is)

        self.app.push_screen(ConfirmDialog(question, "Delete"), confirmed)

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_convert_selected(self) -> None:
        """Open the Convert screen with the highlighted local model chosen."""
        name = self.selected_local_name() if self.query_one(TabbedContent).active == "local" else None
        if name is not None and self.local.selected_endpoint() is not None:
            self.notify(f"{name} is served by a remote engine: only local models can be converted.", severity="warning", markup=False)
            return
        self.app.pop_screen()
        self.app.push_screen("convert")
        if name:
            self.app.convert_screen.choose_source(name)

    # Hub search and pull ---------------------------------------------------------------------------------------

    def action_focus_search(self) -> None:
        self.query_one(TabbedContent).active = "hub"
        self.query_one(HubSearch).focus_query()

    @on(HubSearch.PullRequested)
    def _pull_requested(self, message: HubSearch.PullRequested) -> None:
        self.start_pull(message.spec)

    def start_pull(self, spec: str) -> None:
        self.pull_panel.start(spec)
        self.refresh_bindings()

    @on(PullPanel.Pulled)
    def _pulled(self, message: PullPanel.Pulled) -> None:
        self.query_one(TabbedContent).active = "local"
        self.refresh_local(select=message.model.name)
        self.local.focus_table()

    @on(PullPanel.Ended)
    def _pull_ended(self) -> None:
        self.refresh_bindings()

    def stop_pull(self) -> None:
        """Ask a running pull to stop (safe at any time, also while the app shuts down or before the screen was shown)."""
        for panel in self.query(PullPanel):
            panel.stop()

    def action_cancel_pull(self) -> None:
        self.pull_panel.cancel()
