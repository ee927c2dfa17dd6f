"""A checkpoint whose config.json or safetensors headers do not add up is refused with one sentence before anything is
written: no ZeroDivisionError, no loop over a billion layers, no ValueError traceback, no half-written GGUF."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pocketlm.converters.base import ConversionError, ConvertOptions
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.converters.hf_to_gguf import HfToGGUF
from pocketlm.models.errors import ModelFileError, PocketError
from pocketlm.models.progress import ignore_progress
from pocketlm.models.store import ModelStore
from tests.app.test_cli import assert_clean_failure, pocketlm
from tests.converters.tiny_models import edit_config, rewrite_safetensors_header


@pytest.fixture
def checkpoint(tiny_llama: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "checkpoint"))


def refused(folder: Path, tmp_path: Path, error: type[PocketError], match: str) -> PocketError:
    """Convert `folder` and expect `error` with `match` in its sentence, and nothing written where the output goes."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(error, match=match) as raised:
        HfToGGUF().convert(folder, out / "model.gguf", ConvertOptions(settings=GGUFSettings(outtype="f32")), ignore_progress)
    assert list(out.iterdir()) == []
    assert raised.value.hint, "every refusal says what to do"
    return raised.value


def test_the_unchanged_tiny_checkpoint_converts(checkpoint: Path, tmp_path: Path) -> None:
    # The control for every refusal below: the same checkpoint, untouched, is accepted.
    result = HfToGGUF().convert(checkpoint, tmp_path / "model.gguf", ConvertOptions(settings=GGUFSettings(outtype="f32")), ignore_progress)
    assert result.path.stat().st_size > 0


def test_zero_attention_heads_is_refused_with_a_sentence(checkpoint: Path, tmp_path: Path) -> None:
    edit_config(checkpoint, num_attention_heads=0)
    refused(checkpoint, tmp_path, ConversionError, "config.json says num_attention_heads is 0")


def test_heads_not_dividing_the_hidden_size_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    edit_config(checkpoint, num_attention_heads=6, num_key_value_heads=2, head_dim=None)
    refused(checkpoint, tmp_path, ConversionError, r"num_attention_heads \(6\) does not divide hidden_size \(64\)")


def test_an_explicit_head_dim_that_the_weights_do_not_have_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    # With head_dim given, 6 heads need not divide 64; but then q_proj must have 6 × 16 rows, and it has 64.
    edit_config(checkpoint, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    refused(checkpoint, tmp_path, ConversionError, r"q_proj.weight has 64 rows, but config.json's num_attention_heads × head_dim makes 96")


def test_kv_heads_not_dividing_the_heads_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    edit_config(checkpoint, num_key_value_heads=3)
    refused(checkpoint, tmp_path, ConversionError, r"num_key_value_heads \(3\) does not divide num_attention_heads \(4\)")


@pytest.mark.timeout(120)  # generous: the refusal takes milliseconds; a loop over the layers would take hours
def test_a_billion_layers_is_refused_at_once(checkpoint: Path, tmp_path: Path) -> None:
    edit_config(checkpoint, num_hidden_layers=1_000_000_000)
    refused(checkpoint, tmp_path, ConversionError, "num_hidden_layers is 1000000000; pocketlm converts models whose num_hidden_layers is 1 to 1024")


def test_more_layers_than_the_weights_hold_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    edit_config(checkpoint, num_hidden_layers=3)
    refused(checkpoint, tmp_path, ConversionError, r"says the model has 3 layers, but the weights hold 2 \(numbered 0 to 1\)")


def test_a_vocabulary_size_the_embedding_does_not_have_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    edit_config(checkpoint, vocab_size=1000)
    refused(checkpoint, tmp_path, ConversionError, r"(embed_tokens|lm_head).weight has 600 rows, but config.json's vocab_size makes 1000")


def test_an_absurd_vocabulary_size_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    edit_config(checkpoint, vocab_size=2**40)
    refused(checkpoint, tmp_path, ConversionError, "vocab_size is 1099511627776")


def test_a_truncated_safetensors_file_is_a_sentence(checkpoint: Path, tmp_path: Path) -> None:
    weights = checkpoint / "model.safetensors"
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size - 3)  # three bytes short of what the header says
    refused(checkpoint, tmp_path, ModelFileError, "model.safetensors is truncated: tensor .* ends at byte")


def test_a_tensor_whose_byte_range_does_not_match_its_shape_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    def shorten_a_norm(header: dict) -> None:  # type: ignore[type-arg]
        entry = header["model.norm.weight"]
        entry["data_offsets"][1] -= 4  # 64 float32 values in 252 bytes: one value short

    rewrite_safetensors_header(checkpoint / "model.safetensors", shorten_a_norm)
    refused(checkpoint, tmp_path, ModelFileError, r"tensor 'model.norm.weight' \(F32, shape \(64,\)\) should take 256 bytes")


def test_a_tensor_that_starts_after_it_ends_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    def reverse_a_range(header: dict) -> None:  # type: ignore[type-arg]
        entry = header["model.norm.weight"]
        entry["data_offsets"] = entry["data_offsets"][::-1]

    rewrite_safetensors_header(checkpoint / "model.safetensors", reverse_a_range)
    refused(checkpoint, tmp_path, ModelFileError, "model.norm.weight")


def test_an_unknown_dtype_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    def invent_a_dtype(header: dict) -> None:  # type: ignore[type-arg]
        header["model.norm.weight"]["dtype"] = "Q4"

    rewrite_safetensors_header(checkpoint / "model.safetensors", invent_a_dtype)
    refused(checkpoint, tmp_path, ModelFileError, "stores tensor 'model.norm.weight' as 'Q4', a dtype safetensors does not define")


@pytest.mark.timeout(240)
def test_the_cli_refuses_a_billion_layers_and_zero_heads_with_a_sentence(checkpoint: Path, pocket_home: Path) -> None:
    edit_config(checkpoint, num_hidden_layers=1_000_000_000)
    assert_clean_failure(pocketlm("convert", str(checkpoint), home=pocket_home), "num_hidden_layers is 1000000000")
    edit_config(checkpoint, num_hidden_layers=2, num_attention_heads=0)
    assert_clean_failure(pocketlm("convert", str(checkpoint), home=pocket_home), "num_attention_heads is 0")
    models = pocket_home / "models"
    assert [p.name for p in models.iterdir()] == []


def test_an_unforeseen_failure_is_one_sentence_and_the_traceback_waits_for_debug(checkpoint: Path, pocket_home: Path) -> None:
    # Nothing checks rms_norm_eps ahead: float("tiny") fails inside the writer, where no PocketError is raised.
    edit_config(checkpoint, rms_norm_eps="tiny")
    result = pocketlm("convert", str(checkpoint), home=pocket_home)
    assert_clean_failure(result, "Error: pocketlm convert failed unexpectedly: ValueError: could not convert string to float: 'tiny'")
    assert "pocketlm --debug convert" in result.stderr
    assert [p.name for p in (pocket_home / "models").iterdir()] == []
    debug = pocketlm("--debug", "convert", str(checkpoint), home=pocket_home)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "ValueError" in debug.stderr


def test_click_usage_errors_still_pass_through(pocket_home: Path) -> None:
    result = pocketlm("convert", home=pocket_home)
    assert result.returncode == 2
    assert "Missing argument 'MODEL'" in result.stderr
    assert "failed unexpectedly" not in result.stderr


async def test_the_app_shows_an_unforeseen_conversion_failure_as_a_notification(store_with_starter: ModelStore, checkpoint: Path,
                                                                                pocket_home: Path) -> None:  # fmt: skip
    from textual.widgets import Label

    from pocketlm.app.pocket_app import PocketApp
    from tests.app.test_chat_app import SIZE, wait_for
    from tests.app.test_convert_screen import open_convert_screen

    edit_config(checkpoint, rms_norm_eps="tiny")
    store_with_starter.register(checkpoint, source="import", name="broken-checkpoint")
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_convert_screen(pilot, "broken-checkpoint")
        await pilot.click("#convert-start")
        await wait_for(pilot, lambda: not screen.running, timeout=120)
        shown = str(screen.query_one("#convert-label", Label).render())
        assert "The conversion failed unexpectedly: ValueError: could not convert string to float: 'tiny'" in shown
        assert any("failed unexpectedly" in str(n.message) for n in app._notifications)
        assert app.is_running and app.screen is screen
    assert [p.name for p in (pocket_home / "models").iterdir()] == []


def test_an_importance_matrix_is_never_computed_from_pickle_weights(checkpoint: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from pocketlm.converters.importance_matrix import compute_imatrix

    # The same weights as a pickle only: transformers would load them, unless told to take safetensors alone.
    torch.save(load_file(checkpoint / "model.safetensors"), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="No safetensors weights to compute the importance matrix from") as refused:
        compute_imatrix(checkpoint, "The quick brown fox jumps over the lazy dog. " * 8)
    assert "pickle weights (*.bin) are never loaded" in refused.value.hint
