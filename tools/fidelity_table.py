"""docs/fidelity.md's table: every family x quant type, ours vs llama.cpp, measured now.

    python tools/fidelity_table.py [--quants F32,F16,Q8_0,Q4_0,Q4_K_M,Q6_K] [--families ...] [--real]

Synthetic random-weight models (tools/synthetic.py's test fixtures: 2 layers, 4 for SmolLM3
so that one has no rope, d_model 256; qwen3moe and gpt-oss with 8 experts, 2 used) of each
family in ggufjac.families.FAMILIES (all by default);
with --real also the real Gemma 3 270M Q4_K_M on a few prompts. Prints a Markdown table:
last-position logits nmse vs llama.cpp's default run (flash attention "auto", weights
repacked; our model in float64 and float32), llama.cpp's own noise floor on the same file
and prompt (`check`'s `noise_floor_nmse`: the largest nmse of llama.cpp with flash attention
and repacking flipped, each alone and both, against that default run), top-1 agreement,
the float64 reconstruction error of the detached Jacobian, and the same model anchored to
llama.cpp (`--anchor llama.cpp`, float64, flash attention off and on): logits nmse vs that
llama.cpp run and the top-1 agreement of both runs. A cell that cannot be measured (a
fixture the family has no such file of, a model ggufjac rejects) becomes a row saying why."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggufjac import llamacpp  # noqa: E402
from ggufjac.llamacpp import RunSettings  # noqa: E402
from ggufjac.api import nmse, open_model  # noqa: E402
from ggufjac.errors import GgufjacError  # noqa: E402
from ggufjac.families import FAMILIES  # noqa: E402
from tools.synthetic import write_fixture  # noqa: E402

REAL_PROMPTS = ["The bridge out of Marin is the", "The capital of France is",
                "def fibonacci(n):\n    return", "Water boils at a temperature of",
                "In 1492, Columbus sailed across the", "The quick brown fox jumps over the lazy",
                "She opened the door and saw a", "1, 2, 3, 4, 5,",
                "Photosynthesis converts sunlight into", "The opposite of hot is"]


def row(path: Path | str, prompt: str) -> str:
    """The table cells after the row's name: plain fidelity with llama.cpp's noise floor,
    then anchored fidelity."""
    m64, m32 = open_model(path, dtype="float64"), open_model(path, dtype="float32")
    tokens = m64.tokenize(prompt)
    # check: ours (float64) against llama.cpp's default run, and that run against llama.cpp
    # with flash attention and repacking flipped (the noise floor)
    report = m64.check(prompt, noise_floor=True)
    ref = llamacpp.evaluate(m64.path, tokens).logits[-1]
    z32 = m32.logits(tokens).numpy()[-1]
    recon = m64.jacobian(tokens).reconstruction_rel_error()
    top1 = "yes" if report["top1_agree"] else (
        f"no (margin {report['llama_cpp_margin']:.3f})")
    floor = report["noise_floor_nmse"]
    floor_cell = "failed" if floor is None else f"{floor:.1e}"
    anchored = []
    for flash in (False, True):
        settings = RunSettings(flash_attn="on" if flash else "off")
        engine = m64.engine(anchor=m64.anchor(tokens, settings=settings, reference=False))
        summary = m64.anchor_summary(engine.anchor, engine.forward(engine.embed(tokens)).output[-1])
        anchored.append(summary)
    a_nmse = " / ".join(f"{s['anchor_logits_nmse']:.1e}" for s in anchored)
    a_top1 = "yes" if all(s["top1_agree"] for s in anchored) else "no"
    return (f"{report['nmse']:.1e} | {nmse(z32, ref):.1e} | {floor_cell} | {top1} | "
            f"{recon:.1e} | {a_nmse} | {a_top1} |")


def synthetic_row(tmp: str, arch: str, quant: str) -> str:
    """One family x quant row; a fixture that cannot be written or measured (llama.cpp's
    quantizer or ggufjac refusing it) becomes a row that says why, so the rest still runs."""
    name = f"| {arch} (synthetic) | {quant} | "
    try:
        path = write_fixture(tmp, arch, quant)
        return name + row(path, "the bridge out of Marin")
    except (GgufjacError, RuntimeError, ValueError, OSError) as e:
        reason = " ".join(str(e).split()).replace("|", "/")
        return name + f"skipped: {type(e).__name__}: {reason} |" + " |" * 6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quants", default="F32,F16,Q8_0,Q4_0,Q4_K_M,Q6_K")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help="comma-separated, of: " + ", ".join(FAMILIES))
    ap.add_argument("--real", action="store_true", help="also the real Gemma 3 270M")
    args = ap.parse_args()
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    print("| family | weights | nmse (ours f64) | nmse (ours f32) | llama.cpp noise floor nmse | "
          "top-1 | recon. error f64 | anchored nmse (flash off / on) | anchored top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in families:
            for quant in args.quants.split(","):
                print(synthetic_row(tmp, arch, quant), flush=True)
    if args.real:
        m = open_model("gemma3-270m")
        print("\n| Gemma 3 270M prompt | nmse (ours f32) | llama.cpp noise floor nmse | "
              "max per-layer nmse | top-1 |")
        print("|---|---|---|---|---|")
        for prompt in REAL_PROMPTS:
            r = m.check(prompt, layers=True)
            agree = "yes" if r["top1_agree"] else f"no (margin {r['llama_cpp_margin']:.3f})"
            print(f"| {prompt!r} | {r['nmse']:.1e} | {r['noise_floor_nmse']:.1e} | "
                  f"{max(r['layer_nmse']):.1e} | {agree} |", flush=True)
        print()
        for prompt in REAL_PROMPTS[:3]:
            print(f"| gemma3 270M: {prompt!r} | Q4_K_M | {row('gemma3-270m', prompt)}",
                  flush=True)


if __name__ == "__main__":
    main()
