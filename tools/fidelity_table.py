"""The README's fidelity table: every family x quant type, ours vs llama.cpp, measured now.

    python tools/fidelity_table.py [--quants F32,F16,Q8_0,Q4_0,Q4_K_M,Q6_K] [--families ...] [--real]

Synthetic random-weight models (tools/synthetic.py's test fixtures: 2 layers, 4 for SmolLM3
so that one has no rope, d_model 256) of each family;
with --real also the real Gemma 3 270M Q4_K_M on a few prompts. Prints a Markdown table:
last-position logits nmse vs llama.cpp (our model in float64 and float32), top-1 agreement,
the float64 reconstruction error of the detached Jacobian, and the same model anchored to
llama.cpp (`--anchor llama.cpp`, float64, flash attention off and on): logits nmse vs that
llama.cpp run and the top-1 agreement of both runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggufjac import llamacpp  # noqa: E402
from ggufjac.llamacpp import RunSettings  # noqa: E402
from ggufjac.api import nmse, open_model  # noqa: E402
from tools.synthetic import TIED, write_fixture  # noqa: E402

REAL_PROMPTS = ["The bridge out of Marin is the", "The capital of France is",
                "def fibonacci(n):\n    return", "Water boils at a temperature of",
                "In 1492, Columbus sailed across the", "The quick brown fox jumps over the lazy",
                "She opened the door and saw a", "1, 2, 3, 4, 5,",
                "Photosynthesis converts sunlight into", "The opposite of hot is"]


def row(path: Path, prompt: str) -> str:
    """The table cells after the row's name: plain fidelity, then anchored fidelity."""
    m64, m32 = open_model(path, dtype="float64"), open_model(path, dtype="float32")
    tokens = m64.tokenize(prompt)
    ref = llamacpp.evaluate(m64.path, tokens).logits[-1]
    z64, z32 = m64.logits(tokens).numpy()[-1], m32.logits(tokens).numpy()[-1]
    recon = m64.jacobian(tokens).reconstruction_rel_error()
    top1 = "yes" if z64.argmax() == ref.argmax() else "no (near-tie)"
    anchored = []
    for flash in (False, True):
        settings = RunSettings(flash_attn="on" if flash else "off")
        engine = m64.engine(anchor=m64.anchor(tokens, settings=settings, reference=False))
        summary = m64.anchor_summary(engine.anchor, engine.forward(engine.embed(tokens)).output[-1])
        anchored.append(summary)
    a_nmse = " / ".join(f"{s['anchor_logits_nmse']:.1e}" for s in anchored)
    a_top1 = "yes" if all(s["top1_agree"] for s in anchored) else "no"
    return (f"{nmse(z64, ref):.1e} | {nmse(z32, ref):.1e} | {top1} | {recon:.1e} | {a_nmse} | "
            f"{a_top1} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quants", default="F32,F16,Q8_0,Q4_0,Q4_K_M,Q6_K")
    ap.add_argument("--families", default=",".join(TIED))
    ap.add_argument("--real", action="store_true", help="also the real Gemma 3 270M")
    args = ap.parse_args()
    print("| family | weights | nmse (ours f64) | nmse (ours f32) | top-1 | recon. error f64 | "
          "anchored nmse (flash off / on) | anchored top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.families.split(","):
            for quant in args.quants.split(","):
                path = write_fixture(tmp, arch, quant)
                print(f"| {arch} (synthetic) | {quant} | {row(path, 'the bridge out of Marin')}",
                      flush=True)
    if args.real:
        m = open_model("gemma3-270m")
        print("\n| Gemma 3 270M prompt | nmse (ours f32) | llama.cpp flash-attn on/off nmse | "
              "max per-layer nmse | top-1 |")
        print("|---|---|---|---|---|")
        for prompt in REAL_PROMPTS:
            r = m.check(prompt, layers=True)
            agree = "yes" if r["top1_agree"] else f"no (margin {r['llama_cpp_margin']:.3f})"
            print(f"| {prompt!r} | {r['nmse']:.1e} | {r['noise_floor_nmse']:.1e} | "
                  f"{max(r['layer_nmse']):.1e} | {agree} |", flush=True)
        print()
        for prompt in REAL_PROMPTS[:3]:
            print(f"| gemma3 270M: {prompt!r} | Q4_K_M | {row(Path('gemma3-270m'), prompt)}",
                  flush=True)


if __name__ == "__main__":
    main()
