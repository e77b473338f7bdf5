"""Dequantization speed: ggufjac's torch dequantizers and llama.cpp's own (native_quants.py,
what `dequantize` uses on CPU) vs gguf-py's numpy path, same tensors.

    python tools/bench_dequant.py [--model gemma3-270m] [--device cpu|cuda] [--repeat 3]

For each tensor type in the file (and synthetic random blocks of the types it lacks), prints
GB/s of float32 output for each and the ratios, measured in this one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggufjac.gguf_file import GGUFFile  # noqa: E402
from ggufjac.native_quants import native  # noqa: E402
from ggufjac.quants import DEQUANTIZERS, dequantize_torch, raw_to_torch  # noqa: E402
from ggufjac.resolve import resolve_model  # noqa: E402

TARGET_BYTES = 64 << 20  # ~64 MiB of float32 output per type


def _best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def samples(path: Path) -> dict[Q, np.ndarray]:
    """Raw bytes per type: real tensors of the file where it has the type, else random."""
    g = GGUFFile(path)
    out: dict[Q, list[np.ndarray]] = {}
    for name, info in g.tensors.items():
        if info.type in DEQUANTIZERS and info.type != Q.F32:
            out.setdefault(info.type, []).append(g.tensor_data(name))
    res = {}
    for qtype, parts in out.items():
        block, type_size = GGML_QUANT_SIZES[qtype]
        need = TARGET_BYTES // 4 // block * type_size
        raw = np.concatenate(parts)[:need]
        res[qtype] = np.ascontiguousarray(raw[: len(raw) // type_size * type_size])
    rng = np.random.default_rng(0)
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q5_K, Q.IQ4_NL, Q.IQ4_XS):
        if qtype in res:
            continue
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = TARGET_BYTES // 4 // block
        if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_1):
            raw = gguf_quants.quantize(rng.standard_normal((n, block)).astype(np.float32), qtype)
        else:  # random bytes: the speed does not depend on the values
            raw = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
        res[qtype] = np.ascontiguousarray(raw.reshape(-1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    engine = native() if device.type == "cpu" else None
    print(f"{'type':<8}{'MB out':>8}{'gguf-py GB/s':>14}{'torch GB/s':>12}{'ratio':>8}"
          f"{'torch, reused buffer GB/s':>27}{'ratio':>8}{'llama.cpp, reused GB/s':>24}"
          f"{'vs torch':>10}  source")
    path = resolve_model(args.model)
    real = {info.type for info in GGUFFile(path).tensors.values()}
    for qtype, raw in sorted(samples(path).items(), key=lambda kv: kv[0].value):
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_out = raw.size // type_size * block
        gb = n_out * 4 / 1e9
        with np.errstate(all="ignore"):
            t_ref = _best_of(lambda: gguf_quants.dequantize(raw, qtype), args.repeat)
        dev_raw = raw_to_torch(raw, device)

        def ours() -> None:
            dequantize_torch(dev_raw, qtype, (n_out,))
            if device.type == "cuda":
                torch.cuda.synchronize()

        buffer = torch.empty(n_out, dtype=torch.float32, device=device)

        def ours_reused() -> None:  # what the streaming engine does, layer after layer
            dequantize_torch(dev_raw, qtype, (n_out,), out=buffer)
            if device.type == "cuda":
                torch.cuda.synchronize()

        ours()  # warm-up
        t_ours = _best_of(ours, args.repeat)
        ours_reused()
        t_reused = _best_of(ours_reused, args.repeat)
        native_cols = f"{'-':>24}{'-':>10}"
        if engine is not None and engine.supports(qtype, dequantize_torch):
            threads = torch.get_num_threads()
            t_native = _best_of(lambda: engine.dequantize(dev_raw, qtype, buffer, threads),
                                args.repeat)
            native_cols = f"{gb / t_native:>24.2f}{t_reused / t_native:>10.1f}"
        src = "file" if qtype in real else "random"
        print(f"{qtype.name:<8}{n_out * 4 / 1e6:>8.0f}{gb / t_ref:>14.2f}{gb / t_ours:>12.2f}"
              f"{t_ref / t_ours:>8.1f}{gb / t_reused:>27.2f}{t_ref / t_reused:>8.1f}"
              f"{native_cols}  {src}")


if __name__ == "__main__":
    main()
