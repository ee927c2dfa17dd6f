"""`pocketlm verify` and the verification after `convert`, on the real starter model: its HF checkpoint is the
reference, a faithful f16 GGUF passes, GGUFs broken on purpose (written with the gguf library from the f16) are flagged
in red with what to do, and whatever stops a verification after a conversion is one line, never a failed conversion."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pocketlm.app.cli import cli
from pocketlm.app.verification import scoring_options, verify_after_convert, verify_model
from pocketlm.backends.base import LoadOptions
from pocketlm.models.store import ModelStore

REFERENCE = "smol"  # the HF checkpoint, imported
F16 = "smol:F16"


def rewritten_gguf(source: Path, destination: Path, swap: list[tuple[str, str]] = [],  # noqa: B006 - read only
                   fields: dict[str, Callable[[object], object]] = {}) -> Path:  # noqa: B006  # fmt: skip
    """A copy of `source` with the data of each pair of tensors in `swap` exchanged and each field in `fields` mapped."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(destination, arch=reader.fields[gguf.Keys.General.ARCHITECTURE].contents(), endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        value = fields[field.name](field.contents()) if field.name in fields else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
    data_of = {tensor.name: tensor.data for tensor in reader.tensors}
    exchanged = dict(swap) | {second: first for first, second in swap}
    for tensor in reader.tensors:  # each pair has one shape, so the tensor infos stay as they are
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(data_of[exchanged.get(tensor.name, tensor.name)], tensor_endianess=reader.endianess)
    writer.close()
    return destination


def exchanged_tokens(first: str, second: str) -> Callable[[object], object]:
    def exchange(tokens: object) -> object:
        tokens = list(tokens)  # type: ignore[call-overload]
        i, j = tokens.index(first), tokens.index(second)
        tokens[i], tokens[j] = tokens[j], tokens[i]
        return tokens

    return exchange


@pytest.fixture(scope="session")
def broken_ggufs(converted_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The f16 GGUF broken five ways: layers 0 and 1 with each other's attention weights; layers 3 and 20 with each
    other's down projection (damage as mild as a Q2_K's, which a float conversion must never show); the token list
    with " the" and " a" exchanged; llama.cpp's default pre-tokenizer instead of SmolLM's; and Llama 3's, which splits
    prose the same and only the tokenizer probe's numbers, contractions and spaces differently."""
    folder = tmp_path_factory.mktemp("broken")
    attention = [(f"blk.0.{name}.weight", f"blk.1.{name}.weight") for name in ("attn_q", "attn_k", "attn_v", "attn_output")]
    return {
        "swapped-attention": rewritten_gguf(converted_f16, folder / "swapped-attention.gguf", swap=attention),
        "swapped-down-proj": rewritten_gguf(converted_f16, folder / "swapped-down-proj.gguf", swap=[("blk.3.ffn_down.weight", "blk.20.ffn_down.weight")]),
        "swapped-tokens": rewritten_gguf(converted_f16, folder / "swapped-tokens.gguf", fields={"tokenizer.ggml.tokens": exchanged_tokens("Ġthe", "Ġa")}),
        "default-pre": rewritten_gguf(converted_f16, folder / "default-pre.gguf", fields={"tokenizer.ggml.pre": lambda _: "default"}),
        "llama-bpe-pre": rewritten_gguf(converted_f16, folder / "llama-bpe-pre.gguf", fields={"tokenizer.ggml.pre": lambda _: "llama-bpe"}),
    }


@pytest.fixture
def store(model_store: ModelStore, starter_checkpoint: Path, converted_f16: Path) -> ModelStore:
    """The checkpoint imported as REFERENCE and the session's f16 GGUF registered as its conversion (not owned: no test
    may delete the session's files)."""
    model_store.register(starter_checkpoint, source=f"import:{starter_checkpoint}", name=REFERENCE)
    model_store.register(converted_f16, source="convert", name=F16, parent=REFERENCE, lineage="convert f16")
    return model_store


def pocketlm(*args: str, color: bool = False) -> Result:
    return CliRunner().invoke(cli, list(args), color=color)


def test_a_faithful_f16_conversion_passes_with_identical_tokens_and_the_verdict_is_kept(store: ModelStore) -> None:
    result = pocketlm("verify", F16)
    assert result.exit_code == 0, result.output
    assert f"{F16}: faithful against {REFERENCE}" in result.output and "tokens identical" in result.output
    record = store.verification_of(F16)
    assert record is not None and (record.level, record.reference, record.tokens_identical, record.text) == ("faithful", REFERENCE, True, "built-in")
    # Properties, not figures: a float16 copy agrees almost everywhere and hardly moves the distribution.
    assert record.top1_agreement > 0.95 and 0 <= record.mean_kld < 0.01 and abs(record.perplexity_change) < 0.01
    assert record.scored_tokens > 400  # the built-in text is 433 tokens of this tokenizer
    info = pocketlm("info", F16)
    assert re.search(r"Verified +faithful, tokens identical, top-1 .* \(against smol, on the built-in text\)\.", info.output), info.output


@pytest.mark.parametrize("breakage", ["swapped-attention", "swapped-down-proj", "swapped-tokens", "default-pre", "llama-bpe-pre"])
def test_a_broken_gguf_is_flagged_broken_with_exit_1_and_shown_in_red_with_advice(store: ModelStore, broken_ggufs: dict[str, Path],
                                                                                  breakage: str) -> None:  # fmt: skip
    name = f"smol:{breakage}"
    store.register(broken_ggufs[breakage], source="convert", name=name, parent=REFERENCE, lineage="convert f16")
    result = pocketlm("verify", name)
    assert result.exit_code == 1, result.output
    assert f"{name}: broken against {REFERENCE}" in result.output and "Traceback" not in result.output
    record = store.verification_of(name)
    assert record is not None and record.level == "broken" and record.advice
    if breakage.startswith("swapped-") and breakage != "swapped-tokens":  # the weights are wrong, the tokenizer is not
        assert record.tokens_identical and "predicts" in record.advice
    else:  # the weights are right, the tokenizer is not: where the ids part is what the user needs
        assert not record.tokens_identical and "for the reference but" in record.advice
    info = pocketlm("info", name, color=True)
    verified = next(line for line in info.output.splitlines() if "Verified" in line)
    assert "\x1b[31m" in verified and "broken" in verified and record.advice in verified  # red, with what to do


def test_verify_against_another_model_and_on_a_text_file(store: ModelStore, converted_f16: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("Bees dance to tell the hive where the flowers are, and how far away they grow from home.\n", encoding="utf-8")
    result = pocketlm("verify", str(converted_f16), "--against", REFERENCE, "--text", str(text))
    assert result.exit_code == 0, result.output
    assert "faithful" in result.output and "of notes.txt scored by both" in result.output
    assert store.verification_of(F16).text == "notes.txt"  # type: ignore[union-attr]  # the path names the stored model


def test_an_imported_model_with_no_parent_and_no_against_gets_a_sentence(store: ModelStore) -> None:
    result = pocketlm("verify", REFERENCE)
    assert result.exit_code == 1
    assert f"Error: {REFERENCE} was not converted from a model in the store, so there is nothing to verify it against." in result.output
    assert f"pocketlm verify {REFERENCE} --against REFERENCE" in result.output


def test_an_unreadable_text_is_refused_with_a_sentence(store: ModelStore, tmp_path: Path) -> None:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    result = pocketlm("verify", F16, "--text", str(binary))
    assert result.exit_code == 1 and "it is not UTF-8 text" in result.output and "Traceback" not in result.output


def test_convert_verifies_by_default_and_no_verify_skips_leaving_no_stale_verdict(store: ModelStore) -> None:
    verified = pocketlm("convert", REFERENCE, "--outtype", "f16", "--name", "smol:again")
    assert verified.exit_code == 0, verified.output
    assert "smol:again is ready" in verified.output and "smol:again: faithful against smol" in verified.output
    assert store.verification_of("smol:again").level == "faithful"  # type: ignore[union-attr]
    # Converted again under the same name: a new model, and the verdict about the old one must not stay with it.
    skipped = pocketlm("convert", REFERENCE, "--outtype", "f16", "--name", "smol:again", "--no-verify")
    assert skipped.exit_code == 0, skipped.output
    assert "smol:again is ready" in skipped.output and "faithful" not in skipped.output
    assert store.verification_of("smol:again") is None
    assert re.search(r"^Verified +not yet", pocketlm("info", "smol:again").output, re.MULTILINE)


def test_a_verification_that_cannot_run_after_a_conversion_is_one_line_saying_how_to_run_it_later(store: ModelStore,
                                                                                               converted_f16: Path, tmp_path: Path) -> None:  # fmt: skip
    # The parent's files are gone (deleted by hand): the reference cannot load, and the conversion's result stands.
    gone = tmp_path / "gone"
    gone.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (gone / name).write_bytes((store.get(REFERENCE).path / name).read_bytes())  # type: ignore[union-attr]
    store.register(gone, source=f"import:{gone}", name="vanished")
    child = store.register(converted_f16, source="convert", name="vanished:F16", parent="vanished", lineage="convert f16")
    (gone / "model.safetensors").unlink()
    outcome = verify_after_convert(store, child, LoadOptions())
    assert outcome.record is None and store.verification_of(child.name) is None
    assert outcome.note.startswith("Could not verify vanished:F16: ") and outcome.note.endswith("Run `pocketlm verify vanished:F16` once that is fixed.")
    assert "\n" not in outcome.note


def test_a_quantization_within_its_usual_loss_reads_verified_in_plain_colour_with_no_advice(store: ModelStore, quantized_q4_k_m: Path) -> None:
    store.register(quantized_q4_k_m, source="convert", name="smol:Q4_K_M", parent=REFERENCE, lineage="quantize Q4_K_M")
    result = pocketlm("verify", "smol:Q4_K_M", color=True)
    assert result.exit_code == 0, result.output
    headline = next(line for line in result.output.splitlines() if line.startswith("smol:Q4_K_M"))
    assert headline == "smol:Q4_K_M: verified against smol" and "\x1b[" not in headline  # neither a warning colour nor red
    record = store.verification_of("smol:Q4_K_M")
    assert record is not None and record.level == "lossy" and record.advice == ""
    assert re.search(r"^Verified +tokens identical, top-1 .*KLD .*PPL \+", pocketlm("info", "smol:Q4_K_M").output, re.MULTILINE)


def test_a_float_checkpoint_reference_is_scored_in_float32_whatever_dtype_is_asked(store: ModelStore) -> None:
    reference, model = store.get(REFERENCE), store.get(F16)
    assert reference is not None and model is not None
    assert scoring_options(reference, LoadOptions(dtype="bfloat16"), reference=True).dtype == "float32"
    assert scoring_options(reference, LoadOptions(dtype="bfloat16")).dtype == "bfloat16"  # as the model verified, as asked
    assert scoring_options(model, LoadOptions(dtype="bfloat16"), reference=True).dtype is None  # a GGUF runs its own types
    # A bfloat16 reference would round more than the f16 result does and make a faithful conversion look lossy.
    assert verify_model(store, model, reference, None, LoadOptions(dtype="bfloat16")).level == "faithful"


def test_a_surprise_from_an_engine_during_verification_after_a_conversion_is_a_one_line_note(store: ModelStore, starter_checkpoint: Path,
                                                                                            converted_f16: Path, tmp_path: Path) -> None:  # fmt: skip
    # A parent whose config transformers refuses with its own exception (not a PocketError): 576 wide, 7 heads.
    odd = tmp_path / "odd"
    odd.mkdir()
    for file in starter_checkpoint.iterdir():
        (odd / file.name).symlink_to(file)
    config = json.loads((starter_checkpoint / "config.json").read_text())
    (odd / "config.json").unlink()
    (odd / "config.json").write_text(json.dumps({**config, "num_attention_heads": 7, "num_key_value_heads": 7}))
    store.register(odd, source=f"import:{odd}", name="odd")
    child = store.register(converted_f16, source="convert", name="odd:F16", parent="odd", lineage="convert f16")
    outcome = verify_after_convert(store, child, LoadOptions())
    assert outcome.record is None and store.verification_of(child.name) is None
    assert outcome.note.startswith("Could not verify odd:F16: ") and "attention heads (7)" in outcome.note
    assert outcome.note.endswith("Run `pocketlm verify odd:F16` once that is fixed.") and "\n" not in outcome.note


def test_convert_keeps_a_broken_result_says_where_and_exits_1(model_store: ModelStore, starter_checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint whose layer 0 value projection is scaled by 1e7 and output projection by 1e-7: the same model in
    float32, but in float16 the first overflows to infinity and the second rounds to 0, so its f16 GGUF computes NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "overflowing"
    shutil.copytree(starter_checkpoint, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(starter_checkpoint / "model.safetensors")
    tensors["model.layers.0.self_attn.v_proj.weight"] *= 1e7
    tensors["model.layers.0.self_attn.o_proj.weight"] *= 1e-7
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model_store.register(folder, source=f"import:{folder}", name="overflowing")
    result = pocketlm("convert", "overflowing", "--outtype", "f16", "--name", "overflowing:F16")
    assert result.exit_code == 1, result.output
    converted = model_store.get("overflowing:F16")
    assert converted is not None and converted.path.exists()  # kept, for the user to look at
    assert "overflowing:F16: broken against overflowing" in result.output
    assert f"overflowing:F16 is kept at {converted.path}" in result.output and "Traceback" not in result.output
    assert model_store.verification_of("overflowing:F16").level == "broken"  # type: ignore[union-attr]


def test_verifying_unasked_needs_both_models_one_at_a_time_and_their_scores_to_fit_in_free_memory(store: ModelStore) -> None:
    from dataclasses import replace

    from pocketlm.app.verification import verification_memory_note

    reference, model = store.get(REFERENCE), store.get(F16)
    assert reference is not None and model is not None
    assert verification_memory_note(reference, model) == ""  # 135M parameters: about 1 GiB at its peak
    # The same checkpoint as if it had a trillion parameters: 4 TB in float32, which no machine running this has free.
    huge = replace(reference, parameter_count=10**12)
    note = verification_memory_note(huge, model)
    assert note.startswith("verifying needs about ") and f"to hold {REFERENCE} and the scores" in note and "is free" in note


def test_a_text_of_one_token_is_refused_with_a_sentence(store: ModelStore, tmp_path: Path) -> None:
    text = tmp_path / "one.txt"
    text.write_text("Hello", encoding="utf-8")  # one token of SmolLM2's vocabulary, which adds no BOS
    result = pocketlm("verify", F16, "--text", str(text))
    assert result.exit_code == 1 and "comparing needs at least two" in result.output and "Traceback" not in result.output
    assert store.verification_of(F16) is None
