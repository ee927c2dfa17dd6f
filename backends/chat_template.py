"""Render a conversation with a model's own Jinja chat template, inside Jinja's sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pocketlm.backends.base import ChatMessage
from pocketlm.models.errors import PocketError

# llama.cpp's own fallback for a model without a template: ChatML, which most small instruct models were tuned on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateRaised(Exception):
    """A template's own raise_exception(), e.g. "System role not supported"."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: object, indent: int | None = None) -> str:
    # Templates written for transformers expect its tojson: no HTML escaping, non-ASCII kept.
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=8)
def _compile(source: str):  # type: ignore[no-untyped-def]
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)


def _merge_system_into_first_user(messages: list[ChatMessage]) -> list[ChatMessage]:
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    rest = [m for m in messages if m.role != "system"]
    if rest and rest[0].role == "user":
        rest[0] = ChatMessage("user", f"{system}\n\n{rest[0].content}")
    return rest


def render_chat(
    messages: list[ChatMessage],
    template: str | None,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages`. Templates that refuse a system role get it folded into the first user turn."""
    try:
        compiled = _compile(template or CHATML_TEMPLATE)
    except TemplateError as error:
        raise PocketError(f"The model's chat template is not valid Jinja ({error}).", "Re-convert the model or report it.") from None

    def render(turns: list[ChatMessage]) -> str:
        return compiled.render(
            messages=[{"role": m.role, "content": m.content} for m in turns],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )

    try:
        return render(messages)
    except (TemplateRaised, TemplateError) as error:
        if any(m.role == "system" for m in messages):
            try:
                return render(_merge_system_into_first_user(messages))
            except (TemplateRaised, TemplateError):
                pass
        raise PocketError(f"The model's chat template refused this conversation: {error}.", "Check the roles of the messages.") from None
