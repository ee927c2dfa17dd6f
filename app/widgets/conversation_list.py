"""The list of stored conversations, newest first."""

from __future__ import annotations

from textual.widgets import Label, ListItem, ListView

from pocketlm.app.history import Conversation


class ConversationItem(ListItem):
    def __init__(self, conversation: Conversation) -> None:
        super().__init__(Label(conversation.title or "New chat", markup=False))
        self.conversation = conversation


class ConversationList(ListView):
    async def show(self, conversations: list[Conversation], selected_id: int | None) -> None:
        await self.clear()
        await self.extend([ConversationItem(c) for c in conversations])
        for index, conversation in enumerate(conversations):
            if conversation.id == selected_id:
                self.index = index
