"""Exact per-component attribution: a target's logit split, at every layer, between the
residual stream entering the layer, each attention head, the MLP and the biases.

With the coefficients frozen, the network above layer ℓ is affine in the residual stream
x_{ℓ+1} leaving layer ℓ: the logit is l = u_t · y = g_{ℓ+1} · x_{ℓ+1} + b_{>ℓ}, with g_{ℓ+1}
the cotangent of u_t on that stream (the linear part of the layers above, pulled back: one
reverse sweep from the output passes it at every layer) and b_{>ℓ} the part of the logit
that the biases of the layers above ℓ make (zero for a family without biases). Layer ℓ's
output is a sum of what its parts add to the stream,

    x_{ℓ+1} = x_ℓ + Σ_h A o_h + a_bias + Σ_p m_p,

x_ℓ the stream entering the layer, o_h head h's output (its columns of the concatenated
heads, the others zero), A the layer's frozen output projection, post-norm and residual
scale (linear), a_bias the output projection's bias carried through them (where the layer
has one), m_p the MLP's additive parts (a dense MLP is one part; a mixture of experts is one
part per routed expert, its frozen routing weight times its output). Each part's
contribution is g_{ℓ+1} · part, and b_{>ℓ} is one more, so the contributions at each layer
sum to the logit exactly (to rounding: the parts are the forward's values, recomputed from
the recorded coefficients). A head's contribution is (Aᵀ g_{ℓ+1}) · o_h: one
vector-Jacobian product of the output projection per target gives every head's at once.

Biases: a head's output includes its share of the value projection's bias (P_h (W_v h + b_v)
is that head's); the output projection's bias is its own component ('attention_bias'); an
MLP part includes its own biases; the biases of the layers above are the 'bias_above'
component, b_{>ℓ} = u_t · c − g_{ℓ+1} · c_{ℓ+1} with c the network's constant term and
c_{ℓ+1} the constant stream leaving layer ℓ (the zero input run through layers 0..ℓ with the
biases on). The biases of layers at or below ℓ are in the stream and the parts, as they
flow in the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import ForwardRecord, StreamingEngine
from .families import ModelConfig
from .layout import bias_key
from .linearize import Linearization
from .model import (LayerWeights, attention_branch_heads, attention_branch_output, mlp_branch,
                    mlp_branch_input, mlp_branch_output, moe_slots)

COMPONENTS_DEFINITION = (
    "at layer l, logit = g . x_l + sum_h g . (A o_h) [+ g . a_bias] + sum_p g . m_p "
    "[+ bias_above], g the target's cotangent on layer l's output (the frozen layers above, "
    "linear part), x_l the stream entering layer l ('stream'), o_h head h's output and A the "
    "frozen output projection, post-norm and scale ('head'), a_bias the output projection's "
    "bias ('attention_bias'), m_p the MLP's additive parts ('mlp'; a mixture of experts: "
    "one per routed expert, 'expert'), bias_above the logit's part made by the biases of the "
    "layers above l; the components of each layer sum to the logit")
BIAS_ASSIGNMENT = (
    "a head's output includes its share of the value bias; the output projection's bias is "
    "'attention_bias'; an MLP part includes its own biases; the biases of the layers above "
    "are 'bias_above'; those of the layers below flow in the stream")


@dataclass(frozen=True)
class Component:
    """One additive part of a layer's output: `kind` is 'stream', 'head', 'attention_bias',
    'mlp', 'expert' or 'bias_above'; `index` the head's or expert's number."""

    kind: str
    index: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.index is None else f"{self.kind} {self.index}"


@dataclass
class LayerComponents:
    """Layer `layer`'s components and their contributions to each target's logit."""

    layer: int
    components: list[Component]
    values: torch.Tensor  # [targets, components], in the model's dtype


def mlp_parts(cfg: ModelConfig, w: LayerWeights, mid: torch.Tensor,
              lin: Linearization) -> list[tuple[Component, torch.Tensor]]:
    """The MLP's additive parts at the stream `mid` [N, d], each what it adds to the
    residual stream (norms, biases and residual scale included); they sum to `mlp_branch`.
    A dense MLP is one part. A mixture of experts gives one part per routed expert ('expert',
    its number: its frozen routing weight times its output at the positions that selected
    it, zero elsewhere), in expert order; an expert no position selected has none (its
    contribution is exactly 0)."""
    if cfg.family.moe_gating is None:
        return [(Component("mlp"), mlp_branch(cfg, w, mid, lin))]
    experts, slots = moe_slots(cfg, w, mlp_branch_input(cfg, w, mid, lin), lin)
    parts = []
    for e in torch.unique(experts).tolist():  # the post-norm is frozen: linear in each part
        chosen = (experts == e).to(slots.dtype)[..., None]  # [N, k, 1]
        parts.append((Component("expert", e),
                      mlp_branch_output(cfg, w, (slots * chosen).sum(dim=-2), lin)))
    return parts


class _LayerVisitor:
    """The reverse sweep's visitor: at each layer, the contributions of its components
    from the cotangents on its output (`StreamingEngine.pull_back`'s `visit`)."""

    def __init__(self, engine: StreamingEngine, record: ForwardRecord,
                 directions: torch.Tensor) -> None:
        self.engine, self.record, self.cfg = engine, record, engine.cfg
        c = record.constant
        self.constant_part = None if c is None else directions @ c  # u_t · c per target
        self.layers: list[LayerComponents] = []

    @torch.no_grad()
    def visit(self, layer: int, w: LayerWeights, g: torch.Tensor) -> None:
        cfg, record, lin = self.cfg, self.record, self.engine.lin
        store = record.coefficients[layer]
        values = lin.replaying(store, constants=True)  # the forward's values, biases on
        x = record.residuals[layer]
        o = attention_branch_heads(cfg, layer, w, x, values)
        a = attention_branch_output(cfg, w, o, values)

        def dot(part: torch.Tensor) -> torch.Tensor:  # g · part per target [m]
            return torch.einsum("mnd,nd->m", g, part)

        names: list[Component] = [Component("stream")]
        columns = [dot(x)]
        # Aᵀ g on the heads' outputs, one backward per target (the linear part of the branch)
        o_in = o.detach().requires_grad_(True)
        with torch.enable_grad():
            projected = attention_branch_output(cfg, w, o_in, lin.replaying(store, values=False))
            g_o = torch.stack([torch.autograd.grad(projected, o_in, g[j], retain_graph=True)[0]
                               for j in range(g.shape[0])])
        del projected
        per_head = (g_o * o).reshape(*g_o.shape[:2], cfg.n_head, -1).sum(dim=(1, 3))
        names += [Component("head", h) for h in range(cfg.n_head)]
        columns += list(per_head.unbind(1))
        if w.get(bias_key("attn_output")) is not None:
            names.append(Component("attention_bias"))
            columns.append(dot(attention_branch_output(cfg, w, torch.zeros_like(o), values)))
        for component, part in mlp_parts(cfg, w, x + a, values):
            names.append(component)
            columns.append(dot(part))
        if self.constant_part is not None:
            names.append(Component("bias_above"))
            columns.append(self.constant_part - dot(record.constants[layer + 1]))
        self.layers.append(LayerComponents(layer, names, torch.stack(columns, dim=1)))


def component_sweep(engine: StreamingEngine, record: ForwardRecord, directions: torch.Tensor,
                    chunk: int | None = None) -> tuple[torch.Tensor, list[LayerComponents]]:
    """One reverse sweep from the output along `directions` [m, d] (the targets'
    unembedding rows): directions @ J [m, N, d] (as `pull_back_output`) and, on the way,
    every layer's components (first layer first), each row of `values` summing to the
    target's logit directions · y. Costs the sweep plus, per layer, the forward values of
    its attention and MLP on the linear path's weights (already loaded) and one
    vector-Jacobian product of its output projection per target."""
    visitor = _LayerVisitor(engine, record, directions)
    cot = engine.output_cotangents(record.residuals[-1], directions)
    jac = engine.pull_back(record, {engine.cfg.n_layer: cot}, chunk=chunk, visit=visitor.visit)
    return jac, visitor.layers[::-1]
