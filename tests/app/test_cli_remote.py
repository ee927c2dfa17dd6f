"""`pocketlm remote add|ls|rm`, and a remote endpoint named in `run` and `chat`, against a real OpenAI-compatible
peer on loopback (tests/backends/openai_peer.py) and the real `pocketlm` executable."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pocketlm.backends.base import ChatModel
from pocketlm.models.locations import database_path
from pocketlm.models.remote_endpoints import RemoteEndpoints
from tests.app.test_cli import assert_clean_failure, pocketlm
from tests.backends.openai_peer import openai_peer


def test_add_checks_the_endpoint_then_ls_run_chat_and_rm_use_it(peer_url: str, pocket_home: Path) -> None:
    added = pocketlm("remote", "add", "peer", peer_url.removesuffix("/v1"), home=pocket_home)  # the root: /v1 is added
    assert added.returncode == 0, added.stderr
    assert f"Added peer ({peer_url}): tiny." in added.stdout
    listed = pocketlm("remote", "ls", home=pocket_home)
    assert listed.stdout.split() == ["peer", peer_url, "(no", "key)"]
    served = pocketlm("remote", "ls", "peer", home=pocket_home)
    assert served.stdout.strip() == "peer/tiny  (context 256)"
    ran = pocketlm("run", "peer", "hello", "--temp", "0", "--max-tokens", "4", home=pocket_home)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip()  # the server's model's reply, printed like a local one
    chatted = pocketlm("chat", "peer/tiny", "--temp", "0", "--max-tokens", "4", stdin="hi", home=pocket_home)
    assert chatted.returncode == 0, chatted.stderr
    assert chatted.stdout.strip()
    # bench measures it like a local model: the server's /tokenize ids, continued through /v1/completions.
    benched = pocketlm("bench", "peer", "--n-prompt", "16", "--n-gen", "4", "--repetitions", "1", home=pocket_home)
    assert benched.returncode == 0, benched.stderr
    assert "✓ peer on remote: pp" in benched.stdout + benched.stderr
    removed = pocketlm("remote", "rm", "peer", home=pocket_home)
    assert removed.returncode == 0 and "Removed peer." in removed.stdout
    assert_clean_failure(pocketlm("run", "peer", "hello", home=pocket_home), "No model named 'peer' in the store")


def test_an_unreachable_endpoint_is_refused_with_a_sentence_and_not_saved(pocket_home: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = pocketlm("remote", "add", "gone", f"http://127.0.0.1:{port}/v1", home=pocket_home)
    assert_clean_failure(result, f"Error: gone (http://127.0.0.1:{port}/v1) cannot be reached.")
    assert "No remote endpoints yet" in pocketlm("remote", "ls", home=pocket_home).stdout


def test_a_wrong_key_is_refused_and_the_key_itself_is_never_stored(tiny_engine: ChatModel, pocket_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with openai_peer(tiny_engine, "tiny", api_key="sk-right-key-123") as (url, _):
        monkeypatch.setenv("PEER_KEY", "sk-wrong-key-456")
        assert_clean_failure(pocketlm("remote", "add", "keyed", url, "--api-key-env", "PEER_KEY", home=pocket_home),
                             f"Error: keyed ({url}) refused the API key.")  # fmt: skip
        monkeypatch.setenv("PEER_KEY", "sk-right-key-123")
        added = pocketlm("remote", "add", "keyed", url, "--api-key-env", "PEER_KEY", home=pocket_home)
        assert added.returncode == 0, added.stderr
        assert "key from $PEER_KEY" in pocketlm("remote", "ls", home=pocket_home).stdout
        ran = pocketlm("run", "keyed", "hello", "--temp", "0", "--max-tokens", "3", home=pocket_home)
        assert ran.returncode == 0, ran.stderr
    database = database_path()
    stored = b"".join(path.read_bytes() for path in database.parent.glob(database.name + "*"))  # the WAL too
    assert b"sk-right-key-123" not in stored and b"PEER_KEY" in stored


def test_an_unset_key_variable_and_a_bad_name_are_refused_before_any_request(pocket_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    assert_clean_failure(pocketlm("remote", "add", "x", "http://127.0.0.1:9/v1", "--api-key-env", "NOT_SET_ANYWHERE", home=pocket_home),
                         "Error: NOT_SET_ANYWHERE is not set")  # fmt: skip
    assert_clean_failure(pocketlm("remote", "add", "a/b", "http://127.0.0.1:9/v1", home=pocket_home), "cannot name an endpoint")
    assert_clean_failure(pocketlm("remote", "add", "x", "ftp://host", home=pocket_home), "is not an http:// or https:// address")
    assert_clean_failure(pocketlm("remote", "rm", "nothing", home=pocket_home), "No remote endpoint named 'nothing'")
    assert RemoteEndpoints(database_path()).list() == []
