"""The store keeps one verification verdict per model: it reads back as written, survives from an older database,
and goes with its model when the model is removed or replaced under the same name."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from pocketlm.models.database import connect, migrate
from pocketlm.models.errors import ModelNotFound
from pocketlm.models.store import _MIGRATIONS, LocalModel, ModelStore
from pocketlm.models.verification_record import VerificationRecord

PARENT = LocalModel(name="owner/model", path=Path("/models/owner-model"), format="safetensors", architecture="llama",
                    parameter_count=134_515_008, quantization="F32", context_length=8192, size_bytes=538_000_000, source="import:/x")  # fmt: skip
CHILD = replace(PARENT, name="owner/model:F16", path=Path("/models/model-F16.gguf"), format="gguf", quantization="F16",
                source="convert", parent=PARENT.name, lineage="convert f16")  # fmt: skip


def verdict(model: str = CHILD.name, level: str = "faithful", **changes: object) -> VerificationRecord:
    record = VerificationRecord(model=model, reference=PARENT.name, level=level, summary="tokens identical, top-1 99.6%, KLD 0.0004, PPL +0.0%",
                                advice="", scored_tokens=433, tokens_identical=True, top1_agreement=0.996, mean_kld=0.0004,
                                perplexity_change=0.0002, text="built-in", verified_at=1_700_000_000.5)  # fmt: skip
    return replace(record, **changes)  # type: ignore[arg-type]


def test_a_verification_reads_back_as_recorded_and_a_new_one_replaces_it(model_store: ModelStore) -> None:
    model_store.add(PARENT)
    model_store.add(CHILD)
    assert model_store.verification_of(CHILD.name) is None
    model_store.record_verification(verdict())
    assert model_store.verification_of(CHILD.name) == verdict()
    broken = verdict(level="broken", tokens_identical=False, summary="tokenization differs", advice="Convert again.", text="notes.txt")
    model_store.record_verification(broken)
    assert model_store.verification_of(CHILD.name) == broken
    assert model_store.verifications() == {CHILD.name: broken}
    assert model_store.verification_of(PARENT.name) is None


def test_a_verification_of_a_model_not_in_the_store_is_refused_with_a_sentence(model_store: ModelStore) -> None:
    with pytest.raises(ModelNotFound, match="No model named 'nowhere'"):
        model_store.record_verification(verdict(model="nowhere"))


def test_infinite_figures_read_back_and_a_nan_is_not_mistaken_for_a_missing_model(model_store: ModelStore) -> None:
    model_store.add(PARENT)
    model_store.add(CHILD)
    blown_up = verdict(level="broken", mean_kld=float("inf"), perplexity_change=float("inf"))
    model_store.record_verification(blown_up)
    assert model_store.verification_of(CHILD.name) == blown_up
    # SQLite stores NaN as NULL, which the table refuses: a bug in whatever computed it, said as what it is.
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        model_store.record_verification(verdict(mean_kld=float("nan")))


def test_removing_a_model_removes_its_verification_and_keeps_its_childrens(model_store: ModelStore) -> None:
    model_store.add(PARENT)
    model_store.add(CHILD)
    grandchild = replace(CHILD, name="owner/model:Q4_K_M", quantization="Q4_K_M", parent=CHILD.name, lineage="quantize Q4_K_M")
    model_store.add(grandchild)
    model_store.record_verification(verdict())
    model_store.record_verification(verdict(model=grandchild.name, level="lossy", reference=CHILD.name))
    model_store.remove(CHILD.name)
    assert model_store.verification_of(CHILD.name) is None
    # The grandchild's verdict names its removed reference as plain text, as lineage does.
    assert model_store.verification_of(grandchild.name) == verdict(model=grandchild.name, level="lossy", reference=CHILD.name)
    model_store.add(CHILD)  # the same name registered again is a new model: nothing was verified about it
    assert model_store.verification_of(CHILD.name) is None


def test_a_model_replaced_under_the_same_name_loses_the_old_verdict(model_store: ModelStore) -> None:
    model_store.add(PARENT)
    model_store.add(CHILD)
    model_store.record_verification(verdict(level="broken"))
    model_store.add(replace(CHILD, quantization="Q8_0", lineage="convert q8_0"))  # converted again into the same name
    assert model_store.verification_of(CHILD.name) is None
    assert model_store.get(CHILD.name).quantization == "Q8_0"  # type: ignore[union-attr]


def test_a_version_4_database_gains_the_verifications_table_and_keeps_its_models(pocket_home: Path) -> None:
    from pocketlm.models.locations import database_path

    legacy = connect(database_path())
    migrate(legacy, "models", _MIGRATIONS[:4])  # the schema before verify
    legacy.execute("INSERT INTO models (name, path, format, architecture, parameter_count, quantization, context_length, size_bytes, source, "
                   "parent, lineage, added_at) VALUES (?, ?, 'gguf', 'llama', 1, 'F16', 0, 1, 'convert', 'owner/model', 'convert f16', 1.0)",
                   (CHILD.name, str(CHILD.path)))  # fmt: skip
    legacy.execute("INSERT INTO model_files VALUES (?, ?, 0)", (CHILD.name, str(CHILD.path)))
    legacy.close()

    store = ModelStore(database_path())
    assert [(m.name, m.parent, m.files) for m in store.list()] == [(CHILD.name, PARENT.name, (CHILD.path,))]
    assert store.verifications() == {}
    store.record_verification(verdict())
    store.close()
    with sqlite3.connect(database_path()) as check:
        assert check.execute("SELECT version FROM schema_versions WHERE component = 'models'").fetchone() == (len(_MIGRATIONS),)
    reopened = ModelStore(database_path())  # opening again runs no migration twice
    assert reopened.verification_of(CHILD.name) == verdict()
    reopened.close()
