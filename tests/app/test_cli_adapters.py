"""`pocketlm adapter import|ls|rm|convert` and `--adapter` on `run`, driven through the real CLI (click's runner, in
process) with the tiny random Llama as a float32 GGUF on llama.cpp and PEFT adapters PEFT itself saved.

The tiny model's text is gibberish: replies are compared with each other (an adapter changes the greedy reply), never
with expected words."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pocketlm.app.adapter_loading import conversions_of, parse_adapter_option
from pocketlm.app.cli import cli
from pocketlm.app.history import ConversationStore, UsedAdapter
from pocketlm.models.errors import PocketError
from pocketlm.models.locations import database_path
from pocketlm.models.store import ModelStore

BASE = "tiny"  # the store name the tiny GGUF is registered under
GREEDY = ("--temp", "0", "--max-tokens", "8", "--ctx", "256")


def pocketlm(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_refused(result: Result, sentence: str) -> None:
    assert result.exit_code == 1, result.output
    assert sentence in result.stderr, result.stderr
    assert "Traceback" not in result.output


@pytest.fixture
def store(pocket_home: Path, tiny_llama_f32_gguf: Path) -> Iterator[ModelStore]:
    """A store with the tiny GGUF registered as BASE (not owned: `rm` must never delete the session's copy)."""
    store = ModelStore(database_path())
    store.register(tiny_llama_f32_gguf, source=f"import:{tiny_llama_f32_gguf}", name=BASE)
    yield store
    store.close()


@pytest.fixture
def with_plain(store: ModelStore, tiny_adapters: dict[str, Path]) -> ModelStore:
    result = pocketlm("adapter", "import", str(tiny_adapters["plain"]), "--name", "plain", "--base", BASE)
    assert result.exit_code == 0, result.output
    return store


def last_reply_adapters() -> tuple[UsedAdapter, ...]:
    history = ConversationStore(database_path())
    try:
        latest = history.list()[0]
        return history.messages(latest.id)[-1].adapters
    finally:
        history.close()


def test_import_registers_the_adapter_for_its_base_and_both_listings_show_it(with_plain: ModelStore) -> None:
    plain = with_plain.get("plain")
    assert plain is not None and plain.format == "peft-lora" and plain.base_model == BASE
    listed = pocketlm("adapter", "ls")
    assert listed.exit_code == 0 and "plain" in listed.stdout and "peft-lora" in listed.stdout and BASE in listed.stdout
    models = pocketlm("ls").stdout.splitlines()
    base_row = next(i for i, line in enumerate(models) if line.startswith(BASE))
    assert models[base_row + 1].strip().startswith("+ plain"), models  # the adapter right under its base model


def test_run_with_an_adapter_answers_otherwise_and_history_records_it(with_plain: ModelStore) -> None:
    without = pocketlm("run", BASE, "Hello there", *GREEDY)
    with_adapter = pocketlm("run", BASE, "Hello there", *GREEDY, "--adapter", "plain:0.5")
    assert without.exit_code == 0 and with_adapter.exit_code == 0, with_adapter.output
    assert without.stdout.strip() and with_adapter.stdout.strip()
    assert with_adapter.stdout != without.stdout  # a rank-4 adapter at half strength moves the greedy reply
    assert last_reply_adapters() == (UsedAdapter("plain", 0.5),)


def test_stacked_adapters_are_recorded_in_order_with_their_scales(store: ModelStore, tiny_adapters: dict[str, Path]) -> None:
    for name in ("plain", "second"):
        assert pocketlm("adapter", "import", str(tiny_adapters[name]), "--name", name).exit_code == 0
    result = pocketlm("run", BASE, "Hello", *GREEDY, "--adapter", "plain:0.5", "--adapter", "second")
    assert result.exit_code == 0, result.output
    assert last_reply_adapters() == (UsedAdapter("plain", 0.5), UsedAdapter("second", 1.0))


def test_the_gguf_conversion_is_made_once_and_reused(with_plain: ModelStore) -> None:
    plain = with_plain.get("plain")
    assert plain is not None and conversions_of(with_plain, plain) == []
    first = pocketlm("run", BASE, "Hi", *GREEDY, "--adapter", "plain")
    assert first.exit_code == 0, first.output
    (converted,) = conversions_of(with_plain, plain)
    assert converted.format == "gguf-lora" and converted.base_model == BASE and converted.parent == "plain"
    assert converted.path.suffix == ".gguf" and converted.path.parent == database_path().parent / "models"
    written = converted.path.stat().st_mtime_ns
    again = pocketlm("run", BASE, "Hi", *GREEDY, "--adapter", "plain")
    assert again.exit_code == 0 and again.stdout == first.stdout
    assert [c.name for c in conversions_of(with_plain, plain)] == [converted.name]
    assert converted.path.stat().st_mtime_ns == written  # not written again


def test_an_adapter_named_by_its_folder_is_registered_on_the_fly(store: ModelStore, tiny_adapters: dict[str, Path]) -> None:
    result = pocketlm("run", BASE, "Hi", *GREEDY, "--adapter", f"{tiny_adapters['second']}:0.5")
    assert result.exit_code == 0, result.output
    registered = store.models_at(tiny_adapters["second"])
    assert [m.format for m in registered] == ["peft-lora"]
    assert last_reply_adapters() == (UsedAdapter(registered[0].name, 0.5),)


def test_a_missing_adapter_is_one_sentence(with_plain: ModelStore) -> None:
    assert_refused(pocketlm("run", BASE, "Hi", "--adapter", "nosuch"), "No adapter named 'nosuch' in the store (adapters: plain)")


def test_a_model_named_as_an_adapter_is_refused(with_plain: ModelStore) -> None:
    assert_refused(pocketlm("run", BASE, "Hi", "--adapter", BASE), f"{BASE} is a model (gguf), not a LoRA adapter.")


def test_a_dora_adapter_is_refused_at_import(store: ModelStore, tiny_llama: Path, tmp_path: Path) -> None:
    from tests.adapter_fixtures import build_peft_adapter

    dora = build_peft_adapter(tiny_llama, tmp_path / "dora", use_dora=True)
    assert_refused(pocketlm("adapter", "import", str(dora)), "dora is a DoRA adapter (use_dora), which pocketlm cannot apply yet.")
    assert [m for m in store.list() if m.is_adapter] == []


def test_an_adapter_for_another_model_is_refused_at_import_and_at_run(store: ModelStore, tmp_path: Path) -> None:
    from tests.adapter_fixtures import build_peft_adapter
    from tests.converters.tiny_models import build_tiny_model, train_sentencepiece_tokenizer

    # Qwen3 with 32-wide heads: its q_proj gives 128 outputs where the tiny Llama's gives 64.
    other = build_tiny_model("qwen3", tmp_path / "qwen3", train_sentencepiece_tokenizer(tmp_path / "tokenizer"), vocab_size=600)
    foreign = build_peft_adapter(other, tmp_path / "qwen-lora")
    refused = pocketlm("adapter", "import", str(foreign), "--base", BASE)
    assert_refused(refused, "qwen-lora's")
    assert "it was trained on a model of another size" in refused.stderr
    assert [m for m in store.list() if m.is_adapter] == []
    assert_refused(pocketlm("run", BASE, "Hi", "--adapter", str(foreign)), "it was trained on a model of another size")
    assert not store.models_at(foreign)  # refused before it was registered


def test_adapter_rm_removes_its_conversions_and_keeps_the_users_folder(with_plain: ModelStore, tiny_adapters: dict[str, Path]) -> None:
    assert pocketlm("run", BASE, "Hi", *GREEDY, "--adapter", "plain").exit_code == 0
    plain = with_plain.get("plain")
    assert plain is not None
    (converted,) = conversions_of(with_plain, plain)
    assert pocketlm("adapter", "rm", "plain").exit_code == 1  # no terminal, no --yes: nothing removed
    assert with_plain.get("plain") is not None
    removed = pocketlm("adapter", "rm", "plain", "--yes")
    assert removed.exit_code == 0, removed.output
    assert with_plain.get("plain") is None and with_plain.get(converted.name) is None
    assert not converted.path.exists()  # pocketlm wrote it
    assert (tiny_adapters["plain"] / "adapter_model.safetensors").is_file()  # the user's


def test_adapter_convert_writes_where_output_says_and_chat_reuses_it(with_plain: ModelStore, tmp_path: Path) -> None:
    output = tmp_path / "out" / "plain-tiny.gguf"
    result = pocketlm("adapter", "convert", "plain", "--to", "gguf", "--base", BASE, "--output", str(output))
    assert result.exit_code == 0, result.output
    assert output.is_file()
    # A path that names no .gguf file is a folder to put it in, even one that does not exist yet.
    folder = tmp_path / "adapters"
    again = pocketlm("adapter", "convert", "plain", "--to", "gguf", "--base", BASE, "--output", f"{folder}/", "--name", "plain-copy")
    assert again.exit_code == 0, again.output
    assert [p.name for p in folder.iterdir()] == ["plain-copy.gguf"]
    with_plain.remove("plain-copy")
    plain = with_plain.get("plain")
    assert plain is not None
    (converted,) = conversions_of(with_plain, plain)
    assert converted.path == output and converted.base_model == BASE
    assert pocketlm("run", BASE, "Hi", *GREEDY, "--adapter", "plain").exit_code == 0
    assert [c.path for c in conversions_of(with_plain, plain)] == [output]


def test_adapter_convert_to_mlx_writes_an_mlx_lm_folder(with_plain: ModelStore, tiny_llama: Path, tmp_path: Path) -> None:
    with_plain.register(tiny_llama, source=f"import:{tiny_llama}", name="tiny-hf")
    output = tmp_path / "plain-mlx"
    result = pocketlm("adapter", "convert", "plain", "--to", "mlx", "--base", "tiny-hf", "--output", str(output))
    assert result.exit_code == 0, result.output
    assert (output / "adapters.safetensors").is_file() and (output / "adapter_config.json").is_file()
    converted = with_plain.models_at(output)[0]
    assert converted.format == "mlx-lora" and converted.parent == "plain" and converted.base_model == "tiny-hf"


def test_convert_refuses_a_base_the_adapter_does_not_fit(with_plain: ModelStore, tmp_path: Path) -> None:
    from tests.converters.tiny_models import build_tiny_model, train_sentencepiece_tokenizer

    other = build_tiny_model("qwen3", tmp_path / "qwen3", train_sentencepiece_tokenizer(tmp_path / "tokenizer"), vocab_size=600)
    with_plain.register(other, source=f"import:{other}", name="qwen")
    assert_refused(pocketlm("adapter", "convert", "plain", "--to", "gguf", "--base", "qwen"), "it was trained on a model of another size")
    assert not list((database_path().parent / "models").glob("*plain*"))


def test_import_from_the_hub_pulls_checks_and_names_it(store: ModelStore, tiny_adapters: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from tests.hub.server import HubFile, HubRepo, serving

    folder = tiny_adapters["plain"]
    repo = HubRepo("someone/tiny-lora", {f.name: HubFile(f.read_bytes(), lfs=f.suffix == ".safetensors") for f in folder.iterdir() if f.is_file()})
    with serving([repo], tmp_path / "hf-home", monkeypatch):
        result = pocketlm("adapter", "import", "someone/tiny-lora", "--name", "hub-lora", "--base", BASE)
    assert result.exit_code == 0, result.output
    imported = store.get("hub-lora")
    assert imported is not None and imported.format == "peft-lora" and imported.repo_id == "someone/tiny-lora" and imported.base_model == BASE
    assert store.get("someone/tiny-lora") is None  # registered under the name asked for only
    assert pocketlm("run", BASE, "Hi", *GREEDY, "--adapter", "hub-lora").exit_code == 0


def test_adapter_option_parsing() -> None:
    assert parse_adapter_option("plain") == ("plain", 1.0)
    assert parse_adapter_option("plain:0.5") == ("plain", 0.5)
    assert parse_adapter_option("owner/lora:v2") == ("owner/lora:v2", 1.0)
    assert parse_adapter_option("./my:adapter") == ("./my:adapter", 1.0)
    with pytest.raises(PocketError, match="finite number"):
        parse_adapter_option("plain:nan")


def test_repl_adapter_command_attaches_rescales_detaches_and_refuses_a_misfit(with_plain: ModelStore, tiny_adapters: dict[str, Path],
                                                                              tmp_path: Path) -> None:  # fmt: skip
    """`/adapter` in the interactive chat, on a live model: the same model object throughout, the set shown after each."""
    from rich.console import Console

    from pocketlm.app.repl_adapters import adapter_command
    from pocketlm.app.model_loading import choose_model, load_model
    from pocketlm.backends.base import LoadOptions
    from tests.adapter_fixtures import build_peft_adapter
    from tests.converters.tiny_models import build_tiny_model, train_sentencepiece_tokenizer

    other = build_tiny_model("qwen3", tmp_path / "qwen3", train_sentencepiece_tokenizer(tmp_path / "tokenizer"), vocab_size=600)
    foreign = build_peft_adapter(other, tmp_path / "qwen-lora")
    choice = choose_model(with_plain, BASE)
    model = load_model(choice, LoadOptions(context_length=256))
    console = Console(record=True, width=200)

    def command(argument: str) -> tuple[tuple[str, float], ...]:
        adapter_command(argument, model, with_plain, choice, console)
        return tuple((spec.label, spec.scale) for spec in model.description.adapters)

    try:
        assert command("plain") == (("plain", 1.0),)
        assert command(f"{tiny_adapters['second']} 0.5") == (("plain", 1.0), ("second", 0.5))
        assert command("plain 0.25") == (("plain", 0.25), ("second", 0.5))  # rescaled in its place
        with pytest.raises(PocketError, match="trained on a model of another size"):
            command(str(foreign))
        assert [(s.label, s.scale) for s in model.description.adapters] == [("plain", 0.25), ("second", 0.5)]  # unchanged
        assert command("off second") == (("plain", 0.25),)
        with pytest.raises(PocketError, match="second is not attached"):
            command("off second")
        assert command("off") == ()
    finally:
        model.close()
    shown = console.export_text()
    assert "Adapters: plain ×0.25 + second ×0.5" in shown and "No adapters attached." in shown
    assert not with_plain.models_at(foreign)  # refused before it was registered


def test_a_retrained_adapter_is_converted_again_and_the_new_conversion_used(store: ModelStore, tiny_llama: Path, tmp_path: Path) -> None:
    from pocketlm.app.adapter_loading import source_identity
    from tests.adapter_fixtures import build_peft_adapter

    folder = build_peft_adapter(tiny_llama, tmp_path / "mine", seed=1)
    assert pocketlm("adapter", "import", str(folder), "--name", "mine", "--base", BASE).exit_code == 0
    assert pocketlm("run", BASE, "Hi", *GREEDY, "--adapter", "mine").exit_code == 0
    mine = store.get("mine")
    assert mine is not None
    (first,) = conversions_of(store, mine)
    old_bytes = first.path.read_bytes()
    assert first.revision == source_identity(mine)

    build_peft_adapter(tiny_llama, folder, seed=2, spread=0.2)  # retrained into the same folder
    again = pocketlm("run", BASE, "Hi", *GREEDY, "--adapter", "mine")
    assert again.exit_code == 0, again.output
    (second,) = conversions_of(store, mine)  # the stale one replaced, not kept beside it
    assert second.revision == source_identity(mine) != first.revision
    assert second.path.read_bytes() != old_bytes  # made from the new weights; chat used this file (the only one)
    assert pocketlm("run", BASE, "Hi", *GREEDY, "--adapter", "mine").exit_code == 0
    assert [c.revision for c in conversions_of(store, mine)] == [second.revision]  # and reused from then on


def test_convert_output_that_is_an_existing_file_is_refused_with_a_sentence(with_plain: ModelStore, tmp_path: Path) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert_refused(pocketlm("adapter", "convert", "plain", "--to", "gguf", "--base", BASE, "--output", str(taken)), f"{taken} is a file")
    assert_refused(pocketlm("adapter", "convert", "plain", "--to", "mlx", "--base", BASE, "--output", str(taken)), f"{taken} is a file")
    assert taken.read_text() == "mine"


def test_convert_output_naming_neither_a_gguf_nor_a_folder_is_refused_and_makes_nothing(with_plain: ModelStore, tmp_path: Path) -> None:
    wrong = tmp_path / "out" / "plain.ggml"
    assert_refused(pocketlm("adapter", "convert", "plain", "--to", "gguf", "--base", BASE, "--output", str(wrong)),
                   "names neither a .gguf file nor a folder")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_convert_output_into_an_existing_folder_puts_the_file_inside(with_plain: ModelStore, tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    folder.mkdir()
    result = pocketlm("adapter", "convert", "plain", "--to", "gguf", "--base", BASE, "--output", str(folder), "--name", "plain-here")
    assert result.exit_code == 0, result.output
    assert [p.name for p in folder.iterdir()] == ["plain-here.gguf"]


def test_a_refused_conversion_leaves_no_folder_behind(with_plain: ModelStore, tmp_path: Path) -> None:
    folder = tmp_path / "new" / "adapters"
    # The name is a model's already: the conversion is refused, and the folder --output asked for is not made.
    refused = pocketlm("adapter", "convert", "plain", "--to", "gguf", "--base", BASE, "--output", f"{folder}/", "--name", BASE)
    assert_refused(refused, f"There is already a model named {BASE!r}")
    assert not (tmp_path / "new").exists()


def test_import_refuses_a_hub_repo_holding_a_model_gguf_before_downloading_it(store: ModelStore, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from pocketlm.app import adapter_import
    from tests.hub.server import HubFile, HubRepo, serving

    # The model threshold is lowered to this small file's size: the rule, not gigabytes of test data, is under test.
    monkeypatch.setattr(adapter_import, "MODEL_GGUF_BYTES", 1000)
    repo = HubRepo("someone/big-model-GGUF", {"big-model-Q4_K_M.gguf": HubFile(b"GGUF" + bytes(4096), lfs=True)})
    with serving([repo], tmp_path / "hf-home", monkeypatch):
        result = pocketlm("adapter", "import", "someone/big-model-GGUF")
    assert_refused(result, "looks like a model, not a LoRA adapter")
    assert "pocketlm pull someone/big-model-GGUF" in result.stderr
    assert not [p for p in (tmp_path / "hf-home").rglob("*") if p.is_file() and p.stat().st_size > 4000]  # nothing downloaded
    assert [m for m in store.list() if m.is_adapter] == []


def test_a_cancelled_conversion_writes_and_registers_nothing(with_plain: ModelStore) -> None:
    """What Ctrl-C in `/adapter` and removing a pending adapter in the app both do: set the conversion's cancel event."""
    import threading

    from pocketlm.app.adapter_loading import adapter_spec_for
    from pocketlm.app.model_loading import choose_model
    from pocketlm.models.errors import Cancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        adapter_spec_for(with_plain, "plain", 1.0, "llama.cpp", choose_model(with_plain, BASE), cancel=cancel)
    plain = with_plain.get("plain")
    assert plain is not None and conversions_of(with_plain, plain) == []
    assert not list((database_path().parent / "models").glob("*plain*"))


def test_repl_adapter_failures_are_one_line_and_the_session_goes_on(with_plain: ModelStore) -> None:
    from rich.console import Console

    from pocketlm.app.model_loading import choose_model, load_model
    from pocketlm.app.repl_adapters import run_adapter_command
    from pocketlm.backends.base import LoadOptions

    choice = choose_model(with_plain, BASE)
    model = load_model(choice, LoadOptions(context_length=256))
    console = Console(record=True, width=300)
    try:
        run_adapter_command("nosuch", model, with_plain, choice, console)
        run_adapter_command("plain lots", model, with_plain, choice, console)
        run_adapter_command("plain 0.5", model, with_plain, choice, console)  # the session goes on
    finally:
        model.close()
    lines = console.export_text().splitlines()
    assert lines[0].startswith("Error: No adapter named 'nosuch'") and lines[1].startswith("Error: 'lots' is not a scale.")
    assert lines[2] == "Adapters: plain ×0.5"


def test_info_on_an_adapter_says_what_it_is_and_how_to_attach_it_not_its_memory(with_plain: ModelStore) -> None:
    shown = pocketlm("info", "plain")
    assert shown.exit_code == 0, shown.output
    assert "Rank" in shown.output and f"pocketlm chat {BASE} --adapter plain" in shown.output
    assert "Memory" not in shown.output and "Opens by default with" not in shown.output
