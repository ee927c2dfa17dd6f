"""The conversation's messages, each rendered as Markdown; the reply in progress streams into the last one."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Markdown

from pocketlm.app.history import StoredMessage


class ChatMessageView(Markdown):
    """One message; its role is its CSS class (user, assistant, notice)."""


# A reply that did not end on its own says so after its text.
STATUS_MARKERS = {"cancelled": "  *(stopped)*", "interrupted": "  *(interrupted)*"}


class MessageLog(VerticalScroll):
    async def show_conversation(self, messages: list[StoredMessage]) -> None:
        await self.remove_children()
        await self.mount_all([self._view(m.role, m.content + STATUS_MARKERS.get(m.status, "")) for m in messages])
        self.scroll_end(animate=False)

    @staticmethod
    def _view(role: str, content: str) -> ChatMessageView:
        return ChatMessageView(content, classes=role)

    async def add(self, role: str, content: str) -> ChatMessageView:
        view = self._view(role, content)
        await self.mount(view)
        self.anchor()
        return view
