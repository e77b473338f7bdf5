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

    def llama_cpp_buffer(self, n_layer: int) -> np.ndarray:
        """float32 [n_layer - 1, d]: the rows llama_set_adapter_cvec takes (block 1 first)."""
        d = next(iter(self.directions.values())).numel()
        data = np.zeros((n_layer - 1, d), dtype=np.float32)
        for n, v in self.directions.items():
            data[n - 1] = v.detach().to(torch.float32).cpu().numpy()
        return data

    def write(self, path: Path) -> None:
        """Write the file (atomically: a failed write leaves nothing behind)."""
        from gguf import GGUFWriter

        if not self.directions:
            raise GgufjacError("a control vector needs at least one direction")
        tmp = path.with_name(path.name + ".tmp")
        try:
            w = GGUFWriter(str(tmp), ARCHITECTURE)
            w.add_string(f"{ARCHITECTURE}.model_hint", self.model_hint)
            w.add_int32(f"{ARCHITECTURE}.layer_count", len(self.directions))
            for n, v in sorted(self.directions.items()):
                w.add_tensor(f"direction.{n}", v.detach().to(torch.float32).cpu().numpy())
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def read_control_vector(path: str | os.PathLike[str]) -> ControlVector:
    """A control vector file, checked: architecture, tensor names, types and values."""
    p = Path(path)
    with GGUFFile(p) as f:
        arch = f.get("general.architecture")
        if arch != ARCHITECTURE:
            raise GGUFError(p, "general.architecture",
                            f"is {arch!r}, not {ARCHITECTURE!r}: not a control vector file")
        directions: dict[int, torch.Tensor] = {}
        for name, info in f.tensors.items():
            m = _DIRECTION.fullmatch(name)
            if m is None:
                raise GGUFError(p, f"tensor {name!r}", "a control vector holds only "
                                "direction.N tensors")
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
    """'A-B' or 'A' -> blocks A..B, each one llama.cpp can steer (1..n_layer - 1)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if m is None:
        raise GgufjacError(f"--layers {text!r}: expected A-B or A (block numbers)")
    a, b = int(m.group(1)), int(m.group(2) or m.group(1))
    if a > b or a < 1 or b > n_layer - 1:
        raise GgufjacError(f"--layers {text!r}: llama.cpp steers blocks 1..{n_layer - 1} of this "
                           f"{n_layer}-block model (block 0 has no control-vector slot)")
    return list(range(a, b + 1))


def check_scale(scale: float) -> float:
    if not math.isfinite(scale):
        raise GgufjacError(f"--scale {scale}: must be a finite number")
    return scale
