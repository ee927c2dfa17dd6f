"""Conversion and quantization speed against llama.cpp's own tools, side by side in one run.

- HF safetensors → GGUF f16: pocketlm's converter vs llama.cpp's `convert_hf_to_gguf.py` (from the
  llama-cpp-python sdist's vendor/llama.cpp, run with its own gguf-py), wall time and peak RSS of each process.
- f16 GGUF → Q4_K_M: pocketlm's `quantize` vs the `llama-quantize` binary.

    python benchmarks/convert.py CHECKPOINT_DIR --llama-cpp /path/to/vendor/llama.cpp [--llama-quantize BIN] [--repeat 3]

Each row runs in a fresh subprocess; repetitions alternate between the tools, and the table prints medians and
ratios (>1 means pocketlm is faster or smaller).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POCKETLM_CONVERT = """
import sys
from pathlib import Path
from pocketlm.converters.base import ConvertOptions
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.converters.hf_to_gguf import HfToGGUF
HfToGGUF().convert(Path(sys.argv[1]), Path(sys.argv[2]), ConvertOptions(settings=GGUFSettings(outtype="f16")), lambda update: None)
"""

POCKETLM_QUANTIZE = """
import sys
from pathlib import Path
from pocketlm.converters.base import ConvertOptions
from pocketlm.converters.gguf_quantize import GGUFQuantizer
from pocketlm.converters.gguf_settings import GGUFSettings
GGUFQuantizer().convert(Path(sys.argv[1]), Path(sys.argv[2]), ConvertOptions(settings=GGUFSettings(quant="Q4_K_M"), threads=int(sys.argv[3])), lambda update: None)
"""


def run(command: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, from the child's rusage) of `command`, run to completion."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{command[0]} failed:\n{stderr.decode()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (vendor/llama.cpp of the sdist)")
    parser.add_argument("--llama-quantize", type=Path, help="a built llama-quantize binary")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    reference_env = {**os.environ, "PYTHONPATH": str(args.llama_cpp / "gguf-py")}
    rows: dict[str, list[tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory() as work:
        ours, theirs = Path(work) / "ours-f16.gguf", Path(work) / "theirs-f16.gguf"
        for _ in range(args.repeat):
            rows.setdefault("convert: pocketlm", []).append(run([sys.executable, "-c", POCKETLM_CONVERT, str(args.checkpoint), str(ours)]))
            rows.setdefault("convert: convert_hf_to_gguf.py", []).append(run(
                [sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(args.checkpoint), "--outtype", "f16", "--outfile", str(theirs)],
                reference_env,
            ))  # fmt: skip
        if args.llama_quantize:
            for _ in range(args.repeat):
                rows.setdefault("quantize Q4_K_M: pocketlm", []).append(
                    run([sys.executable, "-c", POCKETLM_QUANTIZE, str(ours), str(Path(work) / "ours-q4.gguf"), str(args.threads)]))
                rows.setdefault("quantize Q4_K_M: llama-quantize", []).append(
                    run([str(args.llama_quantize), str(ours), str(Path(work) / "theirs-q4.gguf"), "Q4_K_M", str(args.threads)]))

    print(f"{'task: tool':<36} {'median s':>9} {'peak RSS':>10} {'time ratio':>11} {'RSS ratio':>10}")
    names = list(rows)
    for index, name in enumerate(names):
        wall = statistics.median(t for t, _ in rows[name])
        rss = statistics.median(m for _, m in rows[name])
        reference = names[index + 1] if index % 2 == 0 else name
        ref_wall = statistics.median(t for t, _ in rows[reference])
        ref_rss = statistics.median(m for _, m in rows[reference])
        print(f"{name:<36} {wall:>9.2f} {rss / 2**20:>7.0f} MiB {ref_wall / wall:>11.2f} {ref_rss / rss:>10.2f}")


if __name__ == "__main__":
    main()
