"""The conversion job plans its steps from the registered converters, names and places the output (a file or a
folder, in the store's folder or where the user says), checks the disk first, and registers the result."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pocketlm.converters.base import ConversionError, ConvertOptions
from pocketlm.converters.conversion_job import convert_model, plan_conversion
from pocketlm.converters.gguf_quantize import GGUFQuantizer
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.converters.gptq import GPTQConverter, GPTQSettings
from pocketlm.converters.hf_to_gguf import HfToGGUF
from pocketlm.converters.registry import conversion_targets, converter_for, plan_steps
from pocketlm.models.errors import NotEnoughDisk
from pocketlm.models.locations import models_dir
from pocketlm.models.store import LocalModel, ModelStore


@pytest.fixture
def checkpoint(model_store: ModelStore, tiny_llama: Path) -> LocalModel:
    return model_store.register(tiny_llama, source=f"import:{tiny_llama}", name="owner/tiny")


def test_every_format_a_checkpoint_reaches_is_a_target_with_its_label() -> None:
    targets = {target.format: target for target in conversion_targets()}
    assert targets["gguf"].label == "GGUF (llama.cpp)" and targets["gguf"].settings_type is GGUFSettings
    assert targets["gptq"].settings_type is GPTQSettings and targets["gptq"].available
    assert "safetensors" not in targets


def test_the_shortest_chain_of_converters_is_planned() -> None:
    assert plan_steps("safetensors", "gguf") == [HfToGGUF]
    assert plan_steps("safetensors", "gptq") == [GPTQConverter]
    with pytest.raises(ConversionError, match="cannot convert gptq models to gguf") as refused:
        plan_steps("gptq", "gguf")
    assert "gguf" in refused.value.hint and "gptq" in refused.value.hint


def test_a_quantization_adds_the_quantizer_after_the_checkpoint_conversion(model_store: ModelStore, checkpoint: LocalModel) -> None:
    plan = plan_conversion(model_store, checkpoint, "gguf", ConvertOptions(settings=GGUFSettings(quant="q4_k_m")))
    assert plan.steps == (HfToGGUF, GGUFQuantizer)
    assert (plan.name, plan.destination) == ("owner/tiny:Q4_K_M", models_dir() / "owner-tiny-Q4_K_M.gguf")
    plain = plan_conversion(model_store, checkpoint, "gguf", ConvertOptions())
    assert (plain.steps, plain.name) == ((HfToGGUF,), "owner/tiny:F16")  # auto became f16: the checkpoint is float32


def test_a_gguf_is_only_quantized_and_without_a_quant_is_refused(model_store: ModelStore, tiny_f16: Path) -> None:
    gguf = model_store.register(tiny_f16, source="import", name="tiny:F16")
    plan = plan_conversion(model_store, gguf, "gguf", ConvertOptions(settings=GGUFSettings(quant="Q4_0")))
    assert (plan.steps, plan.name) == ((GGUFQuantizer,), "tiny:Q4_0")
    with pytest.raises(ConversionError, match="tiny:F16 is already a GGUF file") as refused:
        plan_conversion(model_store, gguf, "gguf", ConvertOptions())
    assert "--quant Q4_K_M" in refused.value.hint


def test_a_gptq_output_is_a_folder_named_for_its_settings(model_store: ModelStore, checkpoint: LocalModel, tmp_path: Path) -> None:
    settings = GPTQSettings(group_size=32, act_order=True)
    plan = plan_conversion(model_store, checkpoint, "gptq", ConvertOptions(settings=settings))
    assert (plan.steps, plan.name) == ((GPTQConverter,), "owner/tiny:GPTQ-4bit-g32-act-order")
    assert plan.destination == models_dir() / "owner-tiny-GPTQ-4bit-g32-act-order"
    elsewhere = plan_conversion(model_store, checkpoint, "gptq", ConvertOptions(settings=settings), output=tmp_path / "mine")
    assert elsewhere.destination == tmp_path / "mine"


def test_settings_of_another_format_are_refused(model_store: ModelStore, checkpoint: LocalModel) -> None:
    with pytest.raises(ConversionError, match="takes GPTQSettings, not GGUFSettings"):
        plan_conversion(model_store, checkpoint, "gptq", ConvertOptions(settings=GGUFSettings(quant="Q4_0")))
    with pytest.raises(ConversionError, match="not q8_0"):
        plan_conversion(model_store, checkpoint, "gguf", ConvertOptions(settings=GGUFSettings(outtype="q8_0", quant="Q4_0")))


def test_a_file_output_given_a_folder_goes_inside_it_and_is_registered(model_store: ModelStore, checkpoint: LocalModel, tmp_path: Path) -> None:
    chosen = tmp_path / "my-models"
    chosen.mkdir()
    result = convert_model(model_store, checkpoint, "gguf", ConvertOptions(settings=GGUFSettings(quant="Q4_0")), output=chosen)
    assert result.path == chosen / "owner-tiny-Q4_0.gguf" and result.path.is_file()
    assert (result.name, result.parent, result.lineage, result.quantization) == ("owner/tiny:Q4_0", "owner/tiny", "convert f16, quantize Q4_0", "Q4_0")
    assert model_store.get("owner/tiny:Q4_0") == result
    assert sorted(p.name for p in chosen.iterdir()) == ["owner-tiny-Q4_0.gguf"]
    assert list(models_dir().iterdir()) == []  # the f16 step's working folder is gone


def test_a_named_output_file_is_written_there_under_the_name_given(model_store: ModelStore, checkpoint: LocalModel, tmp_path: Path) -> None:
    result = convert_model(model_store, checkpoint, "gguf", ConvertOptions(), name="tiny-f16", output=tmp_path / "out" / "tiny.gguf")
    assert (result.name, result.path, result.lineage) == ("tiny-f16", tmp_path / "out" / "tiny.gguf", "convert f16")


def test_an_output_path_holding_something_else_is_never_replaced(model_store: ModelStore, checkpoint: LocalModel, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(b"the user's own file")
    with pytest.raises(ConversionError, match="already exists; pocketlm does not replace what it did not write"):
        convert_model(model_store, checkpoint, "gguf", ConvertOptions(), output=theirs)
    folder = tmp_path / "their-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="already exists"):
        convert_model(model_store, checkpoint, "gptq", ConvertOptions(), output=folder)
    assert theirs.read_bytes() == b"the user's own file" and (folder / "notes.txt").read_text() == "keep me"


def test_converting_again_to_the_same_name_replaces_that_conversion(model_store: ModelStore, checkpoint: LocalModel, tmp_path: Path) -> None:
    first = convert_model(model_store, checkpoint, "gguf", ConvertOptions(), output=tmp_path / "tiny.gguf")
    again = convert_model(model_store, checkpoint, "gguf", ConvertOptions(), output=tmp_path / "tiny.gguf")
    assert again.path == first.path and [m.name for m in model_store.list()] == ["owner/tiny", "owner/tiny:F16"]


def test_the_disk_check_adds_every_step(model_store: ModelStore, checkpoint: LocalModel) -> None:
    f16 = plan_conversion(model_store, checkpoint, "gguf", ConvertOptions(settings=GGUFSettings(outtype="f16")))
    q8 = plan_conversion(model_store, checkpoint, "gguf", ConvertOptions(settings=GGUFSettings(outtype="f16", quant="Q8_0")))
    parameters = checkpoint.parameter_count
    # The f16 written first stays on disk while the Q8_0 is written from it: both count.
    assert q8.needed_bytes - f16.needed_bytes >= GGUFQuantizer.expected_size(parameters, GGUFSettings(quant="Q8_0"))
    assert f16.needed_bytes >= HfToGGUF.expected_size(parameters, GGUFSettings(outtype="f16"))


def test_a_conversion_no_disk_can_hold_is_refused_before_any_work(model_store: ModelStore, checkpoint: LocalModel) -> None:
    # 10^17 weights: 200 petabytes at f16, more than any disk this runs on, whatever it has free.
    huge = replace(checkpoint, parameter_count=10**17)
    with pytest.raises(NotEnoughDisk, match=r"Converting owner/tiny needs about \d+\.\d GiB on .*, but only \d+\.\d GiB is free"):
        convert_model(model_store, huge, "gguf", ConvertOptions(settings=GGUFSettings(quant="Q8_0")))
    assert list(models_dir().iterdir()) == []


@pytest.mark.parametrize("name", ["???", "..", ".", ".hidden", "/"])
def test_a_name_that_cannot_name_a_file_in_the_models_folder_is_refused(model_store: ModelStore, checkpoint: LocalModel, name: str) -> None:
    (models_dir() / "other-model.gguf").write_bytes(b"another model's file")
    with pytest.raises(ConversionError, match="cannot name the output's file or folder"):
        convert_model(model_store, checkpoint, "gptq", ConvertOptions(), name=name)
    with pytest.raises(ConversionError, match="cannot name the output's file or folder"):
        convert_model(model_store, checkpoint, "gguf", ConvertOptions(), name=name)
    assert [p.name for p in models_dir().iterdir()] == ["other-model.gguf"]


def test_a_folder_output_never_replaces_the_models_folder_or_a_folder_above_it(pocket_home: Path) -> None:
    from pocketlm.converters.base import atomic_output

    (models_dir() / "other-model.gguf").write_bytes(b"another model's file")
    for destination in (models_dir(), models_dir().parent):
        with pytest.raises(ConversionError, match="is not a model's own folder"):
            with atomic_output(destination, folder=True) as temporary:
                (temporary / "config.json").write_text("{}")
    assert [p.name for p in models_dir().iterdir()] == ["other-model.gguf"]
    assert not [p.name for p in pocket_home.iterdir() if p.name.endswith((".partial", ".aside"))], "nothing moved aside or left half made"


def test_converting_onto_the_source_is_refused_and_the_source_stays(model_store: ModelStore, tiny_llama: Path, tmp_path: Path) -> None:
    mine = Path(shutil.copytree(tiny_llama, tmp_path / "mine"))
    source = model_store.register(mine, source=f"import:{mine}", name="mine")
    before = sorted(p.name for p in mine.iterdir())
    for output in (mine, mine / "inside", tmp_path):
        with pytest.raises(ConversionError, match="is where mine is; converting onto it would destroy the source"):
            convert_model(model_store, source, "gptq", ConvertOptions(), name="mine", output=output)
    assert sorted(p.name for p in mine.iterdir()) == before and sorted(model_store.get("mine").files) == sorted(source.files)  # type: ignore[union-attr]


def test_quantizing_a_gguf_onto_itself_is_refused_and_the_file_stays(model_store: ModelStore, tiny_f16: Path) -> None:
    source = model_store.register(tiny_f16, source=f"import:{tiny_f16}", name="x")
    content = tiny_f16.read_bytes()
    with pytest.raises(ConversionError, match="converting onto it would destroy the source"):
        convert_model(model_store, source, "gguf", ConvertOptions(settings=GGUFSettings(quant="Q4_0")), name="x", output=tiny_f16)
    assert tiny_f16.read_bytes() == content


def test_only_a_registered_earlier_conversion_is_replaced_not_an_import_of_the_same_name(model_store: ModelStore, checkpoint: LocalModel,
                                                                                         tiny_f16: Path, tmp_path: Path) -> None:  # fmt: skip
    imported = model_store.register(tiny_f16, source=f"import:{tiny_f16}", name="owner/tiny:F16")
    content = tiny_f16.read_bytes()
    with pytest.raises(ConversionError, match="already exists; pocketlm does not replace what it did not write"):
        convert_model(model_store, checkpoint, "gguf", ConvertOptions(), output=tiny_f16)
    assert tiny_f16.read_bytes() == content and model_store.get("owner/tiny:F16").path == imported.path  # type: ignore[union-attr]


def test_an_uninstalled_target_is_refused_with_the_registry_sentence() -> None:
    from pocketlm.converters.registry import ConversionTarget, ConverterUnavailable, refuse_unavailable

    target = ConversionTarget("mlx", "MLX (Apple silicon)", "", False, "pip install 'pocketlm[mlx]'", GGUFSettings)
    with pytest.raises(ConverterUnavailable) as refused:
        refuse_unavailable(target)
    assert (refused.value.message, refused.value.hint) == ("Converting to MLX (Apple silicon) needs libraries that are not installed.", "pip install 'pocketlm[mlx]'")
    refuse_unavailable(replace(target, available=True))


def test_the_registry_finds_the_converter_for_one_step(model_store: ModelStore) -> None:
    assert converter_for("gguf", "gguf") is GGUFQuantizer
    with pytest.raises(ConversionError, match="cannot convert lora models to gguf"):
        converter_for("lora", "gguf")
