"""The `pocketlm` command as scripts and people use it, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pocketlm.models.store import ModelStore
from tests.fixtures import CONCISE_SYSTEM_PROMPT, pocketlm_executable


def pocketlm(*args: str, stdin: str = "", home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [pocketlm_executable(), *args], input=stdin, capture_output=True, text=True, timeout=300,
        env={**os.environ, "POCKETLM_HOME": str(home)},
    )  # fmt: skip


def assert_clean_failure(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_pipe_mode_prints_only_the_reply(store_with_starter: ModelStore, pocket_home: Path) -> None:
    result = pocketlm("chat", "SmolLM2", "--temp", "0", "--system", CONCISE_SYSTEM_PROMPT, stdin="What is the capital of France?", home=pocket_home)
    assert result.returncode == 0, result.stderr
    # Only the reply (no prompt, no role marker) and nothing on stderr; its exact words are left to the CPU's rounding.
    reply = result.stdout.strip()
    assert "Paris" in reply and not reply.startswith(("<|", "assistant", "What is")), reply
    assert result.stdout.endswith("\n") and result.stderr == ""


def test_run_one_shot(store_with_starter: ModelStore, pocket_home: Path) -> None:
    result = pocketlm("run", "smol", "What is the capital of France?", "--temp", "0", "--system", CONCISE_SYSTEM_PROMPT, home=pocket_home)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_gguf_path_works_without_the_store(starter_gguf: Path, pocket_home: Path) -> None:
    result = pocketlm("run", str(starter_gguf), "Say hi.", "--max-tokens", "5", home=pocket_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_unknown_model_lists_what_there_is(store_with_starter: ModelStore, pocket_home: Path) -> None:
    assert_clean_failure(pocketlm("run", "llama-70b", "hi", home=pocket_home), "No model named 'llama-70b' in the store (models: SmolLM2-135M-Instruct)")


def test_empty_store_in_pipe_mode_says_what_to_do(pocket_home: Path) -> None:
    assert_clean_failure(pocketlm("chat", stdin="hi", home=pocket_home), "No model is installed yet.")


def test_truncated_gguf_is_refused_without_crashing(starter_gguf: Path, pocket_home: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(starter_gguf.read_bytes()[: 50_000_000])
    assert_clean_failure(pocketlm("run", str(broken), "hi", home=pocket_home), "broken.gguf is truncated: tensor")


def test_not_a_gguf_and_missing_file(pocket_home: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    assert_clean_failure(pocketlm("run", str(fake), "hi", home=pocket_home), "fake.gguf is not a GGUF file")
    assert_clean_failure(pocketlm("run", str(tmp_path / "gone.gguf"), "hi", home=pocket_home), "gone.gguf does not exist")


def test_too_big_for_memory_refused_unless_forced(store_with_starter: ModelStore, pocket_home: Path) -> None:
    result = pocketlm("run", "SmolLM2", "hi", "--ctx", "8000000", home=pocket_home)
    assert_clean_failure(result, "of memory is free")
    assert "--force" in result.stderr


def test_help_does_not_import_engines() -> None:
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom pocketlm.app.cli import cli\n"
        "result = CliRunner().invoke(cli, ['--help'])\nassert result.exit_code == 0 and 'chat' in result.output\n"
        "print(sorted(m for m in ('torch', 'mlx', 'llama_cpp', 'transformers', 'textual', 'numpy', 'huggingface_hub') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_convert_help_lists_the_targets_without_importing_numpy_or_engines() -> None:
    # `--to`'s help loads every registered converter class: their modules must keep numpy and engines for convert().
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom pocketlm.app.cli import cli\n"
        "result = CliRunner().invoke(cli, ['convert', '--help'])\nassert result.exit_code == 0 and 'gptq' in result.output, result.output\n"
        "print(sorted(m for m in ('torch', 'llama_cpp', 'transformers', 'numpy', 'gguf') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
