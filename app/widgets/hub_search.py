"""Hub search: a query with format and sort, the matching repos, and the files (quants) of the highlighted one."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.widgets import DataTable, Input, Label, OptionList, Select, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from pocketlm.app.notify import as_pocket_error, notify_error
from pocketlm.app.widgets.cells import cell
from pocketlm.models.errors import HubUnreachable, PocketError
from pocketlm.models.fit import human_bytes
from pocketlm.models.hub import SearchResult

_RESULT_COLUMNS = (("repo", "Model"), ("downloads", "Downloads"), ("likes", "Likes"), ("updated", "Updated"), ("formats", "Formats"))


class HubSearch(Vertical):
    class PullRequested(Message):
        """The user chose a file (or the checkpoint) of a repo to pull: `spec` as `pocketlm pull` takes it."""

        def __init__(self, spec: str) -> None:
            super().__init__()
            self.spec = spec

    class _Answered(Message):
        def __init__(self, results: list[SearchResult] | None, error: PocketError | None) -> None:
            super().__init__()
            self.results = results
            self.error = error

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._results: dict[str, SearchResult] = {}

    def compose(self) -> ComposeResult:
        with Horizontal(id="hub-search-bar"):
            yield Input(placeholder="Search models on the Hub (Enter)", id="hub-query")
            yield Select([(f, f) for f in ("gguf", "mlx", "gptq", "safetensors")], prompt="any format", id="hub-format")
            yield Select([("downloads", "downloads"), ("likes", "likes"), ("updated", "updated")], value="downloads",
                         allow_blank=False, id="hub-sort")  # fmt: skip
        # In place of the results while the Hub cannot be reached; the next search that gets an answer clears it.
        yield Static(id="hub-offline")
        with Horizontal(id="hub-browser"):
            yield DataTable(id="hub-results", cursor_type="row", zebra_stripes=True)
            with Vertical(id="hub-files-pane"):
                yield Label("Files to pull", classes="title")
                yield OptionList(id="hub-files")

    def on_mount(self) -> None:
        results = self.query_one("#hub-results", DataTable)
        for key, label in _RESULT_COLUMNS:
            results.add_column(label, key=key)
        self.query_one("#hub-offline").display = False

    def focus_query(self) -> None:
        self.query_one("#hub-query", Input).focus()

    @property
    def unreachable(self) -> bool:
        return bool(self.query_one("#hub-offline").display)

    @on(Input.Submitted, "#hub-query")
    def _submit(self) -> None:
        query = self.query_one("#hub-query", Input).value.strip()
        model_format = self.query_one("#hub-format", Select).value
        sort = self.query_one("#hub-sort", Select).value
        self.query_one("#hub-results", DataTable).loading = True
        self._search(query, model_format if isinstance(model_format, str) else None, str(sort))

    @work(thread=True, exclusive=True, group="search")
    def _search(self, query: str, model_format: str | None, sort: str) -> None:
        from pocketlm.models.hub import search_models

        try:
            answer = self._Answered(search_models(query, model_format, sort, limit=30), None)  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001 - a worker's surprise must become a notification, not end the app
            answer = self._Answered(None, as_pocket_error("The search", error))
        if not get_current_worker().is_cancelled:  # a newer search replaced this one
            self.post_message(answer)

    @on(_Answered)
    def _answered(self, answer: _Answered) -> None:
        self.query_one("#hub-results", DataTable).loading = False
        if isinstance(answer.error, HubUnreachable):
            self._show_unreachable(answer.error)
        elif answer.error is not None:
            notify_error(self, answer.error, title="Search failed")
        else:
            self._show_results(answer.results or [])

    def _show_unreachable(self, error: HubUnreachable) -> None:
        """A state of the tab, not a toast that vanishes: nothing else on it works until the Hub answers."""
        self._set_reachable(False)
        self.query_one("#hub-offline", Static).update(
            Content.from_markup(
                "[b]Can't reach the Hugging Face Hub.[/b]\n\n$message\n\n"
                "Local models still work (the Local tab). Check your connection, then retry with Ctrl+F and Enter.",
                message=error.message,
            )
        )

    def _set_reachable(self, reachable: bool) -> None:
        self.query_one("#hub-offline").display = not reachable
        self.query_one("#hub-browser").display = reachable

    def _show_results(self, results: list[SearchResult]) -> None:
        self._set_reachable(True)
        table = self.query_one("#hub-results", DataTable)
        table.clear()
        self._results = {r.repo_id: r for r in results}
        for r in results:
            updated = r.last_modified.strftime("%Y-%m-%d") if r.last_modified else "?"
            cells = (r.repo_id + (" (gated)" if r.gated else ""), f"{r.downloads:,}", f"{r.likes:,}", updated, ", ".join(r.formats))
            table.add_row(*map(cell, cells), key=r.repo_id)
        if not results:
            self.notify("No models on the Hub match that search.")
        self._show_files()
        if results:
            table.focus()

    @on(DataTable.RowHighlighted, "#hub-results")
    def _show_files(self) -> None:
        options = self.query_one("#hub-files", OptionList)
        options.clear_options()
        table = self.query_one("#hub-results", DataTable)
        if not table.row_count:
            return
        result = self._results.get(str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value))
        if result is None:
            return
        from pocketlm.models.gguf_quants import default_choice

        if result.gguf_files:
            default = default_choice(list(result.gguf_files))
            for choice in result.gguf_files:
                parts = f", {len(choice.files)} parts" if len(choice.files) > 1 else ""
                note = "  [dim](default)[/dim]" if choice == default else ""
                # The quant name comes from the repo's file names: a $variable, shown as written.
                prompt = Content.from_markup(f"$label{note}", label=f"{choice.quant}  {human_bytes(choice.size_bytes)}{parts}")
                # By file, not quant name: a repo may hold two files of one quant.
                options.add_option(Option(prompt, id=f"{result.repo_id}:{choice.first_file}"))
        if set(result.formats) & {"safetensors", "mlx", "gptq", "lora"} or not result.gguf_files:
            options.add_option(Option("Checkpoint: config, tokenizer and safetensors weights", id=result.repo_id))

    @on(DataTable.RowSelected, "#hub-results")
    def _focus_files(self) -> None:
        self.query_one("#hub-files", OptionList).focus()

    @on(OptionList.OptionSelected, "#hub-files")
    def _pull_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.post_message(self.PullRequested(event.option.id))
