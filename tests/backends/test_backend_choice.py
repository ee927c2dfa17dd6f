"""Which backend opens a model: the installed one of lowest priority for its format, or the one the user names; a
choice that cannot work is one sentence naming the backends that can, with what to install."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import pytest

from pocketlm.backends.base import Backend, ChatModel, LoadOptions
from pocketlm.backends.llamacpp import LlamaCppBackend
from pocketlm.backends.pytorch import TorchBackend
from pocketlm.backends.registry import backend_classes, backend_for
from pocketlm.backends.threads import engine_threads
from pocketlm.models.errors import BackendUnavailable, PocketError
from pocketlm.models.fit import physical_cores


class ThirdPartyBackend:
    """A backend as a plugin would register one: it loads safetensors and mlx models, and ranks as set."""

    name: ClassVar[str] = "mlx"
    formats: ClassVar[frozenset[str]] = frozenset({"safetensors", "mlx"})
    install_hint: ClassVar[str] = "Install it with: pip install 'pocketlm[mlx]'"
    installed: ClassVar[bool] = True
    rank: ClassVar[int] = 5

    @classmethod
    def is_available(cls) -> bool:
        return cls.installed

    @classmethod
    def priority(cls, model_format: str) -> int:
        return cls.rank

    @classmethod
    def device_summary(cls) -> str:
        return "Apple silicon"

    def load(self, model_path: Path, options: LoadOptions) -> ChatModel:
        raise NotImplementedError


def plugin(installed: bool = True, rank: int = 5) -> type[Backend]:
    return type("Plugin", (ThirdPartyBackend,), {"installed": installed, "rank": rank})


def test_the_built_in_backends_are_registered() -> None:
    assert {LlamaCppBackend, TorchBackend} <= set(backend_classes())


def test_gguf_opens_on_llama_cpp_and_safetensors_on_torch() -> None:
    assert isinstance(backend_for("gguf"), LlamaCppBackend)
    assert isinstance(backend_for("safetensors"), TorchBackend)
    assert isinstance(backend_for("gptq"), TorchBackend)


def test_the_built_in_priorities() -> None:
    assert LlamaCppBackend.priority("gguf") == 0
    assert TorchBackend.priority("safetensors") == (20 if sys.platform == "darwin" else 10)


def test_the_lowest_priority_installed_backend_opens_a_format_whatever_the_names() -> None:
    # "mlx" sorts after "llama.cpp" but before "torch": only the priorities decide.
    assert isinstance(backend_for("safetensors", known=(LlamaCppBackend, TorchBackend, plugin(rank=5))), ThirdPartyBackend)
    assert isinstance(backend_for("safetensors", known=(LlamaCppBackend, TorchBackend, plugin(rank=50))), TorchBackend)


def test_a_backend_that_is_not_installed_is_passed_over() -> None:
    assert isinstance(backend_for("safetensors", known=(TorchBackend, plugin(installed=False, rank=0))), TorchBackend)


def test_a_format_no_installed_backend_loads_names_the_backends_that_can_with_their_install_hints() -> None:
    with pytest.raises(BackendUnavailable, match="No installed backend loads mlx models") as refused:
        backend_for("mlx", known=(LlamaCppBackend, TorchBackend, plugin(installed=False)))
    assert "mlx (Install it with: pip install 'pocketlm[mlx]')" in refused.value.hint


def test_a_named_backend_that_cannot_load_the_format_says_what_it_loads_and_who_loads_this() -> None:
    with pytest.raises(BackendUnavailable, match="The llama.cpp backend loads gguf models, not safetensors") as refused:
        backend_for("safetensors", "llama.cpp")
    assert "torch" in refused.value.hint
    with pytest.raises(BackendUnavailable, match="The torch backend loads gptq and safetensors models, not gguf"):
        backend_for("gguf", "torch")


def test_a_named_backend_that_is_not_installed_gives_its_install_hint() -> None:
    with pytest.raises(BackendUnavailable, match="The mlx backend is not installed") as refused:
        backend_for("safetensors", "mlx", known=(TorchBackend, plugin(installed=False)))
    assert refused.value.hint == ThirdPartyBackend.install_hint


def test_an_unknown_backend_name_lists_the_known_ones() -> None:
    with pytest.raises(BackendUnavailable, match="No backend is named 'vllm'") as refused:
        backend_for("gguf", "vllm")
    assert "llama.cpp" in refused.value.hint and "torch" in refused.value.hint


def test_engines_keep_a_core_for_the_ui_beside_the_app() -> None:
    assert engine_threads(beside_ui=False) == physical_cores()
    assert engine_threads(beside_ui=True) == max(1, physical_cores() - 1)


def test_device_summaries_say_where_each_backend_runs() -> None:
    assert f"{physical_cores()} physical cores" in LlamaCppBackend.device_summary()
    assert TorchBackend.device_summary()


@pytest.mark.parametrize(
    ("options", "words"),
    [(LoadOptions(dtype="float16"), "GGUF's own types; --dtype is for the torch backend"),
     (LoadOptions(device="cuda"), "--gpu-layers"),
     (LoadOptions(device="cpu", gpu_layers=-1), "disagree")],
    ids=["dtype", "device cuda", "device cpu beside gpu layers"],
)  # fmt: skip
def test_llama_cpp_refuses_the_torch_only_load_options_with_a_sentence(options: LoadOptions, words: str, tmp_path: Path) -> None:
    with pytest.raises(PocketError, match=words.replace("(", r"\(")) as refused:
        LlamaCppBackend().load(tmp_path / "model.gguf", options)
    assert refused.value.hint


def test_llama_cpp_takes_device_cpu_as_no_offload(starter_gguf: Path) -> None:
    model = LlamaCppBackend().load(starter_gguf, LoadOptions(device="cpu", context_length=256))
    try:
        assert model.description.device == "CPU"
    finally:
        model.close()


def test_pocketlm_backends_prints_one_line_per_backend_and_nothing_else() -> None:
    # It imports torch for the device line: neither torch nor a library it pulls in may add its own warnings.
    import subprocess

    done = subprocess.run([str(Path(sys.executable).with_name("pocketlm")), "backends"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [backend.name for backend in backend_classes()]
