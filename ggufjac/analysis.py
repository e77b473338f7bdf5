"""What users read off a Jacobian: its spectrum, ranks, and singular vectors as tokens."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .jacobian import JacobianFile, position_blocks
from .weights import GGUFWeights

ENTROPY_RANK_DEFINITION = (
    "entropy effective rank (Roy & Vetterli 2007): exp(-sum p_k log p_k) with "
    "p_k = s_k / sum(s), over the singular values s of J as a d x (N*d) matrix")
STABLE_RANK_DEFINITION = ("stable rank ||J||_F^2 / s_1^2 = sum_k s_k^2 / s_1^2, over the "
                          "singular values s of J as a d x (N*d) matrix")


@dataclass
class Spectrum:
    singular_values: torch.Tensor  # descending
    left: torch.Tensor  # [d_out, k] left singular vectors, signs fixed (see `orient`)
    # [k, d_in_total] right singular vectors, same signs (None: not computed, gram_spectrum)
    right: torch.Tensor | None

    @property
    def stable_rank(self) -> float:
        s = self.singular_values
        return float((s.pow(2).sum() / s[0].pow(2))) if s[0] > 0 else 0.0

    @property
    def entropy_rank(self) -> float:
        s = self.singular_values
        p = s / s.sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))


def spectrum(matrix: torch.Tensor, output: torch.Tensor | None = None) -> Spectrum:
    """SVD of a 2-D map; with `output`, each left vector u is signed so that u·output > 0
    (its right vector flips with it, so u s vᵀ is unchanged)."""
    if matrix.dtype in (torch.float16, torch.bfloat16):
        # LAPACK has no half-precision SVD: the spectrum of a half-precision Jacobian is taken
        # in float32 (the Jacobian itself was computed in the half type).
        matrix = matrix.float()
        output = None if output is None else output.float()
    rows, cols = matrix.shape
    if cols > 2 * rows:
        # A wide map (a Jacobian d x N·d): A^T = Q R, A = R^T Q^T, and with R^T = U S W^T,
        # A = U S (Q W)^T. The d x d SVD after a Householder QR is as accurate (both are
        # backward stable) and several times faster than LAPACK's SVD of the wide matrix.
        q, r = torch.linalg.qr(matrix.T)
        u, s, wh = torch.linalg.svd(r.T, full_matrices=False)
        vh = (q @ wh.T).T.contiguous()
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if output is not None:
        sign = torch.sign(output @ u)
        sign[sign == 0] = 1
        u, vh = u.mul_(sign), vh.mul_(sign[:, None])  # in place: vh is as large as the map
    return Spectrum(s, u, vh)


def gram_spectrum(jacobian: torch.Tensor | JacobianFile, output: torch.Tensor) -> Spectrum:
    """σ and left vectors of J [d, N, d] from its d × d Gram matrix J Jᵀ, accumulated over
    blocks of positions (a J in a file is read once, a block at a time); the right vectors
    are not formed. σ_k = sqrt(λ_k) carries an absolute error of order eps·σ_1²/σ_k: exact
    enough in float64, coarse for the small σ of a float32 J (`spectrum` is not squared)."""
    d = jacobian.shape[0]
    gram = torch.zeros((d, d), dtype=output.dtype, device=output.device)
    for _, block in position_blocks(jacobian):
        flat = block.to(output.device).reshape(d, -1)
        gram.addmm_(flat, flat.T)
    lam, u = torch.linalg.eigh((gram + gram.T) / 2)
    s, u = lam.flip(0).clamp_min(0).sqrt(), u.flip(1)
    sign = torch.sign(output @ u)
    sign[sign == 0] = 1
    return Spectrum(s, u * sign, None)


@torch.no_grad()
def top_tokens_by_unembedding(weights: GGUFWeights, directions: torch.Tensor,
                              k: int = 5) -> list[list[tuple[int, float]]]:
    """For each column u of `directions` [d, m]: the k tokens t with the largest (W_U u)_t.

    The unembedding is walked in row chunks, so it is never held whole.
    """
    return _top_k_over_rows(weights.unembedding_chunks(), directions, k, cosine=False)


@torch.no_grad()
def nearest_input_embeddings(weights: GGUFWeights, directions: torch.Tensor,
                             k: int = 5) -> list[list[tuple[int, float]]]:
    """For each column v of `directions` [d, m]: the k token-embedding rows with the highest
    cosine similarity to v (rows of zero norm are skipped), walked in chunks."""
    unit = directions / torch.linalg.vector_norm(directions, dim=0, keepdim=True).clamp_min(1e-300)
    return _top_k_over_rows(weights.embedding_chunks(), unit, k, cosine=True)


def _top_k_over_rows(chunks: Iterable[tuple[int, torch.Tensor]], directions: torch.Tensor, k: int,
                     cosine: bool) -> list[list[tuple[int, float]]]:
    m = directions.shape[1]
    best_val = torch.full((k, m), float("-inf"), dtype=directions.dtype, device=directions.device)
    best_idx = torch.zeros((k, m), dtype=torch.long, device=directions.device)
    for start, w in chunks:
        w = w.to(directions.dtype)
        scores = w @ directions  # [rows, m]
        if cosine:
            norms = torch.linalg.vector_norm(w, dim=1, keepdim=True)
            scores = torch.where(norms > 0, scores / norms.clamp_min(1e-300), float("-inf"))
        kk = min(k, scores.shape[0])
        v, i = torch.topk(scores, kk, dim=0)
        vals = torch.cat((best_val, v), dim=0)
        idx = torch.cat((best_idx, i + start), dim=0)
        order = torch.topk(vals, k, dim=0).indices
        best_val, best_idx = vals.gather(0, order), idx.gather(0, order)
    return [[(int(best_idx[r, c]), float(best_val[r, c])) for r in range(k)] for c in range(m)]
