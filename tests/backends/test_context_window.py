"""Dropping the oldest turns, counted with the real tokenizer and chat template of the starter model."""

from __future__ import annotations

import pytest

from pocketlm.backends.base import ChatMessage, ChatModel
from pocketlm.backends.context_window import fit_conversation
from pocketlm.models.errors import ContextOverflow


def conversation(turns: int) -> list[ChatMessage]:
    messages = [ChatMessage("system", "Be brief.")]
    for turn in range(turns):
        messages += [ChatMessage("user", f"Question {turn} " + "padding " * 20), ChatMessage("assistant", f"Answer {turn}.")]
    return messages + [ChatMessage("user", "Last question?")]


def test_fitting_conversation_is_kept_whole(starter_model: ChatModel) -> None:
    messages = conversation(2)
    kept, dropped, tokens = fit_conversation(messages, starter_model.prompt_tokens, 10_000)
    assert kept == messages and dropped == 0 and tokens == starter_model.prompt_tokens(messages)


def test_oldest_pairs_go_first_and_the_system_prompt_stays(starter_model: ChatModel) -> None:
    messages = conversation(5)
    budget = starter_model.prompt_tokens(messages) - 30
    kept, dropped, tokens = fit_conversation(messages, starter_model.prompt_tokens, budget)
    assert tokens <= budget
    assert kept[0] == messages[0] and kept[1].role == "user" and kept[-1] == messages[-1]
    assert dropped == 2 and kept[1:] == messages[3:]


def test_latest_message_alone_too_big(starter_model: ChatModel) -> None:
    with pytest.raises(ContextOverflow):
        fit_conversation(conversation(3), starter_model.prompt_tokens, 10)
