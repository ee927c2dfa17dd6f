"""Render a conversation with a model's own Jinja chat template, inside Jinja's sandbox.

A chat template is code that ships inside a model file. One that does not compile, or fails on a conversation, is
replaced by the architecture's standard template (or ChatML) with a warning shown once: a broken template must never
cost the user the model. And a message's text is text: control-token strings typed into a message are handed to the
tokenizer as placeholders, so only what the template itself writes can become a control token.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from jinja2.exceptions import SecurityError
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
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class StandardTemplate:
    name: str
    source: str
    markers: tuple[str, ...]  # the control tokens it writes: it is used only for a vocabulary that has them all


CHATML = StandardTemplate("ChatML", CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"))
_LLAMA3 = StandardTemplate("Llama 3", LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
_GEMMA = StandardTemplate("Gemma", GEMMA_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"))
# The template to fall back on, by GGUF architecture; ChatML for any other (Qwen's own format, and llama.cpp's default).
STANDARD_TEMPLATES: dict[str, StandardTemplate] = {
    "llama": _LLAMA3,  # SmolLM2 and others of this architecture lack Llama 3's tokens, and get ChatML
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "phi3": StandardTemplate("Phi-3", PHI3_TEMPLATE, ("<|user|>", "<|assistant|>", "<|end|>")),
}

# What a template is tried on when a model loads: a system prompt and a few turns, as the app and the CLI send them.
_SAMPLE_CONVERSATION = [
    ChatMessage("system", "You are a helpful assistant."),
    ChatMessage("user", "Hello!"),
    ChatMessage("assistant", "Hi! How can I help?"),
    ChatMessage("user", "Tell me a joke."),
]


class TemplateFailed(PocketError):
    """The chat template did not compile, or failed on this conversation."""


class TemplateRaised(Exception):
    """A template's own raise_exception(), e.g. "System role not supported"."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: object, indent: int | None = None) -> str:
    # Templates written for transformers expect its tojson: no HTML escaping, non-ASCII kept.
    return json.dumps(value, ensure_ascii=False, indent=indent)


# A template is code from a model file: the sandbox stops it reaching Python, these stop it spending the machine.
# Real templates loop over the messages and write a few kilobytes; a hostile one nests ranges or repeats strings.
_MAX_RANGE_ITEMS = 1_000_000  # all the range() items of one rendering together
_MAX_REPEAT = 1_000_000  # items of a string or list made by `*`
_MAX_PROMPT_CHARS = 64 * 2**20


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator: str, left: object, right: object) -> object:  # type: ignore[no-untyped-def, override]
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SecurityError("the template raises a number to a power above 64")
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(times, int) and len(sequence) * times > _MAX_REPEAT:
                    raise SecurityError(f"the template repeats a string or list beyond {_MAX_REPEAT:,} items")
        return super().call_binop(context, operator, left, right)


def _budgeted_range() -> object:
    """range() for one rendering: nested loops cannot multiply their way past `_MAX_RANGE_ITEMS` all told."""
    spent = 0

    def bounded_range(*arguments: int) -> range:
        nonlocal spent
        items = range(*arguments)
        spent += len(items)
        if spent > _MAX_RANGE_ITEMS:
            raise SecurityError(f"the template's loops run past {_MAX_RANGE_ITEMS:,} steps")
        return items

    return bounded_range


@lru_cache(maxsize=8)
def _compile(source: str):  # type: ignore[no-untyped-def]
    environment = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
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


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if not isinstance(error, TemplateRaised) else str(error)


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
    except Exception as error:  # a syntax error, or anything else the parser trips on: the template is data
        raise TemplateFailed(f"The model's chat template is not valid Jinja ({_describe(error)}).", "Re-convert the model or report it.") from None

    def render(turns: list[ChatMessage]) -> str:
        pieces, length = [], 0
        for piece in compiled.generate(
            messages=[{"role": m.role, "content": m.content} for m in turns],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            range=_budgeted_range(),
        ):
            length += len(piece)
            if length > _MAX_PROMPT_CHARS:
                raise SecurityError(f"the template writes more than {_MAX_PROMPT_CHARS:,} characters")
            pieces.append(piece)
        return "".join(pieces)

    # Any exception is the template's: Jinja errors, undefined names, a TypeError from adding a string to a number.
    try:
        return render(messages)
    except Exception as error:
        if any(m.role == "system" for m in messages):
            try:
                return render(_merge_system_into_first_user(messages))
            except Exception:
                pass
        raise TemplateFailed(
            f"The model's chat template refused this conversation ({_describe(error)}).", "Check the roles of the messages."
        ) from None


def fallback_template(architecture: str, control_tokens: frozenset[str]) -> StandardTemplate:
    """The architecture's standard template when the vocabulary has its tokens, else ChatML."""
    standard = STANDARD_TEMPLATES.get(architecture)
    if standard is not None and all(marker in control_tokens for marker in standard.markers):
        return standard
    return CHATML


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered prompt whose messages' control-token strings stand in it as placeholders."""

    text: str
    escaped: dict[str, str]  # placeholder -> the message text it stands for

    def restore(self) -> str:
        """The prompt with the messages' text put back in place of the placeholders."""
        return "".join(text for text, _ in self.fragments(None))

    def fragments(self, control_pattern: re.Pattern[str] | None) -> list[tuple[str, bool]]:
        """The prompt split as llama.cpp splits a text before tokenizing it: (text, False) runs between (control, True)
        tokens, the controls found only in the template's own text, the messages' text put back whole into the runs."""
        pieces: list[tuple[str, bool]] = []
        parts = _placeholder_pattern(self.escaped).split(self.text) if self.escaped else [self.text]
        for index, part in enumerate(parts):
            if index % 2:  # a placeholder (the pattern's one group): message text, never a control token
                pieces.append((self.escaped[part], False))
                continue
            start = 0
            for match in control_pattern.finditer(part) if control_pattern else ():
                pieces += [(part[start : match.start()], False), (match.group(0), True)]
                start = match.end()
            pieces.append((part[start:], False))
        merged: list[tuple[str, bool]] = []
        for text, is_control in pieces:
            if merged and not is_control and not merged[-1][1]:
                merged[-1] = (merged[-1][0] + text, False)
            elif text:
                merged.append((text, is_control))
        return [fragment for fragment in merged if fragment[0]]


def _placeholder_pattern(escaped: dict[str, str]) -> re.Pattern[str]:
    return re.compile("(" + "|".join(map(re.escape, escaped)) + ")")


class ChatFormat:
    """A model's chat template, replaced by a standard one the first time it fails, with a warning given once.

    `control_tokens` are the vocabulary's strings that the tokenizer turns into control tokens when it parses
    special tokens; they are escaped in message contents, and decide which standard template can replace a broken one.
    `user_defined_tokens` are the strings it turns into tokens in any text: those the template writes as turn markers
    (Command-R's <|START_OF_TURN_TOKEN|>, gpt-oss's <|start|>) are escaped too, and listed in `markers`; the others
    (Gemma's <h1>, say) stay what the model was trained to read in ordinary text.
    """

    def __init__(self, template: str | None, architecture: str, bos_token: str = "", eos_token: str = "",
                 control_tokens: frozenset[str] = frozenset(), user_defined_tokens: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self._template = template
        self._bos_token, self._eos_token = bos_token, eos_token
        self._fallback = fallback_template(architecture, control_tokens)
        self._notice: str | None = None
        self._render_failed = False  # warned once about a conversation the template could not render
        self.load_warning: str | None = None
        try:
            sample = render_chat(_SAMPLE_CONVERSATION, template, bos_token, eos_token)
        except TemplateFailed as error:
            self._replace_template(error)
            self.load_warning, self._notice = self._notice, None
            sample = self._sample_or_nothing()
        # Where the template's turn markers can be seen: in what it makes of a small conversation.
        self.markers = frozenset(text for text in user_defined_tokens if text.strip() and text in sample)
        # Longest first, as llama.cpp matches them: "<|im_start|>" before a shorter token that is its prefix.
        ordered = sorted(control_tokens | self.markers, key=len, reverse=True)
        self._control_pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def _sample_or_nothing(self) -> str:
        try:
            return render_chat(_SAMPLE_CONVERSATION, self._template, self._bos_token, self._eos_token)
        except TemplateFailed:
            return ""

    @property
    def control_pattern(self) -> re.Pattern[str] | None:
        """Matches the control-token strings, longest first; None for a vocabulary without any."""
        return self._control_pattern

    def _replace_template(self, error: TemplateFailed) -> None:
        self._template = self._fallback.source
        self._notice = self._fallback_notice(error, "instead")

    def _fallback_notice(self, error: TemplateFailed, when: str) -> str:
        reason = error.message.removeprefix("The model's chat template ").rstrip(".")
        return f"The model's chat template {reason}; using the standard {self._fallback.name} template {when}."

    def take_notice(self) -> str | None:
        """The warning about a template replaced since the last call, once."""
        notice, self._notice = self._notice, None
        return notice

    def render_text(self, messages: list[ChatMessage]) -> str:
        """The prompt as plain text, message contents as they are."""
        try:
            return render_chat(messages, self._template, self._bos_token, self._eos_token)
        except TemplateFailed as error:
            if self._template == self._fallback.source:
                raise
            # Only for the conversations it fails on: the model was tuned on its own template, which may well render
            # the next one (a Mistral model on ChatML for good would be worse off than one odd turn).
            if not self._render_failed:
                self._render_failed, self._notice = True, self._fallback_notice(error, "where it fails")
            return render_chat(messages, self._fallback.source, self._bos_token, self._eos_token)

    def render(self, messages: list[ChatMessage]) -> RenderedPrompt:
        """The prompt, each control-token string inside a message's content replaced by a placeholder."""
        if self._control_pattern is None:
            return RenderedPrompt(self.render_text(messages), {})
        escaped: dict[str, str] = {}
        # A fresh random placeholder per render: no message can contain one. Letters and digits only, so templates
        # that trim, escape or JSON-encode a message leave it whole.
        nonce = secrets.token_hex(8)

        def placeholder(match: re.Match[str]) -> str:
            key = f"pocketlm{nonce}x{len(escaped)}x"
            escaped[key] = match.group(0)
            return key

        safe = [ChatMessage(m.role, self._control_pattern.sub(placeholder, m.content)) for m in messages]
        return RenderedPrompt(self.render_text(safe), escaped)
