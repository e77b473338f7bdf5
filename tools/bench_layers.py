"""`layers`' cumulative maps by one reverse sweep against one forward pass, and `compare`
before and after its shared work was done once; ratios measured in one run.

    python -m tools.bench_layers layers [--model gemma3-270m] [--tokens 8,4] [--dtype float32]
    python -m tools.bench_layers layers --model big-8b.gguf --tokens 2      # 32 layers, long
    python -m tools.bench_layers layers --model big-8b.gguf --tokens 1 --maps 7,15,23,31
    python -m tools.bench_layers compare [--model gemma3-270m] [--prompts 2] [--repeats 1]

layers: one forward pass of the model, then the cumulative maps of every layer (the exact
logit lens) by each sweep in turn, on the same record (`layers.cumulative_maps`, forced to
'reverse' and to 'forward'), alternating, `--repeats` times each; the counted operations
(costs.lens_reverse_flop / lens_forward_flop), the wall time, the rate, which sweep `auto`
picks, and the largest relative difference between the two sweeps' maps. `--tokens`: the
prompt cut to (or repeated to) these many tokens, each a separate case: the forward pass
gains as L/N grows.

compare: `compare_prompts` of the model against its Q8_0 requantization (llama.cpp's
quantizer, written to a temporary directory) on `--prompts` prompts, with every analysis and
each file's own llama.cpp run, by the code before (compare.py as of BEFORE_COMMIT, loaded
beside the current package: the same engine) and after, alternating; each run's figures
must agree (their largest relative difference is printed).

The 8B-shaped file: `python -m tools.big_model llama-3.1-8b big-8b.gguf` (~4.9 GB, a few
minutes; `--remove` when done). Its maps at 2 tokens hold 32 × 4096 × 2 × 4096 floats
(4.3 GB in float32), and the reverse sweep counts ~357 TFLOP against the forward pass's ~60:
hours on a 2-core CPU; on a GPU use --device cuda. `--maps` takes the maps of some layers
only: at one token the maps of layers 7, 15, 23 and 31 (all 32 layers crossed; ~40 TFLOP
reverse, ~25 forward) take ~10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ggufjac.api import open_model
from ggufjac.costs import lens_forward_flop, lens_reverse_flop
from ggufjac.layers import choose_sweep, cumulative_maps
from ggufjac.layout import dims_of

BRIDGE = "The bridge out of Marin is the"
PROMPTS = ["The bridge out of Marin is the", "The capital of France is",
           "def fibonacci(n):\n    return", "Water boils at a temperature of"]
# compare.py before the shared work was done once (the same engine, layers and llamacpp)
BEFORE_COMMIT = "54e2b73"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def bench_layers(model: str, token_counts: list[int], dtype: str, device: str,
                 repeats: int, maps_of: list[int] | None = None) -> None:
    m = open_model(model, dtype=dtype, device=device)
    full = m.tokenize(BRIDGE)
    layers = maps_of or list(range(m.cfg.n_layer))
    dims = dims_of(m.cfg)
    which = "every layer" if maps_of is None else "layers " + ",".join(map(str, layers))
    print(f"{m.path.name}: {m.cfg.n_layer} layers, d {m.cfg.d_model}, d_ff {m.cfg.d_ff}, "
          f"{dtype}, {device}; cumulative maps of {which}")
    for n in token_counts:
        tokens = (full * (-(-n // len(full))))[:n]
        engine = m.engine()
        x = engine.embed(tokens)
        record = engine.forward(x)
        flop = {"reverse": lens_reverse_flop(dims, n, layers),
                "forward": lens_forward_flop(dims, n, layers)}
        times: dict[str, list[float]] = {"reverse": [], "forward": []}
        maps = {}
        for _ in range(repeats):
            for sweep in ("reverse", "forward"):
                maps.pop(sweep, None)
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                maps[sweep] = cumulative_maps(engine, record, x, layers, sweep=sweep)[0]
                if device == "cuda":
                    torch.cuda.synchronize()
                times[sweep].append(time.perf_counter() - t0)
                engine.release()
        diff = max(_rel(f.jacobian, r.jacobian) for r, f in zip(maps["reverse"],
                                                                 maps["forward"]))
        best = {s: min(t) for s, t in times.items()}
        for sweep in ("reverse", "forward"):
            print(f"  N={n:3d} {sweep:8s} {flop[sweep] / 1e12:8.3f} TFLOP  "
                  + ", ".join(f"{t:.1f}" for t in times[sweep])
                  + f" s  ({flop[sweep] / best[sweep] / 1e9:.1f} GFLOP/s)")
        print(f"  N={n:3d} reverse/forward: counted {flop['reverse'] / flop['forward']:.2f}x, "
              f"measured {best['reverse'] / best['forward']:.2f}x; auto picks "
              f"{choose_sweep(engine, n, layers)}; largest difference {diff:.1e}")
        del maps, record


def _compare_before():
    """compare.py as of BEFORE_COMMIT, as a module of the current package."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "-C", str(root), "show", f"{BEFORE_COMMIT}:ggufjac/compare.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-compare-")) / "compare_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ggufjac._compare_before", path,
                                                  submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "ggufjac"
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _largest_difference(x: object, y: object, path: str = "") -> tuple[float, str]:
    """The largest relative difference between two entries' numbers, and where it is."""
    if isinstance(x, dict):
        return max([_largest_difference(x[k], y[k], f"{path}.{k}") for k in x],
                   default=(0.0, path))
    if isinstance(x, list):
        return max([_largest_difference(a, b, f"{path}[{i}]") for i, (a, b) in
                    enumerate(zip(x, y))], default=(0.0, path))
    if isinstance(x, float) and isinstance(y, float):
        return (abs(x - y) / max(abs(x), 1e-300) if x != y else 0.0), path
    return (0.0 if x == y else float("inf")), path


def bench_compare(model: str, n_prompts: int, dtype: str, repeats: int) -> None:
    from ggufjac import compare, llamacpp
    from ggufjac.linearize import Linearization

    before = _compare_before()
    prompts = PROMPTS[:n_prompts]
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        a_path = open_model(model).path
        b_path = Path(tmp) / "requantized-Q8_0.gguf"
        llamacpp.quantize(a_path, b_path, 7, allow_requantize=True)
        print(f"{a_path.name} against its Q8_0 requantization, {len(prompts)} prompts, "
              f"analyses {', '.join(compare.ANALYSES)}, llama.cpp runs, {dtype}")
        times: dict[str, list[float]] = {"before": [], "after": []}
        entries = {}
        for _ in range(repeats):
            for name, module in (("before", before), ("after", compare)):
                with open_model(a_path, dtype=dtype) as a, open_model(b_path, dtype=dtype) as b:
                    t0 = time.perf_counter()
                    entries[name] = module.compare_prompts(
                        a, b, prompts, compare.ANALYSES, 8, None, Linearization(),
                        llamacpp.RunSettings())
                    times[name].append(time.perf_counter() - t0)
        for name in ("before", "after"):
            print(f"  {name:6s} " + ", ".join(f"{t:.1f}" for t in times[name]) + " s")
        largest, where = _largest_difference(entries["before"], entries["after"])
        print(f"  before/after: {min(times['before']) / min(times['after']):.2f}x; largest "
              f"relative difference of any figure {largest:.1e} (at {where}; the two sweeps "
              f"round differently)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["layers", "compare"])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", default="8,4", help="layers: prompt lengths, comma-separated")
    ap.add_argument("--prompts", type=int, default=2, help="compare: prompts compared")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--maps", help="layers: the maps of these layers only, comma-separated "
                                   "(default: every layer)")
    args = ap.parse_args()
    if args.what == "layers":
        maps = [int(t) for t in args.maps.split(",")] if args.maps else None
        bench_layers(args.model, [int(t) for t in args.tokens.split(",")], args.dtype,
                     args.device, args.repeats, maps)
    else:
        bench_compare(args.model, args.prompts, args.dtype, args.repeats)


if __name__ == "__main__":
    main()
