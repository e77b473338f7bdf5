"""llama.cpp control vectors: GGUF files of directions added to the residual stream.

The format (llama.cpp's common/common.cpp reads it): `general.architecture = controlvector`,
`controlvector.model_hint` (the model's architecture), `controlvector.layer_count`, and one
F32 tensor `direction.N` of n_embd values per steered block N. llama.cpp adds direction.N to
the output of block N (0-based, after its FFN residual add: the tensor it names `l_out-N`)
at every position. Block 0 has no slot (llama.cpp refuses `direction.0`), so N runs from 1
to n_layer - 1.

Which block a direction belongs to is a convention. Here a direction measured at block N's
output is stored as `direction.N`: it is added exactly where it was measured, and
`ggufjac steer` on our model adds it at the same place (runner.ResidualEdit after block N).
llama.cpp's own cvector-generator stores what it measured at block N - 1 as `direction.N`
(one block later than measured); files it wrote load here all the same, read by that rule.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf.constants import Keys

from .errors import GGUFError, GgufjacError
from .families import ModelConfig
from .gguf_file import GGUFFile

ARCHITECTURE = "controlvector"
_DIRECTION = re.compile(r"direction\.(\d+)")


@dataclass
class ControlVector:
    """Per steered block N (0-based), the vector added to that block's output residual."""

    directions: dict[int, torch.Tensor]
    model_hint: str

    def check_fits(self, cfg: ModelConfig, where: str = "control vector") -> None:
        """Refuse vectors of another width, or for blocks the model does not have."""
        for n, v in sorted(self.directions.items()):
            if v.shape != (cfg.d_model,):
                raise GgufjacError(f"{where}: direction.{n} has {v.numel()} values; the model's "
                                   f"n_embd is {cfg.d_model}")
            if not 1 <= n < cfg.n_layer:
                raise GgufjacError(f"{where}: direction.{n} is for block {n}; llama.cpp steers "
                                   f"blocks 1..{cfg.n_layer - 1} of this {cfg.n_layer}-block "
                                   "model")

    def validate(self, cfg: ModelConfig | None = None, where: str = "control vector") -> None:
        """What a file must hold to be read back as written: at least one direction, block
        numbers llama.cpp has a slot for (N >= 1), one width, finite values; with `cfg`,
        also the model's width and blocks (`check_fits`)."""
        if not self.directions:
            raise GgufjacError(f"{where}: a control vector needs at least one direction")
        widths = set()
        for n, v in sorted(self.directions.items()):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise GgufjacError(f"{where}: direction.{n}: block numbers are integers >= 1 "
                                   "(llama.cpp has no control-vector slot for block 0)")
            if v.dim() != 1 or v.numel() == 0:
                raise GgufjacError(f"{where}: direction.{n} has shape {list(v.shape)}; a "
                                   "direction is one vector of n_embd values")
            if not bool(torch.isfinite(v).all()):
                raise GgufjacError(f"{where}: direction.{n} holds NaN or Inf")
            widths.add(v.numel())
        if len(widths) > 1:
            raise GgufjacError(f"{where}: the directions have different lengths "
                               f"{sorted(widths)}; all must have n_embd values")
        if cfg is not None:
            self.check_fits(cfg, where)

    def write(self, path: Path, cfg: ModelConfig | None = None) -> None:
        """Write the file (atomically: a failed write leaves nothing behind), validated
        first (`validate`, against `cfg`'s width and blocks when given)."""
        from .outputs import atomic_write

        self.validate(cfg, str(path))
        atomic_write(Path(path), self.write_to)

    def write_to(self, path: Path) -> None:
        """The file's bytes at `path` as they are (`write` is the checked, atomic one)."""
        from gguf import GGUFWriter

        w = GGUFWriter(str(path), ARCHITECTURE)
        w.add_string(f"{ARCHITECTURE}.model_hint", self.model_hint)
        w.add_int32(f"{ARCHITECTURE}.layer_count", len(self.directions))
        for n, v in sorted(self.directions.items()):
            w.add_tensor(f"direction.{n}", v.detach().to(torch.float32).cpu().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def read_control_vector(path: str | os.PathLike[str]) -> ControlVector:
    """A control vector file, checked: architecture, tensor names, types and values."""
    p = Path(path)
    with GGUFFile(p) as f:
        arch = f.get(Keys.General.ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise GGUFError(p, Keys.General.ARCHITECTURE,
                            f"is {arch!r}, not {ARCHITECTURE!r}: not a control vector file")
        directions: dict[int, torch.Tensor] = {}
        for name, info in f.tensors.items():
            m = _DIRECTION.fullmatch(name)
            if m is None:
                raise GGUFError(p, f"tensor {name!r}", "a control vector holds only "
                                "direction.N tensors")
            # direction.01 would also be block 1 (a name twice is refused by GGUFFile)
            if m.group(1) != str(int(m.group(1))):
                raise GGUFError(p, f"tensor {name!r}", "the block number has a leading zero "
                                f"(write direction.{int(m.group(1))})")
            if info.type != 0 or len(info.shape) != 1:  # GGML_TYPE_F32, one dimension
                raise GGUFError(p, f"tensor {name!r}", f"must be 1-D F32, is {info.type.name} "
                                f"of shape {list(info.shape)}")
            values = np.frombuffer(f.tensor_data(name), dtype=np.float32).copy()
            if not np.isfinite(values).all():
                raise GGUFError(p, f"tensor {name!r}", "holds NaN or Inf")
            directions[int(m.group(1))] = torch.from_numpy(values)
        if not directions:
            raise GGUFError(p, "tensors", "no direction.N tensor")
        hint = f.get(f"{ARCHITECTURE}.model_hint", "")
    return ControlVector(directions, str(hint))


def parse_layer_range(text: str, n_layer: int) -> list[int]:
    """'A-B', 'A' or a list such as '3,5-7' (every --layers' syntax, units.layer_ranges) ->
    those blocks, each one llama.cpp can steer (1..n_layer - 1)."""
    from .units import layer_ranges

    ranges = layer_ranges(text)
    if any(a < 1 or b > n_layer - 1 for a, b in ranges):
        raise GgufjacError(f"--layers {text!r}: llama.cpp steers blocks 1..{n_layer - 1} of this "
                           f"{n_layer}-block model (block 0 has no control-vector slot)")
    return sorted({n for a, b in ranges for n in range(a, b + 1)})


def check_scale(scale: float) -> float:
    if not math.isfinite(scale):
        raise GgufjacError(f"--scale {scale}: must be a finite number")
    return scale
