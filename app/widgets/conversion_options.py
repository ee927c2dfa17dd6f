"""Each conversion target's own options on the Convert screen: a widget per target that builds its settings dataclass.

GGUF: the type written from the checkpoint, a quantization (with expected size and a quality note) and an optional
importance matrix. GPTQ: bits, group size, act-order and the calibration text. MLX: bits (or float weights), group
size, the float dtype and mlx-lm's mixed-bit recipes. A target without a widget here
(a third-party converter) converts with its defaults. Beside the Convert button, for every target, the verify-after-converting switch.
"""

from __future__ import annotations

from dataclasses import replace

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import Input, Label, OptionList, Select, Static, Switch
from textual.widgets.option_list import Option

from pocketlm.converters.base import ConversionError
from pocketlm.converters.calibration import BUILTIN
from pocketlm.converters.gguf_settings import OUTTYPE_CHOICES, GGUFSettings
from pocketlm.converters.mlx import DTYPES, GROUP_SIZES, RECIPES, MLXConverter, MLXSettings  # imports no mlx
from pocketlm.converters.quant_types import QUANT_TYPES, expected_size
from pocketlm.models.fit import human_bytes
from pocketlm.models.store import LocalModel

NO_QUANT = "none"
_DEFAULT_QUANT = "Q4_K_M"
_OUTTYPE_LABELS = {"auto": "auto (bf16 for bf16 weights, else f16)"}  # the choices themselves are GGUFSettings'


class TargetOptions(Vertical):
    """The options of one target format; `settings()` is what ConvertOptions.settings gets."""

    target_format = ""

    def show_source(self, model: LocalModel | None) -> None:
        """Update what depends on the model being converted (sizes, what applies)."""

    def settings(self) -> object:
        raise NotImplementedError


class GGUFOptions(TargetOptions):
    target_format = "gguf"

    def compose(self) -> ComposeResult:
        with Horizontal(classes="option-row"):
            with Vertical():
                yield Label("GGUF written from the checkpoint")
                yield Select([(_OUTTYPE_LABELS.get(t, t), t) for t in OUTTYPE_CHOICES], value=GGUFSettings().outtype, allow_blank=False,
                             id="convert-outtype")  # fmt: skip
            with Vertical():
                yield Label("Importance matrix (optional)")
                yield Input(placeholder="builtin, a calibration text, or a llama-imatrix .gguf", id="convert-imatrix")
        yield Label("Quantization")
        yield OptionList(id="convert-quant")

    def show_source(self, model: LocalModel | None) -> None:
        from pocketlm.converters.conversion_job import outtype_for
        from pocketlm.converters.hf_to_gguf import OUTTYPE_BYTES_PER_WEIGHT

        outtype_select = self.query_one("#convert-outtype", Select)
        outtype_select.disabled = model is not None and model.format == "gguf"  # a GGUF is only quantized
        quants = self.query_one("#convert-quant", OptionList)
        highlighted = quants.highlighted
        quants.clear_options()
        parameters = model.parameter_count if model else 0
        if model is None or model.format != "gguf":
            kept = outtype_for(model, str(outtype_select.value))
            size = f"≈ {human_bytes(int(parameters * OUTTYPE_BYTES_PER_WEIGHT[kept]))}" if parameters else ""
            quants.add_option(Option(Content.from_markup("none: keep $kept  [dim]$size[/dim]", kept=kept, size=size), id=NO_QUANT))
        for quant in QUANT_TYPES.values():
            size = f"≈ {human_bytes(expected_size(parameters, quant))} · " if parameters else ""
            quants.add_option(Option(Content.from_markup("$name [dim]$note[/dim]", name=f"{quant.name:<7}", note=size + quant.quality), id=quant.name))
        if highlighted is not None and highlighted < quants.option_count:
            quants.highlighted = highlighted
        else:
            quants.highlighted = next((i for i in range(quants.option_count) if quants.get_option_at_index(i).id == _DEFAULT_QUANT), 0)

    def settings(self) -> GGUFSettings:
        quants = self.query_one("#convert-quant", OptionList)
        quant = quants.get_option_at_index(quants.highlighted).id if quants.highlighted is not None else _DEFAULT_QUANT
        imatrix = self.query_one("#convert-imatrix", Input).value.strip() or None
        settings = GGUFSettings(outtype=str(self.query_one("#convert-outtype", Select).value), quant=None if quant == NO_QUANT else quant)
        if imatrix is not None:
            if settings.quant is None:
                raise ConversionError("An importance matrix guides a quantization, and none is chosen.", "Choose a quantization, or clear the importance matrix.")
            settings = replace(settings, imatrix=imatrix)
        return settings


class GPTQOptions(TargetOptions):
    target_format = "gptq"

    def compose(self) -> ComposeResult:
        from pocketlm.converters.gptq import BITS, GROUP_SIZES, GPTQSettings

        defaults = GPTQSettings()
        # 2-bit GPTQ is written too, but its loss makes a chat model unusable: the screen offers what users want.
        bits = [(f"{b}-bit", b) for b in BITS if b >= 4]
        groups = [(f"{g}" if g > 0 else "-1 (one scale per row)", g) for g in GROUP_SIZES]
        with Horizontal(classes="option-row"):
            with Vertical():
                yield Label("Bits")
                yield Select(bits, value=defaults.bits, allow_blank=False, id="gptq-bits")
            with Vertical():
                yield Label("Group size")
                yield Select(groups, value=defaults.group_size, allow_blank=False, id="gptq-group-size")
            with Vertical(classes="switch-column"):
                yield Label("Act-order")
                yield Switch(value=defaults.act_order, id="gptq-act-order")
        yield Label("Calibration text (builtin, or a UTF-8 text file)")
        yield Input(defaults.calibration, placeholder=BUILTIN, id="gptq-calibration")
        yield Static(id="gptq-size")

    def show_source(self, model: LocalModel | None) -> None:
        from pocketlm.converters.gptq import GPTQConverter

        size = self.query_one("#gptq-size", Static)
        if model is None or not model.parameter_count:
            size.update("")
            return
        try:
            settings = self.settings()
        except ConversionError:
            size.update("")
            return
        # The converter's estimate (it cannot tell the float embeddings apart from the rest, so it is rough).
        size.update(f"Expected size ≈ {human_bytes(GPTQConverter.expected_size(model.parameter_count, settings))}")

    def settings(self) -> object:
        from pocketlm.converters.gptq import GPTQSettings

        bits = self.query_one("#gptq-bits", Select).value
        group_size = self.query_one("#gptq-group-size", Select).value
        calibration = self.query_one("#gptq-calibration", Input).value.strip() or BUILTIN
        return GPTQSettings(bits=int(bits), group_size=int(group_size),  # type: ignore[call-overload]
                            act_order=self.query_one("#gptq-act-order", Switch).value, calibration=calibration)  # fmt: skip


# The MLX panel's "no recipe" and "not quantized" choices (Select values cannot be None).
NO_RECIPE = "none"
UNQUANTIZED = 0


class MLXOptions(TargetOptions):
    target_format = "mlx"

    def compose(self) -> ComposeResult:
        defaults = MLXSettings()
        # 2/3/5/6 bits are written too (the CLI takes them); the screen offers what mlx-lm users usually pick.
        bits = [("4-bit", 4), ("8-bit", 8), ("unquantized (dtype only)", UNQUANTIZED)]
        with Horizontal(classes="option-row"):
            with Vertical():
                yield Label("Bits")
                yield Select(bits, value=defaults.bits or UNQUANTIZED, allow_blank=False, id="mlx-bits")
            with Vertical():
                yield Label("Group size")
                yield Select([(str(g), g) for g in GROUP_SIZES], value=defaults.group_size, allow_blank=False, id="mlx-group-size")
            with Vertical():
                yield Label("Float dtype")
                yield Select([(d, d) for d in DTYPES], value=defaults.dtype, allow_blank=False, id="mlx-dtype")
            with Vertical():
                yield Label("Mixed-bit recipe")
                yield Select([("none", NO_RECIPE)] + [(r, r) for r in RECIPES], value=defaults.recipe or NO_RECIPE, allow_blank=False, id="mlx-recipe")
        yield Static(id="mlx-size")

    def show_source(self, model: LocalModel | None) -> None:
        settings = self.settings()
        # Group size means nothing to float weights; the recipe sets the bits itself.
        self.query_one("#mlx-group-size", Select).disabled = not MLXConverter.quantizes(settings)
        self.query_one("#mlx-bits", Select).disabled = settings.recipe is not None
        size = self.query_one("#mlx-size", Static)
        if model is None or not model.parameter_count:
            size.update("")
            return
        size.update(f"Expected size ≈ {human_bytes(MLXConverter.expected_size(model.parameter_count, settings))}")

    def settings(self) -> MLXSettings:
        bits = int(self.query_one("#mlx-bits", Select).value)  # type: ignore[arg-type]
        recipe = str(self.query_one("#mlx-recipe", Select).value)
        return MLXSettings(bits=bits or None, group_size=int(self.query_one("#mlx-group-size", Select).value),  # type: ignore[arg-type]
                           dtype=str(self.query_one("#mlx-dtype", Select).value), recipe=None if recipe == NO_RECIPE else recipe)  # fmt: skip


OPTION_WIDGETS: dict[str, type[TargetOptions]] = {"gguf": GGUFOptions, "gptq": GPTQOptions, "mlx": MLXOptions}


class VerifyAfterConverting(Horizontal):
    """The switch (on by default) that verifies a small model's result against its source once converted, as
    `pocketlm convert` does unless --no-verify: app/verification.py says which models and why."""

    DEFAULT_CSS = """
    VerifyAfterConverting { width: auto; height: auto; margin-left: 2; }
    VerifyAfterConverting > Label { margin-left: 1; }
    """

    def compose(self) -> ComposeResult:
        from pocketlm.app.verification import AUTO_VERIFY_MAX_PARAMETERS

        self.tooltip = (f"Compare the result with the model it came from (`pocketlm verify`): models up to "
                        f"{AUTO_VERIFY_MAX_PARAMETERS / 1e9:g}B parameters that fit in memory beside it, about a minute at that size.")  # fmt: skip
        yield Switch(value=True, id="convert-verify")
        yield Label("Verify after converting")

    @property
    def value(self) -> bool:
        return self.query_one("#convert-verify", Switch).value
