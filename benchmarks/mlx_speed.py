"""Prompt processing and decode speed of pocketlm's MLX backend against mlx-lm's own `stream_generate`, side by side.

    python benchmarks/mlx_speed.py [MODEL] [-p 512] [-n 128] [--repetitions 3] [--device cpu|gpu]

MODEL is a safetensors checkpoint or an MLX model folder (default: the starter's checkpoint). Both run on the same
loaded model (so the same dtype: float32 on a CPU) and the same prompt ids (`pocketlm bench`'s: the held-out text's
tokens, backends/speed.py's bench_prompt), greedily, end tokens ignored:
  pp  the backend as `pocketlm bench` measures it (ChatModel.stream_tokens of -p ids, one token out: its
      GenerationStats.prompt_tokens_per_second), mlx-lm as it reports itself (stream_generate's prompt_tps). Both
      count the prompt's evaluation and the first token's sampling.
  tg  -n tokens decoded one at a time after the first, over the time from the first to the last: the backend's
      GenerationStats.tokens_per_second (stream_tokens of one id), mlx-lm from a time stamp per token it yields.
A warm-up of each first, then the repetitions, alternating the two. Goal: the backend at ≥ 0.97× mlx-lm in both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pocketlm.backends.base import GenerationStats, LoadOptions, SamplingParams
from pocketlm.backends.mlx import MLXBackend, MLXChatModel
from pocketlm.backends.speed import bench_prompt


def backend_rates(model: MLXChatModel, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(pp, tg) tokens/s, as backends/speed.py's measure_speed runs them."""

    def stats(ids: list[int], tokens: int) -> GenerationStats:
        sampling = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        (result,) = [e for e in model.stream_tokens(ids, sampling) if isinstance(e, GenerationStats)]
        assert result.generated_tokens == tokens, result
        return result

    return stats(prompt, 1).prompt_tokens_per_second, stats(prompt[:1], n_gen + 1).tokens_per_second


def mlx_lm_rates(model: MLXChatModel, prompt: list[int], n_gen: int) -> tuple[float, float]:
    from mlx_lm import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    tokenizer = TokenizerWrapper(model._tokenizer)
    tokenizer.eos_token_ids = set()  # ignore end tokens, as the backend's runs do
    (first, *_) = list(stream_generate(model._model, tokenizer, prompt, max_tokens=1))
    times = [time.perf_counter() for _ in stream_generate(model._model, tokenizer, prompt[:1], max_tokens=n_gen + 1)]
    # stream_generate yields once per token, then once more (finalize) after the last: that one is no token.
    times = times[: n_gen + 1]
    assert len(times) == n_gen + 1, len(times)
    return first.prompt_tps, n_gen / (times[-1] - times[0])


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="a safetensors checkpoint or MLX model folder (default: the starter's)")
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu or gpu (default: MLX's default device)")
    arguments = parser.parse_args()
    folder = arguments.model
    if folder is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.fixtures import starter_checkpoint_path

        folder = starter_checkpoint_path()
    from pocketlm.converters.calibration import HELD_OUT_TEXT

    model = MLXBackend().load(folder, LoadOptions(context_length=arguments.n_prompt + arguments.n_gen + 16, device=arguments.device))
    prompt = bench_prompt(model, HELD_OUT_TEXT, arguments.n_prompt)
    backend_rates(model, prompt, arguments.n_gen), mlx_lm_rates(model, prompt, arguments.n_gen)  # warm-up
    ours: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    for _ in range(arguments.repetitions):
        ours.append(backend_rates(model, prompt, arguments.n_gen))
        theirs.append(mlx_lm_rates(model, prompt, arguments.n_gen))
    title = f"{folder.name}: {model.description.device}, {model.description.quantization}, {arguments.repetitions} repetitions"
    table = Table(title=title)
    table.add_column("engine")
    for test in (f"pp{arguments.n_prompt}", f"tg{arguments.n_gen}"):
        table.add_column(f"{test} t/s", justify="right")
    table.add_row("pocketlm mlx backend", *(spread([run[i] for run in ours]) for i in (0, 1)))
    table.add_row("mlx_lm.stream_generate", *(spread([run[i] for run in theirs]) for i in (0, 1)))
    ratios = [statistics.fmean(run[i] for run in ours) / statistics.fmean(run[i] for run in theirs) for i in (0, 1)]
    table.add_row("ratio backend / mlx-lm (goal ≥ 0.97)", *(f"{ratio:.3f}" for ratio in ratios))
    Console(width=160).print(table)
    model.close()


if __name__ == "__main__":
    main()
