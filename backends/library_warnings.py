"""Quiet what transformers and the libraries under it print while a backend loads a model.

The CLI quiets them at its start (app/library_noise.py); this is for a backend used as a library, where no CLI ran.
"""

from __future__ import annotations


def quiet_library_warnings() -> None:
    """Library chatter written to stderr while transformers loads (torchao's missing CUDA kernels, torch's pytree
    deprecations, transformers' config and deprecation warnings) lands across the CLI's reply or the app's screen;
    pocketlm says what matters itself. Process-wide levels, set once: pocketlm is these libraries' only user here."""
    import logging as standard_logging
    import warnings

    for name in ("torchao", "torch.utils._pytree"):
        standard_logging.getLogger(name).setLevel(standard_logging.ERROR)
    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
