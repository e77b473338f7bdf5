"""Layer by layer: every layer, and its attention and MLP parts, as exact linear maps.

For each chosen layer l (on the streaming engine, one layer's weights at a time):
- "cumulative": input embeddings -> the final norm (frozen at its value there) of the
  residual stream after layer l, last position: a logit lens that is an exact linear map;
- "layer": layer l's own input (all positions) -> its output at the last position;
- "layer_no_residual": the same without the residual (attention + MLP only);
- "attention", "mlp": each part alone, input of layer l -> that part's output, last position.
Each is a [d, N, d] Jacobian J with Σ_i J_i h_i = output (h: the map's input rows).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass

import torch

from .analysis import nearest_input_embeddings, spectrum, top_tokens_by_unembedding
from .engine import StreamingEngine
from .jacobian import reconstruction_rel_error
from .linearize import Coefficients
from .model import BlockOutput, LayerWeights, block, final_norm
from .weights import GGUFWeights

KINDS = ("cumulative", "layer", "layer_no_residual", "attention", "mlp")


@dataclass
class LayerMap:
    """One exact linear map: J [d_out, N, d_in], its inputs [N, d_in], its output [d_out]."""

    layer: int
    kind: str
    jacobian: torch.Tensor
    inputs: torch.Tensor
    output: torch.Tensor

    def reconstruction_rel_error(self) -> float:
        return reconstruction_rel_error(self.jacobian, self.inputs, self.output)


def _last_position_cotangents(n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """Unit directions on the last position of an [N, d] output: [d, N, d]."""
    cot = like.new_zeros((d, n, d))
    cot[:, -1, :] = torch.eye(d, dtype=like.dtype, device=like.device)
    return cot


@torch.no_grad()
def _part_outputs(engine: StreamingEngine, layer: int, w: LayerWeights,
                  x: torch.Tensor, store: Coefficients) -> BlockOutput:
    return block(engine.cfg, layer, w, x, engine.lin.replaying(store))


def layer_maps(engine: StreamingEngine, inputs: torch.Tensor, layers: list[int],
               chunk: int | None = None) -> tuple[list[LayerMap], torch.Tensor]:
    """All five maps for each layer in `layers` (sorted, unique), and the model's output y
    (last position). One forward pass, one reverse sweep for the cumulative maps (all
    targets stacked as the sweep passes them), one pass over the chosen layers for the rest."""
    cfg, d, n = engine.cfg, engine.cfg.d_model, inputs.shape[0]
    layers = sorted(set(layers))
    eye = torch.eye(d, dtype=inputs.dtype, device=inputs.device)
    plan = engine.plan(d * len(layers), n)
    chunk = chunk or plan.chunk
    record = engine.forward(inputs)
    maps: list[LayerMap] = []

    # cumulative: cotangents injected at residual l + 1 (the output of layer l)
    injected = {l + 1: engine.output_cotangents(record.residuals[l + 1], eye) for l in layers}
    outputs = {}
    for l in layers:  # the lens output at that residual: the frozen final norm, last position
        outputs[l] = final_norm(cfg, engine.output_norm, record.residuals[l + 1],
                                engine.lin)[-1]
    stacked = engine.pull_back(record, injected, chunk=chunk)
    for k, l in enumerate(sorted(layers, reverse=True)):
        maps.append(LayerMap(l, "cumulative", stacked[k * d:(k + 1) * d], inputs, outputs[l]))
    del stacked

    # per layer: a single layer's VJPs with its own recorded coefficients
    for l, w in engine.layers(layers, engine.linear_path, "per-layer"):
        h = record.residuals[l]
        parts = _part_outputs(engine, l, w, h, record.coefficients[l])
        cot = _last_position_cotangents(n, d, h)
        full = engine.layer_vjp(l, w, record, cot.clone(), "out", chunk)
        attn = engine.layer_vjp(l, w, record, cot, "attn", chunk)
        mlp = engine.layer_vjp(l, w, record, cot, "mlp", chunk)
        no_res = full.clone()
        no_res[:, -1, :] -= eye
        maps += [LayerMap(l, "layer", full, h, parts.out[-1]),
                 LayerMap(l, "layer_no_residual", no_res, h, (parts.out - h)[-1]),
                 LayerMap(l, "attention", attn, h, parts.attn[-1]),
                 LayerMap(l, "mlp", mlp, h, parts.mlp[-1])]
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(maps, key=lambda m: (m.layer, order[m.kind])), record.output[-1]


def describe_maps(maps: list[LayerMap], weights: GGUFWeights, token_text: Callable[[int], str],
                  n_vectors: int = 5, n_tokens: int = 5) -> list[dict]:
    """Per map: reconstruction error, singular values, stable rank, and the top singular
    vectors decoded — left vectors through the unembedding (sign: u·output > 0), right
    vectors to the nearest input-embedding rows by cosine, at the input position where the
    right vector is largest. All maps' vectors are decoded in one walk over each table."""
    spectra, lefts, rights, positions = [], [], [], []
    for mp in maps:
        d, n, d_in = mp.jacobian.shape
        spec = spectrum(mp.jacobian.reshape(d, n * d_in), mp.output)
        k = min(n_vectors, spec.left.shape[1])
        right = spec.right[:k].reshape(k, n, d_in)
        pos = torch.linalg.vector_norm(right, dim=2).argmax(dim=1)  # [k]
        spectra.append(spec)
        lefts.append(spec.left[:, :k])
        rights.append(right[torch.arange(k), pos].T)  # [d_in, k]
        positions.append(pos.tolist())
    left_tokens = top_tokens_by_unembedding(weights, torch.cat(lefts, dim=1), n_tokens)
    right_tokens = nearest_input_embeddings(weights, torch.cat(rights, dim=1), n_tokens)
    out, col = [], 0
    for mp, spec, pos in zip(maps, spectra, positions):
        s = spec.singular_values
        y_norm = torch.linalg.vector_norm(mp.output.to(spec.left.dtype))
        vectors = []
        for j in range(len(pos)):
            vectors.append({
                "index": j, "singular_value": float(s[j]),
                "cos_with_output": float(spec.left[:, j] @ mp.output.to(spec.left.dtype)
                                         / y_norm) if y_norm > 0 else 0.0,
                "left_tokens": [token_text(t) for t, _ in left_tokens[col + j]],
                "right_position": pos[j],
                "right_tokens": [token_text(t) for t, _ in right_tokens[col + j]],
                "right_cosines": [round(c, 4) for _, c in right_tokens[col + j]]})
        col += len(pos)
        out.append({"layer": mp.layer, "kind": mp.kind,
                    "reconstruction_rel_error": mp.reconstruction_rel_error(),
                    "stable_rank": spec.stable_rank, "top_singular_value": float(s[0]),
                    "singular_values": s.tolist(), "vectors": vectors})
    return out


def first_layer_predicting(entries: list[dict], token: str) -> int | None:
    """The first layer whose cumulative map's top singular vector decodes to `token`."""
    for e in entries:
        if e["kind"] == "cumulative" and e["vectors"] and token in e["vectors"][0]["left_tokens"]:
            return e["layer"]
    return None


def markdown_summary(report: dict) -> str:
    """DIR/README.md: the table a reader scans for where the prediction's concept appears."""
    entries, predicted = report["maps"], report["predicted_token"]
    first = first_layer_predicting(entries, predicted)
    by = {(e["layer"], e["kind"]): e for e in entries}
    layers = sorted({e["layer"] for e in entries})
    lines = [
        f"# ggufjac layers: {Path(report['model']).name}", "",
        f"Prompt tokens: {' '.join(repr(t) for t in report['tokens'])}  ",
        f"Predicted token: {predicted!r}; dtype {report['dtype']}; gate path "
        f"`{report['gate_path']}`; largest reconstruction error of any map "
        f"{max(e['reconstruction_rel_error'] for e in entries):.1e}.", "",
        *([f"Anchored to llama.cpp (flash attention {'on' if report['anchor']['flash_attn'] else 'off'}): "
           f"the coefficients are llama.cpp's own; logits nmse vs llama.cpp "
           f"{report['anchor']['anchor_logits_nmse']:.1e}.", ""] if "anchor" in report else []),
        "Each cell: the top 3 tokens of the top left singular vector (through the "
        "unembedding), then the stable rank. `cumulative` is the exact linear logit lens "
        "(inputs -> final norm of the residual after that layer); the others are the layer's "
        "own input -> its output at the last position.", "",
        (f"The predicted token first appears in a cumulative top vector at layer {first}."
         if first is not None else "The predicted token does not appear in any cumulative "
                                  "top vector (top 5 tokens)."), "",
        "Only the cumulative maps end in the final norm, where the unembedding reads; the "
        "per-layer maps end in one layer's update to the residual stream, whose top vectors "
        "decode to tokens mostly near the top layers (elsewhere the tokens look random).", "",
        "| layer no. | " + " | ".join(f"`{k}`" for k in KINDS) + " |",
        "|---|" + "---|" * len(KINDS)]
    for l in layers:
        cells = []
        for k in KINDS:
            e = by.get((l, k))
            if e is None or not e["vectors"]:
                cells.append("")
                continue
            toks = ", ".join(repr(t) for t in e["vectors"][0]["left_tokens"][:3])
            cells.append(f"{toks} ({e['stable_rank']:.1f})".replace("|", "\\|"))
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    lines += ["", "Files: `layers.json` (every figure and decoded token), `layers.safetensors` "
              "(singular values; the matrices with --save-matrices), `stable_rank.png`, "
              "`top_singular_value.png`.", ""]
    return "\n".join(lines)
