"""How many CPU threads an engine runs: one rule for llama.cpp and PyTorch."""

from __future__ import annotations

from pocketlm.models.fit import physical_cores


def engine_threads(beside_ui: bool) -> int:
    """Physical cores, less one beside the app's UI: an engine's threads (llama.cpp's, torch's intra-op pool) wait for
    each other at every step, so one that shares its core with the app's rendering stalls them all (on 2 cores,
    2 threads decode at half the speed of 1 in the app)."""
    cores = physical_cores()
    return max(1, cores - 1) if beside_ui else cores
