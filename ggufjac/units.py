"""Sizes as people write them (8GiB, 512MiB) and as the messages print them, and layer lists
as people write them (0,5,10-17); torch-free."""

from __future__ import annotations

import re

from .errors import GgufjacError


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '2.5GB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise GgufjacError(f"--max-memory {text!r}: expected a size such as 8GiB, 512MiB or 2GB")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary or not unit else 1000) ** power)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def layer_ranges(text: str) -> list[tuple[int, int]]:
    """'0,5,10-17' -> [(0, 0), (5, 5), (10, 17)]: the one syntax of every `--layers`, checked
    without a model (numbers from 0, ranges A-B with A <= B)."""
    ranges = []
    for part in text.split(","):
        part = part.strip()
        try:
            a, b = (int(v) for v in part.split("-", 1)) if "-" in part[1:] else (int(part),) * 2
        except ValueError:
            raise GgufjacError(f"--layers {text!r}: expected numbers and ranges like 0,5,10-17") \
                from None
        if a < 0:
            raise GgufjacError(f"--layers {text!r}: layer numbers start at 0, not {a}")
        if b < a:
            raise GgufjacError(f"--layers {text!r}: range {part!r} is reversed (write {b}-{a})")
        ranges.append((a, b))
    return ranges


def parse_layer_list(text: str, n_layer: int) -> list[int]:
    """'0,5,10-17' -> [0, 5, 10, ..., 17] (sorted, each once) for a model of `n_layer`
    layers; a layer it lacks is refused."""
    out: set[int] = set()
    for a, b in layer_ranges(text):
        for layer in (a, b):
            if layer >= n_layer:
                raise GgufjacError(f"--layers: layer {layer} does not exist (the model has "
                                   f"layers 0..{n_layer - 1})")
        out.update(range(a, b + 1))
    return sorted(out)
