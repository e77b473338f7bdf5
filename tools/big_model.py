"""Big synthetic GGUF models with the shapes of real ones, written without a float32 model.

    python -m tools.big_model llama-3.3-70b OUT.gguf [--layers N]   # ~42 GB, minutes
    python -m tools.big_model llama-3.1-8b OUT.gguf
    python -m tools.big_model qwen3-32b OUT.gguf
    python -m tools.big_model --remove OUT.gguf                     # when done with it

Every weight matrix is random but valid K-quant blocks, made directly (a float32
intermediate of a 70B model would be 280 GB), in Q4_K_M's type mix as llama.cpp's own
quantizer assigns it: Q4_K, with Q6_K for the output and for `attn_v` / `ffn_down` in the
layers llama.cpp gives more bits (the first and last eighth, and every third between).
Each distinct (shape, type) is generated once and its bytes reused in every layer, so
writing runs at disk speed. Norms and rope factors are float32; the tokenizer is the
synthetic one of tools/synthetic.py, padded with unused tokens to the model's vocabulary.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggufjac.families import FAMILIES  # noqa: E402
from ggufjac.layout import layer_tensor_name, stored_shapes_of  # noqa: E402
from ggufjac.outputs import atomic_write  # noqa: E402
from tools.synthetic import Shape, add_model_metadata, dims, random_q4_k  # noqa: E402


@dataclass(frozen=True)
class BigModel:
    arch: str
    shape: Shape
    vocab_size: int
    tied: bool
    rope_freqs: bool


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
}


def preset_path(directory: Path, preset: str, layers: int | None = None) -> Path:
    """Where the benchmarks keep a preset's file (all its layers, or `layers` of them), so
    that each finds the file another one wrote."""
    full = layers is None or layers == PRESETS[preset].shape.n_layer
    return directory / (f"{preset}.gguf" if full else f"{preset}-{layers}-layers.gguf")


def more_bits(layer: int, n_layer: int) -> bool:
    """The layers whose attn_v and ffn_down Q4_K_M stores in Q6_K (llama.cpp's quantizer:
    the first and last eighth of the layers, and every third one between)."""
    eighth = n_layer // 8
    return layer < eighth or layer >= 7 * n_layer // 8 or (layer - eighth) % 3 == 2


def q4_k_m_type(name: str, layer: int | None, n_layer: int) -> Q:
    """The type Q4_K_M gives a matrix (`name` short, as in the layout table)."""
    if name == "output":
        return Q.Q6_K
    if name in ("attn_v", "ffn_down") and layer is not None and more_bits(layer, n_layer):
        return Q.Q6_K
    return Q.Q4_K


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


_RANDOM = {Q.Q4_K: random_q4_k, Q.Q6_K: random_q6_k}


def write_big_gguf(path: str | os.PathLike[str], model: BigModel, seed: int = 0,
                   progress: bool = False) -> Path:
    """Write `model` to `path` tensor by tensor (only the distinct blocks are in memory)."""
    path, rng = Path(path), np.random.default_rng(seed)
    shape, fam = model.shape, FAMILIES[model.arch]
    if any(n % 256 for n in (shape.d_model, shape.d_ff, shape.n_head * shape.head_dim)):
        raise ValueError("K-quant rows must be multiples of 256 values")
    blocks: dict[tuple[int, int, Q], np.ndarray] = {}

    def matrix(rows: int, cols: int, qtype: Q) -> np.ndarray:
        key = (rows, cols, qtype)
        if key not in blocks:
            blocks[key] = _RANDOM[qtype](rng, rows, cols)
        return blocks[key]

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    d, vocab = shape.d_model, model.vocab_size
    layer_norms = {name: norm(s[0]) for name, s in stored_shapes_of(fam, dims(shape)).items()
                   if len(s) == 1}
    # (name, array or a function making it): arrays are small; matrices come from `blocks`
    tensors: list[tuple[str, object, Q | None]] = [
        ("token_embd.weight", (vocab, d, Q.Q4_K), Q.Q4_K),
        ("output_norm.weight", norm(d), None)]
    if not model.tied:
        tensors.append(("output.weight", (vocab, d, Q.Q6_K), Q.Q6_K))
    if model.rope_freqs:
        tensors.append(("rope_freqs.weight",
                        np.linspace(1.0, 8.0, shape.head_dim // 2).astype(np.float32), None))
    for i in range(shape.n_layer):
        for name, s in stored_shapes_of(fam, dims(shape)).items():
            if len(s) == 1:
                tensors.append((layer_tensor_name(i, name), layer_norms[name], None))
            else:
                qtype = q4_k_m_type(name, i, shape.n_layer)
                tensors.append((layer_tensor_name(i, name), (*s, qtype), qtype))

    # renamed into place when complete: an interrupted run leaves no file that a later run
    # (the benchmarks reuse an existing one) would take for a whole one
    return atomic_write(path, lambda tmp: _write(GGUFWriter(str(tmp), model.arch), model,
                                                 tensors, matrix, progress))


def _write(w: GGUFWriter, model: BigModel, tensors: list[tuple[str, object, Q | None]],
           matrix: Callable[[int, int, Q], np.ndarray], progress: bool) -> None:
    shape, vocab = model.shape, model.vocab_size
    add_model_metadata(w, model.arch, shape, vocab_size=vocab)
    w.add_uint32("general.file_type", 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    for name, data, qtype in tensors:
        if qtype is None:
            w.add_tensor_info(name, data.shape, data.dtype, data.nbytes)  # type: ignore[union-attr]
        else:
            rows, cols, _ = data  # type: ignore[misc]
            nbytes = rows * cols // 256 * GGML_QUANT_SIZES[qtype][1]
            w.add_tensor_info(name, (rows, nbytes // rows), np.dtype(np.uint8), nbytes, qtype)
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--remove", action="store_true", help="delete OUT (and write nothing)")
    args = ap.parse_args()
    if args.remove:
        args.out.unlink(missing_ok=True)
        return
    if args.preset is None:
        ap.error("a preset is needed (or --remove)")
    model = PRESETS[args.preset]
    if args.layers is not None:
        model = replace(model, shape=replace(model.shape, n_layer=args.layers))
    t0 = time.perf_counter()
    write_big_gguf(args.out, model, args.seed, progress=True)
    size = args.out.stat().st_size
    print(f"{args.out}: {size / 1e9:.1f} GB, {args.preset}, {model.shape.n_layer} layers, "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
