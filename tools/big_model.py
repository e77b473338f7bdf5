"""Big synthetic GGUF models with the shapes of real ones, written without a float32 model.

    python -m tools.big_model llama-3.3-70b OUT.gguf [--layers N]   # ~42 GB, minutes
    python -m tools.big_model llama-3.1-8b OUT.gguf
    python -m tools.big_model qwen3-32b OUT.gguf
    python -m tools.big_model qwen3-30b-a3b OUT.gguf                # ~18 GB, mixture of experts
    python -m tools.big_model gpt-oss-20b OUT.gguf                  # ~13 GB, MXFP4 experts
    python -m tools.big_model --remove OUT.gguf                     # when done with it

Every weight matrix is random but valid K-quant blocks, made directly (a float32
intermediate of a 70B model would be 280 GB), in Q4_K_M's type mix as llama.cpp's own
quantizer assigns it: Q4_K, with Q6_K for the output and for `attn_v` / `ffn_down` in the
layers llama.cpp gives more bits (the first and last eighth, and every third between).
A mixture of experts in Q4_K_M stores its expert stacks [n_expert, rows, cols] the same way
(`ffn_down_exps` is an `ffn_down` to the quantizer) and keeps its router `ffn_gate_inp` in
float32, as llama.cpp's quantizer never quantizes it. gpt-oss files are in the mix of the
released ggml-org GGUF (file type MXFP4_MOE): MXFP4 expert stacks, Q8_0 for every other
matrix, float32 router, norms, attention sinks and biases. Each distinct (shape, type) is
generated once and its bytes reused in every layer, so writing runs at disk speed. Norms
and rope factors are float32; the tokenizer is the synthetic one of tools/synthetic.py
(SentencePiece, or gpt-oss's byte-level BPE), padded with unused tokens to the model's
vocabulary.
The file is llama.cpp-loadable (tests/test_big_model.py checks tiny shapes). Never in CI
at real sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggufjac.families import FAMILIES  # noqa: E402
from ggufjac.layout import (layer_tensor_name, stored_bias_shapes_of,  # noqa: E402
                            stored_shapes_of)
from ggufjac.outputs import atomic_write  # noqa: E402
from tools.synthetic import Shape, add_model_metadata, dims, random_q4_k  # noqa: E402

_U32, _F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32


@dataclass(frozen=True)
class BigModel:
    arch: str
    shape: Shape
    vocab_size: int
    tied: bool
    rope_freqs: bool
    mix: str = "Q4_K_M"  # a key of TYPE_MIXES: which type each matrix is stored in
    tokenizer: str = "llama"  # tools/synthetic.py's: 'llama' or 'gpt2' (byte-level BPE)
    # the family's settings that differ from tools/synthetic.py's small ones (keys without
    # the 'ARCH.' prefix): the real model's windows and rope scaling
    metadata: tuple[tuple[str, object, GGUFValueType], ...] = ()


PRESETS = {
    "llama-3.3-70b": BigModel("llama", Shape(n_layer=80, d_model=8192, d_ff=28672, n_head=64,
                                             n_kv_head=8, head_dim=128, context_length=131072),
                              128256, tied=False, rope_freqs=True),
    "llama-3.1-8b": BigModel("llama", Shape(n_layer=32, d_model=4096, d_ff=14336, n_head=32,
                                            n_kv_head=8, head_dim=128, context_length=131072),
                             128256, tied=False, rope_freqs=True),
    "qwen3-32b": BigModel("qwen3", Shape(n_layer=64, d_model=5120, d_ff=25600, n_head=64,
                                         n_kv_head=8, head_dim=128, context_length=40960),
                          151936, tied=False, rope_freqs=False),
    # Qwen3-30B-A3B (Qwen3-Coder-30B-A3B has the same shapes): 3B of its 30B parameters
    # work per token
    "qwen3-30b-a3b": BigModel("qwen3moe", Shape(n_layer=48, d_model=2048, d_ff=6144, n_head=32,
                                                n_kv_head=4, head_dim=128, context_length=40960,
                                                n_expert=128, n_expert_used=8,
                                                d_ff_expert=768),
                              151936, tied=False, rope_freqs=False,
                              metadata=(("rope.freq_base", 1e6, _F32),)),
    # gpt-oss-20b: sliding-window layers (window 128) alternate with full ones, YaRN rope
    # (factor 32 over an original context of 4096)
    "gpt-oss-20b": BigModel("gpt-oss", Shape(n_layer=24, d_model=2880, d_ff=2880, n_head=64,
                                             n_kv_head=8, head_dim=64, context_length=131072,
                                             n_expert=32, n_expert_used=4, d_ff_expert=2880),
                            201088, tied=False, rope_freqs=False, mix="MXFP4_MOE",
                            tokenizer="gpt2",
                            metadata=(("attention.sliding_window", 128, _U32),
                                      ("rope.freq_base", 150000.0, _F32),
                                      ("rope.scaling.factor", 32.0, _F32),
                                      ("rope.scaling.original_context_length", 4096, _U32),
                                      ("attention.layer_norm_rms_epsilon", 1e-5, _F32))),
}


def preset_path(directory: Path, preset: str, layers: int | None = None) -> Path:
    """Where the benchmarks keep a preset's file (all its layers, or `layers` of them), so
    that each finds the file another one wrote."""
    full = layers is None or layers == PRESETS[preset].shape.n_layer
    return directory / (f"{preset}.gguf" if full else f"{preset}-{layers}-layers.gguf")


def smaller(model: BigModel, layers: int | None = None,
            experts: int | None = None) -> BigModel:
    """`model` with fewer layers and experts (a quick trial of a benchmark); the experts used
    per token capped at the experts there are."""
    shape = model.shape
    if layers is not None:
        shape = replace(shape, n_layer=layers)
    if experts is not None:
        if not shape.n_expert:
            raise ValueError(f"{model.arch} is not a mixture of experts: no --experts")
        shape = replace(shape, n_expert=experts,
                        n_expert_used=min(shape.n_expert_used, experts))
    return replace(model, shape=shape)


def more_bits(layer: int, n_layer: int) -> bool:
    """The layers whose attn_v and ffn_down Q4_K_M stores in Q6_K (llama.cpp's quantizer:
    the first and last eighth of the layers, and every third one between)."""
    eighth = n_layer // 8
    return layer < eighth or layer >= 7 * n_layer // 8 or (layer - eighth) % 3 == 2


def q4_k_m_type(name: str, layer: int | None, n_layer: int) -> Q:
    """The type Q4_K_M gives a matrix (`name` short, as in the layout table; the token
    embedding is 'token_embd'). llama.cpp's quantizer leaves a router in float32, and its
    ffn_down rule matches the expert stack 'ffn_down_exps' by substring. (Its rules for
    models of exactly 8 experts, Mixtral's, which give attention more bits, are not here.)"""
    if name == "output":
        return Q.Q6_K
    if name == "ffn_gate_inp":
        return Q.F32
    if name in ("attn_v", "ffn_down", "ffn_down_exps") and layer is not None \
            and more_bits(layer, n_layer):
        return Q.Q6_K
    return Q.Q4_K


def mxfp4_moe_type(name: str, layer: int | None, n_layer: int) -> Q:
    """The types of ggml-org's gpt-oss GGUF (file type MXFP4_MOE): the expert stacks in
    MXFP4 as released, the router in float32, every other matrix Q8_0."""
    if name.endswith("_exps"):
        return Q.MXFP4
    return Q.F32 if name == "ffn_gate_inp" else Q.Q8_0


# a BigModel's mix: (the type of each matrix, llama.cpp's general.file_type)
TYPE_MIXES: dict[str, tuple[Callable[[str, int | None, int], Q], int]] = {
    "Q4_K_M": (q4_k_m_type, 15),  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    "MXFP4_MOE": (mxfp4_moe_type, 38),  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE
}


def random_q6_k(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random but valid Q6_K blocks for a [rows, cols] matrix, as GGUF stores them: random
    6-bit quants (ql, qh), small positive 8-bit scales, d so that the values have standard
    deviation ~1/sqrt(cols)."""
    n_blocks, type_size = rows * cols // 256, GGML_QUANT_SIZES[Q.Q6_K][1]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    raw[:, 192:208] = rng.integers(1, 17, size=(n_blocks, 16), dtype=np.uint8)  # scales
    d = np.float16(1.0 / (np.sqrt(cols) * 9.0 * 18.5))  # mean scale 9, quant std ~18.5
    raw[:, 208:210] = np.full(n_blocks, d, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, cols // 256 * type_size)


def random_q8_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q8_0 blocks (an f16 scale, 32 int8 quants uniform in [-127, 127], standard
    deviation ~73) with values of standard deviation ~1/sqrt(cols)."""
    n_blocks, type_size = rows * cols // 32, GGML_QUANT_SIZES[Q.Q8_0][1]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    raw[raw == 128] = 129  # int8 -128: outside the quantizer's range
    d = np.float16(1.0 / (np.sqrt(cols) * 73.0))
    raw[:, 0:2] = np.full(n_blocks, d, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, cols // 32 * type_size)


def random_mxfp4(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random MXFP4 blocks: 32 random e2m1 codes (doubled values 0 ... ±12, RMS ~5.9) under
    one E8M0 exponent, the power of two nearest to standard deviation 1/sqrt(cols)."""
    n_blocks, type_size = rows * cols // 32, GGML_QUANT_SIZES[Q.MXFP4][1]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    # ggml's E8M0 'half' scale is 2^(e - 128)
    raw[:, 0] = 128 + int(np.round(np.log2(1.0 / (np.sqrt(cols) * 5.85))))
    return raw.reshape(rows, cols // 32 * type_size)


_RANDOM = {Q.Q4_K: random_q4_k, Q.Q6_K: random_q6_k, Q.Q8_0: random_q8_0,
           Q.MXFP4: random_mxfp4}


def random_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: Q) -> np.ndarray:
    """Random valid blocks of `qtype` for a matrix or a stack of experts [n_expert, rows,
    cols] (each expert's rows drawn separately), as the bytes GGUF stores; float32 (a router)
    as random values of standard deviation 1/sqrt(cols)."""
    *lead, cols = shape
    rows = int(np.prod(lead))
    if qtype == Q.F32:
        return (rng.standard_normal((*lead, cols)) / np.sqrt(cols)).astype(np.float32)
    return _RANDOM[qtype](rng, rows, cols).reshape(*lead, -1)


def write_big_gguf(path: str | os.PathLike[str], model: BigModel, seed: int = 0,
                   progress: bool = False) -> Path:
    """Write `model` to `path` tensor by tensor (only the distinct blocks are in memory)."""
    path, rng = Path(path), np.random.default_rng(seed)
    shape, fam = model.shape, FAMILIES[model.arch]
    type_of, _ = TYPE_MIXES[model.mix]
    blocks: dict[tuple[tuple[int, ...], Q], np.ndarray] = {}

    def matrix(shape: tuple[int, ...], qtype: Q) -> np.ndarray:
        key = (shape, qtype)
        if key not in blocks:
            blocks[key] = random_blocks(rng, shape, qtype)
        return blocks[key]

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    d, vocab = shape.d_model, model.vocab_size
    stored = stored_shapes_of(fam, dims(shape))
    # norms and attention sinks (one value per row or head), and the family's biases, as
    # large as a projection's output (tools/synthetic.py's): small, the same in every layer
    layer_norms = {name: norm(s[0]) for name, s in stored.items() if len(s) == 1}
    layer_biases = {name: rng.standard_normal(s).astype(np.float32)
                    for name, s in stored_bias_shapes_of(fam, dims(shape)).items()}
    # (name, a small array or (shape, type) of a matrix from `blocks`, type or None)
    tensors: list[tuple[str, object, Q | None]] = []

    def add_matrix(name: str, s: tuple[int, ...], qtype: Q) -> None:
        block = GGML_QUANT_SIZES[qtype][0]
        if s[-1] % block:
            raise ValueError(f"{name}: rows of {s[-1]} values are not whole {qtype.name} "
                             f"blocks of {block}")
        tensors.append((name, (s, qtype), qtype))

    add_matrix("token_embd.weight", (vocab, d), type_of("token_embd", None, shape.n_layer))
    tensors.append(("output_norm.weight", norm(d), None))
    if not model.tied:
        add_matrix("output.weight", (vocab, d), type_of("output", None, shape.n_layer))
    if model.rope_freqs:
        tensors.append(("rope_freqs.weight",
                        np.linspace(1.0, 8.0, shape.head_dim // 2).astype(np.float32), None))
    for i in range(shape.n_layer):
        for name, s in stored.items():
            if len(s) == 1:
                tensors.append((layer_tensor_name(i, name), layer_norms[name], None))
            else:
                add_matrix(layer_tensor_name(i, name), s, type_of(name, i, shape.n_layer))
        for name, bias in layer_biases.items():
            tensors.append((layer_tensor_name(i, name, "bias"), bias, None))

    # renamed into place when complete: an interrupted run leaves no file that a later run
    # (the benchmarks reuse an existing one) would take for a whole one
    return atomic_write(path, lambda tmp: _write(GGUFWriter(str(tmp), model.arch), model,
                                                 tensors, matrix, progress))


def _write(w: GGUFWriter, model: BigModel, tensors: list[tuple[str, object, Q | None]],
           matrix: Callable[[tuple[int, ...], Q], np.ndarray], progress: bool) -> None:
    shape, vocab = model.shape, model.vocab_size
    add_model_metadata(w, model.arch, shape, tokenizer=model.tokenizer, vocab_size=vocab,
                       metadata={key: (value, vtype) for key, value, vtype in model.metadata})
    w.add_uint32("general.file_type", TYPE_MIXES[model.mix][1])
    for name, data, qtype in tensors:
        if qtype is None:
            w.add_tensor_info(name, data.shape, data.dtype, data.nbytes)  # type: ignore[union-attr]
        elif qtype == Q.F32:  # a float32 matrix (a router): its shape as it is
            s, _ = data  # type: ignore[misc]
            w.add_tensor_info(name, s, np.dtype(np.float32), 4 * int(np.prod(s)))
        else:
            s, _ = data  # type: ignore[misc]
            block, type_size = GGML_QUANT_SIZES[qtype]
            row_bytes = s[-1] // block * type_size
            w.add_tensor_info(name, (*s[:-1], row_bytes), np.dtype(np.uint8),
                              int(np.prod(s[:-1])) * row_bytes, qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        t0, written = time.perf_counter(), 0
        for k, (name, data, qtype) in enumerate(tensors):
            arr = data if qtype is None else matrix(*data)  # type: ignore[misc]
            w.write_tensor_data(arr)  # type: ignore[arg-type]
            written += arr.nbytes  # type: ignore[union-attr]
            if progress and (k % 50 == 0 or k == len(tensors) - 1):
                rate = written / max(time.perf_counter() - t0, 1e-9) / 1e6
                print(f"\r{written / 1e9:6.1f} GB written, {rate:5.0f} MB/s", end="",
                      flush=True)
    finally:
        # closed on failure too: a removed file still open keeps its blocks, and a full
        # disk would then swallow even the error message
        w.close()
    if progress:
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", choices=sorted(PRESETS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the model's")
    ap.add_argument("--experts", type=int, default=None,
                    help="fewer experts than the model's (a mixture of experts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--remove", action="store_true", help="delete OUT (and write nothing)")
    args = ap.parse_args()
    if args.remove:
        args.out.unlink(missing_ok=True)
        return
    if args.preset is None:
        ap.error("a preset is needed (or --remove)")
    model = smaller(PRESETS[args.preset], args.layers, args.experts)
    t0 = time.perf_counter()
    write_big_gguf(args.out, model, args.seed, progress=True)
    size = args.out.stat().st_size
    print(f"{args.out}: {size / 1e9:.1f} GB, {args.preset}, {model.shape.n_layer} layers, "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
