"""The remote backend's cost over a bare `openai` client loop, on the same llama-server and the same request.

    python benchmarks/remote_overhead.py [GGUF] --llama-server PATH [-t 2] [--repetitions 8] [-n 128]

One llama-server (one slot) serves the GGUF (default: the starter). The same chat request (a fixed prompt, greedy,
`max_tokens` -n, `ignore_eos`) is streamed, alternately, by
  remote  backends/remote.py's RemoteChatModel.stream_chat, as `pocketlm chat gpu` runs it (TextPieces, then its
          GenerationStats), and
  raw     a plain loop over `client.chat.completions.create(..., stream=True)` with the same fields, reading each
          chunk's delta,
each timed here the same way: TTFT from the call to the first text, decode tokens/s as (tokens − 1) over the time
from the first text to the last (tokens: the server's usage), and the client's own CPU time per request (the Python
the backend adds per chunk shows there first; llama-server's time does not count). One warm-up of each first.
Mean ± sample sd; ratios are the backend's speed over the raw loop's (≥ 0.97 means an overhead under 3%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from serve_speed import DEFAULT_GGUF, MODEL_NAME, PROMPT, llama_server, spread

from pocketlm.backends.base import ChatMessage, GenerationStats, SamplingParams, TextPiece
from pocketlm.backends.remote import RemoteChatModel
from pocketlm.models.remote_endpoints import RemoteEndpoint


@dataclass(frozen=True)
class Timing:
    ttft_s: float
    decode_tps: float
    cpu_ms: float
    text: str


def timed_remote(model: RemoteChatModel, max_tokens: int) -> Timing:
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    cpu, sent = time.process_time(), time.perf_counter()
    first = last = None
    pieces: list[str] = []
    stats = None
    for event in model.stream_chat([ChatMessage("user", PROMPT)], sampling):
        if isinstance(event, TextPiece):
            last = time.perf_counter()
            first = first or last
            pieces.append(event.text)
        elif isinstance(event, GenerationStats):
            stats = event
    assert stats is not None and first is not None and last is not None
    return Timing(first - sent, (stats.generated_tokens - 1) / (last - first), (time.process_time() - cpu) * 1000, "".join(pieces))


def timed_raw(client, max_tokens: int) -> Timing:  # type: ignore[no-untyped-def]
    # The fields RemoteChatModel sends for this SamplingParams (backends/remote.py's _request_sampling).
    cpu, sent = time.process_time(), time.perf_counter()
    first = last = None
    pieces: list[str] = []
    usage = None
    stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": PROMPT}], stream=True,
                                            stream_options={"include_usage": True}, temperature=0, top_p=SamplingParams().top_p,
                                            max_tokens=max_tokens, extra_body={"ignore_eos": True})  # fmt: skip
    with stream:
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    last = time.perf_counter()
                    first = first or last
                    pieces.append(choice.delta.content)
    assert usage is not None and first is not None and last is not None
    return Timing(first - sent, (usage.completion_tokens - 1) / (last - first), (time.process_time() - cpu) * 1000, "".join(pieces))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", nargs="?", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--llama-server", type=Path, default=Path("/work/llama-build/bin/llama-server"))
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("-n", "--max-tokens", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=8)
    args = parser.parse_args()
    from openai import OpenAI

    console = Console(stderr=True)
    workdir = Path(tempfile.mkdtemp(prefix="pocketlm-remote-overhead-"))
    loads = [os.getloadavg()[0]]
    results: dict[str, list[Timing]] = {"remote backend": [], "raw openai loop": []}
    try:
        with llama_server(args.llama_server, args.gguf, args.threads, args.ctx, 1, workdir) as server:
            model = RemoteChatModel(RemoteEndpoint("bench", server.base_url), MODEL_NAME, args.ctx)
            client = OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=600)
            runs = {"remote backend": lambda: timed_remote(model, args.max_tokens), "raw openai loop": lambda: timed_raw(client, args.max_tokens)}
            for run in runs.values():  # warm-up: connection open, prompt cached
                run()
            for repetition in range(args.repetitions):
                order = list(runs) if repetition % 2 == 0 else list(reversed(runs))
                for label in order:
                    results[label].append(runs[label]())
                    loads.append(os.getloadavg()[0])
                console.print(f"repetition {repetition + 1}/{args.repetitions} (load average {loads[-1]:.2f})")
            model.close()
            client.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    table = Table(title=f"{args.gguf.name} on llama-server, {args.threads} threads, {args.repetitions} repetitions, -n {args.max_tokens}, "
                        f"load average {min(loads):.2f}–{max(loads):.2f}")  # fmt: skip
    for column in ("client", "decode tok/s", "TTFT ms", "client CPU ms/request"):
        table.add_column(column, justify="left" if column == "client" else "right")
    for label, timings in results.items():
        table.add_row(label, spread([t.decode_tps for t in timings]), spread([t.ttft_s * 1000 for t in timings]),
                      spread([t.cpu_ms for t in timings]))  # fmt: skip
    ours, raw = results["remote backend"], results["raw openai loop"]

    def ratio(pick, inverse: bool = False) -> str:  # type: ignore[no-untyped-def]
        mean_ours, mean_raw = statistics.fmean(map(pick, ours)), statistics.fmean(map(pick, raw))
        paired = statistics.median(pick(a) / pick(b) for a, b in zip(ours, raw, strict=True))
        return f"{mean_raw / mean_ours if inverse else mean_ours / mean_raw:.3f} (median of pairs {1 / paired if inverse else paired:.3f})"

    out = Console()
    out.print(table)
    out.print(f"remote backend / raw loop: decode tok/s {ratio(lambda t: t.decode_tps)}, TTFT (speed) {ratio(lambda t: t.ttft_s, inverse=True)}"
              "  (goal ≥ 0.97: overhead under 3%)")  # fmt: skip
    out.print(f"client CPU per request: remote backend {statistics.fmean(t.cpu_ms for t in ours):.1f} ms, "
              f"raw loop {statistics.fmean(t.cpu_ms for t in raw):.1f} ms")  # fmt: skip
    same = all(t.text == raw[0].text for t in ours + raw)
    out.print(f"every reply the same text: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
