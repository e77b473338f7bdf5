"""Each sweep of the engine against the machine's matmul rate at the sweep's own shapes.

    python -m tools.bench_roofline [--model gemma3-270m] [--dtype float32 float64]
    python -m tools.bench_roofline --big llama-3.1-8b --layers 2 --dir /tmp/big \
        [--directions 512] [--tokens 8]

For each sweep (the forward pass, the Jacobian's reverse sweep, the two matrix-free products
of `svd` — Jᵀu by a reverse sweep and Jv by a forward one, a Lanczos block of directions —
and `layers`' cumulative maps by the reverse and the forward sweep) it prints:

- the floating-point operations counted from the shapes (ggufjac/costs.py's counts; the
  forward pass: 2·N per weight of every layer matrix; the attention's N² products left out);
- the wall time of the sweep (after one warm-up run; the best of three for the Jacobian's
  and svd's sweeps, as torch's rate is the best of three);
- torch's GEMM rate at the same shapes, measured in the same run: the matrix products the
  count describes, shaped as the engine makes them (its chunks of directions, d_ff chunks
  and positions per MLP-matrix product; the forward pass: [N, cols] @ [cols, rows] per
  layer matrix, which it multiplies in quantized blocks by the compiled kernels; `layers`'
  maps: the torch products the sweep made, recorded by torch.profiler in one more run), each timed
  alone in torch with fresh contiguous operands; the rate is their FLOPs over that time;
- the fraction: (counted FLOPs / wall time) / torch's rate — 100 % is the sweep running
  at the rate of its own products with nothing else (dequantization, elementwise work,
  copies, Python) taking time;
- `gemm/count`: the FLOPs of those products over the count (a check that the shapes
  describe the counted work: 1.00 where they do).

Timings on a busy machine are not figures: run it alone. Threads: torch's default (set
OMP_NUM_THREADS to pin them).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

PROMPT = "The bridge out of Marin is the"


GEMM_OPS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2),
            "aten::bmm": (0, 1), "aten::baddbmm": (1, 2), "aten::baddbmm_": (1, 2)}


def gemms_of(run: Callable[[], object]) -> Counter:
    """The torch matrix products `run` makes, {(batch, m, k, n): count}, recorded by
    torch.profiler (for sweeps whose shapes follow the code rather than a fixed plan)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    found: Counter = Counter()
    for e in prof.events():
        if e.name not in GEMM_OPS:
            continue
        a, b = (e.input_shapes[i] for i in GEMM_OPS[e.name])
        if len(a) == 3:
            found[(a[0], a[1], a[2], b[2])] += 1
        elif len(a) == 2:
            found[(1, a[0], a[1], b[1])] += 1
    return found


def gemm_seconds(shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device, min_seconds: float = 0.05) -> float:
    """Seconds of one torch product of `shape` (best of three timings of repeated runs)."""
    b, m, k, n = shape
    a = torch.randn((b, m, k) if b > 1 else (m, k), dtype=dtype, device=device)
    w = torch.randn((b, k, n) if b > 1 else (k, n), dtype=dtype, device=device)
    product = torch.bmm if b > 1 else torch.mm
    product(a, w)
    reps = max(1, int(min_seconds / max(_timed(lambda: product(a, w), device), 1e-7)))
    return min(_timed(lambda: [product(a, w) for _ in range(reps)], device)
               for _ in range(3)) / reps


def _timed(f: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    f()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def torch_rate(gemms: Counter, dtype: torch.dtype, device: torch.device
               ) -> tuple[float, float]:
    """(FLOPs of the products, torch's rate over them in FLOP/s: their FLOPs over the time
    torch takes for each alone)."""
    flop = seconds = 0.0
    for shape, count in gemms.items():
        f = 2.0 * math.prod(shape) * count
        flop += f
        seconds += gemm_seconds(shape, dtype, device) * count
    return flop, (flop / seconds if seconds else float("nan"))


def forward_gemms(cfg, n_tokens: int) -> tuple[Counter, float]:
    """The forward pass's products [N, cols] @ [cols, rows], one per layer matrix (an
    expert stack: the selected experts' share is not known here, so it is left out), and
    their FLOPs (the count)."""
    from ggufjac.layout import stored_shapes

    gemms: Counter = Counter()
    for shape in stored_shapes(cfg).values():
        if len(shape) == 2:
            rows, cols = shape
            gemms[(1, n_tokens, cols, rows)] += cfg.n_layer
    return gemms, sum(2.0 * math.prod(s) * c for s, c in gemms.items())


def _sizes(total: int, step: int) -> list[int]:
    return [min(step, total - s) for s in range(0, total, max(step, 1))]


def layer_gemms(engine, n_tokens: int, m: int, chunk: int, top: bool, matrix: bool | None = None
                ) -> Counter:
    """The products of one layer crossed by m directions (`chunk` at a time) as the engine's
    reverse sweep makes them (a forward push of the frozen layer has the same shapes, its
    products transposed): the attention's o and v at every position; the MLP by its
    per-position matrices (formed `_matrix_positions` at a time per d_ff chunk, then
    applied to `_matrix_rows` rows at a time) or through both projections. `top`: only the
    last position crosses the MLP."""
    from ggufjac.engine import MLP_MATRIX_FFN_CHUNK

    cfg, g = engine.cfg, Counter()
    d, f, n = cfg.d_model, cfg.d_ff, n_tokens
    heads_v, kv_v = cfg.n_head * cfg.head_dim_v, cfg.n_kv_head * cfg.head_dim_v
    for c in _sizes(m, chunk):
        g[(1, c * n, d, heads_v)] += 1
        g[(1, c * n, kv_v, d)] += 1
    if engine.mlp_as_matrix(m) if matrix is None else matrix:
        positions = 1 if top else n
        group = getattr(engine, "_matrix_positions", lambda: 1)()  # 1: an older engine
        for p in _sizes(positions, group):
            for fc in _sizes(f, MLP_MATRIX_FFN_CHUNK):
                g[(1, d, fc, p * d)] += 1
        for r in _sizes(m, max(chunk, engine._matrix_rows())):
            g[(1, r, d, d)] += positions
    else:
        for c in _sizes(m, chunk):
            rows = c * (1 if top else n)
            g[(1, rows, d, f)] += 1
            g[(1, rows, f, d)] += 1
    return g


def sweep_gemms(engine, n_tokens: int, directions: list[int], chunk: int,
                matrix: bool | None = None) -> Counter:
    """A sweep's products: `directions[j]` directions crossing layer j, the last listed
    layer being the top one (its MLP at the last position only)."""
    total = Counter()
    for j, m in enumerate(directions):
        if m:
            total += layer_gemms(engine, n_tokens, m, chunk, j == len(directions) - 1, matrix)
    return total


def push_forward_flop(dims, n_layer: int, n_tokens: int, m: int) -> float:
    """engine.push_forward of m probes: the attention's v and o at every position of every
    layer, the MLP's two linear projections (the replayed GLU's linear branch and the down
    projection) at every position but the top layer's, where only the last runs."""
    d, f, n = dims.d_model, dims.d_ff, n_tokens
    attention = 2 * m * n * (d * dims.n_kv_head * dims.head_dim_v
                             + dims.n_head * dims.head_dim_v * d)
    mlp = 2 * m * 2 * d * f * ((n_layer - 1) * n + 1)
    return float(n_layer * attention + mlp)


def measure(name: str, run: Callable[[], object], flop: float, gemms: Counter,
            dtype: torch.dtype, device: torch.device, repeats: int = 1) -> dict:
    run()  # warm: allocations, first-use costs
    wall = min(_timed(run, device) for _ in range(repeats))
    gemm_flop, rate = torch_rate(gemms, dtype, device)
    return {"sweep": name, "flop": flop, "wall": wall, "rate": flop / wall,
            "torch": rate, "coverage": gemm_flop / flop if flop else float("nan")}


def bench(model: str, dtype_name: str, prompt: str, tokens: int | None, directions: int | None,
          lens_layers: int, sweeps: list[str], device: str, chunk: int | None = None
          ) -> list[dict]:
    from ggufjac.api import open_model
    from ggufjac.costs import sweep_flop
    from ggufjac.layout import dims_of
    from ggufjac.linearize import Linearization
    from ggufjac.svd import default_block

    m = open_model(model, dtype=dtype_name, device=device)
    ids = m.tokenize(prompt)
    if tokens is not None:  # a synthetic file's vocabulary: repeat the prompt's tokens
        ids = (ids * tokens)[:tokens]
    engine = m.engine(Linearization())
    cfg, dims, dtype, dev = engine.cfg, dims_of(engine.cfg), engine.dtype, engine.device
    d, n, layers = cfg.d_model, len(ids), cfg.n_layer
    x = engine.embed(ids)
    record = engine.forward(x)
    rows: list[dict] = []
    if "forward" in sweeps:
        gemms, flop = forward_gemms(cfg, n)
        rows.append(measure("forward", lambda: engine.forward(x), flop, gemms, dtype, dev))
    if "jacobian" in sweeps:
        k = d if directions is None else min(directions, d)
        eye = torch.eye(d, dtype=dtype, device=dev)[:k]
        chunk = chunk or engine.plan(k, n).chunk
        rows.append(measure(f"jacobian reverse ({k} dirs, {chunk} per batch)",
                            lambda: engine.pull_back_output(record, eye, chunk),
                            sweep_flop(dims, layers, n, k),
                            sweep_gemms(engine, n, [k] * layers, chunk), dtype, dev,
                            repeats=3))
    if "svd" in sweeps:
        b = default_block(16, n)
        u = torch.randn(b, d, dtype=dtype, device=dev)
        probes = torch.randn(b, n, d, dtype=dtype, device=dev)
        rows.append(measure(f"svd Jᵀu ({b} dirs)", lambda: engine.pull_back_output(record, u),
                            sweep_flop(dims, layers, n, b),
                            sweep_gemms(engine, n, [b] * layers, engine.plan(b, n).chunk),
                            dtype, dev, repeats=3))
        step = engine.plan(b, n, forward=True).chunk
        rows.append(measure(f"svd Jv ({b} dirs)", lambda: engine.push_forward(record, probes),
                            push_forward_flop(dims, layers, n, b),
                            sweep_gemms(engine, n, [b] * layers, step, matrix=False),
                            dtype, dev, repeats=3))
    if "layers" in sweeps:
        rows += lens_rows(engine, record, x, lens_layers, dtype, dev)
    engine.release()
    return rows


def lens_rows(engine, record, x: torch.Tensor, count: int, dtype: torch.dtype,
              device: torch.device) -> list[dict]:
    """`layers`' cumulative maps of `count` evenly spaced layers, by each sweep layers.py
    offers (where its cost counts are there to compare with); torch's rate at the products
    the sweep made, recorded by the profiler in one more run."""
    from ggufjac import costs, layers as lens
    from ggufjac.layout import dims_of

    reverse_count = getattr(costs, "lens_reverse_flop", None)
    forward_count = getattr(costs, "lens_forward_flop", None)
    maps = getattr(lens, "cumulative_maps", None)
    if maps is None or reverse_count is None:
        print("layers: this version has no cumulative_maps / lens_reverse_flop: skipped")
        return []
    n_layer, n = engine.cfg.n_layer, x.shape[0]
    chosen = sorted({round(i * (n_layer - 1) / max(count - 1, 1)) for i in range(count)})
    dims, rows = dims_of(engine.cfg), []
    for sweep, count_of in (("reverse", reverse_count), ("forward", forward_count)):
        if count_of is None:
            continue
        try:
            def run() -> object:
                return maps(engine, record, x, chosen, sweep=sweep)
            rows.append(measure(f"layers {sweep} ({len(chosen)} maps)", run,
                                count_of(dims, n, chosen), gemms_of(run), dtype, device))
        except Exception as e:  # a sweep this version cannot run: say so, go on
            print(f"layers {sweep}: {e}")
    return rows


def big_file(preset: str, layers: int, directory: Path) -> Path:
    from tools.big_model import PRESETS, preset_path, smaller, write_big_gguf

    path = preset_path(directory, preset, layers)
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...", flush=True)
        write_big_gguf(path, smaller(PRESETS[preset], layers))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m", help="a model name or GGUF path")
    ap.add_argument("--big", help="a tools/big_model.py preset (e.g. llama-3.1-8b) instead")
    ap.add_argument("--layers", type=int, default=2, help="layers of the --big file")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ggufjac-big"),
                    help="where the --big file is written (kept for the next run)")
    ap.add_argument("--dtype", nargs="+", default=["float32", "float64"],
                    choices=["float32", "float64"])
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--tokens", type=int, default=None,
                    help="prompt length (the prompt's tokens repeated; default: the prompt's)")
    ap.add_argument("--directions", type=int, default=None,
                    help="output directions of the Jacobian sweep (default: all d)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="directions per batched backward in the Jacobian sweep (default: "
                         "the memory plan's)")
    ap.add_argument("--lens-layers", type=int, default=4,
                    help="cumulative maps of this many evenly spaced layers")
    ap.add_argument("--sweeps", nargs="+", default=["forward", "jacobian", "svd", "layers"],
                    choices=["forward", "jacobian", "svd", "layers"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model = str(big_file(args.big, args.layers, args.dir)) if args.big else args.model
    print(f"{args.big or args.model}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {args.device}")
    print(f"{'dtype':<8}{'sweep':<44}{'GFLOP':>9}{'wall s':>9}{'GFLOP/s':>9}"
          f"{'torch GEMM':>11}{'fraction':>9}{'gemm/count':>11}")
    for dtype in args.dtype:
        for r in bench(model, dtype, args.prompt, args.tokens, args.directions,
                       args.lens_layers, args.sweeps, args.device, args.chunk):
            print(f"{dtype:<8}{r['sweep']:<44}{r['flop'] / 1e9:>9.2f}{r['wall']:>9.3f}"
                  f"{r['rate'] / 1e9:>9.1f}{r['torch'] / 1e9:>11.1f}"
                  f"{r['rate'] / r['torch']:>8.0%}{r['coverage']:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
