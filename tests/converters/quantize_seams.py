"""Stand-ins for the quantizer's child, run through its documented seam (POCKETLM_QUANTIZE_CHILD_MODULE).

`python -m tests.converters.quantize_seams SOURCE OUTPUT FTYPE THREADS [MATRIX]` plays the role named by
POCKETLM_TEST_QUANTIZE_ROLE:

- abort: reports a tensor and a llama.cpp-like problem, then dies by SIGABRT, as llama.cpp does on an odd input;
- killed: dies by SIGKILL, as the kernel's out-of-memory killer kills it;
- silent: watches its stdin as the real child does (so it ends with its parent), writes its process id to the file
  named by POCKETLM_TEST_QUANTIZE_PID_FILE, and then says nothing, ever.
"""

from __future__ import annotations

import os
import signal
import sys
import time

PROBLEM = "llama_model_quantize: made-up test failure in blk.0.attn_q.weight"


def _main() -> None:
    role = os.environ.get("POCKETLM_TEST_QUANTIZE_ROLE", "abort")
    if role == "abort":
        print("progress 1 3", flush=True)
        print(f"problem {PROBLEM}", flush=True)
        os.abort()
    if role == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if role == "silent":
        from pocketlm.converters.gguf_quantize_child import die_with_parent

        die_with_parent()
        pid_file = os.environ["POCKETLM_TEST_QUANTIZE_PID_FILE"]
        with open(pid_file + ".tmp", "w") as file:
            file.write(str(os.getpid()))
        os.rename(pid_file + ".tmp", pid_file)  # whole or absent: the test never reads half a number
        time.sleep(3600)
    sys.exit(f"unknown role {role}")


if __name__ == "__main__":
    _main()
