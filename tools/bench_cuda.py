"""Big models on one GPU: `attribute` of the big-model presets with --device cuda.

    python -m tools.bench_cuda --dir /big llama-3.3-70b [llama-3.1-8b ...]
        [--dtypes float32,float64] [--tokens JSON] [--layers N] [--keep]

The GPU counterpart of tools/bench_big.py, for a machine that may have no llama.cpp (a GPU
host often has only a CPU build of it, or none): the token ids come from llama.cpp when it
is installed, else from --tokens (llama.cpp's ids for bench_big's prompt, which any machine
with llama.cpp prints with `--print-tokens`). Each preset's file is written into --dir
unless it is there, evicted from the page cache, and each case runs in a fresh process
(peak RSS = VmHWM; peak GPU memory = torch's max_memory_allocated); with --warm the file
is read into the page cache first instead (for a machine whose RAM holds it). Prints one JSON line
per case (time split per sweep included) and a table; the file is removed unless --keep.
Never in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.bench_big import PROMPT, evict, timed  # noqa: E402
from tools.big_model import PRESETS, preset_path, write_big_gguf  # noqa: E402


def child(path: str, tokens: str, dtype: str, device: str) -> None:
    """One `attribute` in this process; its figures as one JSON line."""
    import torch

    from ggufjac.api import open_model

    t0 = time.perf_counter()
    with open_model(path, dtype=dtype, device=device) as m:
        rep = m.attribute(json.loads(tokens))
    wall = time.perf_counter() - t0
    t = rep["targets"][0]
    gpu_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    print(json.dumps({"attribute_s": round(wall, 2), "logit": t["logit"],
                      "sum": t["sum_of_contributions"], "rel_error": t["rel_error"],
                      "gpu_peak_bytes": gpu_peak, "sweeps": rep["sweeps"]}))


def prompt_tokens(path: Path, given: str | None) -> list[int]:
    if given:
        return json.loads(given)
    try:
        from ggufjac.llamacpp import tokenize
        return tokenize(path, PROMPT)
    except Exception as e:  # noqa: BLE001 - any failure to start llama.cpp
        raise SystemExit(f"no llama.cpp here to tokenize with ({e}); pass --tokens") from e


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # one measured case, in a fresh process
        child(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("presets", nargs="+", choices=sorted(PRESETS))
    ap.add_argument("--dir", type=Path, required=True, help="where the files are written")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", help="token ids as a JSON list (default: llama.cpp's)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset's")
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    ap.add_argument("--warm", action="store_true",
                    help="read the file once and leave it in the page cache (a machine whose "
                    "RAM holds it): the GPU's time without the disk's")
    ap.add_argument("--print-tokens", action="store_true",
                    help="print llama.cpp's ids of the prompt for the first preset, and stop")
    args = ap.parse_args()
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "device": _device_name(args.device)}), flush=True)
    table = []
    for name in args.presets:
        model = PRESETS[name]
        path = preset_path(args.dir, name, args.layers)
        if args.layers:
            model = replace(model, shape=replace(model.shape, n_layer=args.layers))
        if not path.exists():
            t0 = time.perf_counter()
            write_big_gguf(path, model)
            print(json.dumps({"preset": path.stem, "written_s":
                              round(time.perf_counter() - t0, 1)}), flush=True)
        tokens = prompt_tokens(path, args.tokens)
        if args.print_tokens:
            print(json.dumps(tokens))
            return
        size = path.stat().st_size
        if args.warm:
            with open(path, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass
        for dtype in args.dtypes.split(","):
            res = timed(["tools.bench_cuda", "--child", str(path), json.dumps(tokens), dtype,
                         args.device], path, cold=not args.warm)
            row = {"preset": path.stem, "file_bytes": size, "dtype": dtype,
                   "page_cache": "warm" if args.warm else "evicted",
                   "n_tokens": len(tokens), "wall_s": res["wall_s"],
                   "peak_bytes": res["peak_bytes"], "rc": res["rc"]}
            if res["rc"]:
                row["stderr_tail"] = res["stderr_tail"]
            else:
                row.update(json.loads(res["stdout"].strip().splitlines()[-1]))
            print(json.dumps(row), flush=True)
            table.append(row)
        if not args.keep:
            path.unlink()
    print(f"\n{'model':22} {'file':>8} {'dtype':8} {'wall s':>8} {'RSS':>9} {'GPU':>9} "
          f"{'rel error':>9}")
    for row in table:
        rss = f"{row['peak_bytes'] / 2**30:.2f} GiB" if row.get("peak_bytes") else "-"
        gpu = f"{row['gpu_peak_bytes'] / 2**30:.2f} GiB" if row.get("gpu_peak_bytes") else "-"
        err = f"{row['rel_error']:.1e}" if "rel_error" in row else f"rc {row['rc']}"
        print(f"{row['preset']:22} {row['file_bytes'] / 1e9:6.1f}GB {row['dtype']:8} "
              f"{row['wall_s']:8.1f} {rss:>9} {gpu:>9} {err:>9}")


def _device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return device


if __name__ == "__main__":
    main()
