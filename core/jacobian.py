"""The posterior-mean predictor ``f(x_t) = (x_t − √(1−ᾱ_t) ε(x_t)) / √ᾱ_t`` and its Jacobian.

``J = ∂f/∂x_t`` is low rank for t in roughly [0.2T, 0.7T]. These tools work with products only
(no d×d matrix): ``jvp`` (J v) and ``vjp`` (Jᵀ u), subspace iteration for the top-r right
singular vectors, a null-space projector, the singular-value spectrum and the rank ratio.

``jvp`` uses the double-backward trick (J v = ∂/∂u ⟨Jᵀu, v⟩) rather than forward-mode AD: forward
mode fails on CPU through SDPA attention and through GroupNorm on non-contiguous tensors, while
reverse mode works through every diffusers block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shallowmark.errors import InvalidParameterError


def posterior_mean(backend, x_t: torch.Tensor, t: int, cond: Any = None) -> torch.Tensor:
    """Tweedie's estimate of x_0 from x_t at training timestep ``t`` (batched)."""
    a = float(backend.alphas_cumprod[int(t)])
    tt = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
    return (x_t - (1 - a) ** 0.5 * backend.eps(x_t, tt, cond).to(x_t.dtype)) / a ** 0.5


def vjp(backend, x_t: torch.Tensor, t: int, u: torch.Tensor, cond: Any = None) -> torch.Tensor:
    """Jᵀu for each sample of the batch (``u`` has the batch's shape)."""
    with torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(posterior_mean(backend, x, t, cond), x, u)
    return g.detach()


def jvp(backend, x_t: torch.Tensor, t: int, v: torch.Tensor, cond: Any = None) -> torch.Tensor:
    """J v for each sample of the batch, by double backward."""
    with torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        y = posterior_mean(backend, x, t, cond)
        u = torch.zeros_like(y, requires_grad=True)
        (g,) = torch.autograd.grad(y, x, u, create_graph=True)  # Jᵀu, linear in u
        (jv,) = torch.autograd.grad(g, u, v.to(g.dtype))
    return jv.detach()


@dataclass(frozen=True)
class Subspace:
    """Top right singular vectors of J at one x_t: ``vectors`` (r, *latent_shape), orthonormal when
    flattened; ``singular_values`` (r,) descending; ``left`` the matching left vectors (J v_i / σ_i)."""

    vectors: torch.Tensor
    singular_values: torch.Tensor
    left: torch.Tensor
    iterations: int
    t: int


def _batched(fn, backend, x_t, t, vs, cond, chunk):
    out = []
    for i in range(0, vs.shape[0], chunk):
        v = vs[i:i + chunk]
        out.append(fn(backend, x_t.expand(v.shape[0], *x_t.shape[1:]), t, v, cond))
    return torch.cat(out)


def _orthonormal_rows(m: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(m.flatten(1).T)
    return q.T.reshape(m.shape)


def top_subspace(backend, x_t: torch.Tensor, t: int, rank: int, iters: int = 10, cond: Any = None,
                 seed: int = 0, chunk: int = 16) -> Subspace:
    """Top-``rank`` right singular subspace of J at a single ``x_t`` (batch of one) by subspace
    (power) iteration on JᵀJ, finished by a Rayleigh–Ritz step so the vectors and σ_i are sorted.

    Cost: ``iters`` × ``rank`` JVP+VJP pairs, batched ``chunk`` at a time.
    """
    if x_t.dim() != 4 or x_t.shape[0] != 1:
        raise InvalidParameterError(f"top_subspace takes one x_t of shape (1, C, H, W); got {tuple(x_t.shape)}")
    d = x_t[0].numel()
    if not 1 <= rank <= d:
        raise InvalidParameterError(f"rank must be in [1, {d}]; got {rank}")
    if iters < 1:
        raise InvalidParameterError(f"iters must be >= 1; got {iters}")
    g = torch.Generator().manual_seed(seed)
    v = _orthonormal_rows(torch.randn((rank, *x_t.shape[1:]), generator=g, dtype=x_t.dtype).to(x_t.device))
    for _ in range(iters):
        jv = _batched(jvp, backend, x_t, t, v, cond, chunk)
        v = _orthonormal_rows(_batched(vjp, backend, x_t, t, jv, cond, chunk))
    jv = _batched(jvp, backend, x_t, t, v, cond, chunk)
    # Rayleigh–Ritz: SVD of the small (d × r) matrix J V rotates V onto the singular vectors.
    u_, s, wt = torch.linalg.svd(jv.flatten(1).T, full_matrices=False)
    vectors = (wt @ v.flatten(1)).reshape(v.shape)
    left = u_.T.reshape(v.shape)
    return Subspace(vectors, s, left, iters, int(t))


def nullspace_project(delta: torch.Tensor, subspace: Subspace | torch.Tensor) -> torch.Tensor:
    """Remove from ``delta`` (batch, *shape) its component in the span of the subspace's vectors:
    ``δ − V Vᵀ δ``. What is left changes the posterior mean only through the small singular values."""
    v = subspace.vectors if isinstance(subspace, Subspace) else subspace
    vf = v.flatten(1).to(delta.dtype)
    df = delta.flatten(1)
    return (df - (df @ vf.T) @ vf).view_as(delta)


def full_jacobian(backend, x_t: torch.Tensor, t: int, cond: Any = None) -> torch.Tensor:
    """The dense d×d Jacobian at one x_t. Only for small models (the analytic backend, tests)."""
    shape = x_t.shape
    f = lambda z: posterior_mean(backend, z.view(shape), t, cond).flatten()  # noqa: E731
    return torch.autograd.functional.jacobian(f, x_t.flatten().detach())


def rank_ratio(singular_values: torch.Tensor, dim: int, tol: float = 1e-3) -> float:
    """Numerical rank / d, where the numerical rank counts σ_i > ``tol`` · σ_max."""
    if not 0.0 < tol < 1.0:
        raise InvalidParameterError(f"tolerance must be in (0, 1); got {tol}")
    s = singular_values.abs()
    return float((s > tol * s.max()).sum()) / float(dim)


# ------------------------------------------------------------------------------------------------
# Rank by energy: the papers' rule, exactly from a full spectrum or estimated from products only
# ------------------------------------------------------------------------------------------------

#: The share of ‖J‖_F the top-k singular values must hold: √Σ_{i≤k}σ_i² > 0.99·√Σσ² (the rule of the
#: generalizability work's Jacobian code), i.e. 98.01 % of Σσ².
DEFAULT_ENERGY = 0.99


def _check_energy(energy: float) -> float:
    energy = float(energy)
    if not 0.0 < energy < 1.0:
        raise InvalidParameterError(f"energy must be in (0, 1); got {energy}")
    return energy


def energy_rank(singular_values: torch.Tensor, energy: float = DEFAULT_ENERGY) -> int:
    """The smallest k whose top-k singular values hold ``energy`` of the Frobenius norm:
    √(Σ_{i≤k} σ_i²) > energy · √(Σ_i σ_i²). Unlike a count of σ_i > tol·σ_max, it does not depend on
    how the largest value compares with the rest. A zero spectrum has rank 0."""
    energy = _check_energy(energy)
    s2 = torch.sort(singular_values.detach().double().abs().flatten(), descending=True).values ** 2
    total = float(s2.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(s2, 0)
    return int(torch.searchsorted(cum, torch.tensor(energy ** 2 * total, dtype=cum.dtype), right=True)) + 1


@dataclass(frozen=True)
class SpectralEstimate:
    """Gauss quadrature of the spectrum of JᵀJ from Lanczos on ``probes`` random start vectors
    (stochastic Lanczos quadrature): probe p puts weight ``d·weights[p, j]`` on the eigenvalue
    ``nodes[p, j]`` (= σ²). Unused steps (after a breakdown) have weight 0. ``d`` is the dimension."""

    nodes: torch.Tensor     # (P, m) σ² values
    weights: torch.Tensor   # (P, m), each row sums to 1
    d: int
    steps: int

    def _pooled(self, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        n, w = (self.nodes, self.weights) if rows is None else (self.nodes[rows], self.weights[rows])
        return n.flatten().clamp_min(0), (w / n.shape[0]).flatten() * self.d

    def total_energy(self, rows=None) -> float:
        """Σσ² = tr JᵀJ (the quadrature is exact for this: it is Hutchinson's estimate)."""
        n, m = self._pooled(rows)
        return float((n * m).sum())

    def energy_rank(self, energy: float = DEFAULT_ENERGY, rows=None) -> float:
        """The energy rule on the estimated spectrum: the number of eigenvalues, counted by the
        quadrature's masses from the top, needed to hold energy² of Σσ² (fractional, interpolated in
        the last node)."""
        energy = _check_energy(energy)
        n, m = self._pooled(rows)
        order = torch.argsort(n, descending=True)
        n, m = n[order], m[order]
        e = n * m
        total = float(e.sum())
        if total <= 0:
            return 0.0
        goal = energy ** 2 * total
        cum = torch.cumsum(e, 0)
        j = int(torch.searchsorted(cum, torch.tensor(goal, dtype=cum.dtype)))
        j = min(j, len(n) - 1)
        before = float(cum[j - 1]) if j > 0 else 0.0
        count_before = float(m[:j].sum())
        part = (goal - before) / float(e[j]) if float(e[j]) > 0 else 0.0
        return min(float(self.d), count_before + part * float(m[j]))

    def energy_rank_spread(self, energy: float = DEFAULT_ENERGY, draws: int = 200, seed: int = 0) -> float:
        """Bootstrap standard deviation over probes of :meth:`energy_rank` (0 with one probe)."""
        p = self.nodes.shape[0]
        if p < 2:
            return 0.0
        g = torch.Generator().manual_seed(seed)
        vals = [self.energy_rank(energy, torch.randint(0, p, (p,), generator=g)) for _ in range(draws)]
        return float(torch.tensor(vals).std())


def lanczos_spectrum(matvec, shape: tuple, *, probes: int = 4, steps: int = 40, seed: int = 0,
                     dtype: torch.dtype = torch.float64, device=None) -> SpectralEstimate:
    """Stochastic Lanczos quadrature of a symmetric PSD operator ``matvec`` (a batch (P, *shape) →
    (P, *shape), here JᵀJ): ``steps`` Lanczos steps with full reorthogonalisation from ``probes``
    Rademacher starts, run side by side. Cost: ``steps`` calls of ``matvec`` on a batch of ``probes``.
    A probe whose Krylov space is exhausted (β ≈ 0: the operator has low rank) stops there."""
    if int(probes) < 1 or int(steps) < 1:
        raise InvalidParameterError(f"probes and steps must be >= 1; got {probes}, {steps}")
    d = 1
    for s in shape:
        d *= int(s)
    steps = min(int(steps), d)
    g = torch.Generator().manual_seed(int(seed))
    v = (torch.randint(0, 2, (int(probes), d), generator=g) * 2 - 1).to(dtype=dtype, device=device)
    v = v / v.norm(dim=1, keepdim=True)
    basis = [v]
    alphas, betas = [], []
    alive = torch.ones(int(probes), dtype=torch.bool, device=v.device)
    used = torch.zeros(int(probes), dtype=torch.long)
    for j in range(steps):
        w = matvec(basis[-1].view(int(probes), *shape)).reshape(int(probes), d).to(v.dtype)
        a = (w * basis[-1]).sum(1)
        alphas.append(a)
        used += alive.long().cpu()
        if j == steps - 1:
            break
        q = torch.stack(basis, 1)  # (P, j+1, d)
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            w = w - torch.einsum("pk,pkd->pd", torch.einsum("pd,pkd->pk", w, q), q)
        b = w.norm(dim=1)
        scale = torch.stack(alphas).abs().amax(0).clamp_min(1e-300)
        alive = alive & (b > 1e-10 * scale)
        betas.append(torch.where(alive, b, torch.zeros_like(b)))
        basis.append(torch.where(alive[:, None], w / b.clamp_min(1e-300)[:, None], torch.zeros_like(w)))
        if not bool(alive.any()):
            break
    nodes = torch.zeros(int(probes), steps, dtype=torch.float64)
    weights = torch.zeros_like(nodes)
    al = torch.stack(alphas, 1).double().cpu()
    be = torch.stack(betas, 1).double().cpu() if betas else torch.zeros(int(probes), 0, dtype=torch.float64)
    for p in range(int(probes)):
        m = int(used[p])
        tri = torch.diag(al[p, :m])
        if m > 1:
            off = be[p, :m - 1]
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        theta, vecs = torch.linalg.eigh(tri)
        nodes[p, :m] = theta
        weights[p, :m] = vecs[0] ** 2
    return SpectralEstimate(nodes, weights, d, steps)


def jtj(backend, x_t: torch.Tensor, t: int, cond: Any = None):
    """The operator v ↦ JᵀJ v at one ``x_t`` (1, C, H, W), for a batch of v: a JVP then a VJP."""
    def matvec(v: torch.Tensor) -> torch.Tensor:
        xb = x_t.expand(v.shape[0], *x_t.shape[1:])
        return vjp(backend, xb, t, jvp(backend, xb, t, v.to(x_t.dtype), cond), cond)
    return matvec
