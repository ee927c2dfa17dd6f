"""The Chat screen: conversations on the left, the streaming message log, the input and a status line; the LoRA
adapter panel on the right (F5)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, ListView, Markdown
from textual.widgets._markdown import MarkdownStream

from pocketlm.app.chat_session import reply
from pocketlm.app.messages import AdaptersApplied, GenerationFailed, GenerationUpdate, ModelLoaded, ModelLoadFailed
from pocketlm.app.screens.chat_settings import ChatSettings, ChatSettingsDialog
from pocketlm.app.screens.dialogs import ConfirmDialog, TextPromptDialog
from pocketlm.app.model_details import LoadedFacts, device_of
from pocketlm.app.notify import as_pocket_error, notify_error
from pocketlm.app.screens.model_picker import ModelPicker, PickedModel
from pocketlm.app.screens.starter_offer import StarterOffer
from pocketlm.app.widgets.adapter_panel import AdapterPanel
from pocketlm.app.widgets.conversation_list import ConversationItem, ConversationList
from pocketlm.app.widgets.message_log import MessageLog
from pocketlm.app.widgets.prompt_input import PromptInput
from pocketlm.app.widgets.status_line import StatusLine
from pocketlm.backends.base import ChatModel, ContextTrimmed, GenerationStats, Notice, SamplingParams, TextPiece
from pocketlm.models.errors import PocketError

if TYPE_CHECKING:
    from pocketlm.app.pocket_app import PocketApp


_UI_BATCH_SECONDS = 0.05


class ChatScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("f2", "rename_chat", "Rename"),
        Binding("f8", "delete_chat", "Delete"),
        Binding("ctrl+o", "open_model", "Model"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("f3", "app.show_models", "Models"),
        Binding("f4", "app.show_convert", "Convert"),
        Binding("f5", "toggle_adapters", "LoRA"),
        # Priority: the prompt (a TextArea) has F6 itself (select the line). Hidden: the footer has no room left for it.
        Binding("f6", "app.show_bench", "Bench", priority=True, show=False),
    ]

    app: PocketApp  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.model: ChatModel | None = None
        self.conversation_id: int | None = None
        self._cancel: threading.Event | None = None
        self._stream: MarkdownStream | None = None
        self._reply_text = ""
        self._load_serial = 0  # only the latest load request's model is kept
        self._settled_serial = 0  # the latest request that has loaded or failed
        self._device = ""  # where the open model runs, as the status line says it

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield ConversationList(id="conversations")
            with Vertical(id="chat-pane"):
                yield MessageLog(id="messages")
                yield PromptInput(id="prompt", soft_wrap=True, show_line_numbers=False, placeholder="Message (Enter to send, Shift+Enter for a new line)")
                yield StatusLine(id="status")
            yield AdapterPanel(lambda: self.generating, id="adapter-panel")
        yield Footer()

    @property
    def generating(self) -> bool:
        return self._cancel is not None

    async def on_mount(self) -> None:
        conversations = self.app.history.list()
        if conversations:
            await self.open_conversation(conversations[0].id)
        else:
            await self.refresh_conversations()
        self.query_one(PromptInput).focus()
        if name := self.app.initial_model:
            # A model and backend both named on the command line go together: a mismatch is the user's to hear about.
            self.begin_loading(name, self.app.backend, chosen=self.app.model_named and self.app.backend is not None)
        else:
            self.app.push_screen(StarterOffer(self.app.store), self._starter_installed)

    def _starter_installed(self, name: str | None) -> None:
        if name:
            self.begin_loading(name)
        else:
            self.notify("No model yet: run `pocketlm starter`, or open one with Ctrl+O once you have it.", timeout=10)

    async def refresh_conversations(self) -> None:
        await self.query_one(ConversationList).show(self.app.history.list(), self.conversation_id)

    async def open_conversation(self, conversation_id: int | None) -> None:
        self.conversation_id = conversation_id
        messages = self.app.history.messages(conversation_id) if conversation_id is not None else []
        await self.query_one(MessageLog).show_conversation(messages)
        await self.refresh_conversations()
        self._update_context_used()

    def _update_context_used(self) -> None:
        status = self.query_one(StatusLine)
        if self.model is None or self.conversation_id is None:
            status.context_used = 0
            return
        messages = self.app.history.chat_messages(self.conversation_id)
        try:
            status.context_used = self.model.prompt_tokens(messages) if messages else 0
        except PocketError:  # a template that refuses this conversation says so when it is sent; not here
            status.context_used = 0

    # Model loading ----------------------------------------------------------------------------------------------

    @work(thread=True, group="load")
    def load_model(self, name: str, serial: int, backend: str | None, chosen: bool) -> None:
        from pocketlm.app.model_loading import choose_model, load_model
        from pocketlm.backends.registry import backend_classes

        try:
            choice = choose_model(self.app.store, name)
            if not chosen:
                backend = self._app_backend_for(choice.format)
            model = load_model(choice, self.app.load_options, backend)
            engine = next((b for b in backend_classes() if b.name == model.description.backend), None)
            device = model.description.device or (device_of(engine) if engine is not None else "")
        except Exception as error:  # noqa: BLE001 - a failed load is a notification; a dead worker would end the app
            self.post_message(ModelLoadFailed(as_pocket_error(f"Loading {name}", error), serial))
            return
        self.post_message(ModelLoaded(model, serial, device))

    def _app_backend_for(self, model_format: str) -> str | None:
        """The backend named on the command line where it loads `model_format`, else None (the registry's choice): a
        llama.cpp the app was started with must not be forced on a safetensors model opened later."""
        from pocketlm.backends.registry import backend_classes

        named = self.app.backend
        if named is None or any(b.name == named and model_format in b.formats for b in backend_classes()):
            return named
        return None

    def begin_loading(self, name: str, backend: str | None = None, *, chosen: bool = False) -> None:
        """Load `name`. `chosen`: the user picked `backend` for this load (None meaning "auto": the registry's choice
        for the model's format), and a backend that cannot load it is refused with a sentence. Otherwise `backend` is
        ignored and the one named on the command line is used when it loads the model's format, else the registry's."""
        if self.generating:
            self.notify("Stop the reply before switching models.", severity="warning")
            return
        if self.query_one(AdapterPanel).applying:  # the model being changed must not be closed under the worker
            self.notify("Wait for the adapters to be applied before switching models.", severity="warning")
            return
        # The open model is closed once the new one is loaded: from now on the panel must start no worker on it.
        self.query_one(AdapterPanel).model_closing()
        status = self.query_one(StatusLine)
        status.model_name, status.backend, status.device, status.state = name, "", "", "loading…"
        status.adapters = ()
        self._load_serial += 1
        self.load_model(name, self._load_serial, backend, chosen)

    def loaded_facts(self) -> LoadedFacts | None:
        """Where the open model runs, for the Models screen's details."""
        if self.model is None:
            return None
        description = self.model.description
        return LoadedFacts(description.backend, self.query_one(StatusLine).device, description.quantization)

    @property
    def loading(self) -> bool:
        return self._settled_serial != self._load_serial

    async def on_model_loaded(self, message: ModelLoaded) -> None:
        if message.serial != self._load_serial:  # a newer request superseded this one
            message.model.close()
            return
        self._settled_serial = message.serial
        if self.model is not None:
            self.model.close()
        self.model = message.model
        status = self.query_one(StatusLine)
        status.model_name = message.model.description.name
        status.backend = message.model.description.backend
        status.device = self._device = message.device
        status.context_length = message.model.description.context_length
        status.exact_token_counts = message.model.description.exact_token_counts
        status.tokens_per_second = None
        status.state = ""
        status.adapters = message.model.description.adapters
        await self.query_one(AdapterPanel).model_loaded(message.model)
        for warning in message.model.description.warnings:
            self.notify(warning, title="Model loaded with a warning", severity="warning", timeout=15, markup=False)
        self._update_context_used()

    async def on_model_load_failed(self, message: ModelLoadFailed) -> None:
        if message.serial != self._load_serial:
            return
        self._settled_serial = message.serial
        status = self.query_one(StatusLine)
        if self.model is not None:  # the model open before stays open: the status line and the panel take it again
            description = self.model.description
            status.model_name, status.backend, status.device, status.state = description.name, description.backend, self._device, ""
            status.adapters = description.adapters
            await self.query_one(AdapterPanel).model_loaded(self.model)
        else:
            status.state = "no model loaded"
        notify_error(self, message.error, title="Could not load the model")

    # Sending and streaming --------------------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def send(self, event: PromptInput.Submitted) -> None:
        if self.generating:
            self.notify("Wait for the reply to finish, or press Esc to stop it.", severity="warning")
            return
        if self.loading:
            self.notify("The model is still loading.", severity="warning")
            return
        if self.model is None:
            self.notify("No model is loaded yet: press Ctrl+O to open one.", severity="warning")
            return
        if self.conversation_id is None:
            conversation = self.app.history.create(self.model.description.name, sampling=self.app.default_sampling)
            self.conversation_id = conversation.id
        conversation = self.app.history.get(self.conversation_id)
        assert conversation is not None
        self.query_one(PromptInput).clear()
        log = self.query_one(MessageLog)
        await log.add("user", event.text)
        reply_view = await log.add("assistant", "")
        self._stream = Markdown.get_stream(reply_view)
        self._reply_text = ""
        self._cancel = threading.Event()
        self.query_one(StatusLine).state = "generating…"
        self.generate(self.model, self.conversation_id, event.text, conversation.sampling, self._cancel)

    @work(thread=True, group="generate")
    def generate(self, model: ChatModel, conversation_id: int, text: str, sampling: SamplingParams, cancel: threading.Event) -> None:
        # Text is handed to the UI in batches: a message per token would keep the event loop (and a CPU core that
        # llama.cpp's threads need) busy re-rendering, slowing generation several-fold on small models.
        pending, last_post = "", 0.0
        try:
            for event in reply(self.app.history, model, conversation_id, text, sampling, cancel):
                if isinstance(event, TextPiece):
                    pending += event.text
                    if time.monotonic() - last_post < _UI_BATCH_SECONDS:
                        continue
                    event, pending, last_post = TextPiece(pending), "", time.monotonic()
                elif pending:
                    self.post_message(GenerationUpdate(TextPiece(pending)))
                    pending = ""
                self.post_message(GenerationUpdate(event))
        except Exception as error:  # noqa: BLE001 - an engine failure must end up as a notification, not a dead worker
            self.post_message(GenerationFailed(as_pocket_error("Generation", error)))

    async def on_generation_update(self, message: GenerationUpdate) -> None:
        event = message.event
        if isinstance(event, TextPiece) and self._stream is not None:
            if not self._reply_text:  # the worker has stored the user's message by now: show the chat's new title
                await self.refresh_conversations()
            self._reply_text += event.text
            await self._stream.write(event.text)
        elif isinstance(event, Notice):
            self.notify(event.message, title="Warning", severity="warning", timeout=15, markup=False)
        elif isinstance(event, ContextTrimmed):
            self.notify(f"Dropped the {event.dropped_messages} oldest messages to fit the {event.context_length}-token context.")
        elif isinstance(event, GenerationStats):
            await self._finish_reply(event)

    async def on_generation_failed(self, message: GenerationFailed) -> None:
        notify_error(self, message.error, title="Generation failed")
        await self._finish_reply(None)

    async def _finish_reply(self, stats: GenerationStats | None) -> None:
        if self._stream is not None:
            if stats is not None and stats.stop_reason == "cancelled":
                await self._stream.write("  *(stopped)*")
            await self._stream.stop()
        self._stream = None
        self._cancel = None
        status = self.query_one(StatusLine)
        status.state = "stopped" if stats is not None and stats.stop_reason == "cancelled" else ""
        if stats is not None:
            status.tokens_per_second = stats.tokens_per_second
        self._update_context_used()
        await self.refresh_conversations()

    # Adapters ---------------------------------------------------------------------------------------------------

    def on_adapters_applied(self, message: AdaptersApplied) -> None:
        if message.model is self.model:
            self.query_one(StatusLine).adapters = message.model.description.adapters

    def action_toggle_adapters(self) -> None:
        panel = self.query_one(AdapterPanel)
        panel.display = not panel.display
        if panel.display:
            panel.query_one("#add-adapter").focus()
        else:
            self.query_one(PromptInput).focus()

    async def attach_adapter(self, name: str) -> None:
        """Attach the stored adapter `name` to the open model (the Models screen's Enter on an adapter)."""
        if self.model is None:
            self.notify("Open a model first: adapters attach to the model in Chat.", severity="warning")
            return
        panel = self.query_one(AdapterPanel)
        panel.display = True
        await panel.attach(name)

    # Actions ----------------------------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    def close_model(self) -> None:
        """Cancel any reply, then free the model (closing waits for the stream to end, within a token)."""
        self.action_stop()
        for panel in self.query(AdapterPanel):  # none once the screen is unmounted
            panel.model_closing()  # a conversion in progress stops; none starts on this model
        if self.model is not None:
            self.model.close()
            self.model = None

    async def action_new_chat(self) -> None:
        if self.generating:
            self.notify("Stop the reply before starting a new chat.", severity="warning")
            return
        model_name = self.model.description.name if self.model else ""
        conversation = self.app.history.create(model_name, sampling=self.app.default_sampling)
        await self.open_conversation(conversation.id)
        self.query_one(PromptInput).focus()

    @on(ListView.Selected, "#conversations")
    async def conversation_selected(self, event: ListView.Selected) -> None:
        assert isinstance(event.item, ConversationItem)
        if event.item.conversation.id == self.conversation_id:
            return
        if self.generating:
            self.notify("Stop the reply before switching chats.", severity="warning")
            return
        await self.open_conversation(event.item.conversation.id)

    def action_rename_chat(self) -> None:
        conversation = self.app.history.get(self.conversation_id) if self.conversation_id is not None else None
        if conversation is None:
            return

        async def rename(title: str | None) -> None:
            if title:
                self.app.history.update(conversation.id, title=title)
                await self.refresh_conversations()

        self.app.push_screen(TextPromptDialog("Rename this chat", conversation.title), rename)

    def action_delete_chat(self) -> None:
        conversation = self.app.history.get(self.conversation_id) if self.conversation_id is not None else None
        if conversation is None or self.generating:
            return

        async def delete(confirmed: bool | None) -> None:
            if confirmed:
                self.app.history.delete(conversation.id)
                remaining = self.app.history.list()
                await self.open_conversation(remaining[0].id if remaining else None)

        self.app.push_screen(ConfirmDialog(f"Delete the chat “{conversation.title or 'New chat'}”?", "Delete"), delete)

    def action_open_model(self) -> None:
        def chosen(picked: PickedModel | None) -> None:
            if picked is not None and picked.name:
                self.begin_loading(picked.name, picked.backend, chosen=True)

        self.app.push_screen(ModelPicker(self.app.store.list(), self.app.backend), chosen)

    def action_settings(self) -> None:
        if self.conversation_id is None:
            self.app.notify("Start a chat first: its settings are kept with it.", severity="warning")
            return
        conversation = self.app.history.get(self.conversation_id)
        assert conversation is not None

        def save(settings: ChatSettings | None) -> None:
            if settings is not None:
                self.app.history.update(conversation.id, system_prompt=settings.system_prompt, sampling=settings.sampling)
                self._update_context_used()

        self.app.push_screen(ChatSettingsDialog(ChatSettings(conversation.system_prompt, conversation.sampling)), save)
