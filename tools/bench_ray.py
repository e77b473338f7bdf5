"""`ggufjac jacobian --ray` against one process, on a local Ray cluster of this machine.

    python -m tools.bench_ray --dir /big [--preset llama-3.1-8b] [--layers 2]
        [--prompt TEXT] [--keep]

The preset's file (tools/big_model.py: the real model's shapes, `--layers` of its layers)
is written into --dir unless it is there. A Ray cluster is started on 127.0.0.1 with this
machine's cores (`ray start --head`) and stopped at the end. Then, each as a user runs it,
in a fresh process, with the file in the page cache (read once before: every run reads it
from memory, none from the disk):

  one process, 1 thread     ggufjac jacobian FILE -p TEXT --out X --threads 1
  one process, 2 threads    ... --threads 2   (what 2 workers' cores give one process)
  ray, 1 worker             ... --ray ADDR --workers 1 --threads 1
  ray, 2 workers            ... --ray ADDR --workers 2 --threads 1

Each line gives the command's wall time and the Jacobian's own seconds (report.json's
jacobian_seconds: the forward passes and the sweeps to J written; the Ray workers' start,
a fresh Python importing torch and opening the model, is in the wall time only), then
the ratios: 1 → 2 workers (the scaling), one process with 1 thread and with 2 threads
against 2 workers. The Ray runs split the d output directions in two requests per worker,
each a reverse sweep that reads every layer again, and every worker runs the forward pass:
that overhead is in their time. The machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.big_model import PRESETS, preset_path, smaller, write_big_gguf  # noqa: E402

PROMPT = "the bridge out"  # as tools/bench_big.py (the synthetic tokenizer is per character)


def read_into_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, args: list[str], env: dict[str, str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ggufjac.cli", *args, "--out", str(out)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{name} failed: {' '.join(args)}\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    row = {"run": name, "wall_s": round(wall, 1),
           "jacobian_s": round(report["jacobian_seconds"], 1), "ray": report.get("ray")}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="where the model file is kept")
    ap.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=2, help="layers of the preset written")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--keep", action="store_true", help="keep the model file afterwards")
    args = ap.parse_args()
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    if ray_bin is None:
        sys.exit("Ray is not installed here: pip install 'ggufjac[ray]'")
    path = preset_path(args.dir, args.preset, args.layers)
    if not path.exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        write_big_gguf(path, smaller(PRESETS[args.preset], args.layers), progress=True)
    read_into_page_cache(path)
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(),
               RAY_USAGE_STATS_ENABLED="0")
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1",
                            f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True)
    if start.returncode != 0:
        sys.exit(start.stdout + start.stderr)
    address = f"127.0.0.1:{port}"
    base = ["jacobian", str(path), "-p", args.prompt]
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            out = Path(tmp) / "out"
            one = run("one process, 1 thread", [*base, "--threads", "1"], env, out)
            two = run("one process, 2 threads", [*base, "--threads", "2"], env, out)
            ray1 = run("ray, 1 worker", [*base, "--threads", "1", "--ray", address,
                                         "--workers", "1"], env, out)
            ray2 = run("ray, 2 workers", [*base, "--threads", "1", "--ray", address,
                                          "--workers", "2"], env, out)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
        if not args.keep:
            path.unlink(missing_ok=True)
    print(f"{args.preset}, {args.layers} layer(s), prompt {args.prompt!r}: J's seconds "
          f"(wall in brackets)")
    for row in (one, two, ray1, ray2):
        print(f"  {row['run']:<24} {row['jacobian_s']:8.1f} s  ({row['wall_s']:.1f} s)")
    print(f"scaling 1 -> 2 workers:        {ray1['jacobian_s'] / ray2['jacobian_s']:.2f}x")
    print(f"2 workers vs 1 process, 1 thread:  {one['jacobian_s'] / ray2['jacobian_s']:.2f}x")
    print(f"2 workers vs 1 process, 2 threads: {two['jacobian_s'] / ray2['jacobian_s']:.2f}x")


if __name__ == "__main__":
    main()
