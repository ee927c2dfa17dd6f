"""Decode speed of pocketlm's PyTorch backend against a plain transformers `model.generate`, side by side.

    python benchmarks/torch_decode.py [CHECKPOINT] [--tokens 128] [--repetitions 3] [--device cpu]

Both generate the same number of new tokens greedily after the same prompt ids (the chat template's rendering of one
user message), end tokens ignored, on the same loaded model: the backend through `ChatModel.stream_chat` (template,
sampling, detokenising, stop strings, events), `model.generate` with its own greedy loop. Decode speed is tokens
after the first over the time from the first to the last, measured the same way for both (GenerationStats for the
backend; a stopping criterion, which generate calls after every token anyway, time-stamps generate's tokens). A
warm-up run first, then the best of the repetitions. Goal: the backend within 10% of generate.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pocketlm.backends.base import ChatMessage, GenerationStats, LoadOptions, SamplingParams
from pocketlm.backends.pytorch import TorchBackend, TorchChatModel

MESSAGES = [ChatMessage("user", "Tell me a long story about a lighthouse keeper.")]


def backend_rate(model: TorchChatModel, tokens: int) -> float:
    sampling = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    (stats,) = [e for e in model.stream_chat(MESSAGES, sampling) if isinstance(e, GenerationStats)]
    assert stats.generated_tokens == tokens, stats
    return stats.tokens_per_second


def generate_rate(model: TorchChatModel, tokens: int) -> float:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class TokenClock(StoppingCriteria):
        """Never stops; notes when each token was appended."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    transformers_model = model._model
    prompt = torch.tensor([model._render(MESSAGES)], device=transformers_model.device)
    config = copy.deepcopy(transformers_model.generation_config)
    config.eos_token_id = None  # ignore end tokens, as the backend run does
    config.pad_token_id = 0
    config.do_sample = False
    config.max_new_tokens = tokens
    clock = TokenClock()
    with torch.inference_mode():
        output = transformers_model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                             stopping_criteria=StoppingCriteriaList([clock]))  # fmt: skip
    assert output.shape[1] - prompt.shape[1] == tokens == len(clock.times)
    return (tokens - 1) / (clock.times[-1] - clock.times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help="a safetensors checkpoint folder (default: the starter's)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu (float32), cuda, ... (default: cpu)")
    arguments = parser.parse_args()
    checkpoint = arguments.checkpoint
    if checkpoint is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.fixtures import starter_checkpoint_path

        checkpoint = starter_checkpoint_path()
    model = TorchBackend().load(checkpoint, LoadOptions(context_length=1024, device=arguments.device))
    backend_rate(model, arguments.tokens), generate_rate(model, arguments.tokens)  # warm-up
    # Alternate, so a neighbour's load on a shared machine falls on both rows alike.
    ours, theirs = [], []
    for _ in range(arguments.repetitions):
        ours.append(backend_rate(model, arguments.tokens))
        theirs.append(generate_rate(model, arguments.tokens))
    model.close()

    table = Table(title=f"{checkpoint.name}, {model.description.quantization} on {arguments.device}: "
                        f"{arguments.tokens} new tokens, best of {arguments.repetitions}")  # fmt: skip
    for column in ("", "decode tokens/s (best)", "all runs"):
        table.add_column(column)
    table.add_row("model.generate", f"{max(theirs):.2f}", " ".join(f"{rate:.2f}" for rate in theirs))
    table.add_row("pocketlm torch", f"{max(ours):.2f}", " ".join(f"{rate:.2f}" for rate in ours))
    Console().print(table)
    print(f"pocketlm / generate: {max(ours) / max(theirs):.3f} (goal: at least 0.90)")


if __name__ == "__main__":
    main()
