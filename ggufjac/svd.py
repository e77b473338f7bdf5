"""The top singular triplets of the detached Jacobian without forming it (long prompts).

J is d × (N·d): at 1,024 tokens of a d = 640 model 1.6 GB in float32, at 8B scale tens of GB.
With the forward record's coefficients frozen the network is exactly linear, so J and Jᵀ are
available as sweeps of the streaming engine: Jᵀ·U is the reverse sweep with U's columns as
output directions (`pull_back_output`, [m, N, d]), J·V the forward sweep of the replayed
network with V as input (`push_forward`, [m, d]: its biases left out, so it applies J, the
linear part of an affine map y = J x + c, and never c). Neither forms J.

The method: block Lanczos on the d × d matrix A = J Jᵀ, with full reorthogonalization. Its
basis lives in the output space (d values per vector, so a basis of hundreds of vectors costs
nothing) and every step is one reverse and one forward sweep of a block of b vectors. The
Rayleigh quotient T = Qᵀ A Q is read off the stored images A Q, and the top-K Ritz values of
T converge to σ_k². Eigenvalues of A carry rounding of order eps·σ_1², so σ and the right
vectors are not taken from them: every block's reverse-sweep rows Qᵢᵀ J are kept (in a
temporary file), B = U_sᵀ J for the top Ritz vectors U_s = Q S is combined from them
(Sᵀ Qᵀ J) without another sweep, and the SVD of B (σ and vectors, accurate to eps·σ_1 rather
than eps·σ_1²) is the answer. Its residuals ‖J v_k − σ_k u_k‖ / σ_k need no sweep either:
with B = W Σ Vᵀ, v_k = Bᵀ w_k / σ_k = Jᵀ U_s w_k / σ_k, so J v_k = A U_s w_k / σ_k =
(A Q) S w_k / σ_k, from the stored images (‖Jᵀ u_k − σ_k v_k‖ is zero by construction).

‖J‖²_F = tr(A) is tr(T) on the Krylov space plus, on its complement, a Hutchinson estimate
from Gaussian probes projected off the basis (one reverse sweep of them): the deflated
estimate, whose variance is that of the complement's small part only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .analysis import gram_spectrum, spectrum
from .engine import ForwardRecord, SpilledTensors, StreamingEngine, SweepTiming
from .errors import GgufjacError
from .jacobian import JacobianFile, JacobianResult, position_blocks

# Default convergence: the largest relative change of the top-K σ between two iterations.
DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# Gaussian probes for the complement's part of ‖J‖²_F.
FROBENIUS_PROBES = 8


def check_top_k(k: int, d: int, n_tokens: int) -> None:
    """One error for a K that no J of this model and prompt has: J is d × N·d (rank ≤ d)."""
    if k < 1:
        raise GgufjacError(f"--top-k must be at least 1, not {k}")
    if k > d:
        raise GgufjacError(f"--top-k {k} is more than J's rank can be: J is {d} x "
                           f"{n_tokens}·{d}, of rank at most {d}")


def default_tolerance(dtype: torch.dtype) -> float:
    return DEFAULT_TOLERANCE[dtype]


# From this many tokens on, a Lanczos block is one vector (default_block).
SINGLE_VECTOR_TOKENS = 1024


def default_block(k: int, n_tokens: int) -> int:
    """Vectors per Lanczos block. A block costs one reverse and one forward sweep per
    vector, and a smaller block reaches a higher Krylov degree for the same number of
    vectors, but each sweep also has a fixed cost (reading and dequantizing the weights)
    that a block of 1 pays twice as often. The vectors' cost grows with the prompt and the
    fixed cost does not, so: 2 (at most k) for shorter prompts, 1 from SINGLE_VECTOR_TOKENS
    on. Measured for the top 16 on Gemma 3 270M (docs/benchmarks.md): at 256 tokens blocks
    of 1 and 2 swept 102 and 120 vectors in 39.7 and 37.2 s, at 512 tokens 134 and 148
    vectors in 80.1 and 77.6 s, at 1,024 tokens 140 and 168 vectors in 159.4 and 170.1 s."""
    return 1 if n_tokens >= SINGLE_VECTOR_TOKENS else max(1, min(k, 2))


@dataclass
class TopSingularTriplets:
    """The top K singular triplets of J as a d × (N·d) matrix: J ≈ Σ_k σ_k u_k v_kᵀ."""

    singular_values: torch.Tensor  # [K] descending
    left: torch.Tensor  # [d, K]; each u_k signed so that u_k · output > 0
    right: torch.Tensor  # [K, N, d]
    residuals: torch.Tensor  # [K]: ‖J v_k − σ_k u_k‖ / σ_k
    converged: bool
    iterations: int
    sigma_change: float  # the last iteration's largest relative change of the top-K σ
    tolerance: float
    krylov_dimension: int
    frobenius_sq: float  # estimate of ‖J‖²_F
    frobenius_sq_std: float  # its standard error (0 when the Krylov space is all of R^d)
    vectors_swept: int  # directions and probes through the engine, all sweeps together
    inputs: torch.Tensor  # x [N, d]
    output: torch.Tensor  # y [d], the last position's final-norm output
    sweeps: list[SweepTiming] = field(default_factory=list)  # the engine's, when it ran them
    # c [d] of y = J x + c (a family with biases): the triplets are J's, c is apart from them
    constant: torch.Tensor | None = None

    def truncated_reconstruction_rel_error(self) -> float:
        """‖y − c − Σ_k σ_k u_k (v_k · x)‖ / ‖y‖: how much of y the top K directions explain
        (c, the constant term where the map has one, taken as given: it has no direction)."""
        coords = torch.einsum("knd,nd->k", self.right, self.inputs)
        approx = self.left @ (self.singular_values * coords)
        if self.constant is not None:
            approx = approx + self.constant
        return float(torch.linalg.vector_norm(self.output - approx)
                     / torch.linalg.vector_norm(self.output))

    def input_weights(self) -> torch.Tensor:
        """‖v_k[i]‖ [K, N]: how much of each right vector lies on input position i (the
        squares sum to 1 over positions): which tokens a direction reads."""
        return torch.linalg.vector_norm(self.right, dim=2)

    @property
    def stable_rank(self) -> float:
        """‖J‖²_F / σ_1², from the estimate of ‖J‖²_F."""
        s1 = float(self.singular_values[0])
        return self.frobenius_sq / (s1 * s1) if s1 > 0 else 0.0


def _orthonormal_block(z: torch.Tensor, basis: torch.Tensor | None,
                       generator: torch.Generator) -> torch.Tensor:
    """Columns of z [d, b] made orthonormal and orthogonal to `basis` [d, m] (classical
    Gram–Schmidt twice, then QR). Columns that vanish against z's own size (the Krylov space
    became invariant) are replaced by random directions orthogonal to everything so far."""
    d = z.shape[0]
    size = float(torch.linalg.vector_norm(z, dim=0).max())
    for _ in range(2):
        if basis is not None and basis.shape[1]:
            z = z - basis @ (basis.T @ z)
    q, r = torch.linalg.qr(z)
    small = r.diagonal().abs() <= 1e3 * torch.finfo(z.dtype).eps * size
    if bool(small.any()):
        fresh = torch.randn(d, int(small.sum()), dtype=z.dtype, generator=generator).to(z.device)
        keep = q[:, ~small]
        full = keep if basis is None else torch.cat((basis, keep), dim=1)
        for _ in range(2):
            fresh = fresh - full @ (full.T @ fresh)
        fresh, _ = torch.linalg.qr(fresh)
        q = torch.cat((keep, fresh), dim=1)
    return q


class JacobianProducts:
    """J's products for the Lanczos iteration, from one forward record: Jᵀ U (a reverse
    sweep) and J Jᵀ Q (a reverse sweep, then a forward one). Here by the streaming engine in
    this process; a front end may compute them elsewhere (on a cluster) with the same
    methods."""

    def __init__(self, engine: StreamingEngine, record: ForwardRecord) -> None:
        self.engine, self.record = engine, record
        self.d = engine.cfg.d_model
        self.inputs, self.output, self.constant = record.inputs, record.output[-1], \
            record.constant

    def transposed(self, u: torch.Tensor) -> torch.Tensor:
        """Columns u [d, m] -> the rows of Uᵀ J, [m, N, d]."""
        return self.engine.pull_back_output(self.record, u.T.contiguous())

    def gram(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns q [d, m] -> (Qᵀ J [m, N, d], J Jᵀ Q [d, m])."""
        rows = self.transposed(q)
        return rows, self.engine.push_forward(self.record, rows).T


def top_singular_triplets(engine: StreamingEngine, record: ForwardRecord, k: int,
                          tol: float | None = None, max_iterations: int = 100,
                          block: int | None = None, seed: int = 0,
                          on_iteration: Callable[[int, float, float], None] | None = None
                          ) -> TopSingularTriplets:
    """The top `k` singular triplets of the detached Jacobian recorded in `record`, matrix
    free (see the module docstring). `tol`: stop when no top-k σ changed by more than this
    (relative) in an iteration and every top-k Ritz residual ‖Ay − θy‖ is below tol·σ_1²
    (default: 1e-10 in float64, 1e-5 in float32). Not converging
    within `max_iterations` (at least ⌈k / block⌉, which a basis of k vectors takes) is
    reported in the result (`converged`), not raised.
    `on_iteration(i, change, residual)` is told each iteration's figures."""
    return triplets_of_products(JacobianProducts(engine, record), k, tol, max_iterations,
                                block, seed, on_iteration)


def triplets_of_products(products: JacobianProducts, k: int, tol: float | None = None,
                         max_iterations: int = 100, block: int | None = None, seed: int = 0,
                         on_iteration: Callable[[int, float, float], None] | None = None
                         ) -> TopSingularTriplets:
    """`top_singular_triplets` with J's products given (`JacobianProducts`)."""
    d, n = products.d, products.inputs.shape[0]
    dtype, device = products.inputs.dtype, products.inputs.device
    check_top_k(k, d, n)
    if dtype not in DEFAULT_TOLERANCE:
        raise GgufjacError(f"svd runs in float64 or float32, not "
                           f"{str(dtype).removeprefix('torch.')} (the Lanczos iteration's "
                           "eigenvalue problems have no half-precision LAPACK)")
    tol = default_tolerance(dtype) if tol is None else tol
    if not tol > 0:
        raise GgufjacError(f"the tolerance must be positive, not {tol}")
    b = min(block or default_block(k, n), d)
    generator = torch.Generator().manual_seed(seed)
    y = products.output

    swept = 0
    q = _orthonormal_block(torch.randn(d, b, dtype=dtype, generator=generator).to(device),
                           None, generator)
    basis, images = q, None  # Q [d, m], A Q [d, m]
    spilled = SpilledTensors(device)  # Jᵀ Q, block by block
    previous, change, converged, iterations = None, math.inf, False, 0
    # at least the iterations that make a Krylov space of k vectors, whatever the limit
    max_iterations = max(max_iterations, -(-k // b))
    while iterations < max_iterations:
        iterations += 1
        rows, image = products.gram(q)  # Qᵢᵀ J and A q = J Jᵀ q
        spilled.append({"rows": rows})  # Qᵢᵀ J, kept (in a file) for the final B = U_sᵀ J
        del rows
        swept += 2 * q.shape[1]
        images = image if images is None else torch.cat((images, image), dim=1)
        t = basis.T @ images
        theta, ritz = torch.linalg.eigh((t + t.T) / 2)
        theta, ritz = theta.flip(0)[:k], ritz.flip(1)[:, :k]
        sigma = theta.clamp_min(0).sqrt()
        # ‖A y − θ y‖ / θ_1 for the top Ritz pairs (y = Q s, A y = (A Q) s: no sweep needed)
        residual = float((torch.linalg.vector_norm(images @ ritz - (basis @ ritz) * theta, dim=0)
                          / theta[0].clamp_min(torch.finfo(dtype).tiny)).max())
        if previous is not None and previous.shape[0] == k:
            change = float(((sigma - previous).abs() / sigma.clamp_min(
                torch.finfo(dtype).tiny)).max())
        if on_iteration is not None:
            on_iteration(iterations, change, residual)
        if change <= tol and residual <= tol:
            converged = True
            break
        previous = sigma
        if basis.shape[1] >= d:  # the Krylov space is all of R^d: T is A itself
            converged, change = True, 0.0
            break
        width = min(b, d - basis.shape[1])
        q = _orthonormal_block(image[:, :width], basis, generator)
        basis = torch.cat((basis, q), dim=1)
    if basis.shape[1] > images.shape[1]:  # the last block was never applied
        basis = basis[:, :images.shape[1]]
    t = basis.T @ images
    theta, ritz = torch.linalg.eigh((t + t.T) / 2)
    s = min(basis.shape[1], k + b)  # a few more Ritz vectors than asked: they sharpen B's SVD
    ritz = ritz.flip(1)[:, :s]
    u_s = basis @ ritz
    # B = U_sᵀ J = ritzᵀ (Qᵀ J), from the rows of every block's reverse sweep
    b_rows = torch.zeros((s, n * d), dtype=dtype, device=device)
    first = 0
    for i in range(len(spilled)):
        rows = spilled[i]["rows"].reshape(-1, n * d)
        b_rows.addmm_(ritz[first:first + rows.shape[0]].T, rows)
        first += rows.shape[0]
        del rows
    del spilled

    # the complement of the Krylov space, for ‖J‖²_F
    n_probe = 0 if basis.shape[1] >= d else FROBENIUS_PROBES
    probe_rows = None
    if n_probe:
        probes = torch.randn(d, n_probe, dtype=dtype, generator=generator).to(device)
        for _ in range(2):
            probes = probes - basis @ (basis.T @ probes)
        probe_rows = products.transposed(probes).reshape(n_probe, n * d)
        swept += n_probe
    spec = spectrum(b_rows, None)
    del b_rows
    sv, w = spec.singular_values[:k], spec.left[:, :k]
    left = u_s @ w
    right = spec.right[:k].reshape(k, n, d)
    sign = torch.sign(y @ left)
    sign[sign == 0] = 1
    left, right = left * sign, right * sign[:, None, None]

    # J v_k = (A Q) S w_k / σ_k (module docstring), [d, k]
    sv_safe = sv.clamp_min(torch.finfo(dtype).tiny)
    applied = images @ (ritz @ w) * (sign / sv_safe)
    residuals = torch.linalg.vector_norm(applied - left * sv, dim=0) / sv_safe

    exact = float(torch.trace(t))
    if probe_rows is not None:
        tail = probe_rows.pow(2).sum(dim=1)  # ‖Jᵀ P⊥ g‖², one per probe
        estimate = exact + float(tail.mean())
        std = float(tail.std() / math.sqrt(n_probe)) if n_probe > 1 else math.inf
    else:
        estimate, std = exact, 0.0
    return TopSingularTriplets(sv, left, right, residuals, converged, iterations, change, tol,
                               int(basis.shape[1]), estimate, std, swept,
                               products.inputs.detach(), y, constant=products.constant)


def triplets_of_jacobian(result: JacobianResult, k: int) -> TopSingularTriplets:
    """The same triplets from a formed Jacobian: its dense SVD (for a J in a file, the
    eigenvectors of J Jᵀ, and v_k = Jᵀ u_k / σ_k read off the file), residuals from J
    itself and ‖J‖²_F exactly (nothing estimated, nothing iterated)."""
    jac, y = result.jacobian, result.output
    d, n = jac.shape[0], jac.shape[1]
    check_top_k(k, d, n)
    in_memory = isinstance(jac, torch.Tensor)
    if in_memory:
        spec = spectrum(jac.reshape(d, n * d), y)
        right = spec.right[:k].reshape(k, n, d)
    else:
        spec = gram_spectrum(jac, y)
        right = torch.empty((k, n, d), dtype=y.dtype, device=y.device)
    sv, left = spec.singular_values[:k], spec.left[:, :k]
    applied = torch.zeros_like(left)
    frob = 0.0
    for start, block in position_blocks(jac):  # one pass over a J in a file
        block = block.to(y.device)
        part = right[:, start:start + block.shape[1]]
        if not in_memory:  # v_k = Jᵀ u_k / σ_k, block by block
            part[:] = torch.einsum("ok,onj->knj", left, block) / sv[:, None, None]
        applied += torch.einsum("onj,knj->ok", block, part)
        frob += float(block.pow(2).sum())
    residuals = torch.linalg.vector_norm(applied - left * sv, dim=0) \
        / sv.clamp_min(torch.finfo(sv.dtype).tiny)
    return TopSingularTriplets(sv, left, right, residuals, True, 0, 0.0, 0.0, d, frob, 0.0, d,
                               result.inputs, y, constant=result.constant)


@dataclass
class PerTokenTriplets:
    """The top K singular triplets of every per-token block J_i = ∂y/∂x_i (d × d)."""

    singular_values: torch.Tensor  # [N, K]
    left: torch.Tensor  # [N, d, K]; u signed so that u · output > 0
    right: torch.Tensor  # [N, K, d]


def per_token_triplets(jacobian: torch.Tensor | JacobianFile, k: int, output: torch.Tensor,
                       positions_per_batch: int = 64) -> PerTokenTriplets:
    """Top-k triplets of each block J[:, i, :] of a formed Jacobian [d, N, d] (in memory or
    in a file), by LAPACK's SVD batched over `positions_per_batch` positions at a time.

    Why J is formed here: one reverse sweep with the d unit directions gives every J_i at
    once, while a matrix-free iteration needs, per step, a reverse direction and a forward
    probe for each position separately (the forward sweep sums over positions): 2N sweeps of
    one vector per step against d once, more work as soon as N > d / 2."""
    d = jacobian.shape[0]
    check_top_k(k, d, jacobian.shape[1])
    values, lefts, rights = [], [], []
    for _, read in position_blocks(jacobian):
        for start in range(0, read.shape[1], positions_per_batch):
            blocks = read[:, start:start + positions_per_batch].permute(1, 0, 2)
            if blocks.dtype in (torch.float16, torch.bfloat16):  # LAPACK has no half SVD
                blocks = blocks.float()
            u, s, vh = torch.linalg.svd(blocks.to(output.device), full_matrices=False)
            u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
            sign = torch.sign(torch.einsum("pdk,d->pk", u, output.to(u.dtype)))
            sign[sign == 0] = 1
            values.append(s)
            lefts.append(u * sign[:, None, :])
            rights.append(vh * sign[:, :, None])
    return PerTokenTriplets(torch.cat(values), torch.cat(lefts), torch.cat(rights))
