"""Stands in for app/bench_cell.py (POCKETLM_BENCH_CELL_MODULE) in a test: it reads its job, says it is loading, then
dies as llama.cpp does on a failed assertion (ggml's line on stderr, then SIGABRT)."""

import json
import os
import sys

if __name__ == "__main__":
    json.loads(sys.stdin.buffer.readline())
    print(json.dumps({"progress": "loading", "done": 0, "total": 1}), flush=True)
    print("/tmp/pip-build/vendor/llama.cpp/src/llama-model.cpp:812: GGML_ASSERT(n_embd > 0) failed", file=sys.stderr, flush=True)
    os.abort()
