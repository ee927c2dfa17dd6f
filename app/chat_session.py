"""One turn of a stored conversation: the producer both the CLI and the app render."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from pocketlm.app.history import ConversationStore
from pocketlm.backends.base import ChatMessage, ChatModel, GenerationEvent, GenerationStats, SamplingParams, TextPiece


def reply(
    history: ConversationStore,
    model: ChatModel,
    conversation_id: int,
    user_text: str,
    sampling: SamplingParams,
    cancel: threading.Event | None = None,
) -> Iterator[GenerationEvent]:
    """Store `user_text` with an empty reply, stream the model's answer, and store it in batches as it comes.

    A piece reaches the database before the caller shows it or in the next batch (BATCH_SECONDS later at most), so a
    process killed mid-reply loses at most the last batch window.
    """
    messages = [*history.chat_messages(conversation_id), ChatMessage("user", user_text)]
    writer = history.begin_reply(conversation_id, user_text, model=model.description.name, adapters=model.description.adapters)
    finished = False
    try:
        for event in model.stream_chat(messages, sampling, cancel):
            if isinstance(event, TextPiece):
                writer.write(event.text)
            elif isinstance(event, GenerationStats):
                writer.finish("cancelled" if event.stop_reason == "cancelled" else "complete", event)
                finished = True
            yield event
    except (GeneratorExit, KeyboardInterrupt):
        # The reader stopped listening (Ctrl-C, a closed pipe): keep what was streamed, as a cancel would.
        if not finished:
            writer.finish("cancelled")
        raise
    except Exception:
        if not finished:
            writer.finish("failed")
        raise
