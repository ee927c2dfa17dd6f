"""What loading a GPTQ checkpoint through transformers needs first: optimum and gptqmodel installed, gptqmodel told
how many CPU workers to start, and its console output (a banner and kernel choices, on stdout) turned off.

gptqmodel logs through logbar, whose shared logger writes to stdout: the CLI's reply, or under the app's screen.
Neither has an environment variable for its level, so the shared logger is made here, before gptqmodel makes it,
and set to errors only; gptqmodel then reuses it. Making it prints one empty line with print(), so importing logbar
(which makes it) runs with stdout redirected: once per process, under a lock (redirect_stdout swaps sys.stdout for every thread, so
two loads must not interleave their swaps), and before gptqmodel's import, which is the slow part and runs unredirected.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from importlib.util import find_spec

from pocketlm.models.errors import BackendUnavailable

GPTQ_INSTALL_HINT = "Install it with: pip install 'pocketlm[gptq]'"

_quiet_lock = threading.Lock()
_quieted = False


def prepare_gptq() -> None:
    """Refuse a missing optimum or gptqmodel with a sentence; otherwise ready gptqmodel's environment and logging.
    Call before anything imports gptqmodel (transformers does, through optimum, when it reads a GPTQ config)."""
    missing = [name for name in ("optimum", "gptqmodel") if find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise BackendUnavailable(f"Loading GPTQ checkpoints needs {' and '.join(missing)}, which {verb} not installed.", GPTQ_INSTALL_HINT)
    # gptqmodel starts a pool of CPU workers at import; on a 2-core machine it waits for them for ever unless told
    # how many there are. Its warning about Python's GIL concerns quantizing MoE models on several GPUs, not loading.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    _quiet_gptqmodel_logging()


def _quiet_gptqmodel_logging() -> None:
    global _quieted
    with _quiet_lock:
        if _quieted or find_spec("logbar") is None:  # a gptqmodel without logbar logs some other way: nothing to quiet
            return
        with contextlib.redirect_stdout(io.StringIO()):
            from logbar import LogBar  # its import makes the shared logger already (logbar/progress.py)

            shared = LogBar.shared()
        shared.setLevel(logging.ERROR)
        # torchao (imported by gptqmodel) warns through the standard logging about CUDA kernels a CPU build lacks.
        logging.getLogger("torchao").setLevel(logging.ERROR)
        _quieted = True
