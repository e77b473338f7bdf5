"""Layer by layer: every layer, and its attention and MLP parts, as exact linear maps.

For each chosen layer l (on the streaming engine, one layer's weights at a time):
- "cumulative": input embeddings -> the final norm (frozen at its value there) of the
  residual stream after layer l, last position: a logit lens that is an exact linear map;
- "layer": layer l's own input (all positions) -> its output at the last position;
- "layer_no_residual": the same without the residual (attention + MLP only);
- "attention", "mlp": each part alone, input of layer l -> that part's output, last position.
Each is a [d, N, d] Jacobian J with Σ_i J_i h_i = output (h: the map's input rows), or, for
a family with biases, the linear part of an affine map, Σ_i J_i h_i + c = output, c being
the map's output for a zero input (its coefficients replayed with the biases on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .analysis import nearest_input_embeddings, spectrum, top_tokens_by_unembedding
from .costs import lens_forward_flop, lens_reverse_flop
from .engine import ForwardRecord, MemoryPlan, StreamingEngine
from .errors import GgufjacError
from .jacobian import reconstruction_rel_error
from .layout import dims_of
from .linearize import Coefficients, at_last_position
from .model import BlockOutput, LayerWeights, block, final_norm
from .weights import GGUFWeights

KINDS = ("cumulative", "layer", "layer_no_residual", "attention", "mlp")
# How the cumulative maps are made: one reverse sweep (map l's d directions pulled back
# through layers l..0), one forward pass (the N·d input directions through every layer, each
# on the rows from its own position on), or whichever costs less by costs.py's counts.
SWEEPS = ("auto", "reverse", "forward")


@dataclass
class LayerMap:
    """One exact linear map: J [d_out, N, d_in], its inputs [N, d_in], its output [d_out]."""

    layer: int
    kind: str
    jacobian: torch.Tensor
    inputs: torch.Tensor
    output: torch.Tensor
    constant: torch.Tensor | None = None  # c [d_out] of an affine map (biases), else None

    def reconstruction_rel_error(self) -> float:
        return reconstruction_rel_error(self.jacobian, self.inputs, self.output, self.constant)


def _last_position_cotangents(n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """Unit directions on the last position of an [N, d] output: [d, N, d]."""
    cot = like.new_zeros((d, n, d))
    cot[:, -1, :] = torch.eye(d, dtype=like.dtype, device=like.device)
    return cot


@torch.no_grad()
def _part_outputs(engine: StreamingEngine, layer: int, w: LayerWeights,
                  x: torch.Tensor, store: Coefficients) -> BlockOutput:
    """The layer's parts on x with its recorded coefficients, biases included: their values
    (on the layer's input) or their constants (on zeros)."""
    return block(engine.cfg, layer, w, x, engine.lin.replaying(store, constants=True))


def lens_maps(engine: StreamingEngine, record: ForwardRecord, inputs: torch.Tensor,
              layers: list[int], chunk: int) -> list[LayerMap]:
    """The cumulative maps (an exact logit lens) of `layers`, last layer first: cotangents
    injected at residual l + 1 (the output of layer l), all targets stacked as one reverse
    sweep passes them; each map's output is the frozen final norm of that residual."""
    d = engine.cfg.d_model
    eye = torch.eye(d, dtype=inputs.dtype, device=inputs.device)
    injected = {l + 1: engine.output_cotangents(record.residuals[l + 1], eye) for l in layers}
    outputs, constants = _lens_outputs_and_constants(engine, record, layers)
    stacked = engine.pull_back(record, injected, chunk=chunk)
    return [LayerMap(l, "cumulative", stacked[k * d:(k + 1) * d], inputs, outputs[l],
                     constants[l])
            for k, l in enumerate(sorted(layers, reverse=True))]


def _lens_outputs_and_constants(engine: StreamingEngine, record: ForwardRecord,
                                layers: list[int]
                                ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor | None]]:
    """Each cumulative map's output (the frozen final norm of residual l + 1, last position)
    and, for an affine network, its constant: the constant stream after layer l through the
    final norm frozen at that residual's scale."""
    cfg = engine.cfg
    outputs = {l: final_norm(cfg, engine.output_norm, record.residuals[l + 1], engine.lin)[-1]
               for l in layers}
    constants = {l: None if record.constants is None else engine.frozen_final_norm(
        record.residuals[l + 1], record.constants[l + 1])[-1] for l in layers}
    return outputs, constants


def forward_plan(engine: StreamingEngine, record: ForwardRecord, layers: list[int]
                 ) -> tuple[int, MemoryPlan]:
    """The passes the forward lens (`lens_maps_forward`) needs, and the memory plan of one:
    all N·d input directions at once if they fit in the budget beside the maps, else groups
    of positions (halved until a group fits; one position's d directions must)."""
    d, n = engine.cfg.d_model, record.inputs.shape[0]
    maps_bytes = len(set(layers)) * d * n * d * record.inputs.element_size()
    positions = n
    while True:
        try:
            plan = engine.plan(positions * d, n, record.nbytes() + maps_bytes,
                               forward=not engine.mlp_as_matrix(positions * d))
            return -(-n // positions), plan
        except GgufjacError:
            if positions == 1:
                raise
            positions = -(-positions // 2)


def lens_maps_forward(engine: StreamingEngine, record: ForwardRecord, inputs: torch.Tensor,
                      layers: list[int], passes: int = 1, plan: MemoryPlan | None = None
                      ) -> list[LayerMap]:
    """`lens_maps` by forward mode: the N·d unit directions on the inputs pushed once through
    layers 0..max(layers) of the frozen network (`passes` groups of positions, where they do
    not fit in memory at once; `plan`: `forward_plan`'s); after each chosen layer l the directions' images on residual
    l + 1 at the last position, through the final norm frozen there, are map l's columns.
    The same maps as the reverse sweep's, last layer first."""
    cfg, d, n = engine.cfg, engine.cfg.d_model, inputs.shape[0]
    chosen = sorted(set(layers))
    outputs, constants = _lens_outputs_and_constants(engine, record, chosen)
    jacobians = {l: inputs.new_empty((d, n, d)) for l in chosen}
    norm_at = {}  # the final norm's coefficients at residual l + 1, last position
    for l in chosen:
        store: Coefficients = {}
        with torch.no_grad():
            final_norm(cfg, engine.output_norm, record.residuals[l + 1],
                       engine.lin.recording(store))
        norm_at[l] = engine.lin.replaying(at_last_position(store))
    group = -(-n // passes)
    held = len(chosen) * d * n * d * inputs.element_size()
    for start in range(0, n, group):
        stop = min(start + group, n)
        probes = inputs.new_zeros((stop - start, d, n, d))
        for i in range(start, stop):  # probe (i, a): the unit direction e_a at position i
            probes[i - start, :, i, :] = torch.eye(d, dtype=inputs.dtype, device=inputs.device)
        probes = probes.reshape(-1, n, d)

        def visit(layer: int, x: torch.Tensor) -> None:
            if layer in jacobians:  # columns J_l[:, i, a] for the group's positions i
                with torch.no_grad():
                    cols = final_norm(cfg, engine.output_norm, x[:, -1:], norm_at[layer])
                jacobians[layer][:, start:stop, :] = \
                    cols[:, 0].reshape(stop - start, d, d).permute(2, 0, 1)

        # probe (i, a) is zero before position i, and stays so (attention is causal)
        blocks = [((i - start) * d, (i - start + 1) * d, i) for i in range(start, stop)]
        engine.push_forward_residuals(record, probes, chosen[-1], visit, held_bytes=held,
                                      plan=plan, zero_before=blocks)
        del probes
    return [LayerMap(l, "cumulative", jacobians[l], inputs, outputs[l], constants[l])
            for l in reversed(chosen)]


def choose_sweep(engine: StreamingEngine, n_tokens: int, layers: list[int],
                 sweep: str = "auto", passes: int = 1) -> str:
    """'reverse' or 'forward' for the cumulative maps: as asked, or (auto) whichever costs
    fewer floating-point operations by the counts of costs.py."""
    if sweep not in SWEEPS:
        raise GgufjacError(f"sweep {sweep!r}: choose from {', '.join(SWEEPS)}")
    if sweep != "auto":
        return sweep
    dims = dims_of(engine.cfg)
    # an anchor's rounding ratios are not cut to rows: its forward pass runs all N of them
    forward = lens_forward_flop(dims, n_tokens, layers, passes, causal=engine.anchor is None)
    return "forward" if forward < lens_reverse_flop(dims, n_tokens, layers) else "reverse"


def cumulative_maps(engine: StreamingEngine, record: ForwardRecord, inputs: torch.Tensor,
                    layers: list[int], chunk: int | None = None, sweep: str = "auto"
                    ) -> tuple[list[LayerMap], str]:
    """The cumulative maps of `layers`, last layer first, by the sweep `choose_sweep` picks
    (the forward one's passes counted first), and which it was."""
    chosen = sorted(set(layers))
    passes, plan = 1, None
    if sweep != "reverse":
        try:
            passes, plan = forward_plan(engine, record, chosen)
        except GgufjacError:
            if sweep == "forward":
                raise
            sweep = "reverse"  # the forward directions cannot fit: the reverse sweep can
    which = choose_sweep(engine, inputs.shape[0], chosen, sweep, passes)
    if which == "forward":
        return lens_maps_forward(engine, record, inputs, chosen, passes, plan), which
    n, d = inputs.shape[0], engine.cfg.d_model
    chunk = chunk or engine.plan(d * len(chosen), n).chunk
    return lens_maps(engine, record, inputs, chosen, chunk), which


def layer_maps(engine: StreamingEngine, inputs: torch.Tensor, layers: list[int],
               chunk: int | None = None, sweep: str = "auto", chosen_sweep: list[str] | None = None
               ) -> tuple[list[LayerMap], torch.Tensor]:
    """All five maps for each layer in `layers` (sorted, unique), and the model's output y
    (last position). One forward pass, one sweep for the cumulative maps (`sweep`: 'reverse',
    'forward' or 'auto', `cumulative_maps`; the one used is appended to `chosen_sweep` if
    given), one pass over the chosen layers for the rest."""
    cfg, d, n = engine.cfg, engine.cfg.d_model, inputs.shape[0]
    layers = sorted(set(layers))
    eye = torch.eye(d, dtype=inputs.dtype, device=inputs.device)
    plan = engine.plan(d * len(layers), n)
    chunk = chunk or plan.chunk
    record = engine.forward(inputs)
    maps, which = cumulative_maps(engine, record, inputs, layers, chunk, sweep)
    if chosen_sweep is not None:
        chosen_sweep.append(which)

    # per layer: a single layer's VJPs with its own recorded coefficients
    for l, w in engine.layers(layers, engine.linear_path, "per-layer"):
        h = record.residuals[l]
        store = record.coefficients[l]
        parts = _part_outputs(engine, l, w, h, store)
        zero = None if record.constants is None else \
            _part_outputs(engine, l, w, torch.zeros_like(h), store)

        def c(part: str) -> torch.Tensor | None:  # a part's constant, last position
            return None if zero is None else getattr(zero, part)[-1]
        cot = _last_position_cotangents(n, d, h)
        full = engine.layer_vjp(l, w, record, cot.clone(), "out", chunk)
        attn = engine.layer_vjp(l, w, record, cot, "attn", chunk)
        mlp = engine.layer_vjp(l, w, record, cot, "mlp", chunk)
        no_res = full.clone()
        no_res[:, -1, :] -= eye
        maps += [LayerMap(l, "layer", full, h, parts.out[-1], c("out")),
                 LayerMap(l, "layer_no_residual", no_res, h, (parts.out - h)[-1], c("out")),
                 LayerMap(l, "attention", attn, h, parts.attn[-1], c("attn")),
                 LayerMap(l, "mlp", mlp, h, parts.mlp[-1], c("mlp"))]
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(maps, key=lambda m: (m.layer, order[m.kind])), record.output[-1]


def describe_maps(maps: list[LayerMap], weights: GGUFWeights, token_text: Callable[[int], str],
                  n_vectors: int = 5, n_tokens: int = 5) -> list[dict]:
    """Per map: reconstruction error, singular values, stable rank, and the top singular
    vectors decoded — left vectors through the unembedding (sign: u·output > 0), right
    vectors to the nearest input-embedding rows by cosine, at the input position where the
    right vector is largest (and its norm at every position). All maps' vectors are decoded in one walk over each table."""
    spectra, lefts, rights, positions, norms = [], [], [], [], []
    for mp in maps:
        d, n, d_in = mp.jacobian.shape
        spec = spectrum(mp.jacobian.reshape(d, n * d_in), mp.output)
        k = min(n_vectors, spec.left.shape[1])
        right = spec.right[:k].reshape(k, n, d_in)
        position_norms = torch.linalg.vector_norm(right, dim=2)  # [k, N]: squares sum to 1
        pos = position_norms.argmax(dim=1)  # [k]
        spectra.append(spec)
        norms.append(position_norms)
        lefts.append(spec.left[:, :k])
        rights.append(right[torch.arange(k), pos].T)  # [d_in, k]
        positions.append(pos.tolist())
    left_tokens = top_tokens_by_unembedding(weights, torch.cat(lefts, dim=1), n_tokens)
    right_tokens = nearest_input_embeddings(weights, torch.cat(rights, dim=1), n_tokens)
    out, col = [], 0
    for mp, spec, pos, position_norms in zip(maps, spectra, positions, norms):
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
                "right_position_norms": [round(float(v), 6) for v in position_norms[j]],
                "right_tokens": [token_text(t) for t, _ in right_tokens[col + j]],
                "right_cosines": [round(c, 4) for _, c in right_tokens[col + j]]})
        col += len(pos)
        out.append({"layer": mp.layer, "kind": mp.kind,
                    "reconstruction_rel_error": mp.reconstruction_rel_error(),
                    **({} if mp.constant is None else
                       {"constant_norm": float(torch.linalg.vector_norm(mp.constant))}),
                    "stable_rank": spec.stable_rank, "top_singular_value": float(s[0]),
                    "singular_values": s.tolist(), "vectors": vectors})
    return out


def layers_tensors(maps: list[LayerMap], entries: list[dict], save_matrices: bool = False
                   ) -> dict[str, torch.Tensor]:
    """What layers.safetensors holds: `layer{N}.{kind}.singular_values` of every map (from
    its entry, `describe_maps`; float64 for float64 maps, else float32) and, with
    `save_matrices`, every map itself as `layer{N}.{kind}.jacobian`, with its constant as
    `layer{N}.{kind}.constant` where the map is affine."""
    spectrum_dtype = torch.float64 if maps[0].jacobian.dtype == torch.float64 else torch.float32
    tensors = {f"layer{mp.layer}.{mp.kind}.singular_values":
               torch.tensor(e["singular_values"], dtype=spectrum_dtype)
               for mp, e in zip(maps, entries, strict=True)}
    if save_matrices:
        tensors.update({f"layer{mp.layer}.{mp.kind}.jacobian": mp.jacobian.contiguous().cpu()
                        for mp in maps})
        tensors.update({f"layer{mp.layer}.{mp.kind}.constant": mp.constant.contiguous().cpu()
                        for mp in maps if mp.constant is not None})
    return tensors
