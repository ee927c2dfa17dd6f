"""Finds converters through the `pocketlm.converters` entry points, built-in ones included, and says which formats
a checkpoint can become. Loading a converter class imports its module, never its engine (gptqmodel, mlx)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points

from pocketlm.converters.base import ConversionError, Converter

ENTRY_POINT_GROUP = "pocketlm.converters"
CHECKPOINT_FORMAT = "safetensors"  # what every conversion target is reached from


class ConverterUnavailable(ConversionError):
    """The converter a conversion needs is registered but its libraries are not installed."""


@dataclass(frozen=True)
class ConversionTarget:
    """A format a checkpoint can be converted to, as `--to` and the Convert screen offer it."""

    format: str
    label: str
    summary: str
    available: bool
    install_hint: str
    settings_type: type


@cache
def converter_classes() -> tuple[type[Converter], ...]:
    """Every registered converter class, by name. One whose module is missing (a plugin half uninstalled) is left
    out rather than breaking every command."""
    found: list[type[Converter]] = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found.append(entry_point.load())
        except ImportError:
            continue
    return tuple(sorted(found, key=lambda converter: converter.name))


def converter_for(source_format: str, target_format: str) -> type[Converter]:
    """The class converting `source_format` to `target_format` in one step, installed or not (the job refuses an
    uninstalled one with `refuse_unavailable`)."""
    for converter in converter_classes():
        if source_format in converter.source_formats and converter.target_format == target_format:
            return converter
    paths = ", ".join(f"{'/'.join(sorted(c.source_formats))} → {c.target_format}" for c in converter_classes())
    raise ConversionError(f"pocketlm cannot convert {source_format} models to {target_format}.", f"It can convert: {paths}.")


def unavailable_error(target: ConversionTarget | type[Converter]) -> ConverterUnavailable:
    """The one sentence for a target (or converter) whose libraries are missing, with what to install."""
    return ConverterUnavailable(f"Converting to {target.label} needs libraries that are not installed.", target.install_hint)


def refuse_unavailable(target: ConversionTarget | type[Converter]) -> None:
    """Raise `unavailable_error(target)` unless its libraries are installed."""
    available = target.available if isinstance(target, ConversionTarget) else target.is_available()
    if not available:
        raise unavailable_error(target)


def conversion_targets() -> list[ConversionTarget]:
    """One entry per format a checkpoint can reach (through any chain of steps), labelled by the step reaching it."""
    targets: dict[str, ConversionTarget] = {}
    for target_format in sorted(reachable_formats(CHECKPOINT_FORMAT)):
        steps = plan_steps(CHECKPOINT_FORMAT, target_format)
        last = steps[-1]
        available = all(step.is_available() for step in steps)
        hint = next((step.install_hint for step in steps if not step.is_available()), "")
        targets[target_format] = ConversionTarget(target_format, last.label, last.summary, available, hint, last.settings_type)
    return list(targets.values())


def reachable_formats(source_format: str) -> set[str]:
    reached = {source_format}
    frontier = [source_format]
    while frontier:
        current = frontier.pop()
        for converter in converter_classes():
            if current in converter.source_formats and converter.target_format not in reached:
                reached.add(converter.target_format)
                frontier.append(converter.target_format)
    return reached - {source_format}


def plan_steps(source_format: str, target_format: str) -> list[type[Converter]]:
    """The shortest chain of converters from `source_format` to a different `target_format` (breadth first, so a
    direct converter wins over a detour); same-format steps (quantizers) are the job's to add."""
    paths: dict[str, list[type[Converter]]] = {source_format: []}
    frontier = [source_format]
    while frontier and target_format not in paths:
        following = []
        for current in frontier:
            for converter in converter_classes():
                reached = converter.target_format
                if current in converter.source_formats and reached not in paths:
                    paths[reached] = [*paths[current], converter]
                    following.append(reached)
        frontier = following
    if target_format not in paths or target_format == source_format:
        known = ", ".join(sorted(reachable_formats(CHECKPOINT_FORMAT))) or "none"
        raise ConversionError(f"pocketlm cannot convert {source_format} models to {target_format}.",
                              f"From a checkpoint it converts to: {known}.")  # fmt: skip
    return paths[target_format]
