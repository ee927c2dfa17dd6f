"""Quiet the libraries pocketlm drives: their warnings (torchao's missing CUDA kernels, torch's pytree deprecations,
transformers' config and deprecation notes) print on stderr, across the CLI's reply or the app's screen, and say
nothing a pocketlm user can act on; pocketlm reports what matters in its own sentences.

Set before any of them is imported, without importing them (`pocketlm --help` stays light): logger levels, the
environment variable transformers reads for its verbosity, and a warnings filter. `--debug` leaves them all on.
"""

from __future__ import annotations

import logging
import os
import warnings

_QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "transformers", "optimum", "accelerate")


def quiet_library_chatter() -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    for module in (r"transformers(\.|$)", r"torch(\.|$)", r"torchao(\.|$)", r"optimum(\.|$)", r"gptqmodel(\.|$)"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
