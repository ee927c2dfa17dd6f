"""A process that loads model files with LlamaCppBackend, one path per stdin line, and answers one line each.

The damaged-file tests load hundreds of files in process, as the app does; if pocketlm's guards ever let a native
abort through, it kills this worker instead of pytest, and the test reports the file. Answers: "loaded", or
"sentence<TAB>the PocketError", or "traceback<TAB>the traceback with newlines escaped".
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path


def _answer(path: Path) -> str:
    from pocketlm.backends.base import ChatMessage, LoadOptions, SamplingParams
    from pocketlm.backends.llamacpp import LlamaCppBackend
    from pocketlm.models.errors import PocketError

    try:
        model = LlamaCppBackend().load(path, LoadOptions(context_length=64, threads=1))
        try:
            # A load is only "working" if it also decodes: some damage aborts llama.cpp at the first token.
            list(model.stream_chat([ChatMessage("user", "hi")], SamplingParams(temperature=0, max_tokens=2)))
        finally:
            model.close()
    except PocketError as error:
        return f"sentence\t{error}"
    except Exception:  # noqa: BLE001 - what the test must never see
        return "traceback\t" + traceback.format_exc().replace("\n", "\\n")
    return "loaded"


def main() -> None:
    for line in sys.stdin:
        print(_answer(Path(line.rstrip("\n"))), flush=True)


if __name__ == "__main__":
    main()
