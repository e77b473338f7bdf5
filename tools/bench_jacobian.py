"""Streaming Jacobian vs the naive whole-model reference, on the real Gemma 3 270M.

    python -m tools.bench_jacobian [--dtype float32|float64] [--model gemma3-270m]

Reference (what the paper's code does): every weight dequantized and held in memory, the
token embedding table included (as a Hugging Face model holds it), and
`torch.autograd.functional.jacobian(f, x, vectorize=True)` of the detached model.
Ours: `LoadedModel.jacobian` (the streaming engine: one layer's weights at a time, input rows
gathered, the unembedding walked in chunks). Both then decode y and the top 10 left singular
vectors to tokens. Each side runs in a fresh process per prompt; the wall time covers
loading the weights and the Jacobian (decoding is timed separately), and the peak is the
process's VmHWM over everything (tools/peak_rss.py).
"""

from __future__ import annotations

import argparse
import json
import time

from tools.peak_rss import measure_module

PROMPTS = ["The bridge out of Marin is the", "The capital of France is",
           "def fibonacci(n):\n    return"]


def child(side: str, model: str, prompt: str, dtype: str) -> None:
    import torch

    from ggufjac.analysis import spectrum, top_tokens_by_unembedding
    from ggufjac.api import open_model
    from ggufjac.linearize import DETACHED
    from ggufjac.runner import Transformer

    m = open_model(model, dtype=dtype)
    tokens = m.tokenize(prompt)
    t0 = time.perf_counter()
    if side == "ours":
        r = m.jacobian(tokens)
        jac, y = r.jacobian, r.output
    else:
        model_all = Transformer(m.weights, keep_weights=True)
        table = m.weights.tensor("token_embd.weight")  # resident, as in an HF model
        x = table[tokens] * m.cfg.embed_scale
        jac = torch.autograd.functional.jacobian(
            lambda t: model_all.forward(t, DETACHED)[-1], x, vectorize=True)
        with torch.no_grad():
            y = model_all.forward(x, DETACHED)[-1]
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    d, n = jac.shape[0], jac.shape[1]
    spec = spectrum(jac.reshape(d, n * d), y)
    directions = torch.cat((spec.left[:, :10], y[:, None]), dim=1)
    if side == "ours":
        decoded = [[t for t, _ in row] for row in top_tokens_by_unembedding(m.weights, directions)]
    else:
        decoded = (table @ directions).topk(5, dim=0).indices.T.tolist()
    print(json.dumps({"seconds": seconds, "decode_seconds": time.perf_counter() - t1,
                      "predicted": decoded[-1][0], "top_vector": decoded[0]}))


def run(side: str, model: str, prompt: str, dtype: str) -> dict:
    return measure_module("tools.bench_jacobian", "--child", side, "--model", model,
                          "--dtype", dtype, "--prompt", prompt)


def matmul_gflops(dtype: str) -> float:
    """Sustained rate of a matmul shaped like the reverse sweep's (64 directions x 8 tokens
    against an MLP weight): the ceiling both sides work against."""
    import torch

    dt = getattr(torch, dtype)
    a, w = torch.randn(512, 2048, dtype=dt), torch.randn(2048, 640, dtype=dt)
    for _ in range(3):
        a @ w
    t0 = time.perf_counter()
    for _ in range(50):
        a @ w
    return 2 * 512 * 2048 * 640 * 50 / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--prompt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.prompt, args.dtype)
        return
    print(f"{args.model}, {args.dtype}, CPU; time = load weights + Jacobian; peak = whole "
          "process, in GB (10^9 bytes, as the goals are stated)")
    print(f"matmul rate of this machine, {args.dtype} [512 x 2048] @ [2048 x 640]: "
          f"{matmul_gflops(args.dtype):.0f} GFLOP/s")
    print(f"{'prompt':<34}{'reference s':>12}{'ours s':>8}{'speed-up':>10}"
          f"{'ref peak':>10}{'our peak':>10}{'ratio':>7}  same prediction")
    for prompt in PROMPTS:
        ref, ours = run("reference", args.model, prompt, args.dtype), \
            run("ours", args.model, prompt, args.dtype)
        same = ref["predicted"] == ours["predicted"] and ref["top_vector"] == ours["top_vector"]
        print(f"{prompt[:32]!r:<34}{ref['seconds']:>12.2f}{ours['seconds']:>8.2f}"
              f"{ref['seconds'] / ours['seconds']:>9.2f}x"
              f"{ref['peak'] / 1e9:>9.3f}G{ours['peak'] / 1e9:>9.3f}G"
              f"{ours['peak'] / ref['peak']:>7.2f}  {same}")


if __name__ == "__main__":
    main()
