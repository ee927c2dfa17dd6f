"""Chat templates render as transformers renders them, inside Jinja's sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketlm.backends.base import ChatMessage
from pocketlm.backends.chat_template import CHATML_TEMPLATE, render_chat
from pocketlm.models.errors import PocketError
from pocketlm.models.gguf_info import read_gguf

# Gemma 2's template, abridged to its system-role refusal and turn format.
GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def test_starter_template_with_its_default_system_prompt(starter_gguf: Path) -> None:
    summary = read_gguf(starter_gguf)
    prompt = render_chat([ChatMessage("user", "Hi")], summary.chat_template)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_no_template_falls_back_to_chatml() -> None:
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"), ChatMessage("user", "Bye")]
    assert render_chat(messages, None) == render_chat(messages, CHATML_TEMPLATE) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_refusing_a_system_role_gets_it_in_the_first_user_turn() -> None:
    prompt = render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")], GEMMA_LIKE, bos_token="<bos>")
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_template_errors_are_sentences() -> None:
    with pytest.raises(PocketError, match="refused this conversation: System role not supported"):
        render_chat([ChatMessage("system", "only a system message")], GEMMA_LIKE)
    with pytest.raises(PocketError, match="not valid Jinja"):
        render_chat([ChatMessage("user", "Hi")], "{% for %}")


def test_templates_run_in_the_sandbox() -> None:
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(PocketError):
        render_chat([ChatMessage("user", "Hi")], escape)


def test_tojson_keeps_non_ascii_like_transformers() -> None:
    assert render_chat([ChatMessage("user", "café")], "{{ messages[0]['content'] | tojson }}") == '"café"'
