"""Stand-ins for the llama.cpp probe's child, run through its documented seam (POCKETLM_LLAMACPP_PROBE_MODULE).

`python -m tests.backends.probe_seams PATH GPU_LAYERS THREADS` plays the role named by POCKETLM_TEST_PROBE_ROLE:

- abort: prints a llama.cpp-like assertion and dies by SIGABRT, as llama.cpp does on a damaged file;
- killed: dies by SIGKILL, as the kernel's out-of-memory killer kills it;
- cuda-oom: prints ggml-cuda's failed allocation and aborts, as llama.cpp does when the GPU is full;
- hang: never finishes;
- broken: exits with status 1, as an interpreter that cannot even import the probe does;
- count: runs the real probe.

Every role first appends its arguments to the file named by POCKETLM_TEST_PROBE_LOG, if set, so tests count runs.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time


def _main() -> None:
    role = os.environ.get("POCKETLM_TEST_PROBE_ROLE", "abort")
    if log_path := os.environ.get("POCKETLM_TEST_PROBE_LOG"):
        with open(log_path, "a") as log:
            log.write(" ".join(sys.argv[1:]) + "\n")
    print("llama_model_loader: loaded meta data", file=sys.stderr, flush=True)
    if role == "abort":
        print("/build/vendor/llama.cpp/src/llama-vocab.cpp:2544: GGML_ASSERT(made-up test failure) failed", file=sys.stderr, flush=True)
        os.abort()
    if role == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if role == "cuda-oom":
        print("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: cudaMalloc failed: out of memory", file=sys.stderr)
        print("CUDA error: out of memory", file=sys.stderr)
        print("  current device: 0, in function ggml_cuda_pool_alloc at /build/ggml/src/ggml-cuda/ggml-cuda.cu:412", file=sys.stderr)
        print("/build/ggml/src/ggml-cuda/ggml-cuda.cu:88: CUDA error", file=sys.stderr, flush=True)
        os.abort()
    if role == "hang":
        time.sleep(3600)
    if role == "broken":
        sys.exit(1)
    runpy.run_module("pocketlm.backends.llamacpp_probe", run_name="__main__")


if __name__ == "__main__":
    _main()
