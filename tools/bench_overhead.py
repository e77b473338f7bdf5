"""Where a command's time goes besides the Jacobian: imports, opening the file, llama.cpp's
child (tokenizing, its runs), the SVD, the vocabulary walk that decodes vectors, the plot,
writing.

    python -m tools.bench_overhead [MODEL] [--repeat 3]

Each command runs as users run it, in a fresh process (`python -m ggufjac.cli ...`), with
timers wrapped around the functions named below; the whole process is timed from outside.
"other" is what no timer covers (the interpreter's start, click, printing). Prints one
table per command and the time spent outside the model's own computation (the Jacobian,
or the forward pass and attribution sweep): the goal is <= 2 s on Gemma 3 270M.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The bridge out of Marin is the"
# (phase, module, qualified name): the first timer entered owns the time (no double count)
TIMED = [
    ("imports", None, None),
    ("open model", "ggufjac.api", "open_model"),
    ("llama.cpp: tokenize", "ggufjac.llamacpp", "tokenize"),
    ("llama.cpp: tokenize", "ggufjac.llamacpp", "PendingCall.result"),
    ("llama.cpp: runs", "ggufjac.llamacpp", "evaluate"),
    ("jacobian", "ggufjac.jacobian", "streamed_jacobian"),
    ("attribution sweep", "ggufjac.engine", "StreamingEngine.pull_back_output"),
    ("forward pass", "ggufjac.engine", "StreamingEngine.forward"),
    ("memory plan", "ggufjac.engine", "StreamingEngine.plan"),
    ("svd", "ggufjac.analysis", "spectrum"),
    ("validate (torch-free)", "ggufjac.layout", "validate_file"),
    ("vocabulary walk", "ggufjac.analysis", "top_tokens_by_unembedding"),
    ("weight scan (NaN/Inf)", "ggufjac.weights", "GGUFWeights.nonfinite_counts"),
    ("plot", "ggufjac.plots", "plot_spectrum"),
    ("write files", "ggufjac.outputs", "write_all"),
]
COMMANDS = {
    "jacobian": ["jacobian", "{model}", "-p", PROMPT, "--out", "{out}", "--overwrite"],
    "attribute": ["attribute", "{model}", "-p", PROMPT],
    "check": ["check", "{model}", "-p", PROMPT],
    "info --no-scan": ["info", "{model}", "--no-scan"],
}

CHILD = r'''
import builtins, importlib, json, sys, time
spent, active, depth = {}, [None], [0]
targets = [t for t in json.loads(sys.argv[1]) if t[1] is not None]
patched = set()


def wrap(phase, original):
    def timed(*a, **k):
        if active[0] is not None:
            return original(*a, **k)
        active[0], t0 = phase, time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - t0
            active[0] = None
    return timed


def patch_loaded():
    # the timers go in as soon as their modules are imported, before any `from x import f`
    for phase, module, qualname in targets:
        if (module, qualname) in patched or module not in sys.modules:
            continue
        mod = sys.modules[module]
        owner, attr = (mod, qualname) if "." not in qualname else \
            (getattr(mod, qualname.split(".")[0], None), qualname.split(".")[1])
        if owner is None or not hasattr(owner, attr):
            continue  # the module is still being executed
        setattr(owner, attr, wrap(phase, getattr(owner, attr)))
        patched.add((module, qualname))


original_import = builtins.__import__


def timed_import(name, globals=None, locals=None, fromlist=(), level=0):
    top = depth[0] == 0 and active[0] is None
    depth[0] += 1
    t0 = time.perf_counter()
    try:
        return original_import(name, globals, locals, fromlist, level)
    finally:
        depth[0] -= 1
        patch_loaded()
        if top:
            spent["imports"] = spent.get("imports", 0.0) + time.perf_counter() - t0


builtins.__import__ = timed_import
import ggufjac.cli
try:
    ggufjac.cli.main(sys.argv[3:], standalone_mode=False)
except SystemExit:
    pass
finally:
    builtins.__import__ = original_import
    with open(sys.argv[2], "w") as f:
        json.dump(spent, f)
'''


def run(args: list[str]) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "spent.json"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(TIMED), str(out), *args],
                           capture_output=True, text=True, env={**os.environ})
        wall = time.perf_counter() - t0
        if p.returncode not in (0, 1):
            raise SystemExit(f"{args}: exit {p.returncode}: {p.stderr[-2000:]}")
        return wall, json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="gemma3-270m")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--commands", default=",".join(COMMANDS))
    args = ap.parse_args()
    print(f"model {args.model}, prompt {PROMPT!r}, median of {args.repeat} fresh processes, "
          f"{os.cpu_count()} CPUs")
    for name in args.commands.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [a.format(model=args.model, out=f"{tmp}/out") for a in COMMANDS[name]]
            runs = [run(cmd) for _ in range(args.repeat)]
        walls = [w for w, _ in runs]
        phases = {p for _, s in runs for p in s}
        median = {p: statistics.median(s.get(p, 0.0) for _, s in runs) for p in phases}
        wall = statistics.median(walls)
        print(f"\n{name}: whole process {wall:.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)})")
        for phase, _, _ in TIMED:
            if median.get(phase, 0.0) >= 0.005:
                print(f"  {phase:<24}{median[phase]:7.2f} s")
        print(f"  {'other':<24}{wall - sum(median.values()):7.2f} s")
        core = sum(median.get(p, 0.0) for p in ("jacobian", "forward pass", "attribution sweep"))
        print(f"  outside the model's own computation (Jacobian, forward pass, sweep): "
              f"{wall - core:.2f} s")


if __name__ == "__main__":
    main()
