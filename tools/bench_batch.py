"""`ggufjac batch` against one `ggufjac attribute` command per prompt, on the same prompts.

    python -m tools.bench_batch [MODEL] [--prompts 50] [--analyses attribute,svd,lens]

Both sides run as users run them, in fresh processes: N separate `ggufjac attribute -p …`
commands one after another, and one `ggufjac batch MODEL prompts.jsonl --analyses
attribute`. Prints both wall times and their ratio (the goal: batch at least 3× faster),
then prompts per minute of `batch` for each analysis named in --analyses, each alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBJECTS = ["The capital of France is", "Water boils at a temperature of",
            "The bridge out of Marin is the", "Once upon a time there was a",
            "The opposite of hot is", "Two plus two equals"]


def prompts(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]}" + ("" if i < len(SUBJECTS) else f" ({i})")
            for i in range(n)]


def timed(command: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="gemma3-270m")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--analyses", default="attribute,svd,lens",
                    help="analyses whose prompts/min are measured, each alone")
    ap.add_argument("--rate-prompts", type=int, default=10,
                    help="prompts per analysis for the prompts/min figures")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "ggufjac.cli"]
    texts = prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "prompts.jsonl"
        jsonl.write_text("".join(json.dumps({"id": str(i), "prompt": t}) + "\n"
                                 for i, t in enumerate(texts)))
        separate = sum(timed([*cli, "attribute", args.model, "-p", t]) for t in texts)
        batched = timed([*cli, "batch", args.model, str(jsonl), "--out",
                         str(Path(tmp) / "a.db"), "--analyses", "attribute"])
        print(f"{args.prompts} prompts, attribute: {args.prompts} commands {separate:.1f} s, "
              f"one batch {batched:.1f} s: batch {separate / batched:.2f}x faster")
        subset = Path(tmp) / "subset.jsonl"
        subset.write_text("".join(jsonl.read_text().splitlines(True)[:args.rate_prompts]))
        for analysis in args.analyses.split(","):
            seconds = timed([*cli, "batch", args.model, str(subset), "--out",
                             str(Path(tmp) / f"{analysis}.db"), "--analyses", analysis])
            print(f"{analysis:>10}: {60 * args.rate_prompts / seconds:.1f} prompts/min "
                  f"({args.rate_prompts} prompts, {seconds:.1f} s with the start)")


if __name__ == "__main__":
    main()
