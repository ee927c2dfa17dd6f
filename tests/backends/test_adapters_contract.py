"""What every backend's set_adapters shares, before any engine is involved: a scale that is a number, each adapter
once, and one sentence for an adapter of a format the backend does not take (naming the format it takes). The
backends' own adapter tests check that each of them says it, on a live model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pocketlm.backends.adapter_format import adapter_key, check_adapter_set, require_adapter_format, sniff_adapter_format
from pocketlm.backends.base import AdapterSpec, refuse_repeated_adapters, require_token_count
from pocketlm.models.errors import PocketError
from pocketlm.models.peft_adapter import AdapterError


def peft_folder(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    return path


def mlx_folder(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 2.0}}))
    (path / "adapters.safetensors").write_bytes(b"weights")
    return path


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_a_scale_that_is_not_a_finite_number_is_refused_with_a_sentence(scale: float, tmp_path: Path) -> None:
    with pytest.raises(PocketError, match=r"^style's scale .* is not a finite number\.") as refused:
        AdapterSpec(tmp_path / "style", scale=scale)
    assert refused.value.hint


def test_negative_zero_and_large_scales_are_numbers_like_any_other(tmp_path: Path) -> None:
    assert [AdapterSpec(tmp_path, scale=s).scale for s in (-1.0, 0.0, 3.0)] == [-1.0, 0.0, 3.0]


def test_the_format_is_told_by_the_files(tmp_path: Path) -> None:
    gguf = tmp_path / "style.gguf"
    gguf.write_bytes(b"GGUF")
    config_only = tmp_path / "odd"
    config_only.mkdir()
    (config_only / "adapters.safetensors").write_bytes(b"")  # no config at all: mlx-lm's weights name still says it
    assert sniff_adapter_format(peft_folder(tmp_path / "peft")) == "peft-lora"
    assert sniff_adapter_format(mlx_folder(tmp_path / "mlx")) == "mlx-lora"
    assert sniff_adapter_format(gguf) == "gguf-lora"
    assert sniff_adapter_format(config_only) == "mlx-lora"
    assert sniff_adapter_format(tmp_path / "nothing") is None
    (tmp_path / "notes.txt").write_text("hi")
    assert sniff_adapter_format(tmp_path / "notes.txt") is None


def test_an_adapter_of_another_format_is_refused_naming_the_format_the_backend_takes(tmp_path: Path) -> None:
    peft = peft_folder(tmp_path / "style")
    sentence = r"^style is a PEFT LoRA adapter \(peft-lora\); the mlx backend takes MLX LoRA adapters \(mlx-lora\)\."
    with pytest.raises(AdapterError, match=sentence) as refused:
        require_adapter_format(peft, "style", frozenset({"mlx-lora"}), "mlx")
    assert "pocketlm adapter convert" in refused.value.hint
    mlx = mlx_folder(tmp_path / "tuned")
    sentence = r"^tuned is an MLX LoRA adapter \(mlx-lora\); the llama.cpp backend takes GGUF LoRA adapters \(gguf-lora\)\."
    with pytest.raises(AdapterError, match=sentence):
        require_adapter_format(mlx, "tuned", frozenset({"gguf-lora"}), "llama.cpp")
    require_adapter_format(peft, "style", frozenset({"peft-lora"}), "torch")  # its own format passes


def test_a_missing_or_unknown_adapter_is_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="There is no adapter at"):
        require_adapter_format(tmp_path / "gone", "gone", frozenset({"peft-lora"}), "torch")
    (tmp_path / "empty").mkdir()
    sentence = r"^empty is not a LoRA adapter pocketlm knows; the torch backend takes PEFT LoRA adapters \(peft-lora\)\."
    with pytest.raises(AdapterError, match=sentence):
        require_adapter_format(tmp_path / "empty", "empty", frozenset({"peft-lora"}), "torch")


def test_one_adapter_listed_twice_is_refused_even_by_another_spelling_of_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = peft_folder(tmp_path / "style")
    link = tmp_path / "link"
    link.symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    for other in (folder, Path("style"), link):
        with pytest.raises(AdapterError, match=r"^style is listed twice\.") as refused:
            refuse_repeated_adapters([AdapterSpec(folder, name="style"), AdapterSpec(other, scale=0.5, name="style")])
        assert refused.value.hint == "Give it once, with the scale you want."
    refuse_repeated_adapters([AdapterSpec(folder), AdapterSpec(peft_folder(tmp_path / "other"))])
    with pytest.raises(AdapterError, match="listed twice"):
        check_adapter_set([AdapterSpec(folder), AdapterSpec(link)], frozenset({"peft-lora"}), "torch")


def test_token_counts_outside_the_context_are_refused_with_one_sentence() -> None:
    for tokens in ([], list(range(65))):
        with pytest.raises(PocketError, match=rf"^token_logits takes 1 to 64 tokens \(the loaded context\), not {len(tokens)}\."):
            require_token_count(tokens, 64)
    require_token_count([1], 64)
    require_token_count(list(range(64)), 64)


def test_an_adapter_rewritten_in_place_has_another_key(tmp_path: Path) -> None:
    folder = peft_folder(tmp_path / "style")
    first = adapter_key(folder)
    assert adapter_key(tmp_path / "." / "style") == first
    weights = folder / "adapter_model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"retrain")  # same size: the time tells it apart
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert adapter_key(folder) != first
