"""One turn of a stored conversation: the producer both the CLI and the app render."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from pocketlm.app.history import ConversationStore
from pocketlm.backends.base import ChatModel, GenerationEvent, GenerationStats, SamplingParams, TextPiece


def reply(
    history: ConversationStore,
    model: ChatModel,
    conversation_id: int,
    user_text: str,
    sampling: SamplingParams,
    cancel: threading.Event | None = None,
) -> Iterator[GenerationEvent]:
    """Store `user_text`, stream the model's answer, and store each piece before the caller shows it."""
    history.add_message(conversation_id, "user", user_text)
    messages = history.chat_messages(conversation_id)
    reply_id = history.add_message(conversation_id, "assistant", "", status="streaming", model=model.description.name)
    finished = False
    try:
        for event in model.stream_chat(messages, sampling, cancel):
            if isinstance(event, TextPiece):
                history.append_to_message(reply_id, event.text)
            elif isinstance(event, GenerationStats):
                history.finish_message(reply_id, "cancelled" if event.stop_reason == "cancelled" else "complete", event)
                finished = True
            yield event
    except (GeneratorExit, KeyboardInterrupt):
        # The reader stopped listening (Ctrl-C, a closed pipe): keep what was streamed, as a cancel would.
        if not finished:
            history.finish_message(reply_id, "cancelled")
        raise
    except Exception:
        history.finish_message(reply_id, "failed")
        raise
