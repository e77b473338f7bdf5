"""Big models on this machine: files larger than RAM, memory that does not grow with the model.

    python -m tools.bench_big --dir /big llama-3.3-70b [llama-3.1-8b qwen3-32b ...]
        [--cases info,check,attribute,anchored] [--keep] [--prompt TEXT]

For each preset (tools/big_model.py) the file is written into --dir (unless it is there),
then every case runs as a user runs it, in a fresh process (`python -m ggufjac.cli ...` under
tools/peak_rss.py: peak = that process's VmHWM), with the file evicted from the page cache
first (posix_fadvise DONTNEED: the reads come from the disk). The yardstick is llama.cpp's
own run of the same tokens on the same file, timed the same way in the same benchmark run
(repacking off: with it llama.cpp copies the repacked weights into RAM, which a file larger
than RAM cannot take). The file is removed after its cases unless --keep. Prints one JSON
line per case and a table at the end; never in CI (42 GB for the 70B shape).

Cases:
  info       `ggufjac info --no-scan` and the default `ggufjac info`
  check      `ggufjac check --no-repack --no-noise-floor` (ours vs llama.cpp's logits)
  attribute  `ggufjac attribute` float32: sum of contributions vs the logit; time split
  anchored   `ggufjac attribute --anchor llama.cpp --dtype float64 --no-repack`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.big_model import PRESETS, preset_path, write_big_gguf  # noqa: E402

PROMPT = "the bridge out"  # the synthetic tokenizer is per character: 15 tokens with BOS
CASES = ("info", "check", "attribute", "anchored")

LLAMA_CPP = r'''
import sys, json
from ggufjac.llamacpp import RunSettings, evaluate
tokens = json.loads(sys.argv[2])
run = evaluate(sys.argv[1], tokens, RunSettings(repack=False), last_only=True, timeout=3600)
print(json.dumps({"top": int(run.logits[-1].argmax())}))
'''


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache, so the next reader waits on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(args: list[str], path: Path, cold: bool = True) -> dict:
    """Run `args` (a python command line) in a fresh process after evicting `path` (unless
    not `cold`): wall time, peak RSS (VmHWM), return code, stdout and the stderr tail."""
    if cold:
        evict(path)
    with tempfile.NamedTemporaryFile(suffix=".txt") as peak:
        cmd = [sys.executable, "-m", "tools.peak_rss", peak.name, *args]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        text = Path(peak.name).read_text().strip()
    return {"wall_s": round(wall, 2), "peak_bytes": int(text) if text else None,
            "rc": r.returncode, "stdout": r.stdout, "stderr_tail": r.stderr[-600:]}


def cli(*args: str) -> list[str]:
    return ["ggufjac.cli", *args]


def run_cases(path: Path, cases: list[str], prompt: str, device: str = "cpu") -> list[dict]:
    from ggufjac.llamacpp import tokenize

    tokens = tokenize(path, prompt)
    rows: list[dict] = []

    def record(case: str, result: dict, **extra: object) -> dict:
        row = {"case": case, "wall_s": result["wall_s"], "peak_bytes": result["peak_bytes"],
               "rc": result["rc"], **extra}
        if result["rc"]:
            row["stderr_tail"] = result["stderr_tail"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "llama_cpp_run.py"
        script.write_text(LLAMA_CPP)
        evict(path)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(script), str(path), json.dumps(tokens)],
                           capture_output=True, text=True)
        yard = {"wall_s": round(time.perf_counter() - t0, 2), "peak_bytes": None,
                "rc": r.returncode, "stderr_tail": r.stderr[-600:]}
        llama_s = yard["wall_s"]
        record("llama.cpp (repacking off)", yard, n_tokens=len(tokens))
        if "info" in cases:
            record("info --no-scan", timed(cli("info", str(path), "--no-scan"), path))
            record("info", timed(cli("info", str(path)), path))
        if "check" in cases:
            out = Path(tmp) / "check.json"
            res = timed(cli("check", str(path), "-p", prompt, "--no-repack", "--no-noise-floor",
                            "--json", str(out)), path)
            extra = {}
            if out.exists():
                rep = json.loads(out.read_text())
                extra = {"logits_nmse": rep.get("nmse"), "verdict": rep.get("verdict")}
            record("check", res, vs_llama_cpp=round(res["wall_s"] / llama_s, 2), **extra)
        for case, args in (("attribute", []),
                           ("anchored", ["--anchor", "llama.cpp", "--dtype", "float64",
                                         "--no-repack"])):
            if case not in cases:
                continue
            out = Path(tmp) / f"{case}.json"
            res = timed(cli("attribute", str(path), "-p", prompt, *args, "--device", device,
                            "--json", str(out)), path)
            extra = {}
            if out.exists():
                rep = json.loads(out.read_text())
                t = rep["targets"][0]
                extra = {"logit": t["logit"], "sum": t["sum_of_contributions"],
                         "rel_error": t["rel_error"], "sweeps": rep.get("sweeps")}
                if "llama_cpp_logit" in t:
                    extra["llama_cpp_logit"] = t["llama_cpp_logit"]
                    extra["rel_error_vs_llama_cpp"] = abs(
                        t["sum_of_contributions"] - t["llama_cpp_logit"]) / abs(t["llama_cpp_logit"])
                if "anchor" in rep:
                    a = rep["anchor"]
                    extra["anchor"] = {"logits_nmse": a["anchor_logits_nmse"],
                                       "output_rel_error": a["anchor_output_rel_error"],
                                       "independent_run_logits_nmse":
                                           a.get("independent_run", {}).get("logits_nmse")}
            record(case, res, vs_llama_cpp=round(res["wall_s"] / llama_s, 2), **extra)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("presets", nargs="+", choices=sorted(PRESETS))
    ap.add_argument("--dir", type=Path, required=True, help="where the files are written")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for `attribute` (llama.cpp "
                    "and `check` run on CPU: llama.cpp's CPU build is what this package installs)")
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer layers than the preset's (a quick trial of the benchmark)")
    args = ap.parse_args()
    cases = args.cases.split(",")
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "ram_bytes": os.sysconf("SC_PHYS_PAGES")
                      * os.sysconf("SC_PAGE_SIZE")}), flush=True)
    table = []
    for name in args.presets:
        model = PRESETS[name]
        path = preset_path(args.dir, name, args.layers)
        name = path.stem  # the preset, and its layer count when not all of them
        if args.layers:
            model = replace(model, shape=replace(model.shape, n_layer=args.layers))
        if not path.exists():
            t0 = time.perf_counter()
            write_big_gguf(path, model, progress=True)
            print(json.dumps({"preset": name, "written_s": round(time.perf_counter() - t0, 1)}))
        size = path.stat().st_size
        evict(path)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:  # this disk's sequential read speed
            n = 0
            while n < 2 << 30 and (chunk := f.read(64 << 20)):
                n += len(chunk)
        disk = n / (time.perf_counter() - t0)
        print(json.dumps({"preset": name, "file_bytes": size, "disk_read_MBps": round(disk / 1e6)}))
        for row in run_cases(path, cases, args.prompt, args.device):
            table.append((name, size, disk, row))
        if not args.keep:
            path.unlink()
    print(f"\n{'model':16} {'file':>8} {'case':28} {'wall s':>8} {'x llama.cpp':>11} {'peak':>9}")
    for name, size, _, row in table:
        peak = f"{row['peak_bytes'] / 2**30:.2f} GiB" if row.get("peak_bytes") else "-"
        ratio = row.get("vs_llama_cpp", "")
        print(f"{name:16} {size / 1e9:6.1f}GB {row['case']:28} {row['wall_s']:8.1f} "
              f"{ratio!s:>11} {peak:>9}")


if __name__ == "__main__":
    main()
