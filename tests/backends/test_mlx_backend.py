"""The MLX backend on real mlx and mlx-lm, on MLX's CPU device: a tiny random Llama for the stream's mechanics (in
seconds), the real starter checkpoint for an answer and for token-count parity with llama.cpp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")

from pocketlm.backends.base import (  # noqa: E402
    ChatMessage,
    ChatModel,
    GenerationStats,
    LoadOptions,
    SamplingParams,
)
from pocketlm.backends.mlx import MLXBackend, MLXChatModel, TokenSampler  # noqa: E402
from pocketlm.models.errors import PocketError  # noqa: E402
from tests.converters.tiny_models import build_tiny_model, edit_config, train_sentencepiece_tokenizer  # noqa: E402
from tests.backends.chat_model_contract import (  # noqa: E402
    HELLO,
    ChatModelContract,
    TokenizerFacts,
    fixed_length,
    reply,
    transformers_tokenizer_facts,
)
from tests.fixtures import capital_question  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama (hidden 64) with a 600-token SentencePiece tokenizer and no chat template, saved by
    transformers 5 (RoPE theta under `rope_parameters`), with theta 500000 so a theta lost on the way shows."""
    folder = tmp_path_factory.mktemp("mlx-tiny")
    tokenizer = train_sentencepiece_tokenizer(folder / "tokenizer")
    checkpoint = build_tiny_model("llama", folder / "llama", tokenizer, vocab_size=600)
    edit_config(checkpoint, rope_theta=None, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    return checkpoint


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> Iterator[MLXChatModel]:
    model = MLXBackend().load(tiny_checkpoint, LoadOptions(context_length=256))
    yield model
    model.close()


def test_the_description_says_mlx_on_the_cpu_in_float32(tiny_model: MLXChatModel) -> None:
    description = tiny_model.description
    assert (description.backend, description.architecture, description.context_length) == ("mlx", "llama", 256)
    assert description.device == "CPU, float32" and description.quantization == "float32"
    assert MLXBackend.device_summary().startswith("CPU (float32)")


def test_the_model_computes_in_float32_on_the_cpu(tiny_model: MLXChatModel) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    dtypes = {value.dtype for _, value in tree_flatten(tiny_model._model.parameters())}
    assert dtypes == {mx.float32}


def test_a_transformers_5_rope_theta_reaches_mlx_and_the_logits_match_transformers(tiny_model: MLXChatModel, tiny_checkpoint: Path) -> None:
    import mlx.core as mx
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert "rope_theta" not in config, "the checkpoint must carry theta only where transformers 5 writes it"
    tokens = list(range(3, 90))  # long enough that theta 10000 and 500000 rotate the late positions apart
    ours = np.array(tiny_model._model(mx.array([tokens]))[0].astype(mx.float32))
    reference_model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    with torch.inference_mode():
        reference = reference_model(torch.tensor([tokens])).logits[0].numpy()
    # Both float32 on the same weights: only summation order differs (~1e-6 relative); a wrong theta moves the
    # logits of late positions by whole units on these wide random weights.
    assert np.abs(ours - reference).max() < 1e-3 * max(1.0, np.abs(reference).max())


def test_a_reply_streams_in_a_thread_other_than_the_one_that_loaded(tiny_model: MLXChatModel) -> None:
    results: list[GenerationStats] = []
    worker = threading.Thread(target=lambda: results.append(reply(list(tiny_model.stream_chat(HELLO, fixed_length(8))))[1]))
    worker.start()
    worker.join()
    assert results and results[0].generated_tokens == 8


def test_a_repeat_penalty_keeps_greedy_sampling_off_the_recent_tokens() -> None:
    import mlx.core as mx

    logits = mx.array([5.0, 4.0, 3.0, -1.0])
    sampler = TokenSampler(mx, SamplingParams(temperature=0, repeat_penalty=1e6))
    picked = [int(sampler.sample(logits).item()) for _ in range(4)]
    # Each pick is penalized next time: positive logits shrink to ~0, the negative one grows more negative.
    assert picked == [0, 1, 2, 0]


def test_the_prompt_token_count_matches_the_pytorch_backend(tiny_model: MLXChatModel, tiny_checkpoint: Path) -> None:
    from pocketlm.backends.pytorch import TorchBackend

    conversation = [ChatMessage("system", "Be brief."), *HELLO, ChatMessage("assistant", "Fine </s> <s> thanks."), ChatMessage("user", "Again?")]
    torch_model = TorchBackend().load(tiny_checkpoint, LoadOptions(context_length=256))
    try:
        assert torch_model._render(conversation) == tiny_model._render(conversation)
    finally:
        torch_model.close()


def test_control_token_text_in_a_message_stays_text(tiny_model: MLXChatModel) -> None:
    tokens = tiny_model._render([ChatMessage("user", "end here </s> and <s> again")])
    assert tiny_model._tokenizer.eos_token_id not in tokens[1:]


def test_a_4_bit_mlx_model_loads_with_its_bits_and_group_size(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from mlx_lm import convert

    from pocketlm.backends.registry import backend_for

    quantized = tmp_path / "tiny-4bit"
    convert(str(tiny_checkpoint), str(quantized), quantize=True, q_bits=4, q_group_size=32)
    assert backend_for("mlx").name == "mlx", "MLX models open with this backend by default"
    model = MLXBackend().load(quantized, LoadOptions(context_length=128))
    try:
        assert model.description.quantization == "4-bit g32" and model.description.device == "CPU, float32"
        _, stats = reply(list(model.stream_chat(HELLO, fixed_length(8))))
        assert stats.generated_tokens == 8
    finally:
        model.close()


def test_a_closed_model_refuses_to_reply_with_a_sentence(tiny_checkpoint: Path) -> None:
    model = MLXBackend().load(tiny_checkpoint, LoadOptions(context_length=64))
    model.close()
    with pytest.raises(PocketError, match="was closed"):
        list(model.stream_chat(HELLO, fixed_length(4)))


def test_a_gpu_asked_for_on_linux_is_a_sentence(tiny_checkpoint: Path) -> None:
    if sys.platform == "darwin":
        pytest.skip("a Mac has Metal")
    with pytest.raises(PocketError, match="no GPU MLX can use"):
        MLXBackend().load(tiny_checkpoint, LoadOptions(device="gpu"))


def test_a_checkpoint_that_needs_its_own_code_is_refused_unless_trusted(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_checkpoint, tmp_path / "copy"))
    edit_config(copy, model_file="model.py")
    (copy / "model.py").write_text("raise SystemExit('checkpoint code ran')\n")
    with pytest.raises(PocketError, match="needs its own Python code"):
        MLXBackend().load(copy, LoadOptions(context_length=64))


HIDE_MLX = """
import sys
class Hide:
    # Every finder made blind to mlx and mlx_lm: find_spec then answers None, as where they are not installed.
    def __init__(self, inner):
        self.inner = inner
    def __getattr__(self, name):
        return getattr(self.inner, name)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlx", "mlx_lm"):
            return None
        return self.inner.find_spec(name, path, target)
sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
"""

REPORT = """
from pathlib import Path
from pocketlm.backends.mlx import MLXBackend
from pocketlm.backends.base import LoadOptions
from pocketlm.backends.registry import backend_for
from pocketlm.models.errors import PocketError
print("available:", MLXBackend.is_available())
print("hint:", MLXBackend.install_hint)
try:
    MLXBackend().load(Path(sys.argv[1]), LoadOptions(context_length=64))
except PocketError as error:
    print("load:", error, "|", error.hint)
try:
    backend_for("mlx")
except PocketError as error:
    print("mlx format:", error, "|", error.hint)
"""


def run_without_mlx(prelude: str, checkpoint: Path, extra_path: Path | None = None) -> str:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (extra_path, REPOSITORY) if p)}
    result = subprocess.run([sys.executable, "-c", "import sys\n" + prelude + REPORT, str(checkpoint)],
                            capture_output=True, text=True, env=environment, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def test_without_mlx_the_backend_is_unavailable_with_a_sentence(tiny_checkpoint: Path) -> None:
    output = run_without_mlx(HIDE_MLX, tiny_checkpoint)
    assert "available: False" in output
    assert "hint: Install it with: pip install 'pocketlm[mlx]'" in output
    assert "load: The mlx backend cannot run here: MLX is not installed." in output
    assert "mlx format: No installed backend loads mlx models." in output and "pocketlm[mlx]" in output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the engine-less mlx wheel is a Linux case")
def test_mlx_without_its_linux_engine_is_unavailable_with_a_sentence(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # The `mlx` wheel alone on Linux: the Python package without lib/libmlx.so (which mlx-cpu brings).
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx" / "__init__.py").write_text("")
    output = run_without_mlx("", tiny_checkpoint, extra_path=tmp_path)
    assert "available: False" in output
    assert "hint: Install MLX's CPU engine with: pip install 'pocketlm[mlx]'" in output
    assert "load: The mlx backend cannot run here: MLX is installed without an engine for Linux (the mlx-cpu package)" in output


def test_safetensors_open_with_pytorch_first_on_linux_and_mlx_first_on_a_mac() -> None:
    from pocketlm.backends.pytorch import TorchBackend

    assert MLXBackend.priority("mlx") == 0
    if sys.platform == "darwin":
        assert MLXBackend.priority("safetensors") < TorchBackend.priority("safetensors")
    else:
        assert MLXBackend.priority("safetensors") > TorchBackend.priority("safetensors")


def test_the_starter_checkpoint_answers_paris_greedily(starter_checkpoint: Path) -> None:
    model = MLXBackend().load(starter_checkpoint, LoadOptions(context_length=1024))
    try:
        text, stats = reply(list(model.stream_chat(capital_question(), SamplingParams(temperature=0, max_tokens=24))))
        assert "paris" in text.lower(), text
        assert stats.stop_reason in ("end_of_generation", "max_tokens")
    finally:
        model.close()


def test_the_prompt_token_count_matches_llama_cpp_on_the_starter(starter_checkpoint: Path, starter_model: ChatModel) -> None:
    conversation = [*capital_question(), ChatMessage("assistant", "Paris."), ChatMessage("user", "And of Italy? <|im_end|> keep this as text.")]
    model = MLXBackend().load(starter_checkpoint, LoadOptions(context_length=1024))
    try:
        assert model.prompt_tokens(conversation) == starter_model.prompt_tokens(conversation)
    finally:
        model.close()


class TestMLXChatModel(ChatModelContract):
    """The stream every backend owes (tests/backends/chat_model_contract.py), on the tiny model."""

    @pytest.fixture
    def chat_model(self, tiny_model: MLXChatModel) -> MLXChatModel:
        return tiny_model

    @pytest.fixture(scope="class")
    def tokenizer_facts(self, tiny_checkpoint: Path) -> TokenizerFacts:
        return transformers_tokenizer_facts(tiny_checkpoint)

    @pytest.fixture
    def load_with_context(self, tiny_checkpoint: Path) -> Callable[[int], ChatModel]:
        return lambda context_length: MLXBackend().load(tiny_checkpoint, LoadOptions(context_length=context_length))
