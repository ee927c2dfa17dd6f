"""Decode speed of pocketlm's MLX backend against mlx-lm's own `stream_generate`, side by side.

    python benchmarks/mlx_decode.py [MODEL] [--tokens 128] [--repetitions 3] [--device cpu|gpu]

MODEL is a safetensors checkpoint or an MLX model folder (default: the starter's checkpoint). Both generate the same
number of new tokens greedily after the same prompt ids (the chat template's rendering of one user message), end
tokens ignored, on the same loaded model (so the same dtype: float32 on a CPU): the backend through
`ChatModel.stream_chat` (template, sampling, detokenising, stop strings, events), mlx-lm with `stream_generate` (its
generate_step loop and streaming detokenizer). Decode speed is tokens after the first over the time from the first
to the last, measured the same way for both (GenerationStats for the backend; a time stamp per token mlx-lm yields).
A warm-up run first, then the best of the repetitions, alternating the two. Goal: the backend at ≥ 0.97× mlx-lm.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pocketlm.backends.base import ChatMessage, GenerationStats, LoadOptions, SamplingParams
from pocketlm.backends.mlx import MLXBackend, MLXChatModel

MESSAGES = [ChatMessage("user", "Tell me a long story about a lighthouse keeper.")]


def backend_rate(model: MLXChatModel, tokens: int) -> float:
    sampling = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    (stats,) = [e for e in model.stream_chat(MESSAGES, sampling) if isinstance(e, GenerationStats)]
    assert stats.generated_tokens == tokens, stats
    return stats.tokens_per_second


def mlx_lm_rate(model: MLXChatModel, tokens: int) -> float:
    from mlx_lm import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    tokenizer = TokenizerWrapper(model._tokenizer)
    tokenizer.eos_token_ids = set()  # ignore end tokens, as the backend run does
    times = [time.perf_counter() for _ in stream_generate(model._model, tokenizer, model._render(MESSAGES), max_tokens=tokens)]
    # stream_generate yields once per token, then once more (finalize) after the last: that one is no token.
    times = times[:tokens]
    assert len(times) == tokens, len(times)
    return (tokens - 1) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="a safetensors checkpoint or MLX model folder (default: the starter's)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu or gpu (default: MLX's default device)")
    arguments = parser.parse_args()
    folder = arguments.model
    if folder is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.fixtures import starter_checkpoint_path

        folder = starter_checkpoint_path()
    model = MLXBackend().load(folder, LoadOptions(context_length=1024, device=arguments.device))
    backend_rate(model, arguments.tokens), mlx_lm_rate(model, arguments.tokens)  # warm-up
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(arguments.repetitions):
        ours.append(backend_rate(model, arguments.tokens))
        theirs.append(mlx_lm_rate(model, arguments.tokens))
    table = Table(title=f"{folder.name}: {model.description.device}, {model.description.quantization}, {arguments.tokens} tokens, best of {arguments.repetitions}")
    table.add_column("engine")
    table.add_column("decode tok/s", justify="right")
    table.add_column("all runs", justify="right")
    table.add_row("pocketlm mlx backend", f"{max(ours):.1f}", ", ".join(f"{rate:.1f}" for rate in ours))
    table.add_row("mlx_lm.stream_generate", f"{max(theirs):.1f}", ", ".join(f"{rate:.1f}" for rate in theirs))
    console = Console()
    console.print(table)
    console.print(f"ratio backend / mlx-lm: {max(ours) / max(theirs):.3f} (goal ≥ 0.97)")
    model.close()


if __name__ == "__main__":
    main()
