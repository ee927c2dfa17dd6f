"""The pocketlm terminal app: the shell that holds the screens."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from textual.app import App, SystemCommand
from textual.screen import Screen

from pocketlm.app.history import ConversationStore
from pocketlm.app.model_loading import default_model_name
from pocketlm.app.notify import notify_error
from pocketlm.app.screens.bench import BenchScreen
from pocketlm.app.screens.chat import ChatScreen
from pocketlm.app.screens.convert import ConvertScreen
from pocketlm.app.screens.models import ModelsScreen
from pocketlm.backends.base import LoadOptions, SamplingParams
from pocketlm.models.locations import database_path
from pocketlm.models.errors import PocketError
from pocketlm.models.store import ModelStore

if TYPE_CHECKING:
    from pocketlm.app.serve_background import BackgroundServer

SERVE_PORT = 11435  # pocketlm serve's default (serve_settings.DEFAULT_PORT, not imported: it is the serve extra's module)


class PocketApp(App[None]):
    TITLE = "pocketlm"
    CSS_PATH = "app.tcss"

    def __init__(
        self,
        model: str | None = None,
        load_options: LoadOptions | None = None,
        default_sampling: SamplingParams | None = None,
        backend: str | None = None,
        serve_port: int = SERVE_PORT,
    ) -> None:
        super().__init__()
        self.store = ModelStore(database_path())
        self.history = ConversationStore(database_path())
        # The UI shares the cores with the engine: each backend applies its own rule for that (llama.cpp keeps one free).
        self.load_options = load_options or LoadOptions(beside_ui=True)
        self.default_sampling = default_sampling or SamplingParams()
        self.backend = backend
        self._initial_model = model
        self.chat_screen = ChatScreen()
        # Installed, not just pushed: leaving the screen must not end a pull running in its worker.
        self.models_screen = ModelsScreen()
        self.convert_screen = ConvertScreen()
        self.bench_screen = BenchScreen()
        self.serve_port = serve_port  # 0: any free port (tests)
        self.server: BackgroundServer | None = None

    def get_default_screen(self) -> ChatScreen:
        return self.chat_screen

    def on_mount(self) -> None:
        self.install_screen(self.models_screen, "models")
        self.install_screen(self.convert_screen, "convert")
        self.install_screen(self.bench_screen, "bench")

    def action_show_models(self) -> None:
        if self.screen is not self.models_screen:
            self.push_screen("models")

    def action_show_convert(self) -> None:
        if self.screen is not self.convert_screen:
            self.push_screen("convert")

    def action_show_bench(self) -> None:
        if self.screen is not self.bench_screen:
            self.push_screen("bench")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Models", "Local models, Hub search and pull, delete (F3)", self.action_show_models)
        yield SystemCommand("Convert", "Convert a checkpoint to GGUF or GPTQ, or quantize a GGUF (F4)", self.action_show_convert)
        yield SystemCommand("Bench", "Measure speed and quality across models, formats and backends (F6)", self.action_show_bench)
        if self.server is None:
            yield SystemCommand("Serve", f"Serve the local models over an OpenAI-compatible API on 127.0.0.1:{self.serve_port}", self.action_toggle_serve)
        else:
            yield SystemCommand("Stop serving", f"Stop the API server on {self.server.url}", self.action_toggle_serve)

    def action_toggle_serve(self) -> None:
        """Start `pocketlm serve` inside the app (loopback only, the app's store), or stop it. The header's subtitle
        says, on every screen, where it listens and how many requests it answered."""
        if self.server is not None:
            self._stop_serving()
            return
        from pocketlm.app.serve_background import BackgroundServer
        from pocketlm.app.serve_settings import ServeSettings

        settings = ServeSettings(port=self.serve_port, threads=self.load_options.threads, context_length=self.load_options.context_length)
        try:
            self.server = BackgroundServer(self.store, settings).start()
        except PocketError as error:
            notify_error(self, error, title="Serve")
            return
        self._serve_timer = self.set_interval(1.0, self._show_serving)
        self._show_serving()
        self.notify(f"{self.server.url}/v1 answers OpenAI clients; Stop serving in the command palette ends it.", title="Serving", markup=False)

    def _show_serving(self) -> None:
        self.sub_title = self.server.describe() if self.server is not None else ""

    def _stop_serving(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        self._serve_timer.stop()
        self.sub_title = ""
        server.stop()

    @property
    def model_named(self) -> bool:
        """Whether the user named the model to open (rather than the app picking the latest or first one)."""
        return self._initial_model is not None

    @property
    def initial_model(self) -> str | None:
        """The model named on the command line, else the usual default; None when the store is empty."""
        return self._initial_model or default_model_name(self.store, self.history)

    def on_unmount(self) -> None:
        self.models_screen.stop_pull()  # a pull keeps its bytes for next time; quitting must not wait for it
        self.convert_screen.stop()  # a conversion leaves nothing half-written; quitting must not wait for it
        self.bench_screen.stop()  # its cell's child process is killed; the finished cells are saved
        self.chat_screen.close_model()
        self._stop_serving()
