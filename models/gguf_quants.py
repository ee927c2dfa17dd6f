"""Which GGUF files a Hub repo offers: quant names read from file names, split files grouped, a sensible default."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# A quant name as publishers write it in file names: Q4_K_M, IQ4_XS, Q8_0, UD-Q4_K_XL, BF16, F16, ...
_QUANT = re.compile(r"(?<![A-Za-z0-9])((?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|FP16|F32|MXFP4(?:_MOE)?))(?=[-._]|$)", re.IGNORECASE)
SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)

# What Ollama and LM Studio default to: the best size/quality trade among 4-5 bit quants first.
PREFERRED_QUANTS = ("Q4_K_M", "Q4_K_S", "IQ4_XS", "Q4_0", "Q5_K_M", "Q4_1", "Q5_K_S", "Q5_0", "Q6_K", "Q8_0",
                    "Q3_K_L", "Q3_K_M", "BF16", "F16")  # fmt: skip


@dataclass(frozen=True)
class GGUFChoice:
    """One downloadable GGUF model in a repo: a single file, or every part of a split one."""

    quant: str
    files: tuple[str, ...]
    size_bytes: int

    @property
    def first_file(self) -> str:
        return self.files[0]


def quant_of(file_name: str) -> str:
    """The quant named in a GGUF file name (the last one, as in `model-Q4_K_M.gguf`), or "" if none is."""
    stem = SPLIT_PART.sub("", file_name)
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else ""


def is_model_gguf(file_name: str) -> bool:
    """A GGUF holding a language model, not a vision projector or an importance matrix."""
    base = file_name.rsplit("/", 1)[-1].lower()
    return base.endswith(".gguf") and "mmproj" not in base and "imatrix" not in base


def gguf_choices(files: Iterable[tuple[str, int]]) -> list[GGUFChoice]:
    """Group (name, size) pairs into downloadable models, smallest first; a split model missing a part is left out."""
    singles: list[GGUFChoice] = []
    splits: dict[str, dict[int, tuple[str, int]]] = {}
    split_counts: dict[str, int] = {}
    for name, size in files:
        if not is_model_gguf(name):
            continue
        if match := SPLIT_PART.search(name):
            key = name[: match.start()]
            splits.setdefault(key, {})[int(match[1])] = (name, size)
            split_counts[key] = int(match[2])
        else:
            singles.append(GGUFChoice(quant_of(name) or name.rsplit("/", 1)[-1], (name,), size))
    for key, parts in splits.items():
        if sorted(parts) != list(range(1, split_counts[key] + 1)):
            continue
        names = tuple(parts[i][0] for i in sorted(parts))
        singles.append(GGUFChoice(quant_of(names[0]) or key.rsplit("/", 1)[-1], names, sum(p[1] for p in parts.values())))
    return sorted(singles, key=lambda choice: (choice.size_bytes, choice.quant))


def default_choice(choices: list[GGUFChoice]) -> GGUFChoice:
    by_quant = {choice.quant: choice for choice in choices}
    for quant in PREFERRED_QUANTS:
        if quant in by_quant:
            return by_quant[quant]
    return choices[0]
