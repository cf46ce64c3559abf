"""Mixture of low-rank Gaussians (MoLRG): the data model of the talk's theory, with its exact
posterior mean.

``p(x) = Σ_k π_k N(0, U_k U_kᵀ)`` with orthonormal ``U_k ∈ R^{d×r}`` and ``U_i ⊥ U_j``. With the
forward process ``x_t = α_t x_0 + β_t ε`` (α_t = √ᾱ_t, β_t = √(1-ᾱ_t)) the lemma gives

    E[x_0 | x_t] = α_t / (α_t² + β_t²) · Σ_k w_k(x_t) U_k U_kᵀ x_t,
    w_k ∝ π_k exp(φ_t ‖U_kᵀ x_t‖²),   φ_t = α_t² / (2 β_t² (α_t² + β_t²)).

Its Jacobian has rank ≤ K·r, so tests of null-space logic have a ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shallowmark.errors import InvalidParameterError


@dataclass(frozen=True)
class MoLRG:
    """``bases``: (K, d, r) with orthonormal, mutually orthogonal columns; ``weights``: (K,) summing to 1."""

    bases: torch.Tensor
    weights: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.bases.shape[1])

    @property
    def rank(self) -> int:
        return int(self.bases.shape[2])

    @property
    def clusters(self) -> int:
        return int(self.bases.shape[0])

    @staticmethod
    def random(dim: int, rank: int, clusters: int = 1, seed: int = 0, dtype=torch.float64) -> "MoLRG":
        """Random orthogonal subspaces (one QR of a Gaussian matrix) and equal weights."""
        if dim < 1 or rank < 1 or clusters < 1:
            raise InvalidParameterError(f"dim, rank and clusters must be >= 1; got {dim}, {rank}, {clusters}")
        if rank * clusters > dim:
            raise InvalidParameterError(f"K·r = {rank * clusters} orthogonal directions do not fit in d = {dim}")
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, rank * clusters, generator=g, dtype=dtype))
        bases = q.T.reshape(clusters, rank, dim).transpose(1, 2).contiguous()
        return MoLRG(bases, torch.full((clusters,), 1.0 / clusters, dtype=dtype))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples (n, d): pick a cluster by its weight, then ``U_k a`` with ``a ~ N(0, I_r)``."""
        if n < 1:
            raise InvalidParameterError(f"number of samples must be >= 1; got {n}")
        k = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        a = torch.randn(n, self.rank, generator=generator, dtype=self.bases.dtype)
        return torch.einsum("ndr,nr->nd", self.bases[k], a)

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """Exact ``E[x_0 | x_t]`` for a batch ``x_t`` of shape (n, d) at noise level ``alpha_bar``."""
        a2, b2 = float(alpha_bar), 1.0 - float(alpha_bar)
        if not 0.0 < a2 < 1.0:
            raise InvalidParameterError(f"alpha_bar must be in (0, 1); got {alpha_bar}")
        x = x_t.to(self.bases.dtype)
        proj = torch.einsum("kdr,nd->nkr", self.bases, x)            # U_kᵀ x
        phi = a2 / (2 * b2 * (a2 + b2))
        logits = torch.log(self.weights)[None] + phi * proj.pow(2).sum(-1)
        w = torch.softmax(logits, dim=1)                               # (n, K)
        back = torch.einsum("kdr,nkr->nkd", self.bases, proj)          # U_k U_kᵀ x
        return (a2 ** 0.5 / (a2 + b2)) * torch.einsum("nk,nkd->nd", w, back)
