"""Memory and reads of a mixture of experts against its number of experts: `attribute`
(float32, 16 tokens) on random Q4_K qwen3moe files with Qwen3-30B-A3B's layer shape (d 2048,
32/4 heads × 128, expert FFN 768, 8 experts used) and 16 ... 128 experts, each in a fresh
process: peak RSS, wall time, and the bytes of the experts read against the file.

    python -m tools.bench_moe [--layers 2] [--experts 16 128]

With --preset, a whole model of tools/big_model.py's (qwen3-30b-a3b: Qwen3-30B-A3B's shapes
in Q4_K_M, 18.6 GB; gpt-oss-20b: MXFP4 experts, 12.1 GB), as a user runs it:

    python -m tools.bench_moe --preset qwen3-30b-a3b --file DIR/qwen3-30b-a3b.gguf [--jacobian]
    python -m tools.bench_moe --preset gpt-oss-20b --file DIR/gpt-oss-20b.gguf
    python -m tools.bench_moe --preset qwen3-30b-a3b --layers 2 --experts 16   # a quick trial

The file is written there if it is not (a trial's smaller one into a temporary directory,
removed after). Each case is a fresh process (tools/peak_rss.py: peak = its VmHWM) started
after the file is evicted from the page cache (posix_fadvise DONTNEED), on the same 16
tokens: llama.cpp's own run (repacking off, as tools/bench_big.py runs it: the whole
process, load included), then `attribute` float32, its wall time against llama.cpp's, its
peak RSS, the experts it read (each once) against the file's, and the bytes the process
read from the disk (/proc/self/io: the reverse sweep re-reads what the page cache no longer
holds; the selected experts are asked for by their exact bytes, so the kernel's
read-ahead does not add their unselected neighbours); with --jacobian, J at the first 8
tokens (d directions: many minutes at full size). Prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from tools.peak_rss import measure_module
from tools.synthetic import Shape, write_random_q4_k_gguf

# Qwen3-30B-A3B's layer (its GGUF metadata); the vocabulary is the synthetic one.
SHAPE_30B_A3B = dict(d_model=2048, d_ff=6144, n_head=32, n_kv_head=4, head_dim=128,
                     n_expert_used=8, d_ff_expert=768)
TOKENS = [1] + [261 + i % 20 for i in range(15)]  # BOS and 15 words: 16 tokens


def child(model: str) -> None:
    """Runs inside the measured process: one attribution, figures as JSON on stdout."""
    from ggufjac.api import open_model

    m = open_model(model, dtype="float32")
    t0 = time.perf_counter()
    report = m.attribute(TOKENS)
    seconds = time.perf_counter() - t0
    r = report["routing"]
    print(json.dumps({"seconds": seconds, "n_expert": m.cfg.n_expert,
                      "expert_bytes_read": r["expert_bytes_read"],
                      "expert_bytes_in_file": r["expert_bytes_in_file"],
                      "file_bytes": r["file_bytes"],
                      "share_of_file_read": r["share_of_file_read"]}))


# 16 tokens of each tokenizer tools/synthetic.py writes: SentencePiece (BOS and 15 words)
# and byte-level BPE (its first 256 tokens are the bytes; gpt-oss adds no BOS)
PRESET_TOKENS = {"llama": TOKENS, "gpt2": list(b"the bridge out o")}
JACOBIAN_TOKENS = 8


def disk_read_bytes() -> int:
    """Bytes this process has caused to be read from the disk (/proc/self/io read_bytes):
    page-cache hits are not counted, so after an eviction it is what the run read."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def preset_child(case: str, model: str, tokens_json: str) -> None:
    """One case of the preset mode, inside the measured process: figures as JSON."""
    tokens = json.loads(tokens_json)
    if case == "llama.cpp":
        from ggufjac.llamacpp import RunSettings, evaluate

        t0 = time.perf_counter()
        run = evaluate(model, tokens, RunSettings(repack=False), last_only=True, timeout=3600)
        print(json.dumps({"seconds": time.perf_counter() - t0,
                          "top": int(run.logits[-1].argmax())}))
        return
    from ggufjac.api import open_model

    m = open_model(model, dtype="float32")
    t0 = time.perf_counter()
    if case == "attribute":
        report = m.attribute(tokens)
        seconds = time.perf_counter() - t0
        r, t = report["routing"], report["targets"][0]
        out = {"seconds": seconds, "rel_error": t["rel_error"],
               **{k: r[k] for k in ("expert_bytes_read", "expert_bytes_in_file", "file_bytes",
                                    "share_of_file_read")}}
    else:  # jacobian
        result = m.jacobian(tokens[:JACOBIAN_TOKENS])
        seconds = time.perf_counter() - t0
        out = {"seconds": seconds,
               "reconstruction_rel_error": float(result.reconstruction_rel_error()),
               "expert_bytes_read": m.weights.expert_bytes_read()}
    print(json.dumps({**out, "disk_read_bytes": disk_read_bytes()}))


def run_preset(args: argparse.Namespace) -> None:
    from tools.bench_big import evict, timed
    from tools.big_model import PRESETS, smaller, write_big_gguf

    if args.experts is not None and len(args.experts) != 1:
        raise SystemExit("--preset: --experts takes one number (fewer experts than the model's)")
    trial = args.layers is not None or args.experts is not None
    if args.file is not None and args.file.exists() and trial:
        raise SystemExit(f"{args.file} exists: its shape is the file's, not --layers/--experts")
    model = smaller(PRESETS[args.preset], args.layers, args.experts and args.experts[0])
    tokens = PRESET_TOKENS[model.tokenizer]
    with tempfile.TemporaryDirectory(prefix="ggufjac-bench-moe-") as tmp:
        path = args.file or Path(tmp) / f"{args.preset}.gguf"
        if not path.exists():
            t0 = time.perf_counter()
            write_big_gguf(path, model, progress=True)
            print(json.dumps({"written": str(path),
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        size = path.stat().st_size
        print(json.dumps({"preset": args.preset, "file": str(path), "file_bytes": size,
                          "layers": model.shape.n_layer, "experts": model.shape.n_expert,
                          "machine": platform.processor() or platform.machine(),
                          "cores": os.cpu_count()}), flush=True)
        cases = ["llama.cpp", "attribute"] + (["jacobian"] if args.jacobian else [])
        rows = {}
        for case in cases:
            n = JACOBIAN_TOKENS if case == "jacobian" else len(tokens)
            res = timed(["tools.bench_moe", "--child", case, str(path), json.dumps(tokens)],
                        path)
            if res["rc"]:
                raise SystemExit(f"{case} failed:\n{res['stderr_tail']}")
            row = {"case": case, "tokens": n, "wall_s": res["wall_s"],
                   "peak_bytes": res["peak_bytes"],
                   **json.loads(res["stdout"].strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            rows[case] = row
        evict(path)
    llama_s = rows["llama.cpp"]["wall_s"]
    print(f"\n{args.preset}, {model.shape.n_layer} layers, {model.shape.n_expert} experts "
          f"({model.shape.n_expert_used} used), {size / 1e9:.1f} GB; each case a fresh process "
          "after the file was evicted from the page cache; llama.cpp with repacking off\n")
    print("| case | tokens | wall | × llama.cpp | in the call | peak RSS | experts read | "
          "read from disk | reconstruction |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, r in rows.items():
        # llama.cpp runs in a worker process: its memory is not this process's
        peak = "-" if case == "llama.cpp" else f"{r['peak_bytes'] / 2**30:.2f} GiB"
        experts = "-"
        if "expert_bytes_in_file" in r:
            experts = (f"{r['expert_bytes_read'] / 1e9:.2f} of "
                       f"{r['expert_bytes_in_file'] / 1e9:.2f} GB")
        elif "expert_bytes_read" in r:
            experts = f"{r['expert_bytes_read'] / 1e9:.2f} GB"
        disk = "-" if "disk_read_bytes" not in r else \
            f"{r['disk_read_bytes'] / 1e9:.2f} GB ({r['disk_read_bytes'] / size:.2f} × file)"
        recon = r.get("rel_error", r.get("reconstruction_rel_error"))
        print(f"| {case} | {r['tokens']} | {r['wall_s']:.1f} s | "
              f"{r['wall_s'] / llama_s:.2f} | {r['seconds']:.1f} s | {peak} | {experts} | "
              f"{disk} | {'-' if recon is None else f'{recon:.1e}'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--experts", type=int, nargs="+", default=None)
    ap.add_argument("--preset", choices=["qwen3-30b-a3b", "gpt-oss-20b"],
                    help="a whole model of tools/big_model.py's (see above)")
    ap.add_argument("--file", type=Path, help="--preset: its file (written if absent)")
    ap.add_argument("--jacobian", action="store_true",
                    help=f"--preset: also J at {JACOBIAN_TOKENS} tokens (slow at full size)")
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        if len(args.child) == 1:
            child(args.child[0])
        else:
            preset_child(*args.child)
        return
    if args.preset:
        run_preset(args)
        return
    args.layers = 2 if args.layers is None else args.layers
    args.experts = args.experts or [16, 128]
    print("| experts | file | experts read | share of the file read | peak RSS | wall |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="ggufjac-bench-moe-") as tmp:
        for n_expert in args.experts:
            shape = Shape(n_layer=args.layers, n_expert=n_expert, **SHAPE_30B_A3B)
            path = write_random_q4_k_gguf(Path(tmp) / f"e{n_expert}.gguf", "qwen3moe", shape)
            r = measure_module("tools.bench_moe", "--child", str(path))
            path.unlink()
            print(f"| {n_expert} | {r['file_bytes'] / 2**20:.0f} MiB | "
                  f"{r['expert_bytes_read'] / 2**20:.0f} MiB of "
                  f"{r['expert_bytes_in_file'] / 2**20:.0f} MiB | "
                  f"{100 * r['share_of_file_read']:.0f}% | {r['peak'] / 2**20:.0f} MiB | "
                  f"{r['seconds']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
