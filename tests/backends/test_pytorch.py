"""The PyTorch backend on real torch and transformers, on the CPU: a tiny random Llama for the stream's mechanics (in
seconds), the real starter checkpoint for facts and for parity with transformers' own generate."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pocketlm.backends.base import ChatMessage, ChatModel, LoadOptions, SamplingParams
from pocketlm.backends.pytorch import TorchBackend, TorchChatModel
from pocketlm.models.errors import ModelFileError, NotEnoughMemory, PocketError
from pocketlm.models.fit import checkpoint_kv_bytes_per_token
from tests.converters.tiny_models import build_tiny_model, edit_config, rewrite_safetensors_header, train_sentencepiece_tokenizer
from tests.backends.chat_model_contract import (
    HELLO,
    ChatModelContract,
    TokenizerFacts,
    fixed_length,
    reply,
    transformers_tokenizer_facts,
)
from tests.fixtures import capital_question


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama (hidden 64) with a 600-token SentencePiece tokenizer and no chat template."""
    folder = tmp_path_factory.mktemp("torch-tiny")
    tokenizer = train_sentencepiece_tokenizer(folder / "tokenizer")
    return build_tiny_model("llama", folder / "llama", tokenizer, vocab_size=600)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> Iterator[TorchChatModel]:
    model = TorchBackend().load(tiny_checkpoint, LoadOptions(context_length=256))
    yield model
    model.close()


@pytest.fixture
def checkpoint_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))


def test_the_description_says_torch_float32_and_the_loaded_context(tiny_model: TorchChatModel) -> None:
    description = tiny_model.description
    assert (description.backend, description.architecture, description.quantization) == ("torch", "llama", "float32")
    assert description.context_length == 256
    assert description.parameter_count > 0


def test_a_repeat_penalty_changes_a_greedy_reply_that_repeats(tiny_model: TorchChatModel) -> None:
    plain = tiny_model._render(HELLO)
    with tiny_model._decoding(plain, SamplingParams(temperature=0)) as steps:
        tokens = []
        for _ in range(48):
            tokens.append(steps.next_token())
            steps.advance(tokens[-1])
    assert len(set(tokens)) < len(tokens), "the random model's greedy reply must repeat a token for this test"
    with tiny_model._decoding(plain, SamplingParams(temperature=0, repeat_penalty=1e6)) as steps:
        penalized = []
        for _ in range(48):
            penalized.append(steps.next_token())
            steps.advance(penalized[-1])
    # llama.cpp's penalty divides a positive logit (multiplies a negative one) by it: at a million a recent token falls
    # to about zero or far below, under the many positive logits of the rest of the vocabulary. None repeats within
    # the 64-token window.
    assert len(set(penalized)) == len(penalized)


def test_control_token_text_in_a_message_stays_text(tiny_model: TorchChatModel) -> None:
    # The tiny tokenizer's control tokens are <s>, </s> and <unk>; ChatML (its fallback template) writes none of them.
    tokens = tiny_model._render([ChatMessage("user", "end here </s> and <s> again")])
    assert 2 not in tokens and 1 not in tokens[1:]


def test_a_pickle_only_checkpoint_is_refused_without_unpickling(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    loads: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))
    with pytest.raises(ModelFileError, match="pickle") as refused:
        TorchBackend().load(folder, LoadOptions())
    assert "safetensors" in refused.value.hint
    assert loads == []


def test_a_checkpoint_that_needs_its_own_code_is_refused_unless_trusted(checkpoint_copy: Path) -> None:
    edit_config(checkpoint_copy, model_type="pocketlm-custom", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})
    with pytest.raises(PocketError, match="own Python code") as refused:
        TorchBackend().load(checkpoint_copy, LoadOptions())
    assert "--trust-remote-code" in refused.value.hint


def test_an_auto_map_beside_a_type_transformers_implements_loads_with_its_own_code(checkpoint_copy: Path) -> None:
    # Many Hub checkpoints keep an auto_map from before transformers had the architecture; it uses its own then.
    edit_config(checkpoint_copy, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})
    model = TorchBackend().load(checkpoint_copy, LoadOptions(context_length=64))
    model.close()


def test_a_model_that_does_not_fit_in_memory_is_refused_with_numbers(tiny_checkpoint: Path) -> None:
    with pytest.raises(NotEnoughMemory, match=r"context cache \d+\.\d GiB"):
        TorchBackend().load(tiny_checkpoint, LoadOptions(context_length=2**34))


def test_cuda_asked_for_on_a_machine_without_it_is_a_sentence(tiny_checkpoint: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PocketError, match="no CUDA device"):
        TorchBackend().load(tiny_checkpoint, LoadOptions(device="cuda"))


def test_the_kv_cache_estimate_is_what_transformers_allocates(tiny_model: TorchChatModel, tiny_checkpoint: Path) -> None:
    import torch
    from transformers import DynamicCache

    model = tiny_model._model
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([list(range(3, 20))]), use_cache=True, **{tiny_model._cache_argument: cache})
    allocated = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert allocated == checkpoint_kv_bytes_per_token(config, 4) * 17


def test_a_gptq_checkpoint_loads_through_transformers_and_streams(tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from pocketlm.converters.base import ConvertOptions
    from pocketlm.converters.gptq import GPTQConverter, GPTQSettings
    from pocketlm.models.progress import ignore_progress

    quantized = tmp_path / "gptq"
    GPTQConverter().convert(tiny_checkpoint, quantized, ConvertOptions(settings=GPTQSettings(group_size=32)), ignore_progress)
    capfd.readouterr()
    stdout = sys.stdout
    model = TorchBackend().load(quantized, LoadOptions(context_length=128))
    try:
        assert capfd.readouterr().out == "", "gptqmodel's banner and kernel choices must not reach the CLI's output"
        assert sys.stdout is stdout, "loading must not leave the process's stdout swapped"
        assert model.description.quantization == "GPTQ 4-bit g32"
        text, stats = reply(list(model.stream_chat(HELLO, fixed_length(8))))
        assert text and stats.generated_tokens == 8
    finally:
        model.close()


def test_weights_whose_tensors_overlap_are_a_model_file_error_sentence(checkpoint_copy: Path) -> None:
    # Damage the header checks of inspect_model cannot see (each entry is in range and of the right size), which
    # safetensors itself refuses with its own SafetensorError when transformers opens the file.
    def overlap(header: dict) -> None:
        header["model.layers.1.mlp.up_proj.weight"]["data_offsets"] = header["model.layers.0.mlp.up_proj.weight"]["data_offsets"]

    rewrite_safetensors_header(checkpoint_copy / "model.safetensors", overlap)
    with pytest.raises(ModelFileError, match="could not load checkpoint") as refused:
        TorchBackend().load(checkpoint_copy, LoadOptions(context_length=64))
    assert "damaged" in refused.value.hint


def test_a_truncated_weights_file_is_a_model_file_error_sentence(checkpoint_copy: Path) -> None:
    weights = checkpoint_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: 8 + int.from_bytes(data[:8], "little") + 100])  # the header and a little data
    with pytest.raises(ModelFileError, match="truncated") as refused:
        TorchBackend().load(checkpoint_copy, LoadOptions(context_length=64))
    assert refused.value.hint


def test_a_closed_model_refuses_to_reply_with_a_sentence(tiny_checkpoint: Path) -> None:
    model = TorchBackend().load(tiny_checkpoint, LoadOptions(context_length=64))
    model.close()
    with pytest.raises(PocketError, match="was closed") as refused:
        list(model.stream_chat(HELLO, fixed_length(4)))
    assert "again" in refused.value.hint


def test_gpu_layers_are_refused_with_a_pointer_to_device(tiny_checkpoint: Path) -> None:
    with pytest.raises(PocketError, match="--gpu-layers -1 is for llama.cpp") as refused:
        TorchBackend().load(tiny_checkpoint, LoadOptions(gpu_layers=-1))
    assert "--device cuda" in refused.value.hint


def test_the_first_load_sizes_torchs_threads_and_later_loads_leave_them(tiny_model: TorchChatModel, tiny_checkpoint: Path) -> None:
    # The pool is process-wide: a second model (or the GPTQ converter) must not change the speed of the first.
    import torch

    before = torch.get_num_threads()
    model = TorchBackend().load(tiny_checkpoint, LoadOptions(context_length=64, threads=before + 1))
    model.close()
    assert torch.get_num_threads() == before


def test_a_checkpoint_is_estimated_at_the_device_and_dtype_torch_loads_it_with(tiny_checkpoint: Path) -> None:
    from pocketlm.models.fit import DTYPE_BYTES, estimate_model_memory, torch_default_placement
    from pocketlm.models.formats import inspect_model
    from pocketlm.models.store import model_from_facts

    stored = model_from_facts("tiny", inspect_model(tiny_checkpoint), source="import:test")
    estimate = estimate_model_memory(stored, context_length=128)
    device, dtype = torch_default_placement()
    assert estimate.weights_bytes == stored.parameter_count * DTYPE_BYTES[dtype]
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert estimate.kv_cache_bytes == checkpoint_kv_bytes_per_token(config, DTYPE_BYTES[dtype]) * 128
    assert estimate.memory_name == ("memory" if device == "cpu" else f"GPU memory on {device}")


def test_a_gguf_is_estimated_without_importing_torch(starter_gguf: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pocketlm.models.fit import estimate_model_memory\n"
        "from pocketlm.models.formats import inspect_model\n"
        "from pocketlm.models.store import model_from_facts\n"
        f"model = model_from_facts('starter', inspect_model(Path({str(starter_gguf)!r})), source='import:test')\n"
        "assert estimate_model_memory(model).weights_bytes == model.size_bytes\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_device_summary_names_the_cpu_and_its_cores() -> None:
    import torch

    summary = TorchBackend.device_summary()
    assert summary.startswith("CUDA: " if torch.cuda.is_available() else "CPU (float32), ")


@pytest.fixture(scope="session")
def starter_on_torch(starter_checkpoint: Path) -> Iterator[TorchChatModel]:
    model = TorchBackend().load(starter_checkpoint, LoadOptions(context_length=2048))
    yield model
    model.close()


def test_greedy_reply_names_paris(starter_on_torch: TorchChatModel) -> None:
    text, stats = reply(list(starter_on_torch.stream_chat(capital_question(), SamplingParams(temperature=0, max_tokens=32))))
    assert "paris" in text.lower()
    assert stats.stop_reason == "end_of_generation"


def test_greedy_tokens_are_transformers_generate_tokens_up_to_a_near_tie(starter_on_torch: TorchChatModel) -> None:
    """Our decode loop against model.generate(do_sample=False) on the same prompt ids. generate builds its attention
    mask, positions and cache its own way, so the two compute the same logits in a different order of float32
    operations: they agree to about 1e-4 here, not bit for bit. So the ids must match until the first step where
    they differ, and there the two tokens must be a near-tie in generate's own logits (within 1e-2, a hundred times
    that rounding and far below the gap a wrong mask, position or cache makes, which is whole logits)."""
    import torch

    messages = [ChatMessage("user", "Write a short poem about the sea.")]
    prompt = starter_on_torch._render(messages)
    with torch.inference_mode():
        output = starter_on_torch._model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
            max_new_tokens=16, pad_token_id=2, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    generated = output.sequences[0, len(prompt) :].tolist()
    assert len(generated) >= 8, "generate ended the poem almost at once: pick a longer-answer prompt"
    ours: list[int] = []
    with starter_on_torch._decoding(prompt, SamplingParams(temperature=0)) as steps:
        for _ in range(len(generated)):
            ours.append(steps.next_token())
            steps.advance(ours[-1])
    # generate stops after an end token; our steps do not check for one, so only its length is compared.
    differing = next((index for index, (mine, theirs) in enumerate(zip(ours, generated)) if mine != theirs), None)
    if differing is not None:
        logits = output.logits[differing][0].float()
        gap = float(logits[generated[differing]] - logits[ours[differing]])
        assert gap <= 1e-2, f"token {differing}: ours {ours[differing]} is {gap:.3f} below generate's {generated[differing]}, not a tie"


class TestTorchChatModel(ChatModelContract):
    """The stream every backend owes (tests/backends/chat_model_contract.py), on the tiny model."""

    @pytest.fixture
    def chat_model(self, tiny_model: TorchChatModel) -> TorchChatModel:
        return tiny_model

    @pytest.fixture(scope="class")
    def tokenizer_facts(self, tiny_checkpoint: Path) -> TokenizerFacts:
        return transformers_tokenizer_facts(tiny_checkpoint)

    @pytest.fixture
    def load_with_context(self, tiny_checkpoint: Path) -> Callable[[int], ChatModel]:
        return lambda context_length: TorchBackend().load(tiny_checkpoint, LoadOptions(context_length=context_length))
