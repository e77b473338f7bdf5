"""Per-architecture tensor tables, as data: which tensors a layer has, their shapes, how fused
tensors are stored, and the check that a file's tensor index matches. No tensor data is read
here (and no torch), so a file can be validated before anything is dequantized.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import numpy as np
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import GGUFError, UnsupportedModelError
from .families import Family, ModelConfig
from .gguf_file import GGUFFile

T = TypeVar("T")


class Role(StrEnum):
    """What a layer tensor is to the detached model."""

    LINEAR = "linear"  # on the linear path whatever the gate path (its input rounded if anchored)
    GLU_BRANCH = "glu branch"  # gate or up: linear or frozen, as the gate path says
    COEFFICIENT = "coefficient"  # only shapes frozen coefficients (q, k): never in the sweep
    NORM = "norm"  # a norm weight: a constant diagonal on the linear path
    QK_NORM = "qk norm"  # a norm weight inside the frozen attention scores


@dataclass(frozen=True)
class Dims:
    """The sizes a layer's tensor shapes depend on."""

    d_model: int
    d_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int
    head_dim_v: int
    n_expert: int = 0  # a mixture of experts' expert count and FFN width (0: dense MLP)
    d_ff_expert: int = 0


def _always(fam: Family) -> bool:
    return True


def _pre_norm(fam: Family) -> bool:
    return fam.norm_layout in ("pre", "sandwich")


def _post_norm(fam: Family) -> bool:
    return fam.norm_layout in ("sandwich", "post")


def _qk_norm(fam: Family) -> bool:
    return fam.qk_norm != "none"


def _attn_sinks(fam: Family) -> bool:
    return fam.attn_sinks


def _dense_mlp(fam: Family) -> bool:
    return fam.moe_gating is None


def _experts(fam: Family) -> bool:
    return fam.moe_gating is not None


@dataclass(frozen=True)
class LayerTensor:
    """One row of the layout table: a tensor of every layer ('blk.N.{name}.weight')."""

    name: str  # short name, as the block reads it
    role: Role
    shape: Callable[[Dims, Family], tuple[int, ...]]  # row-major (torch) shape
    present: Callable[[Family], bool] = _always
    # (Family flag, stored tensor): families with the flag store this tensor's rows inside
    # the stored one, members in table order (q|k|v in attn_qkv; gate|up in Phi 3's ffn_up)
    fused: tuple[str, str] | None = None
    # A matmul a family may give a bias ('blk.N.{stored}.bias', one value per output row;
    # Family.biases says which it does). What the bias is to the detached model follows from
    # the role: on a COEFFICIENT matmul it only shapes frozen coefficients; on the linear
    # path (LINEAR, the GLU branch that stays linear) it is part of the constant c of
    # y = J x + c; on the frozen GLU branch, part of that coefficient.
    biased: bool = False


# The table. Everything else about a layer's tensors derives from it: which a family has,
# their shapes as stored and as used, fused storage, the linear path, the rounding sites an
# anchor fills ("in:" + name for the matmuls on the linear path), the synthetic generators.
LAYER_TENSORS: tuple[LayerTensor, ...] = (
    LayerTensor("attn_norm", Role.NORM, lambda m, f: (m.d_model,), _pre_norm),
    LayerTensor("attn_q", Role.COEFFICIENT, lambda m, f: (m.n_head * m.head_dim, m.d_model),
                fused=("fused_qkv", "attn_qkv"), biased=True),
    LayerTensor("attn_k", Role.COEFFICIENT, lambda m, f: (m.n_kv_head * m.head_dim, m.d_model),
                fused=("fused_qkv", "attn_qkv"), biased=True),
    LayerTensor("attn_v", Role.LINEAR, lambda m, f: (m.n_kv_head * m.head_dim_v, m.d_model),
                fused=("fused_qkv", "attn_qkv"), biased=True),
    LayerTensor("attn_q_norm", Role.QK_NORM, lambda m, f: (m.head_dim,) if f.qk_norm == "head"
                else (m.n_head * m.head_dim,), _qk_norm),
    LayerTensor("attn_k_norm", Role.QK_NORM, lambda m, f: (m.head_dim,) if f.qk_norm == "head"
                else (m.n_kv_head * m.head_dim,), _qk_norm),
    LayerTensor("attn_output", Role.LINEAR, lambda m, f: (m.d_model, m.n_head * m.head_dim_v),
                biased=True),
    # one extra logit per head in the softmax: it only shapes the frozen probabilities
    LayerTensor("attn_sinks", Role.COEFFICIENT, lambda m, f: (m.n_head,), _attn_sinks),
    LayerTensor("post_attention_norm", Role.NORM, lambda m, f: (m.d_model,), _post_norm),
    LayerTensor("ffn_norm", Role.NORM, lambda m, f: (m.d_model,), _pre_norm),
    LayerTensor("ffn_gate", Role.GLU_BRANCH, lambda m, f: (m.d_ff, m.d_model), _dense_mlp,
                fused=("fused_gate_up", "ffn_up"), biased=True),
    LayerTensor("ffn_up", Role.GLU_BRANCH, lambda m, f: (m.d_ff, m.d_model), _dense_mlp,
                fused=("fused_gate_up", "ffn_up"), biased=True),
    LayerTensor("ffn_down", Role.LINEAR, lambda m, f: (m.d_model, m.d_ff), _dense_mlp,
                biased=True),
    # A mixture of experts: the router (its logits only shape the frozen routing weights)
    # and the experts, each a GLU MLP, stacked [n_expert, rows, cols] (a bias: [n_expert,
    # rows]).
    LayerTensor("ffn_gate_inp", Role.COEFFICIENT, lambda m, f: (m.n_expert, m.d_model),
                _experts, biased=True),
    LayerTensor("ffn_gate_exps", Role.GLU_BRANCH,
                lambda m, f: (m.n_expert, m.d_ff_expert, m.d_model), _experts, biased=True),
    LayerTensor("ffn_up_exps", Role.GLU_BRANCH,
                lambda m, f: (m.n_expert, m.d_ff_expert, m.d_model), _experts, biased=True),
    LayerTensor("ffn_down_exps", Role.LINEAR,
                lambda m, f: (m.n_expert, m.d_model, m.d_ff_expert), _experts, biased=True),
    LayerTensor("post_ffw_norm", Role.NORM, lambda m, f: (m.d_model,), _post_norm),
)
# Which GLU branch stays linear for each gate path (linearize.GATE_PATHS): the dense MLP's,
# and the experts'.
GLU_LINEAR = {"up": "ffn_up", "gate": "ffn_gate"}
GLU_LINEAR_EXPERTS = {"up": "ffn_up_exps", "gate": "ffn_gate_exps"}
# The expert tensors (3-D: [n_expert, rows, cols]), read one expert at a time.
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def dims_of(cfg: ModelConfig) -> Dims:
    return Dims(cfg.d_model, cfg.d_ff, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.head_dim_v,
                cfg.n_expert, cfg.d_ff_expert)


def layer_tensors(fam: Family) -> list[LayerTensor]:
    """The rows of the table a family's layers have."""
    return [t for t in LAYER_TENSORS if t.present(fam)]


def layer_tensor_name(layer: int, stored: str, part: str = "weight") -> str:
    """The file's name of layer `layer`'s tensor `stored` (a stored name: 'attn_qkv',
    'ffn_down', ...): 'blk.{layer}.{stored}.weight', or with `part` 'bias' its bias, built
    here only."""
    if part not in ("weight", "bias"):
        raise ValueError(f"a layer tensor's part is 'weight' or 'bias', not {part!r}")
    return f"blk.{layer}.{stored}.{part}"


def layer_of_tensor(name: str) -> int | None:
    """The layer a file's tensor belongs to ('blk.N.…' → N), None for a global tensor."""
    prefix, _, rest = name.partition(".")
    index = rest.partition(".")[0]
    return int(index) if prefix == "blk" and index.isdigit() else None


def bias_key(name: str) -> str:
    """The key of layer tensor `name`'s bias among a layer's loaded tensors ('attn_q.bias')."""
    return f"{name}.bias"


def layer_biases(fam: Family) -> list[LayerTensor]:
    """The rows of the table whose matmul has a bias in this family (Family.biases), each a
    matrix the table allows a bias on; a fused tensor's members are biased all or none."""
    rows = {t.name: t for t in layer_tensors(fam)}
    for name in fam.biases:
        if name not in rows or not rows[name].biased:
            raise ValueError(f"Family.biases names {name!r}, which is not a layer matmul "
                             "that may have a bias in the layout table")
    biased = [t for t in layer_tensors(fam) if t.name in fam.biases]
    for t in biased:
        stored = stored_name(fam, t.name)
        members = [m.name for m in layer_tensors(fam) if stored_name(fam, m.name) == stored]
        if not set(members) <= set(fam.biases):
            raise ValueError(f"Family.biases: {t.name!r} is stored fused in {stored!r}, so "
                             f"its members {members} have a bias all or none")
    return biased


def has_constant(fam: Family) -> bool:
    """Whether the family's detached network is affine (y = J x + c) rather than linear: it
    has a bias on some matmul. Its results then carry c."""
    return bool(fam.biases)


def layer_tensor_names(cfg: ModelConfig) -> list[str]:
    """The per-layer tensors the block uses (without the 'blk.N.' prefix and '.weight')."""
    return [t.name for t in layer_tensors(cfg.family)]


def stored_name(fam: Family, name: str) -> str:
    """The stored tensor that holds layer tensor `name` (itself, the fused one, or the
    family's own name for it)."""
    row = next(t for t in LAYER_TENSORS if t.name == name)
    if row.fused and getattr(fam, row.fused[0]):
        return row.fused[1]
    return dict(fam.stored_names).get(name, name)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Row-major (torch) shape of each per-layer tensor, as the block uses it."""
    dims = dims_of(cfg)
    return {t.name: t.shape(dims, cfg.family) for t in layer_tensors(cfg.family)}


def stored_members(fam: Family, dims: Dims) -> dict[str, list[tuple[str, int]]]:
    """Each stored tensor's members and their row counts, in storage order."""
    members: dict[str, list[tuple[str, int]]] = {}
    for t in layer_tensors(fam):
        members.setdefault(stored_name(fam, t.name), []).append((t.name, t.shape(dims, fam)[0]))
    return members


def stored_shapes_of(fam: Family, dims: Dims) -> dict[str, tuple[int, ...]]:
    """Shapes as stored in the file: fused tensors stack their members' rows."""
    shapes = {}
    for stored, members in stored_members(fam, dims).items():
        first = next(t for t in LAYER_TENSORS if t.name == members[0][0]).shape(dims, fam)
        shapes[stored] = (sum(rows for _, rows in members), *first[1:]) if len(first) > 1 \
            else first
    return shapes


def stored_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return stored_shapes_of(cfg.family, dims_of(cfg))


def stored_bias_shapes_of(fam: Family, dims: Dims) -> dict[str, tuple[int, ...]]:
    """Shapes of the family's bias tensors as stored, by stored name: one value per row of
    the stored matrix (a fused tensor's bias stacks its members' as its rows do; an expert
    tensor's has one row of them per expert)."""
    stored = {stored_name(fam, t.name) for t in layer_biases(fam)}
    return {name: tuple(shape[:-1]) for name, shape in stored_shapes_of(fam, dims).items()
            if name in stored}


def split_stored(cfg: ModelConfig, stored: str, tensor: T) -> dict[str, T]:
    """A stored tensor's members, split along its rows (views, no copy); a stored bias
    splits the same way."""
    members = stored_members(cfg.family, dims_of(cfg))[stored]
    if len(members) == 1:
        return {members[0][0]: tensor}
    parts = tensor.split([rows for _, rows in members])  # type: ignore[attr-defined]
    return {name: part for (name, _), part in zip(members, parts)}


def linear_path(fam: Family, gate_path: str) -> list[str]:
    """The layer tensors the reverse sweep reads: the linear matmuls and the norm weights."""
    return [t.name for t in layer_tensors(fam)
            if t.role in (Role.LINEAR, Role.NORM)
            or (t.role == Role.GLU_BRANCH
                and t.name in (GLU_LINEAR[gate_path], GLU_LINEAR_EXPERTS[gate_path]))]


def linear_matmuls(fam: Family) -> list[str]:
    """The matmuls whose input can lie on the linear path (either gate path): the rounding
    sites of an anchored run are 'in:' + these names."""
    return [t.name for t in layer_tensors(fam) if t.role in (Role.LINEAR, Role.GLU_BRANCH)]


def weights_per_layer(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of one layer's matrices: all of them (a mixture of experts: every
    expert), and the Jacobian's linear path (one GLU branch: either gate path reads as
    many)."""
    shapes = expected_shapes(cfg)
    matrices = {n: math.prod(s) for n, s in shapes.items() if len(s) >= 2}
    linear = set(linear_path(cfg.family, "up"))  # the gate path's is the same size
    return {"all": sum(matrices.values()),
            "linear_path": sum(v for n, v in matrices.items() if n in linear)}


# llama.cpp's converters store biases (1-D tensors) in F32, and its CPU backend adds them
# in F32: another type is refused rather than read differently.
BIAS_TYPES = (GGMLQuantizationType.F32,)


@functools.cache
def dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether a tensor type can be read as numbers: by gguf-py's reference dequantizers,
    which cover every type ggufjac's torch ones do (tested equal) and some more; integer
    tensors and the activation-only types (Q8_1, Q8_K) cannot."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        gguf_quants.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def check_tensor_index(g: GGUFFile, cfg: ModelConfig) -> str | None:
    """Every tensor the model needs exists with the shape the config implies and a type that
    can be dequantized, and nothing the detach rules cannot handle is there. Returns the
    rope-factor tensor's name, if any."""
    want = {layer_tensor_name(i, n): s for i in range(cfg.n_layer)
            for n, s in stored_shapes(cfg).items()}
    want["token_embd.weight"] = (cfg.vocab_size, cfg.d_model)
    want["output_norm.weight"] = (cfg.d_model,)
    if not cfg.tied_embeddings:
        want["output.weight"] = (cfg.vocab_size, cfg.d_model)
    for name, shape in want.items():
        info = g.tensor(name)
        if info.torch_shape != shape:
            raise GGUFError(g.path, f"tensor {name!r}",
                            f"expected shape {list(shape)}, found {list(info.torch_shape)}")
        if not dequantizable(info.type):
            raise UnsupportedModelError(
                f"{g.path}: tensor {name!r} has type {info.type.name}, which neither ggufjac "
                "nor gguf-py can dequantize")
    _check_biases(g, cfg)
    rope_factors_name = next((n for n in cfg.family.rope_factors if n in g.tensors), None)
    if rope_factors_name:
        want_rf = (cfg.rope_dims // 2,)
        got = g.tensors[rope_factors_name].torch_shape
        if got != want_rf:
            raise GGUFError(g.path, f"tensor {rope_factors_name!r}",
                            f"expected shape {list(want_rf)}, found {list(got)}")
    return rope_factors_name


def _check_biases(g: GGUFFile, cfg: ModelConfig) -> None:
    """The family's biases (each optional, as llama.cpp reads them, unless the family
    requires it) have one F32 value per row of their matrix; any other bias tensor is
    refused, naming it."""
    fam = cfg.family
    allowed = {layer_tensor_name(i, stored, "bias"): shape for i in range(cfg.n_layer)
               for stored, shape in stored_bias_shapes_of(fam, dims_of(cfg)).items()}
    for i in range(cfg.n_layer):
        for name in fam.biases_required:
            required = layer_tensor_name(i, stored_name(fam, name), "bias")
            if required not in g.tensors:
                raise GGUFError(g.path, f"tensor {required!r}",
                                f"missing: llama.cpp requires it for {cfg.arch}")
    for name, info in g.tensors.items():
        if not name.endswith(".bias"):
            continue
        if name not in allowed:
            has = ", ".join(fam.biases) if fam.biases else "none"
            raise UnsupportedModelError(
                f"{g.path}: tensor {name!r}: the {cfg.arch} family has no bias there (its "
                f"biases: {has}), so the file is not the model ggufjac and llama.cpp read")
        if info.torch_shape != allowed[name]:
            raise GGUFError(g.path, f"tensor {name!r}",
                            f"expected shape {list(allowed[name])} (one value per row of its "
                            f"matrix), found {list(info.torch_shape)}")
        if info.type not in BIAS_TYPES:
            raise UnsupportedModelError(
                f"{g.path}: tensor {name!r} has type {info.type.name}; a bias must be "
                f"{'/'.join(t.name for t in BIAS_TYPES)}")


def validate_file(path: str | os.PathLike[str]) -> tuple[GGUFFile, ModelConfig]:
    """Open a GGUF file and check everything ggufjac relies on before any tensor is read:
    the header and tensor index (GGUFFile), the architecture and its metadata (config), and
    every tensor's presence and shape. Raises GGUFError / UnsupportedModelError."""
    from .families import config_from_gguf

    g = GGUFFile(path)
    try:
        cfg = config_from_gguf(g)
        check_tensor_index(g, cfg)
    except BaseException:
        g.close()
        raise
    return g, cfg
