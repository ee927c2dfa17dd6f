"""A PEFT adapter folder is read from its header and config alone: each module's scale is the one PEFT itself computes
(rank and alpha patterns, rsLoRA), and every kind of adapter pocketlm cannot apply is refused with a sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pocketlm.models.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, read_peft_adapter
from tests.adapter_fixtures import build_peft_adapter
from tests.converters.tiny_models import rewrite_safetensors_header


def peft_layers(base: Path, folder: Path) -> dict[str, tuple[int, float]]:
    """{module path: (rank, scaling)} as a real PeftModel loaded from `folder` holds them."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)
    return {name.removeprefix("base_model.model."): (layer.r["default"], layer.scaling["default"])
            for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}  # fmt: skip


@pytest.fixture(scope="module")
def odd_patterns(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rsLoRA with patterns keyed by a module's full path, a dotted suffix and a bare name, and an alpha of 0."""
    return build_peft_adapter(tiny_llama, tmp_path_factory.mktemp("odd") / "odd", rank=6, alpha=5.0, use_rslora=True,
                              rank_pattern={"model.layers.0.mlp.up_proj": 3, "self_attn.o_proj": 2},
                              alpha_pattern={"v_proj": 7.0, "layers.1.self_attn.k_proj": 1.5, "model.layers.0.mlp.gate_proj": 0.0})  # fmt: skip


def test_every_module_has_the_rank_and_scale_peft_gives_it(tiny_adapters: dict[str, Path], odd_patterns: Path, tiny_llama: Path) -> None:
    for folder in (*tiny_adapters.values(), odd_patterns):
        adapter = read_peft_adapter(folder)
        expected = peft_layers(tiny_llama, folder)
        ours = {m.module: (m.rank, m.scale) for m in adapter.modules}
        assert ours.keys() == expected.keys(), folder.name
        for module, (rank, scale) in expected.items():
            assert ours[module][0] == rank, (folder.name, module)
            assert ours[module][1] == pytest.approx(scale, rel=1e-12), (folder.name, module)


def test_facts_of_the_fixture_adapters(tiny_adapters: dict[str, Path]) -> None:
    patterned = read_peft_adapter(tiny_adapters["patterned"])
    assert patterned.layers == (1,) and {m.rank for m in patterned.modules if m.short_name == "mlp.down_proj"} == {2}
    rslora = read_peft_adapter(tiny_adapters["rslora"])
    assert (rslora.use_rslora, rslora.dtype, rslora.rank, rslora.alpha) == (True, "BF16", 8, 4.0)
    second = read_peft_adapter(tiny_adapters["second"])
    assert second.target_names == ("self_attn.q_proj", "self_attn.v_proj") and second.layers == (0, 1)
    a, b = second.load_pair(second.modules[0])
    assert a.shape == (2, 64) and b.shape[1] == 2 and abs(b).max() > 0


def test_a_dora_adapter_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    folder = build_peft_adapter(tiny_llama, tmp_path / "dora", use_dora=True, targets=("q_proj",))
    with pytest.raises(AdapterError, match="dora is a DoRA adapter"):
        read_peft_adapter(folder)


def test_pickle_only_weights_are_refused_unread(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_adapters["plain"] / ADAPTER_CONFIG, folder)
    torch.save(load_file(tiny_adapters["plain"] / ADAPTER_WEIGHTS), folder / "adapter_model.bin")  # save_pretrained(safe_serialization=False)
    with pytest.raises(AdapterError, match=r"only as adapter_model\.bin \(pickle\)"):
        read_peft_adapter(folder)


def test_a_module_without_its_b_matrix_is_refused(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_adapters["second"], tmp_path / "incomplete"))
    missing = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    rewrite_safetensors_header(folder / ADAPTER_WEIGHTS, lambda header: header.pop(missing))
    with pytest.raises(AdapterError) as refused:
        read_peft_adapter(folder)
    assert refused.value.message == "incomplete has no lora_B for model.layers.1.self_attn.v_proj: the adapter is incomplete."


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"peft_type": "IA3"}, "is a PEFT IA3 adapter; pocketlm applies LoRA adapters only"),
        ({"modules_to_save": ["lm_head"]}, "carries fully trained modules too"),
        ({"bias": "lora_only"}, "trains biases as well"),
        ({"r": 0}, "gives r = 0, which is not a positive number"),
        # Pattern values PEFT cannot use must not quietly become r or lora_alpha; a key PEFT cannot compile is refused.
        ({"alpha_pattern": {"q_proj": -4}}, r"gives alpha_pattern\['q_proj'\] = -4, which is not a number of at least 0\. "),
        ({"alpha_pattern": {"q_proj": "8"}}, r"gives alpha_pattern\['q_proj'\] = '8', which is not a number"),
        ({"alpha_pattern": {"q_proj": True}}, r"alpha_pattern\['q_proj'\] = True, which is not a number"),
        ({"rank_pattern": {"v_proj": 2.5}}, r"gives rank_pattern\['v_proj'\] = 2.5, which is not a positive whole number\. "),
        ({"rank_pattern": {"v_proj": 0}}, r"rank_pattern\['v_proj'\] = 0, which is not a positive whole number"),
        ({"rank_pattern": {"q_(proj": 2}}, r"has the rank_pattern key 'q_\(proj', which is not a valid regular expression"),
        ({"alpha_pattern": ["q_proj"]}, "gives alpha_pattern = \\['q_proj'\\], which is not a mapping"),
        # PEFT builds each module at the config's rank and fails on these rank-2 matrices (size mismatch).
        ({"r": 16}, "model.layers.0.self_attn.q_proj has rank-2 matrices, but r in adapter_config.json says rank 16"),
        ({"r": 16, "rank_pattern": {"q_proj": 2}}, "v_proj has rank-2 matrices, but r in adapter_config.json says rank 16"),
        ({"rank_pattern": {"v_proj": 4}}, "v_proj has rank-2 matrices, but its rank_pattern in adapter_config.json says rank 4"),
    ],
)
def test_adapters_pocketlm_cannot_apply_are_refused_with_a_sentence(tiny_adapters: dict[str, Path], tmp_path: Path, changes: dict, words: str) -> None:
    folder = Path(shutil.copytree(tiny_adapters["second"], tmp_path / "changed"))
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, **changes}))
    with pytest.raises(AdapterError, match=words):
        read_peft_adapter(folder)


def test_an_adapter_saved_with_a_whole_head_weight_is_refused_naming_it(tiny_llama: Path, tmp_path: Path) -> None:
    folder = build_peft_adapter(tiny_llama, tmp_path / "with-head", targets=("lm_head",))  # PEFT saves lm_head's weight too
    with pytest.raises(AdapterError) as refused:
        read_peft_adapter(folder)
    assert refused.value.message == "with-head's adapter_model.safetensors holds a whole base weight, base_model.model.lm_head.base_layer.weight, besides its LoRA matrices."
    assert "save_embedding_layers=False" in refused.value.hint


def test_a_rank_pattern_explains_matrices_of_another_rank_than_r(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_adapters["second"], tmp_path / "explained"))  # r 2, alpha 2 on q_proj and v_proj
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 16, "rank_pattern": {"q_proj": 2, "v_proj": 2}}))
    adapter = read_peft_adapter(folder)
    assert {(m.rank, m.scale) for m in adapter.modules} == {(2, 1.0)}  # alpha 2 / the module's rank 2, not / 16


def test_peft_itself_refuses_a_config_rank_the_matrices_do_not_have(tiny_adapters: dict[str, Path], tiny_llama: Path, tmp_path: Path) -> None:
    """Why read_peft_adapter refuses it: the adapter is broken for PEFT too, not merely strange."""
    folder = Path(shutil.copytree(tiny_adapters["second"], tmp_path / "r16"))
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 16}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_layers(tiny_llama, folder)
