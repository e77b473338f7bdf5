"""Sizes as people write them (8GiB, 512MiB) and as the messages print them; torch-free."""

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
