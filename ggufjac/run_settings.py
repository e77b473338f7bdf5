"""How llama.cpp is run: the settings a user can flip in llama.cpp's own tools, as plain data.

Kept apart from llamacpp.py (which starts llama.cpp) so that the data that records a run's
settings (an anchor's, a batch's) needs no part of the code that runs it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

from .errors import GgufjacError

FlashAttn = Literal["auto", "on", "off"]
FLASH_ATTN_CHOICES: tuple[FlashAttn, ...] = ("auto", "on", "off")


@dataclass(frozen=True)
class RunSettings:
    """How llama.cpp is run; `None` means llama.cpp's own default for that setting."""

    # extra buffer types (repacked weights, their own GEMM kernels); default on, as in
    # llama.cpp, unless the environment says GGUFJAC_NO_REPACK=1 (`repack_by_default`)
    repack: bool = dataclasses.field(default_factory=lambda: repack_by_default())
    flash_attn: FlashAttn = "auto"
    n_batch: int | None = None  # tokens per llama_decode call (llama.cpp: 2048)
    n_ubatch: int | None = None  # tokens per graph evaluation (llama.cpp: 512)
    threads: int | None = None  # None: the cores this process may run on

    def __post_init__(self) -> None:
        if self.flash_attn not in FLASH_ATTN_CHOICES:
            raise GgufjacError(f"flash attention {self.flash_attn!r} is not one of "
                               f"{', '.join(FLASH_ATTN_CHOICES)}")
        for name in ("n_batch", "n_ubatch", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise GgufjacError(f"llama.cpp setting {name} must be a positive integer, "
                                   f"not {value!r}")

    def flipped(self, **changes: object) -> RunSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def describe(self) -> str:
        """The flags that reproduce this run with llama.cpp's own tools."""
        parts = [f"flash attention {self.flash_attn}",
                 "repacking on" if self.repack else "repacking off (--no-repack)"]
        if self.n_ubatch is not None:
            parts.append(f"ubatch {self.n_ubatch}")
        if self.n_batch is not None:
            parts.append(f"batch {self.n_batch}")
        if self.threads is not None:
            parts.append(f"{self.threads} threads")
        return ", ".join(parts)


def repack_by_default() -> bool:
    """llama.cpp's default is to repack; GGUFJAC_NO_REPACK=1 makes --no-repack the default,
    for machines where llama.cpp's repacked kernels cannot run (docs/anchoring.md: its AMX
    path crashed on a virtual machine whose CPU advertises AMX)."""
    value = os.environ.get("GGUFJAC_NO_REPACK", "").strip().lower()
    return value in ("", "0", "false", "no", "off")


DEFAULT_SETTINGS = RunSettings()
