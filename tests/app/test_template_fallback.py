"""A model whose chat template is broken still chats, with the standard template and one warning: in the backend,
the CLI and the app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pocketlm.app import pocket_app
from pocketlm.app.pocket_app import PocketApp
from pocketlm.backends.base import ChatMessage, GenerationStats, LoadOptions, Notice, SamplingParams, TextPiece
from pocketlm.backends.chat_template import CHATML_TEMPLATE, render_chat
from pocketlm.backends.llamacpp import LlamaCppBackend
from tests.app.test_chat_app import SIZE, send, views, wait_for
from tests.fixtures import pocketlm_executable

# Renders like ChatML, except that it raises on a message saying "boom": it passes the check at load, and fails later.
PICKY_TEMPLATE = "{% if 'boom' in messages[-1]['content'] %}{{ raise_exception('boom is not allowed') }}{% endif %}" + CHATML_TEMPLATE


def with_template(source: Path, destination: Path, template: str) -> Path:
    """A copy of `source` whose `tokenizer.chat_template` is `template`, written with the gguf package's rewriter."""
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--chat-template", template, "--force", str(source), str(destination)],
        check=True, capture_output=True,
    )  # fmt: skip
    return destination


@pytest.fixture(scope="module")
def unparsable_gguf(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_template(starter_gguf, tmp_path_factory.mktemp("templates") / "unparsable-template.gguf", "{% for %}")


@pytest.fixture(scope="module")
def picky_gguf(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_template(starter_gguf, tmp_path_factory.mktemp("templates") / "picky-template.gguf", PICKY_TEMPLATE)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


class RecordingApp(PocketApp):
    """The app, keeping every warning it showed: a toast vanishes after its timeout, however slow the machine."""

    CSS_PATH = str(Path(pocket_app.__file__).with_name("app.tcss"))  # a relative one would be read beside this file

    def __init__(self, model: Path, max_tokens: int) -> None:
        super().__init__(model=str(model), load_options=LoadOptions(context_length=1024), default_sampling=greedy(max_tokens))
        self.warnings_shown: list[str] = []

    def notify(self, message: str, **options) -> None:  # type: ignore[no-untyped-def, override]
        if options.get("severity") == "warning":
            self.warnings_shown.append(message)
        super().notify(message, **options)


def test_backend_loads_a_model_whose_template_does_not_parse_and_uses_chatml(unparsable_gguf: Path) -> None:
    model = LlamaCppBackend().load(unparsable_gguf, LoadOptions(context_length=512))
    try:
        (warning,) = model.description.warnings
        assert "chat template is not valid Jinja" in warning and "standard ChatML template" in warning
        messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
        chatml = render_chat(messages, CHATML_TEMPLATE)
        assert model._render(messages) == model._llm.tokenize(chatml.encode(), add_bos=False, special=True)  # type: ignore[attr-defined]
        events = list(model.stream_chat(messages, greedy(8)))
        assert not any(isinstance(event, Notice) for event in events), "the load warning is not repeated"
        assert "".join(event.text for event in events if isinstance(event, TextPiece))
    finally:
        model.close()


def test_backend_replaces_a_template_that_fails_mid_conversation_and_says_so_once(picky_gguf: Path) -> None:
    model = LlamaCppBackend().load(picky_gguf, LoadOptions(context_length=512))
    try:
        assert model.description.warnings == ()
        first = list(model.stream_chat([ChatMessage("user", "Say boom")], greedy(4)))
        notices = [event for event in first if isinstance(event, Notice)]
        assert len(notices) == 1 and "boom is not allowed" in notices[0].message
        assert isinstance(first[0], Notice) and isinstance(first[-1], GenerationStats), "the notice comes before the reply"
        second = list(model.stream_chat([ChatMessage("user", "boom again")], greedy(4)))
        assert not any(isinstance(event, Notice) for event in second)
    finally:
        model.close()


def run_cli(pocket_home: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "POCKETLM_HOME": str(pocket_home)}
    return subprocess.run([pocketlm_executable(), *arguments], capture_output=True, text=True, env=environment, timeout=300)


def test_cli_answers_with_a_template_that_does_not_parse_and_warns_on_stderr(unparsable_gguf: Path, pocket_home: Path) -> None:
    result = run_cli(pocket_home, "run", str(unparsable_gguf), "hi", "--max-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("Warning:") == 1 and "not valid Jinja" in result.stderr
    assert result.stdout.strip(), "a reply, on stdout alone"


def test_cli_warns_once_when_the_template_fails_on_the_message(picky_gguf: Path, pocket_home: Path) -> None:
    result = run_cli(pocket_home, "run", str(picky_gguf), "boom", "--max-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("Warning:") == 1 and "boom is not allowed" in result.stderr
    assert result.stdout.strip()


async def test_app_stays_up_shows_the_warning_and_replies(unparsable_gguf: Path, pocket_home: Path) -> None:
    app = RecordingApp(unparsable_gguf, max_tokens=12)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await wait_for(pilot, lambda: screen.model is not None)
        (warning,) = app.warnings_shown
        assert "not valid Jinja" in warning
        await send(pilot, "Hello")
        await wait_for(pilot, lambda: len(views(app)) == 2 and not screen.generating)
        assert views(app)[1].source.strip(), "the model replied"
        assert app.is_running and len(app.warnings_shown) == 1


async def test_app_shows_a_template_failing_mid_conversation_as_one_notification(picky_gguf: Path, pocket_home: Path) -> None:
    app = RecordingApp(picky_gguf, max_tokens=6)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await wait_for(pilot, lambda: screen.model is not None)
        await send(pilot, "boom")
        await wait_for(pilot, lambda: len(views(app)) == 2 and not screen.generating)
        await send(pilot, "boom, again")
        await wait_for(pilot, lambda: len(views(app)) == 4 and not screen.generating)
        (warning,) = app.warnings_shown
        assert "boom is not allowed" in warning
        assert app.is_running and views(app)[3].source.strip()
