"""The detached Jacobian of the output embedding with respect to every input embedding.

Two paths: `streamed_jacobian` (the default: one layer in memory at a time, see engine.py),
and the in-memory reference `detached_jacobian`: one forward pass through the whole model
with gradients, then batched reverse mode (`autograd.grad(..., is_grads_batched=True)`, i.e. vmap over the
backward pass) with the identity as cotangents, `chunk` output directions at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .linearize import DETACHED, Linearization
from .engine import StreamingEngine
from .runner import Transformer


@dataclass
class JacobianResult:
    """J [d_out, N, d_in] with y = Σ_i J[:, i, :] @ x_i for the detached model."""

    jacobian: torch.Tensor
    inputs: torch.Tensor  # x [N, d], the rows fed into layer 0
    output: torch.Tensor  # y [d], last position after the final norm
    # If set [m, d]: `jacobian` is [m, N, d], the Jacobian of directions @ y (projected).
    directions: torch.Tensor | None = None

    def reconstruction_rel_error(self) -> float:
        target = self.output if self.directions is None else self.directions @ self.output
        return reconstruction_rel_error(self.jacobian, self.inputs, target)


def reconstruction_rel_error(jacobian: torch.Tensor, inputs: torch.Tensor,
                             output: torch.Tensor) -> float:
    """‖Σ_i J_i x_i − y‖ / ‖y‖: zero up to rounding when the map is exactly linear."""
    recon = torch.einsum("onk,nk->o", jacobian, inputs)
    return float(torch.linalg.vector_norm(recon - output) / torch.linalg.vector_norm(output))


def streamed_jacobian(engine: StreamingEngine, inputs: torch.Tensor,
                      directions: torch.Tensor | None = None) -> JacobianResult:
    """The detached Jacobian by the streaming engine: one forward sweep, one reverse sweep.

    `directions` [m, d] (default: all d unit vectors) are the output directions: the result is
    directions @ J, e.g. one unembedding row for the Jacobian of a single logit. The memory
    budget is checked before any layer is read.
    """
    d, n = engine.cfg.d_model, inputs.shape[0]
    dirs = torch.eye(d, dtype=inputs.dtype, device=inputs.device) if directions is None \
        else directions.to(inputs.device, inputs.dtype)
    plan = engine.plan(dirs.shape[0], n)
    record = engine.forward(inputs)
    jac = engine.pull_back_output(record, dirs, plan.chunk)
    return JacobianResult(jac, inputs.detach(), record.output[-1], directions)


def detached_jacobian(model: Transformer, inputs: torch.Tensor,
                      lin: Linearization = DETACHED, chunk: int | None = None,
                      progress: bool = False) -> JacobianResult:
    """Jacobian of the last position's final-norm output w.r.t. all input embeddings.

    With `lin=PLAIN` this is the ordinary Jacobian (which does not reconstruct the output).
    """
    x = inputs.detach().clone().requires_grad_(True)
    y = model.forward(x, lin)[-1]
    d_out = y.shape[0]
    chunk = chunk or d_out
    eye = torch.eye(d_out, dtype=y.dtype, device=y.device)
    starts = range(0, d_out, chunk)
    rows = []
    for s in tqdm(starts, desc="jacobian", unit="chunk", disable=not progress or len(starts) < 2):
        (g,) = torch.autograd.grad(y, x, grad_outputs=eye[s:s + chunk], retain_graph=True,
                                   is_grads_batched=True)
        rows.append(g)
    return JacobianResult(torch.cat(rows, dim=0), inputs.detach(), y.detach())
