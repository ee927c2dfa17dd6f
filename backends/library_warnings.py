"""Quiet the libraries the backends and converters drive: their warnings (torchao's missing CUDA kernels, torch's
pytree deprecations, transformers' config and deprecation notes) print on stderr, across the CLI's reply or the app's
screen, and say nothing a pocketlm user can act on; pocketlm reports what matters in its own sentences.

Nothing is imported: logger levels, the environment variables the libraries read when they are imported, and a
warnings filter; so the CLI calls it at start (`pocketlm --help` stays light, `--debug` leaves it out), and a backend
calls it again before loading, for programs that use the backend without the CLI. Process-wide: pocketlm is these
libraries' only user in its process.
"""

from __future__ import annotations

import logging
import os
import warnings

# "transformers" at ERROR is what transformers' own set_verbosity_error() does, whether or not it is imported yet.
_QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "transformers", "optimum", "accelerate")
_QUIET_MODULES = (r"transformers(\.|$)", r"torch(\.|$)", r"torchao(\.|$)", r"optimum(\.|$)", r"gptqmodel(\.|$)")


def quiet_library_warnings() -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read by transformers when it is first imported
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    for module in _QUIET_MODULES:
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
