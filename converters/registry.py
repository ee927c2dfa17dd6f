"""Finds converters through the `pocketlm.converters` entry points, built-in ones included."""

from __future__ import annotations

from importlib.metadata import entry_points

from pocketlm.converters.base import ConversionError, Converter


def converter_classes() -> list[type[Converter]]:
    return [entry.load() for entry in entry_points(group="pocketlm.converters")]


def converter_for(source_format: str, target_format: str) -> Converter:
    for converter in converter_classes():
        if source_format in converter.source_formats and converter.target_format == target_format:
            return converter()
    paths = ", ".join(f"{'/'.join(sorted(c.source_formats))} → {c.target_format}" for c in converter_classes())
    raise ConversionError(f"pocketlm cannot convert {source_format} models to {target_format}.", f"It can convert: {paths}.")
