"""The chat format, prompt tokenization and end-token ids of a Hugging Face tokenizer folder, for the engines that
run on one (the torch and mlx backends), so a conversation counts and renders the same tokens on both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pocketlm.backends.base import ChatMessage
from pocketlm.backends.chat_template import ChatFormat
from pocketlm.backends.streaming import PromptTokenizer


def token_ids(*values: object) -> frozenset[int]:
    """Every id in values that are an id, a list of ids, or None (a config's eos_token_id is any of them)."""
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(item for item in value if isinstance(item, int))
    return frozenset(ids)


def generation_config_end_ids(folder: Path) -> object:
    """eos_token_id of the folder's generation_config.json, as written (an id, a list, or None where there is none)."""
    path = folder / "generation_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


class HFChatTokens:
    """A transformers tokenizer as a chat model's tokens: the chat format from its template and special tokens, the
    prompt's ids (a BOS where the tokenizer adds one itself, as llama.cpp does), and the ids that end a reply."""

    def __init__(self, tokenizer: Any, architecture: str, model_end_ids: tuple[object, ...]) -> None:
        self._tokenizer = tokenizer
        self.end_ids = token_ids(*model_end_ids, tokenizer.eos_token_id)
        added = tokenizer.added_tokens_decoder  # id -> AddedToken: special ones are control tokens
        controls = {token.content: token_id for token_id, token in added.items() if token.special}
        controls.update({text: tokenizer.convert_tokens_to_ids(text) for text in tokenizer.all_special_tokens if text not in controls})
        user_defined = {token.content: token_id for token_id, token in added.items() if not token.special}
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates: the default one is the chat template
            template = template.get("default")
        self._bos = tokenizer.bos_token or ""
        self.format = ChatFormat(template, architecture, self._bos, tokenizer.eos_token or "",
                                 control_tokens=frozenset(controls), user_defined_tokens=frozenset(user_defined))  # fmt: skip
        # Where the tokenizer puts a BOS token itself, the prompt gets one unless the template wrote it (as llama.cpp does).
        probe = tokenizer.encode("a")
        self._bos_id = probe[0] if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id else None
        control_ids = {**controls, **{text: user_defined[text] for text in self.format.markers}}
        marker_ids = frozenset(user_defined[text] for text in self.format.markers)
        self._prompt_tokenizer = PromptTokenizer(control_ids, marker_ids, self.format.control_pattern, self.tokenize_text)

    def tokenize_text(self, text: str) -> list[int]:
        """`text` as text: control-token strings in it are split like any other characters."""
        return self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        """`text` as a document: the BOS first where the tokenizer adds one itself, then the text as text."""
        return ([self._bos_id] if self._bos_id is not None else []) + self.tokenize_text(text)

    def render(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt's ids for `messages`, ready for the model to reply to."""
        prompt = self.format.render(messages)
        bos = [self._bos_id] if self._bos_id is not None and not prompt.text.startswith(self._bos) else []
        if not prompt.escaped:  # no message holds a control token's text: the tokenizer parses the template's own
            return bos + self._tokenizer.encode(prompt.text, add_special_tokens=False)
        return bos + self._prompt_tokenizer.tokens(prompt)

    def decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=True)
