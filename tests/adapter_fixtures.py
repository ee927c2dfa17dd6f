"""PEFT LoRA adapters for tests, made by PEFT itself on a given base checkpoint (seconds for the tiny models).

B is not left at PEFT's zero initialisation: a zero B changes nothing, and every parity test would pass vacuously.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_peft_adapter(base: Path, destination: Path, *, rank: int = 4, alpha: float = 8.0, use_rslora: bool = False,
                       targets: tuple[str, ...] = ATTENTION_AND_MLP, rank_pattern: dict[str, int] | None = None,
                       alpha_pattern: dict[str, float] | None = None, layers: list[int] | None = None, seed: int = 0,
                       spread: float = 0.05, dtype: str = "float32", use_dora: bool = False,
                       save_embedding_layers: bool | str = "auto") -> Path:  # fmt: skip
    """A LoRA on the checkpoint at `base`, saved by PEFT's save_pretrained into `destination`; A and B drawn from
    N(0, spread²) so the adapter moves the logits by a visible amount without drowning the base model.
    `save_embedding_layers` is save_pretrained's: "auto" saves an adapted lm_head's or embedding's whole base weight
    beside the LoRA, as a user's adapter has it; False keeps the LoRA matrices alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(targets), lora_dropout=0.0,
                        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, layers_to_transform=layers,
                        use_dora=use_dora, init_lora_weights=True, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.normal_(0.0, spread)
    peft_model.to(getattr(torch, dtype))
    peft_model.save_pretrained(destination, save_embedding_layers=save_embedding_layers)
    config_path = destination / "adapter_config.json"
    # PEFT writes the absolute path of a local base; a Hub-trained adapter names a repo id. Keep the test's the latter's shape.
    import json

    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(data, indent=2))
    return destination


@dataclass(frozen=True)
class PeftAnswer:
    """PEFT's greedy answer on a checkpoint with an adapter, with the logits that chose each token."""

    tokens: list[int]  # prompt then answer
    prompt_length: int
    logits: np.ndarray  # one row per token of `tokens`, with the adapter
    base_logits: np.ndarray  # the same, with the adapter off

    def check_follows(self, got: np.ndarray, backend: str, near_tie: float) -> None:
        """`got` (a backend's token_logits over `tokens`) picks the answer's token at every step, until a step where
        PEFT's own two best logits are within `near_tie` (rounding may tip such a step either way)."""
        import numpy as np

        for step in range(self.prompt_length - 1, len(self.tokens) - 1):  # row i chooses token i + 1
            if int(got[step].argmax()) != self.tokens[step + 1]:
                first, second = np.sort(self.logits[step])[::-1][:2]
                assert first - second < near_tie, f"{backend} left PEFT's answer at step {step - self.prompt_length + 1} without a near-tie"
                return


def peft_greedy_answer(checkpoint: Path, adapter: Path, messages: list[dict[str, str]], max_new_tokens: int = 24) -> PeftAnswer:
    """transformers + PEFT in float32: the chat-templated prompt, its greedy answer, and the logits along it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(messages, add_generation_prompt=True)
    prompt = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        tokens = peft.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[0].tolist()  # fmt: skip
        logits = peft(torch.tensor([tokens])).logits[0].numpy()
        with peft.disable_adapter():
            base_logits = peft(torch.tensor([tokens])).logits[0].numpy()
    return PeftAnswer(tokens, len(prompt), logits, base_logits)
