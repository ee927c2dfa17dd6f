"""`pocketlm search | pull | ls | info | rm | import` as real subprocesses against the loopback Hub."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from pocketlm.app import exit_codes
from tests.app.test_cli import assert_clean_failure, pocketlm
from tests.fixtures import pocketlm_executable
from tests.hub.repos import GATED_REPO, GGUF_REPO, HUGE_REPO, STARTER_FILE, TINY_CHECKPOINT
from tests.hub.server import LoopbackHub


def test_search_pull_ls_info_rm(loopback_hub: LoopbackHub, pocket_home: Path) -> None:
    found = pocketlm("search", "smollm2", home=pocket_home)
    assert found.returncode == 0, found.stderr
    assert GGUF_REPO in found.stdout and "Q4_1 98.4 MB" in found.stdout

    pulled = pocketlm("pull", f"{GGUF_REPO}:Q4_1", home=pocket_home)
    assert pulled.returncode == 0, pulled.stderr
    assert f"{GGUF_REPO}:Q4_1 is ready (gguf, 98.4 MB)" in pulled.stdout
    assert "Also available: Q4_K_M (864 B), Q8_0 (864 B), Q2_K (1.70 kB)" in pulled.stderr
    assert pocketlm("pull", TINY_CHECKPOINT, home=pocket_home).returncode == 0

    listing = pocketlm("ls", home=pocket_home).stdout
    assert f"{GGUF_REPO}:Q4_1" in listing and TINY_CHECKPOINT in listing and "safetensors" in listing

    info = pocketlm("info", "smollm2", home=pocket_home)
    assert info.returncode == 0, info.stderr
    assert "Quantization    Q4_1" in info.stdout and "Memory          fits: needs about" in info.stdout
    assert STARTER_FILE in info.stdout

    refused = pocketlm("rm", "tiny-llama", home=pocket_home)
    assert_clean_failure(refused, "Not removing pocketlm-test/tiny-llama without confirmation.")
    removed = pocketlm("rm", "--yes", "tiny-llama", home=pocket_home)
    assert removed.returncode == 0 and "Removed pocketlm-test/tiny-llama, freed 364.3 kB." in removed.stdout
    assert TINY_CHECKPOINT not in pocketlm("ls", home=pocket_home).stdout


def test_import_then_chat(pocket_home: Path, starter_gguf: Path) -> None:
    imported = pocketlm("import", str(starter_gguf), "--name", "my-smollm", home=pocket_home)
    assert imported.returncode == 0 and "Imported my-smollm (gguf, llama, 98.4 MB)." in imported.stdout
    answer = pocketlm("run", "my-smol", "What is the capital of France?", "--temp", "0", "--system", "Answer in one short sentence.", home=pocket_home)
    assert "Paris" in answer.stdout
    assert_clean_failure(pocketlm("import", str(pocket_home / "missing.gguf"), home=pocket_home), "does not exist")


def test_failures_are_one_sentence_and_exit_1(loopback_hub: LoopbackHub, pocket_home: Path) -> None:
    assert_clean_failure(pocketlm("pull", GATED_REPO, home=pocket_home), f"Error: {GATED_REPO} is gated")
    assert_clean_failure(pocketlm("pull", HUGE_REPO, home=pocket_home), "more disk space")
    assert_clean_failure(pocketlm("info", "nothing", home=pocket_home), "No model named 'nothing'")
    offline = {**os.environ, "POCKETLM_HOME": str(pocket_home), "HF_ENDPOINT": "http://127.0.0.1:9"}
    for command in (["search", "llama"], ["pull", GGUF_REPO]):
        result = subprocess.run([pocketlm_executable(), *command], capture_output=True, text=True, timeout=60, env=offline)
        assert_clean_failure(result, "Cannot reach the Hugging Face Hub at http://127.0.0.1:9")


def test_ctrl_c_keeps_the_partial_download_and_the_next_pull_resumes(loopback_hub: LoopbackHub, pocket_home: Path, tmp_path: Path) -> None:
    loopback_hub.stall_transfers(STARTER_FILE)
    child = subprocess.Popen([pocketlm_executable(), "pull", f"{GGUF_REPO}:Q4_1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "POCKETLM_HOME": str(pocket_home)})  # fmt: skip
    partial_files = lambda: list((tmp_path / "hf-home").rglob("*.pocketlm-partial"))  # noqa: E731
    deadline = time.monotonic() + 60
    while not (partial_files() and partial_files()[0].stat().st_size >= 2**20) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    loopback_hub.release_stalls()
    assert child.returncode == exit_codes.ERROR, stderr
    assert "interrupted; what was downloaded is kept" in stderr and "Traceback" not in stderr
    kept = partial_files()[0].stat().st_size
    assert kept >= 2**20

    resumed = pocketlm("pull", f"{GGUF_REPO}:Q4_1", home=pocket_home)
    assert resumed.returncode == 0, resumed.stderr
    assert loopback_hub.transfers_of(STARTER_FILE)[-1].range_start == kept


def test_removing_a_model_whose_files_are_gone_says_so(pocket_home: Path, tmp_path: Path, starter_gguf: Path) -> None:
    import shutil

    copy = tmp_path / "gone-soon.gguf"
    shutil.copyfile(starter_gguf, copy)
    assert pocketlm("import", str(copy), home=pocket_home).returncode == 0
    copy.unlink()
    removed = pocketlm("rm", "-y", "gone-soon", home=pocket_home)
    assert removed.returncode == 0 and "Removed gone-soon from the store; its files were already gone." in removed.stdout


def test_pull_with_output_puts_the_model_there_and_chat_finds_it_by_path(loopback_hub: LoopbackHub, pocket_home: Path, tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    pulled = pocketlm("pull", TINY_CHECKPOINT, "--output", str(target), home=pocket_home)
    assert pulled.returncode == 0, pulled.stderr
    assert (target / "config.json").is_file()
    info = pocketlm("info", str(target), home=pocket_home)
    assert info.returncode == 0 and TINY_CHECKPOINT in info.stdout, info.stdout + info.stderr
    again = pocketlm("pull", TINY_CHECKPOINT, "--output", str(target), home=pocket_home)
    assert_clean_failure(again, "already exists")


def test_info_shows_a_gptq_models_bits_group_size_and_act_order_once_each(pocket_home: Path, tmp_path: Path) -> None:
    from tests.models.test_formats import gptq_checkpoint

    folder = gptq_checkpoint(tmp_path / "tiny-gptq", group_size=64, desc_act=True)
    assert pocketlm("import", str(folder), "--name", "tiny-gptq", home=pocket_home).returncode == 0
    shown = pocketlm("info", "tiny-gptq", home=pocket_home)
    assert shown.returncode == 0, shown.stderr
    labels = [line.split("  ")[0].strip() for line in shown.stdout.splitlines()]
    assert [labels.count(label) for label in ("Bits", "Group size", "Act-order")] == [1, 1, 1], shown.stdout
    rows = {line.split("  ")[0].strip(): line.split("  ", 1)[1].strip() for line in shown.stdout.splitlines() if "  " in line and not line.startswith(" ")}
    assert (rows["Bits"], rows["Group size"], rows["Act-order"]) == ("4", "64", "yes")
