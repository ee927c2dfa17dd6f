"""No native crash reaches the user: a damaged GGUF gives a sentence or a working load, never a dead process.

pocketlm refuses the damage known to abort llama.cpp before it opens a file (models/gguf_checks.py), and opens a
file it has never loaded in a child process first (backends/llamacpp_probe.py). The property tests below damage a
tiny model's header, metadata and vocabulary at random (seeded, so CI is reproducible) and load each copy through the
backend and through the CLI.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from gguf import GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketlm.backends.base import LoadOptions
from pocketlm.backends.llamacpp import LlamaCppBackend
from pocketlm.backends.llamacpp_probe import PROBE_MODULE_ENV, ProbeResult, engine_key, ensure_llama_cpp_survives, run_probe
from pocketlm.models.errors import ModelFileError, NotEnoughMemory, PocketError
from pocketlm.models.locations import database_path
from pocketlm.models.verified_files import FileIdentity, VerifiedFiles
from tests.backends.tiny_gguf import tiny_llama_gguf_path, write_tiny_llama_gguf
from tests.fixtures import pocketlm_executable

REPO = Path(__file__).resolve().parent.parent.parent
DAMAGE_SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def header_layout(data: bytes) -> tuple[int, list[int], list[int]]:
    """Where the tiny file's header ends, where its counts and lengths lie (uint64s), and its tokens' text bytes."""
    counts: list[int] = [8, 16]
    token_bytes: list[int] = []
    at = 24
    for _ in range(struct.unpack_from("<Q", data, 16)[0]):
        counts.append(at)
        key_length = struct.unpack_from("<Q", data, at)[0]
        key, at = data[at + 8 : at + 8 + key_length], at + 8 + key_length
        value_type, at = struct.unpack_from("<I", data, at)[0], at + 4
        if value_type == 8:
            counts.append(at)
            at += 8 + struct.unpack_from("<Q", data, at)[0]
        elif value_type == 9:
            item_type, count = struct.unpack_from("<IQ", data, at)
            counts.append(at + 4)
            at += 12
            if item_type == 8:
                for _ in range(count):
                    counts.append(at)
                    length = struct.unpack_from("<Q", data, at)[0]
                    if key == b"tokenizer.ggml.tokens":
                        token_bytes += range(at + 8, at + 8 + length)
                    at += 8 + length
            else:
                at += count * _SCALAR_SIZES[item_type]
        else:
            at += _SCALAR_SIZES[value_type]
    for _ in range(struct.unpack_from("<Q", data, 8)[0]):
        counts.append(at)
        at += 8 + struct.unpack_from("<Q", data, at)[0]
        n_dims = struct.unpack_from("<I", data, at)[0]
        counts += [at + 4 + 8 * dim for dim in range(n_dims)] + [at + 8 + 8 * n_dims]
        at += 4 + 8 * n_dims + 4 + 8
    return at, counts, token_bytes


@pytest.fixture(scope="module")
def tiny_gguf() -> Path:
    return tiny_llama_gguf_path()


@st.composite
def damaged_copies(draw: st.DrawFn, original: bytes) -> tuple[str, bytes]:
    """One damage to `original`: a bit flip or byte overwrite in the header, metadata or vocabulary, a truncation,
    or an absurd value in one of the header's counts and lengths."""
    header_end, counts, token_bytes = header_layout(original)
    data = bytearray(original)
    # Token flips twice as often: in a byte-level vocabulary most of them make one token equal another, the damage
    # that kills llama.cpp.
    kind = draw(st.sampled_from(["flip", "flip-token", "flip-token", "overwrite", "truncate", "absurd-count"]))
    if kind == "truncate":
        cut = draw(st.one_of(st.integers(0, header_end), st.integers(header_end, len(data) - 1)))
        return f"truncated to {cut} bytes", bytes(data[:cut])
    if kind == "absurd-count":
        at = draw(st.sampled_from(counts))
        value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32, 2**32 + 1, 2**63, 2**64 - 1, 10**6, 10**12]))
        struct.pack_into("<Q", data, at, value)
        return f"{value} written at byte {at}", bytes(data)
    if kind == "overwrite":
        at = draw(st.integers(0, header_end - 1))
        junk = draw(st.binary(min_size=1, max_size=8))
        data[at : at + len(junk)] = junk
        return f"{junk.hex()} written at byte {at}", bytes(data[: len(original)])
    at = draw(st.sampled_from(token_bytes) if kind == "flip-token" else st.integers(0, header_end - 1))
    bit = draw(st.integers(0, 7))
    data[at] ^= 1 << bit
    return f"bit {bit} of byte {at} flipped", bytes(data)


class LoadWorker:
    """tests/backends/load_worker.py, restarted if it dies; `load` answers (outcome, detail) or ("died", returncode)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.process: subprocess.Popen[str] | None = None

    def load(self, path: Path) -> tuple[str, str]:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.backends.load_worker"], cwd=REPO, text=True, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "POCKETLM_HOME": str(self.home)},
            )  # fmt: skip
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            return "died", str(self.process.wait())
        outcome, _, detail = answer.rstrip("\n").partition("\t")
        return outcome, detail

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            assert self.process.stdin
            self.process.stdin.close()
            self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def load_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadWorker]:
    worker = LoadWorker(tmp_path_factory.mktemp("worker-home"))
    yield worker
    worker.close()


_names = itertools.count()


def write_copy(folder: Path, data: bytes) -> Path:
    # A fresh name each time: a file rewritten in place within one clock tick could keep its size, mtime and inode.
    path = folder / f"damaged-{next(_names)}.gguf"
    path.write_bytes(data)
    return path


def assert_sentence(sentence: str, path: Path) -> None:
    assert path.name in sentence or str(path) in sentence, sentence
    assert "Traceback" not in sentence


def test_the_tiny_model_loads_and_decodes(tiny_gguf: Path, load_worker: LoadWorker) -> None:
    assert load_worker.load(tiny_gguf) == ("loaded", "")


@DAMAGE_SETTINGS
@given(data=st.data())
def test_a_damaged_gguf_gives_the_backend_a_sentence_or_a_working_model(
    tiny_gguf: Path, load_worker: LoadWorker, tmp_path: Path, data: st.DataObject
) -> None:
    what, damaged = data.draw(damaged_copies(tiny_gguf.read_bytes()))
    path = write_copy(tmp_path, damaged)
    outcome, detail = load_worker.load(path)
    assert outcome in ("loaded", "sentence"), f"{what}: the loading process {outcome} ({detail})"
    if outcome == "sentence":
        assert_sentence(detail, path)
    path.unlink()


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_gguf_gives_the_cli_a_sentence_or_a_reply(tiny_gguf: Path, tmp_path: Path, data: st.DataObject) -> None:
    what, damaged = data.draw(damaged_copies(tiny_gguf.read_bytes()))
    path = write_copy(tmp_path, damaged)
    result = subprocess.run(
        [pocketlm_executable(), "run", str(path), "hi", "--max-tokens", "2"], capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL, env={**os.environ, "POCKETLM_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert result.returncode in (0, 1), f"{what}: exit status {result.returncode}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, f"{what}:\n{result.stderr[-2000:]}"
    if result.returncode == 1:
        assert path.name in result.stderr, result.stderr
    path.unlink()


def test_a_file_that_aborts_llama_cpp_at_its_first_token_is_caught_by_the_probe(tmp_path: Path) -> None:
    """A NaN norm epsilon loads, then fails ggml's `eps >= 0` assertion on the first decode (SIGABRT, found by
    trying); gguf_checks refuses it now, so the probe is run on it directly."""
    path = write_tiny_llama_gguf(
        tmp_path / "nan-epsilon.gguf",
        lambda writer: writer.add_key_value("llama.attention.layer_norm_rms_epsilon", float("nan"), GGUFValueType.FLOAT32),
    )
    with pytest.raises(ModelFileError) as crashed:
        run_probe(path, gpu_layers=0, threads=1)
    assert str(crashed.value).startswith("llama.cpp crashed while opening nan-epsilon.gguf (signal SIGABRT: ")
    assert "GGML_ASSERT(eps >= 0.0f) failed); the file is probably damaged." in str(crashed.value)


@pytest.fixture
def probe_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file the stand-in child appends a line to on every run (see probe_seams.py)."""
    log = tmp_path / "probe-runs.log"
    log.touch()
    monkeypatch.setenv("POCKETLM_TEST_PROBE_LOG", str(log))
    return log


def play_child(monkeypatch: pytest.MonkeyPatch, role: str) -> None:
    """Run tests/backends/probe_seams.py as the probe's child, in `role`."""
    monkeypatch.setenv(PROBE_MODULE_ENV, "tests.backends.probe_seams")
    monkeypatch.setenv("POCKETLM_TEST_PROBE_ROLE", role)
    monkeypatch.setenv("PYTHONPATH", str(REPO))


def test_a_child_that_dies_by_a_signal_becomes_one_sentence(tiny_gguf: Path, pocket_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    play_child(monkeypatch, "abort")
    with pytest.raises(ModelFileError) as crashed:
        LlamaCppBackend().load(tiny_gguf, LoadOptions(context_length=64))
    assert str(crashed.value) == (
        f"llama.cpp crashed while opening {tiny_gguf.name} (signal SIGABRT: llama-vocab.cpp:2544: GGML_ASSERT(made-up test "
        "failure) failed); the file is probably damaged. Download or convert the model again."
    )


def test_a_child_killed_by_the_out_of_memory_killer_blames_memory_not_the_file(
    tiny_gguf: Path, pocket_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    play_child(monkeypatch, "killed")
    with pytest.raises(NotEnoughMemory) as killed:
        LlamaCppBackend().load(tiny_gguf, LoadOptions(context_length=64))
    assert killed.value.message == f"llama.cpp was killed while opening {tiny_gguf.name}, probably for lack of memory."
    assert killed.value.hint == "Close other programs, or choose a smaller model or context (--ctx)."


def test_a_child_that_runs_out_of_gpu_memory_blames_memory_and_suggests_fewer_gpu_layers(
    tiny_gguf: Path, pocket_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    play_child(monkeypatch, "cuda-oom")
    with pytest.raises(NotEnoughMemory) as full:
        run_probe(tiny_gguf, gpu_layers=-1, threads=1)
    assert full.value.message == f"llama.cpp ran out of memory while opening {tiny_gguf.name} (CUDA error: out of memory)."
    assert "fewer layers (--gpu-layers)" in full.value.hint
    assert not isinstance(full.value, ModelFileError)


def test_a_probe_that_takes_too_long_is_stopped_without_blaming_the_file(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    play_child(monkeypatch, "hang")
    with pytest.raises(PocketError) as slow:
        run_probe(tiny_gguf, gpu_layers=0, threads=1, timeout_s=1)
    assert not isinstance(slow.value, ModelFileError)
    assert str(slow.value) == (
        f"Opening {tiny_gguf.name} with llama.cpp took longer than 1 s, so it was stopped. The disk may be slow or busy; try again."
    )


def test_a_probe_that_cannot_run_lets_the_load_go_ahead_and_remembers_nothing(
    tiny_gguf: Path, pocket_home: Path, probe_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    play_child(monkeypatch, "broken")
    for runs in (1, 2):
        LlamaCppBackend().load(tiny_gguf, LoadOptions(context_length=64)).close()
        assert len(probe_log.read_text().splitlines()) == runs, "a probe that did not run vouches for nothing"


def test_a_python_module_in_the_working_folder_does_not_reach_the_probe(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: `python -m` put the working folder first on sys.path, so the child imported ./numpy.py."""
    (tmp_path / "numpy.py").write_text("raise ImportError('the numpy.py in the working folder was imported')\n")
    (tmp_path / "json.py").write_text("raise ImportError('the json.py in the working folder was imported')\n")
    monkeypatch.chdir(tmp_path)
    assert run_probe(tiny_gguf, gpu_layers=0, threads=1) is ProbeResult.OPENED


def test_a_file_that_loaded_once_is_not_probed_again_until_it_changes(
    tiny_gguf: Path, pocket_home: Path, tmp_path: Path, probe_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    play_child(monkeypatch, "count")
    outside_the_store = shutil.copyfile(tiny_gguf, tmp_path / "elsewhere.gguf")

    def probe_runs_after_load(path: Path, gpu_layers: int = 0) -> int:
        LlamaCppBackend().load(path, LoadOptions(context_length=64, gpu_layers=gpu_layers)).close()
        return len(probe_log.read_text().splitlines())

    assert probe_runs_after_load(outside_the_store) == 1
    assert probe_runs_after_load(outside_the_store) == 1, "an unchanged file that loaded is not probed again"
    os.utime(outside_the_store, ns=(0, 10**18))
    assert probe_runs_after_load(outside_the_store) == 2, "a file whose mtime changed is probed again"
    replacement = shutil.copyfile(tiny_gguf, tmp_path / "replacement.gguf")
    os.utime(replacement, ns=(0, 10**18))
    replacement.replace(outside_the_store)  # same path, size and mtime; another inode
    assert probe_runs_after_load(outside_the_store) == 3, "a file replaced by another is probed again"
    assert probe_runs_after_load(outside_the_store, gpu_layers=1) == 4, "a file verified on the CPU only is probed for a GPU"
    assert probe_runs_after_load(outside_the_store, gpu_layers=-1) == 4, "another number of GPU layers is not probed again"
    assert probe_runs_after_load(outside_the_store) == 4, "the CPU verification still holds"


def test_a_file_verified_by_another_llama_cpp_is_probed_again(
    tiny_gguf: Path, pocket_home: Path, probe_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    play_child(monkeypatch, "count")
    verified = VerifiedFiles(database_path())
    verified.remember(FileIdentity.of(tiny_gguf), engine_key(0, llama_cpp_version="0.2.90"))
    verified.close()
    LlamaCppBackend().load(tiny_gguf, LoadOptions(context_length=64)).close()
    assert len(probe_log.read_text().splitlines()) == 1


def test_an_unusable_verified_files_database_costs_a_probe_not_the_load(
    tiny_gguf: Path, pocket_home: Path, probe_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database_path().write_bytes(b"not an SQLite database, e.g. one a full disk cut short" * 100)
    play_child(monkeypatch, "count")
    for runs in (1, 2):
        LlamaCppBackend().load(tiny_gguf, LoadOptions(context_length=64)).close()
        assert len(probe_log.read_text().splitlines()) == runs, "nothing could be remembered, so it is probed again"


def test_a_file_that_vanished_before_the_probe_is_left_to_the_load_to_report(tmp_path: Path, pocket_home: Path) -> None:
    ensure_llama_cpp_survives(tmp_path / "gone.gguf", gpu_layers=0, threads=1)


def test_the_probe_catches_only_crashes_not_python_errors(tmp_path: Path, pocket_home: Path) -> None:
    """A file llama.cpp refuses politely reaches the backend's own error handling, as before the probe."""
    path = write_tiny_llama_gguf(tmp_path / "no-heads.gguf", lambda writer: writer.add_key_value("llama.attention.head_count", 0, GGUFValueType.UINT32))
    assert run_probe(path, gpu_layers=0, threads=1) is ProbeResult.REFUSED
    with pytest.raises(ModelFileError, match="llama.cpp could not load no-heads.gguf"):
        LlamaCppBackend().load(path, LoadOptions(context_length=64))


def flip_one_starter_token_into_another(starter: bytes) -> bytes:
    """The issue's file: one bit flipped in one vocabulary token, making it equal another ("()" becomes "))")."""
    key = b"tokenizer.ggml.tokens"
    at = starter.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4 + 8  # value type, item type, count
    tokens: dict[bytes, int] = {}
    positions = []
    for index in range(struct.unpack_from("<Q", starter, at - 8)[0]):
        length = struct.unpack_from("<Q", starter, at)[0]
        token = starter[at + 8 : at + 8 + length]
        tokens.setdefault(token, index)
        positions.append((at + 8, token))
        at += 8 + length
    for start, token in positions[1000:]:
        for offset, bit in itertools.product(range(len(token)), range(8)):
            flipped = bytearray(token)
            flipped[offset] ^= 1 << bit
            if bytes(flipped) in tokens:
                damaged = bytearray(starter)
                damaged[start + offset] ^= 1 << bit
                return bytes(damaged)
    raise AssertionError("no single bit flip turns one starter token into another")


@pytest.mark.slow
def test_the_starter_with_one_token_flipped_into_another_is_refused_not_fatal(starter_gguf: Path, pocket_home: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "starter-duplicate-token.gguf"
    damaged.write_bytes(flip_one_starter_token_into_another(starter_gguf.read_bytes()))
    bare = subprocess.run(
        [sys.executable, "-c", f"import llama_cpp; llama_cpp.Llama(model_path={str(damaged)!r}, verbose=False)"],
        capture_output=True, timeout=300, env={**os.environ, "GGML_NO_BACKTRACE": "1"},
    )  # fmt: skip
    assert bare.returncode == -signal.SIGABRT, "llama.cpp itself aborts on this file: the reason for the check"
    result = subprocess.run(
        [pocketlm_executable(), "run", str(damaged), "hi", "--max-tokens", "2"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "POCKETLM_HOME": str(pocket_home)},
    )  # fmt: skip
    assert result.returncode == 1
    assert "starter-duplicate-token.gguf is corrupted: vocabulary tokens 1000 and 1292 are both '))'." in result.stderr
    assert "Traceback" not in result.stderr
