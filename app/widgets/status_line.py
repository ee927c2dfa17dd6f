"""One line under the chat: model, backend and device, the active LoRA adapters, speed of the last reply and how full
the context is."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static

from pocketlm.app.history import adapters_label, used_adapters
from pocketlm.backends.base import AdapterSpec


class StatusLine(Static):
    model_name: reactive[str] = reactive("no model")
    backend: reactive[str] = reactive("")
    device: reactive[str] = reactive("")  # where the backend runs: "CPU, 2 physical cores", "CUDA: NVIDIA H200, 139.8 GiB"
    tokens_per_second: reactive[float | None] = reactive(None)
    context_used: reactive[int] = reactive(0)
    context_length: reactive[int] = reactive(0)
    # False where the engine cannot count tokens (a remote server): the meter then says its count is an estimate.
    exact_token_counts: reactive[bool] = reactive(True)
    state: reactive[str] = reactive("")
    adapters: reactive[tuple[AdapterSpec, ...]] = reactive(())  # the open model's description.adapters

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False)  # the model's name is the user's: shown as written, never as markup

    def render(self) -> str:
        parts = [self.model_name]
        if self.backend:
            # The device's kind and name only ("CPU", "CUDA: NVIDIA H200"): its size and core count are for the Models screen.
            device = self.device.split(",")[0]
            # A remote model's device is "remote: URL": "remote at URL", not "remote on remote: URL".
            if (address := device.removeprefix(f"{self.backend}: ")) != device:
                parts.append(f"{self.backend} at {address}")
            else:
                parts.append(f"{self.backend} on {device}" if device else self.backend)
        if self.adapters:
            parts.append("LoRA: " + adapters_label(used_adapters(self.adapters)))  # as the CLI and the history say it
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.1f} tokens/s")
        if self.context_length:
            about = "" if self.exact_token_counts else "about "
            parts.append(f"context {about}{self.context_used}/{self.context_length}")
        if self.state:
            parts.append(self.state)
        return " · ".join(parts)
