"""Figures by quantization type: one model's files compared with `compare`, as a table.

    python -m tools.compare_quants real [--types Q8_0,Q6_K,Q3_K_M,Q2_K,IQ4_XS]
    python -m tools.compare_quants synthetic [--families llama,gemma3] [--types ...]

real: the shipped Gemma 3 270M Q4_K_M file (A) against llama.cpp's requantizations of it
(B; `--allow-requantize`: the Q4_K values dequantized and quantized again, not a
quantization of the original weights). synthetic: for each family, a random-weight F32 file
(A) against llama.cpp's quantizations of it (B). Each row: medians over the prompts of
`compare`'s figures (ggufjac/compare.py DEFINITIONS), float32 unless --dtype.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggufjac import llamacpp  # noqa: E402
from ggufjac.api import open_model  # noqa: E402
from ggufjac.compare import ANALYSES, compare_prompts  # noqa: E402
from ggufjac.linearize import Linearization  # noqa: E402
from ggufjac.reports import comparison_summary  # noqa: E402
from ggufjac.resolve import resolve_model  # noqa: E402
from tools.synthetic import LLAMA_FTYPES, Shape, write_synthetic_gguf  # noqa: E402

PROMPTS = ["The capital of France is", "The bridge out of Marin is the",
           "Water boils at a temperature of", "The quick brown fox jumps over the lazy",
           "In 1492, Columbus sailed across the", "The opposite of hot is",
           "My favourite programming language is", "Two plus two equals"]
COLUMNS = [("J rel diff", "jacobian_rel_difference", ".3g"),
           ("max angle L", "largest_left_angle", ".3f"),
           ("max angle R", "largest_right_angle", ".3f"),
           ("cos u1", "top_left_cosine", ".4f"),
           ("Δ stable rank", "delta_stable_rank", "+.3f"),
           ("Spearman", "attribution_spearman", ".3f"),
           ("top-3", "attribution_top3_overlap", ".2f"),
           ("logits nmse", "logits_nmse", ".2e"),
           ("B vs own llama.cpp", "b_vs_own_llama_cpp_nmse", ".2e")]


def table_row(label: str, entries: list[dict]) -> str:
    s = comparison_summary(entries)
    cells = [label]
    for _, key, fmt in COLUMNS:
        cells.append(format(s[key]["median"], fmt) if key in s and s[key]["n"] else "")
    cells.append(f"{s['same_prediction']}/{s['prompts']}")
    lens = s.get("lens")
    cells.append("" if not lens else f"{lens[-1]['lens_rel_difference']['median']:.3g}"
                 f" / {lens[len(lens) // 2]['lens_rel_difference']['median']:.3g}"
                 f" / {lens[0]['lens_rel_difference']['median']:.3g}")
    return "| " + " | ".join(cells) + " |"


def header() -> str:
    names = ["B", *[c[0] for c in COLUMNS], "same top-1", "lens diff last / mid / first"]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


def run(a_path: Path, b_paths: dict[str, Path], prompts: list[str], analyses: tuple[str, ...],
        dtype: str, k: int) -> None:
    settings = llamacpp.RunSettings()
    print(f"A = {a_path.name}; {len(prompts)} prompts; {dtype}; top-{k}; llama.cpp "
          f"{settings.describe()}")
    print(header())
    with open_model(a_path, dtype=dtype) as a:
        first = None
        for label, path in b_paths.items():
            t0 = time.perf_counter()
            with open_model(path, dtype=dtype) as b:
                entries = compare_prompts(a, b, prompts, analyses, k, None, Linearization(),
                                          settings)
            first = first or entries
            print(table_row(label, entries) + f"  <!-- {time.perf_counter() - t0:.0f} s -->",
                  flush=True)
    if first and "a_vs_own_llama_cpp_nmse" in first[0]:
        s = comparison_summary(first)["a_vs_own_llama_cpp_nmse"]
        print(f"\nA vs its own llama.cpp run: logits nmse median {s['median']:.2e}, max "
              f"{s['max']:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", choices=["real", "synthetic"])
    ap.add_argument("--types", default=None, help="comma-separated llama.cpp file types")
    ap.add_argument("--families", default="llama,qwen3,gemma3,phi3,olmo2")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--analyses", default=",".join(ANALYSES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where the quantized files go (default: a "
                                                "temporary directory)")
    args = ap.parse_args()
    prompts = PROMPTS[:args.prompts]
    analyses = tuple(args.analyses.split(","))
    with tempfile.TemporaryDirectory(prefix="ggufjac-quants-") as tmp:
        out = Path(args.dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.case == "real":
            types = (args.types or "Q8_0,Q6_K,Q3_K_M,Q2_K,IQ4_XS").split(",")
            shipped = resolve_model("gemma3-270m")
            files = {}
            for t in types:
                files[t] = out / f"gemma3-270m-requant-{t}.gguf"
                if not files[t].exists():
                    llamacpp.quantize(shipped, files[t], LLAMA_FTYPES[t], allow_requantize=True)
            run(shipped, files, prompts, analyses, args.dtype, args.top_k)
            return
        types = (args.types or "F16,Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K").split(",")
        for arch in args.families.split(","):
            base = write_synthetic_gguf(out / f"{arch}-F32.gguf", arch, Shape(), "F32",
                                        rope_freqs=arch == "llama")
            files = {t: write_synthetic_gguf(out / f"{arch}-{t}.gguf", arch, Shape(), t,
                                             rope_freqs=arch == "llama") for t in types}
            print(f"\n### {arch}\n")
            run(base, files, prompts, analyses, args.dtype, args.top_k)


if __name__ == "__main__":
    main()
