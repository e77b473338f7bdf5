"""All detach rules in one place: the input-dependent coefficients that are frozen.

Every operation on the residual stream is written A(x)·x. With `Linearization(detach=True)`
the coefficient A(x) is computed from x as usual but its gradient is stopped, so the network
is exactly linear in its input embeddings while its forward values do not change (each rule
computes the same expression whether or not it detaches, so the forward pass is bit-identical).
With `detach=False` these functions are the plain model, for the true Jacobian.

Rules (Golden, arXiv 2505.24293):
- RMSNorm: the scalar 1/rms(x) (epsilon inside it) is frozen; the weight is a constant.
- gated MLP, gate_path="up": act(gate x) is frozen, the up projection stays linear.
  gate_path="gate": with act(g) = g·s(g), s(g) and the whole up branch are frozen, g stays
  linear. Both reconstruct the output exactly; their Jacobians differ.
- attention: the softmax probabilities are frozen (so q, k, RoPE, QK-norm, masks never enter
  the linear path); the values P·(W_v x) stay linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GATE_PATHS = ("up", "gate")


@dataclass(frozen=True)
class Linearization:
    detach: bool = True
    gate_path: str = "up"

    def __post_init__(self) -> None:
        if self.gate_path not in GATE_PATHS:
            raise ValueError(f"gate_path must be one of {GATE_PATHS}, not {self.gate_path!r}")


PLAIN = Linearization(detach=False)
DETACHED = Linearization(detach=True)


def _freeze(t: torch.Tensor, lin: Linearization) -> torch.Tensor:
    return t.detach() if lin.detach else t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, lin: Linearization) -> torch.Tensor:
    """x · (1/rms(x)) · weight over the last dimension; 1/rms(x) is the frozen coefficient."""
    inv_rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x * _freeze(inv_rms, lin) * weight


def gate_factor(g: torch.Tensor, activation: str) -> torch.Tensor:
    """s(g) with act(g) = g · s(g): sigmoid for SiLU, the tanh factor for GELU (tanh form)."""
    if activation == "silu":
        return torch.sigmoid(g)
    if activation == "gelu_tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g.pow(3))))
    raise ValueError(f"unknown activation {activation!r}")


def gated_product(g: torch.Tensor, up: torch.Tensor, activation: str,
                  lin: Linearization) -> torch.Tensor:
    """act(g) ⊙ up with the coefficients frozen as `lin.gate_path` says.

    Always evaluated as (g · s(g)) · up, so every mode gives bit-identical values.
    """
    s = gate_factor(g, activation)
    if not lin.detach:
        return (g * s) * up
    if lin.gate_path == "up":
        return (g * s).detach() * up
    return (g * s.detach()) * up.detach()


def attention_probs(scores: torch.Tensor, mask: torch.Tensor, lin: Linearization) -> torch.Tensor:
    """softmax over keys of masked scores; the probabilities are the frozen coefficients."""
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return _freeze(p, lin)
