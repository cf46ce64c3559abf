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
