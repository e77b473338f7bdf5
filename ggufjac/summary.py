"""What a GGUF file holds and whether ggufjac supports it (`ggufjac info`): sizes, tensor
types, the cost of a Jacobian, anchoring support. Torch-free, so the answer is quick; the
scan of every weight for NaN/Inf (`nonfinite_weights`) is a separate, slow step."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import Keys

from .activation_formats import anchoring_support
from .costs import sweep_flop
from .errors import GgufjacError
from .families import FAMILIES, ModelConfig, config_from_gguf
from .gguf_file import GGUFFile
from .layout import (check_tensor_index, dims_of, layer_tensor_name, linear_matmuls, stored_name,
                     weights_per_layer)

# The prompt length the Jacobian's size and cost are quoted for.
EXAMPLE_TOKENS = 8


@dataclass(frozen=True)
class JacobianCost:
    """The full detached Jacobian of an `n_tokens` prompt: its size and its work."""

    n_tokens: int
    float32_bytes: int  # J [d, N, d] in float32
    flop: float  # one reverse sweep of all d output directions (costs.sweep_flop)


@dataclass(frozen=True)
class FileSummary:
    """One GGUF file as `ggufjac info` describes it. `supported` is False when the
    architecture is not a supported family (`config` None) or its metadata or tensors fail
    the validation every command runs (`reason` says which)."""

    path: Path
    file_size: int
    gguf_version: int
    name: str
    architecture: str
    tensor_types: list[tuple[str, int]]  # type name, count; most common first
    supported: bool
    reason: str | None = None
    config: ModelConfig | None = None
    layer_weights: int | None = None  # the matrices of one layer (layout.weights_per_layer)
    jacobian: JacobianCost | None = None
    anchoring: str | None = None  # activation_formats.anchoring_support's line

    @property
    def known_architecture(self) -> bool:
        return self.architecture in FAMILIES


def jacobian_cost(cfg: ModelConfig, n_tokens: int = EXAMPLE_TOKENS) -> JacobianCost:
    """Size (float32) and floating-point work of the full J of an `n_tokens` prompt."""
    return JacobianCost(n_tokens, cfg.d_model * n_tokens * cfg.d_model * 4,
                        sweep_flop(dims_of(cfg), cfg.n_layer, n_tokens, cfg.d_model))


def _linear_path_tensors(cfg: ModelConfig) -> list[str]:
    """The stored tensors whose matmul inputs an anchored run rounds: every layer's linear
    path and the unembedding."""
    linear = {stored_name(cfg.family, n) for n in linear_matmuls(cfg.family)}
    names = [layer_tensor_name(i, n) for i in range(cfg.n_layer) for n in sorted(linear)]
    names.append("token_embd.weight" if cfg.tied_embeddings else "output.weight")
    return names


def summarize(path: Path) -> FileSummary:
    """What the GGUF file at `path` holds and whether ggufjac supports it. A file that is
    not a valid GGUF is refused (GGUFError); an unsupported but valid one is described."""
    with GGUFFile(path) as g:
        arch = str(g.get(Keys.General.ARCHITECTURE, "<missing>"))
        head = dict(path=Path(path), file_size=g.file_size, gguf_version=g.version,
                    name=str(g.get(Keys.General.NAME, "?")), architecture=arch,
                    tensor_types=Counter(t.type.name for t in g.tensors.values()).most_common())
        if arch not in FAMILIES:
            return FileSummary(**head, supported=False,
                               reason=f"architecture {arch!r} is not one of "
                                      f"{', '.join(sorted(FAMILIES))}")
        try:
            cfg = config_from_gguf(g)
            check_tensor_index(g, cfg)  # the validation every other command runs
        except GgufjacError as e:
            return FileSummary(**head, supported=False,
                               reason=str(e).removeprefix(str(path) + ": "))
        *layer_tensors, unembedding = _linear_path_tensors(cfg)
        anchoring = anchoring_support(
            (g.tensor(n).type for n in layer_tensors if n in g.tensors),
            g.tensor(unembedding).type if unembedding in g.tensors else None)
    return FileSummary(**head, supported=True, config=cfg,
                       layer_weights=weights_per_layer(cfg)["all"], jacobian=jacobian_cost(cfg),
                       anchoring=anchoring)


def nonfinite_weights(path: Path, cfg: ModelConfig) -> dict[str, int]:
    """Every weight tensor holding NaN or Inf values, with their count: a full read and
    dequantization of the file (minutes for a 70B model)."""
    from .weights import GGUFWeights

    with GGUFFile(path) as g:
        return GGUFWeights(g, cfg).nonfinite_counts()
