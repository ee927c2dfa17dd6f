"""The GPTQ walk through a model: calibration chunks through the decoder, layer by layer; each group of linears that
reads the same input gets its Hessian from inputs that already went through the quantized linears before it, is
solved (converters/gptq_solver.py), and the layer then runs once more to give the next layer its inputs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pocketlm.converters.base import ConversionError, ConvertOptions, check_cancel
from pocketlm.converters.calibration import calibration_chunks
from pocketlm.models.fit import physical_cores
from pocketlm.models.progress import ProgressCallback, ProgressUpdate

if TYPE_CHECKING:
    from pocketlm.converters.gptq import GPTQSettings

CHUNK_TOKENS = 512  # the length GPTQModel's and AutoGPTQ's examples calibrate with
MAX_CHUNKS = 128  # 65k tokens: beyond this a longer text costs time and buys little


def calibration_token_chunks(tokenizer: Any, text: str) -> list[list[int]]:
    """The calibration text as 512-token chunks (the last one shorter), without special tokens."""
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [chunk for chunk in calibration_chunks(token_ids, CHUNK_TOKENS, MAX_CHUNKS) if len(chunk) > 1]
    if not chunks:
        raise ConversionError("The calibration text gives no tokens to calibrate on.", "Give a longer text, or `builtin`.")
    return chunks


class _Stop(Exception):
    """Raised from a hook once a pass has seen what it came for: the rest of the forward would be wasted work."""


def quantize_model(source: Path, text: str, settings: GPTQSettings, options: ConvertOptions,
                   on_progress: ProgressCallback) -> dict[str, Any]:  # fmt: skip
    """GPTQ of every linear inside the decoder layers of `source`, keyed by module name ("model.layers.0.mlp.up_proj")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # pocketlm shows its own progress
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chunks = calibration_token_chunks(AutoTokenizer.from_pretrained(source), text)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True).to(device).eval()
    layers = _decoder_layers(model)
    names = {id(module): name for name, module in model.named_modules()}
    threads = torch.get_num_threads()
    # The layer forwards are large matmuls over every calibration token: they use every physical core (the column
    # loop, thousands of small vector operations, drops to one thread in _quantize_group); restored at the end.
    torch.set_num_threads(options.threads or physical_cores())
    try:
        with torch.no_grad():
            states, calls = _layer_inputs(model, layers, chunks, device)
            results: dict[str, Any] = {}
            plans: dict[type, list[list[str]]] = {}  # layers of one class call their linears in the same order
            for index, layer in enumerate(layers):
                if type(layer) not in plans:
                    plans[type(layer)] = _input_groups(layer, states[0], calls[0][index])
                layer_calls = [call[index] for call in calls]
                groups = [[layer.get_submodule(name) for name in names_in_group] for names_in_group in plans[type(layer)]]
                with _FinalOutputs(groups, states) as replay:
                    for group in groups:
                        check_cancel(options)
                        hessian = _hessian(layer, group[0], states, layer_calls, replay)
                        results.update(_quantize_group(group, hessian, settings, names))
                        replay.freeze(group)
                    check_cancel(options)
                    states = [replay.run(layer, chunk, state, call) for chunk, (state, call) in enumerate(zip(states, layer_calls))]
                on_progress(ProgressUpdate(f"Quantizing layer {index + 1} of {len(layers)}", index + 1, len(layers)))
    finally:
        torch.set_num_threads(threads)
    return results


def _decoder_layers(model: Any) -> list[Any]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise ConversionError(f"pocketlm cannot find the decoder layers of {type(model).__name__} to quantize.")
    return list(layers)


Call = tuple[tuple[Any, ...], dict[str, Any]]  # a decoder layer's arguments after the hidden states


def _layer_inputs(model: Any, layers: list[Any], chunks: list[list[int]], device: str) -> tuple[list[Any], list[list[Call]]]:
    """The first layer's input for each chunk, and the other arguments each layer is called with (masks and rotary
    embeddings depend only on positions, and differ between layers of different kinds, as in Gemma's)."""
    import torch

    states: list[Any] = []
    calls: list[list[Call]] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module is layers[0]:
            states.append(args[0] if args else kwargs.pop("hidden_states"))
            calls.append([])
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        calls[-1].append((tuple(args[1:]), kwargs))
        if module is layers[-1]:
            raise _Stop

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        for chunk in chunks:
            try:
                model(input_ids=torch.tensor([chunk], device=device), use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return states, calls


def _run(layer: Any, state: Any, call: Call) -> Any:
    output = layer(state, *call[0], **call[1])
    return output[0] if isinstance(output, tuple) else output


def _input_groups(layer: Any, state: Any, call: Call) -> list[list[str]]:
    """The names of the layer's linears in the order they run, grouped when consecutive ones read the same tensor
    (q/k/v, then o, then gate/up, then down)."""
    import torch

    named = {module: name for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}
    linears = list(named)
    seen: list[tuple[Any, Any]] = []
    handles = [m.register_forward_pre_hook(lambda module, args: seen.append((module, args[0]))) for m in linears]
    try:
        _run(layer, state, call)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[Any]] = []
    previous = None
    for module, tensor in seen:
        if groups and tensor is previous and module not in groups[-1]:
            groups[-1].append(module)
        elif not any(module in group for group in groups):
            groups.append([module])
        previous = tensor
    if sum(len(group) for group in groups) != len(linears):
        raise ConversionError("Some linear layers of this model never run on text, so GPTQ cannot calibrate them.")
    return [[named[module] for module in group] for group in groups]


class _FinalOutputs:
    """Replays the outputs of a layer's linears once they are quantized, per calibration chunk.

    Each group's Hessian needs a pass through the layer up to that group, and the next layer's inputs a full pass:
    without this, q/k/v would run four times per chunk and gate/up twice, with inputs and weights that no longer
    change. A quantized linear's first output for a chunk is kept and returned by the later passes instead (measured
    on the 135M model: about 40% of the forward work). Kept only when the outputs of all but the last group fit in
    _REPLAY_BYTES; a larger model or calibration set recomputes them."""

    def __init__(self, groups: list[list[Any]], states: list[Any]) -> None:
        tokens = sum(state.shape[0] * state.shape[1] for state in states)
        widths = sum(module.out_features for group in groups[:-1] for module in group)
        self.enabled = tokens * widths * 4 <= _REPLAY_BYTES
        self.chunk = 0
        self.outputs: dict[tuple[int, int], Any] = {}
        self.frozen: list[Any] = []

    def __enter__(self) -> _FinalOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self.frozen:
            del module.forward  # the instance attribute set in freeze(): the class's forward is back
        self.outputs.clear()

    def freeze(self, group: list[Any]) -> None:
        """The group's weights are final: from now on its outputs for a chunk are computed once."""
        if not self.enabled:
            return
        for module in group:
            compute = module.forward

            def forward(x: Any, _module: Any = module, _compute: Any = compute) -> Any:
                key = (id(_module), self.chunk)
                if key not in self.outputs:
                    self.outputs[key] = _compute(x)
                return self.outputs[key].clone()  # a model may change a linear's output in place

            module.forward = forward
            self.frozen.append(module)

    def run(self, layer: Any, chunk: int, state: Any, call: Call) -> Any:
        self.chunk = chunk
        return _run(layer, state, call)


_REPLAY_BYTES = 1 << 30


def _hessian(layer: Any, first: Any, states: list[Any], calls: list[Call], replay: _FinalOutputs) -> Any:
    """XᵀX / n over every calibration token reaching `first` (its group shares the input), with the linears before it
    already quantized."""
    import torch

    total = torch.zeros(first.in_features, first.in_features, device=first.weight.device)
    rows = 0

    def accumulate(module: Any, args: tuple[Any, ...]) -> None:
        nonlocal rows
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        total.addmm_(x.t(), x)
        rows += x.shape[0]
        raise _Stop

    handle = first.register_forward_pre_hook(accumulate)
    try:
        for chunk, (state, call) in enumerate(zip(states, calls)):
            try:
                replay.run(layer, chunk, state, call)
            except _Stop:
                pass
    finally:
        handle.remove()
    return total / max(rows, 1)


def _quantize_group(group: list[Any], hessian: Any, settings: GPTQSettings, names: dict[int, str]) -> dict[str, Any]:
    """GPTQ of the group's weights stacked row-wise (one factorisation for all), each linear then computing with its
    dequantized weight so the layers after it calibrate on what the quantized model will really compute."""
    import torch

    from pocketlm.converters.gptq_solver import HessianNotPositive, gptq_quantize, split_rows

    stacked = torch.cat([module.weight for module in group])
    threads = torch.get_num_threads()
    # The column loop is thousands of small vector operations: on CPU, waking a second thread for each costs more than
    # it saves, and far more when other processes hold the cores (measured: 0.09 s one thread, 0.45–10 s two).
    torch.set_num_threads(1)
    try:
        quantized = gptq_quantize(stacked, hessian, settings.bits, settings.group_size, settings.act_order, settings.damp_percent)
    except HessianNotPositive:
        raise ConversionError(f"GPTQ found no usable statistics for {names[id(group[0])]} (the model computes NaN or infinity on the calibration text).",
                              "Check the checkpoint, or calibrate on another text.") from None  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    parts = split_rows(quantized, [module.out_features for module in group])
    for module, part in zip(group, parts):
        module.weight.copy_(part.dequantized.to(module.weight.dtype))
    return {names[id(module)]: part for module, part in zip(group, parts)}
