"""GPTQ quantization speed and quality: pocketlm's converter against GPTQModel 7.6 in float32, side by side in one run.

    GPTQMODEL_CPU_WORKERS=2 python benchmarks/gptq_speed.py CHECKPOINT_DIR [--calibration builtin FILE ...]
        [--bits 4] [--group-size 64] [--variants]

Both quantize the same checkpoint on the same calibration text (512-token chunks) with the same settings (4-bit,
group size 64, no act-order), each in a fresh subprocess timed from start to saved folder. Both folders are then
loaded back through transformers' own GPTQ path (optimum + gptqmodel) and scored on the same held-out text (never the
calibration text), beside the float model and plain round-to-nearest on the same grid. `--variants` adds pocketlm
with act-order and with other damping values, to show what each buys.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pocketlm.converters.calibration import HELD_OUT_TEXT

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel stops at start-up on a 2-core machine without it


OURS = """
import sys
from pathlib import Path
from pocketlm.converters.base import ConvertOptions
from pocketlm.converters.gptq import GPTQConverter, GPTQSettings
settings = GPTQSettings(bits=int(sys.argv[3]), group_size=int(sys.argv[4]), calibration=sys.argv[5],
                        act_order=sys.argv[6] == "1", damp_percent=float(sys.argv[7]))
GPTQConverter().convert(Path(sys.argv[1]), Path(sys.argv[2]), ConvertOptions(settings=settings), lambda update: None)
"""

GPTQMODEL = """
import sys
import torch
from gptqmodel import GPTQModel, QuantizeConfig
from transformers import AutoTokenizer
from pocketlm.converters.calibration import calibration_chunks, calibration_text
from pocketlm.converters.gptq_walk import CHUNK_TOKENS, MAX_CHUNKS
source, destination, bits, group_size, calibration = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tokenizer = AutoTokenizer.from_pretrained(source)
ids = tokenizer(calibration_text(calibration), add_special_tokens=False)["input_ids"]
samples = [{"input_ids": c, "attention_mask": [1] * len(c)} for c in calibration_chunks(ids, CHUNK_TOKENS, MAX_CHUNKS) if len(c) > 1]
model = GPTQModel.load(source, quantize_config=QuantizeConfig(bits=bits, group_size=group_size, desc_act=False), dtype=torch.float32)
model.quantize(samples)
model.save(destination)
"""


def timed(script: str, *arguments: str) -> float:
    # Run from a scratch folder: GPTQModel writes a logs/ folder into the working directory.
    absolute = [str(Path(a).resolve()) if Path(str(a)).exists() else str(a) for a in arguments]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([sys.executable, "-c", script, *absolute], capture_output=True, text=True, cwd=scratch)
    if result.returncode != 0:
        raise SystemExit(f"a quantization run failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def perplexity(model, tokenizer, text: str) -> float:  # type: ignore[no-untyped-def]
    import torch

    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def folder_perplexity(folder: Path, text: str) -> float:
    """Perplexity of a checkpoint loaded through transformers' own path (GPTQ folders through optimum + gptqmodel)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    return perplexity(model, AutoTokenizer.from_pretrained(folder), text)


def rtn_perplexity(checkpoint: Path, bits: int, group_size: int, text: str) -> float:
    """Round-to-nearest on the same grid, applied in memory to every linear the converter quantizes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pocketlm.converters.gptq_solver import round_to_nearest

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(round_to_nearest(module.weight, bits, group_size).dequantized)
    return perplexity(model, AutoTokenizer.from_pretrained(checkpoint), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--calibration", nargs="+", default=["builtin"], help="builtin, or UTF-8 text files: one table each")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--variants", action="store_true", help="also pocketlm with act-order and other damping values")
    parser.add_argument("--skip-gptqmodel", action="store_true")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pocketlm.converters.calibration import calibration_text
    from pocketlm.converters.gptq_walk import calibration_token_chunks

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    print(f"held-out text: {len(tokenizer(HELD_OUT_TEXT)['input_ids'])} tokens; {args.bits}-bit, group size {args.group_size}; "
          f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip
    float_ppl = perplexity(AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32), tokenizer, HELD_OUT_TEXT)
    rtn_ppl = rtn_perplexity(args.checkpoint, args.bits, args.group_size, HELD_OUT_TEXT)
    runs = [("pocketlm GPTQ (damp 0.05)", False, 0.05)]
    if args.variants:
        runs += [("pocketlm GPTQ act-order", True, 0.05), ("pocketlm GPTQ damp 0.01", False, 0.01), ("pocketlm GPTQ damp 0.1", False, 0.1)]
    for calibration in args.calibration:
        chunks = calibration_token_chunks(tokenizer, calibration_text(calibration))
        print(f"\ncalibration: {calibration} ({sum(map(len, chunks))} tokens, {len(chunks)} chunks)", flush=True)
        rows: list[tuple[str, float | None, float]] = [("float32", None, float_ppl), (f"round-to-nearest {args.bits}-bit", None, rtn_ppl)]
        with tempfile.TemporaryDirectory() as scratch:
            for label, act_order, damp in runs:
                folder = Path(scratch) / label.replace(" ", "-")
                seconds = timed(OURS, args.checkpoint, folder, args.bits, args.group_size, calibration, int(act_order), damp)
                rows.append((label, seconds, folder_perplexity(folder, HELD_OUT_TEXT)))
                print(f"  {label}: {seconds:.1f} s", flush=True)
            if not args.skip_gptqmodel:
                folder = Path(scratch) / "gptqmodel"
                seconds = timed(GPTQMODEL, args.checkpoint, folder, args.bits, args.group_size, calibration)
                rows.append(("GPTQModel 7.6 float32", seconds, folder_perplexity(folder, HELD_OUT_TEXT)))
                print(f"  GPTQModel: {seconds:.1f} s", flush=True)
        print(f"\n{'':32} {'seconds':>8} {'perplexity':>11} {'vs float':>9}")
        for label, seconds, ppl in rows:
            shown = f"{seconds:8.1f}" if seconds is not None else f"{'':>8}"
            print(f"{label:32} {shown} {ppl:11.2f} {ppl / float_ppl:9.3f}")
        ours = next(r for r in rows if r[0].startswith("pocketlm"))
        theirs = next((r for r in rows if r[0].startswith("GPTQModel")), None)
        if theirs is not None and ours[1] and theirs[1]:
            print(f"speed: pocketlm is {theirs[1] / ours[1]:.2f}× GPTQModel's; perplexity ratio pocketlm/GPTQModel {ours[2] / theirs[2]:.3f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
