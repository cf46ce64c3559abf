"""The talk's theory on mixtures of low-rank Gaussians, checked numerically.

* The parameterized denoiser of the talk,

      x_U(x_t, t) = α_t / (α_t² + β_t²) · Σ_k w_k(x_t) U_k U_kᵀ x_t,
      w_k ∝ exp(φ_t ‖U_kᵀ x_t‖²),  φ_t = α_t² / (2 β_t² (α_t² + β_t²)),

  (K = 1: plain ``U Uᵀ``) trained with the DAE loss ``E_t E_{x0,ε} ‖x_U(x_t, t) − x0‖²`` by gradient
  descent, ``[U_1 … U_K]`` kept orthonormal by parametrizing it as the Q factor of a free matrix.
* K = 1: the DAE loss reduces to PCA, ``max_U ‖Uᵀ Y‖_F²`` s.t. ``UᵀU = I`` (:func:`pca_subspace`).
* K > 1: it reduces to subspace clustering; learned bases are matched to the true ones
  (:func:`match_subspaces`).
* The phase transition in N vs r (:func:`phase_transition`): with N ≥ r samples the subspace is
  recovered; with N < r the error ``‖U Uᵀ − U_g U_gᵀ‖_F`` is at least ``√(r − N)``.

:func:`run_molrg_analysis` runs all of it and writes ``report.json``, ``report.md`` and figures.

Noise schedule used for training: t ~ U(t_min, t_max), α_t = cos(πt/2), β_t = sin(πt/2)
(variance preserving, so ``x_t = √ᾱ x0 + √(1−ᾱ) ε`` with ᾱ = α_t², as in :mod:`.molrg`).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from shallowmark.core.molrg import MoLRG
from shallowmark.research.threads import single_thread
from shallowmark.errors import InvalidParameterError
from shallowmark.reports import markdown_table

DTYPE = torch.float64
DEFAULT_T_RANGE = (0.05, 0.95)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------

def _as_data(data) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data).to(DTYPE)
    if x.ndim != 2:
        raise InvalidParameterError(f"data must be a 2-D array (N samples, d dims); got shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise InvalidParameterError("data must hold at least one sample (N >= 1); got N = 0")
    if x.shape[1] < 1:
        raise InvalidParameterError("data must have dimension d >= 1; got d = 0")
    if not torch.isfinite(x).all():
        raise InvalidParameterError("data contains NaN or infinite values")
    return x


def _check_rank(rank: int, clusters: int, dim: int) -> None:
    if int(rank) != rank or rank < 1:
        raise InvalidParameterError(f"rank must be an integer >= 1; got {rank}")
    if int(clusters) != clusters or clusters < 1:
        raise InvalidParameterError(f"clusters must be an integer >= 1; got {clusters}")
    if rank * clusters > dim:
        raise InvalidParameterError(
            f"clusters·rank = {clusters}·{rank} = {rank * clusters} orthonormal directions do not fit in d = {dim}")


def _check_t_range(t_range) -> tuple[float, float]:
    lo, hi = float(t_range[0]), float(t_range[1])
    if not 0.0 < lo <= hi < 1.0:
        raise InvalidParameterError(f"t_range must satisfy 0 < t_min <= t_max < 1; got {t_range}")
    return lo, hi


def _as_basis(u) -> torch.Tensor:
    u = torch.as_tensor(np.asarray(u) if not isinstance(u, torch.Tensor) else u).to(DTYPE)
    if u.ndim != 2:
        raise InvalidParameterError(f"a basis must be a 2-D (d, r) matrix; got shape {tuple(u.shape)}")
    return u


def _derive_seed(seed: int, stream: int) -> int:
    """Independent seeds for independent uses (ground truth, data, initialisation) of one user seed, so
    that e.g. ``MoLRG.random(seed=s)`` and ``train_subspace_dae(seed=s)`` never draw the same numbers."""
    return (int(seed) * 1_000_003 + 7_919 * int(stream) + 1) % (2 ** 63 - 1)


# ----------------------------------------------------------------------------------------------
# Subspace geometry and PCA
# ----------------------------------------------------------------------------------------------

def pca_subspace(data, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``Y = dataᵀ`` (d, N): the global solution of
    ``max_U ‖UᵀY‖_F²`` s.t. ``UᵀU = I``. Returns (d, rank).

    With N < rank only N directions are determined by the data; the remaining rank − N columns are
    an (arbitrary, deterministic) orthonormal completion, as any completion is a global solution.
    """
    y = _as_data(data).T                                             # (d, N), uncentred: MoLRG has mean 0
    _check_rank(rank, 1, y.shape[0])
    u, _, _ = torch.linalg.svd(y, full_matrices=True)                # (d, d), singular values descending
    return u[:, :rank].contiguous()


def subspace_distance(u, v) -> float:
    """``‖U Uᵀ − V Vᵀ‖_F`` for orthonormal (d, r) bases; 0 for the same subspace, √(2r) for orthogonal ones."""
    u, v = _as_basis(u), _as_basis(v)
    if u.shape[0] != v.shape[0]:
        raise InvalidParameterError(f"bases live in different dimensions: {u.shape[0]} vs {v.shape[0]}")
    return float(torch.linalg.matrix_norm(u @ u.T - v @ v.T))


def principal_angles(u, v) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of orthonormal bases ``u``, ``v``."""
    u, v = _as_basis(u), _as_basis(v)
    if u.shape[0] != v.shape[0]:
        raise InvalidParameterError(f"bases live in different dimensions: {u.shape[0]} vs {v.shape[0]}")
    s = torch.linalg.svdvals(u.T @ v).clamp(-1.0, 1.0)             # descending, so angles ascend
    return torch.arccos(s)


def largest_principal_angle(u, v) -> float:
    """The largest principal angle (radians) between two subspaces of equal dimension."""
    return float(principal_angles(u, v).max())


def match_subspaces(learned, truth) -> tuple[list[int], list[float]]:
    """Match learned bases (K, d, r) to true bases (K, d, r) by the permutation minimising the summed
    subspace distance. Returns ``perm`` (learned index for each true cluster) and the matched distances."""
    learned, truth = torch.as_tensor(learned, dtype=DTYPE), torch.as_tensor(truth, dtype=DTYPE)
    if learned.shape != truth.shape or learned.ndim != 3:
        raise InvalidParameterError(
            f"bases must both be (K, d, r); got {tuple(learned.shape)} and {tuple(truth.shape)}")
    k = truth.shape[0]
    cost = [[subspace_distance(learned[j], truth[i]) for j in range(k)] for i in range(k)]
    if k <= 7:
        perm = min(itertools.permutations(range(k)), key=lambda p: sum(cost[i][p[i]] for i in range(k)))
    else:  # greedy for many clusters
        perm, free = [], set(range(k))
        for i in range(k):
            j = min(free, key=lambda j: cost[i][j])
            perm.append(j)
            free.remove(j)
    return list(perm), [cost[i][perm[i]] for i in range(k)]


# ----------------------------------------------------------------------------------------------
# The parameterized denoiser and its DAE training
# ----------------------------------------------------------------------------------------------

NOISE_MODES = ("sampled", "expected")


def schedule(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(α_t, β_t) = (cos(πt/2), sin(πt/2))`` for t in (0, 1)."""
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def _denoise(bases: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
             log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Batched denoiser: bases (J, K, d, r), x_t (J, n, d), alpha/beta (J, n) -> (J, n, d)."""
    alpha, beta = alpha[..., None], beta[..., None]
    a2b2 = alpha ** 2 + beta ** 2
    proj = torch.einsum("jkdr,jnd->jnkr", bases, x_t)               # U_kᵀ x_t
    back = torch.einsum("jkdr,jnkr->jnkd", bases, proj)             # U_k U_kᵀ x_t
    if bases.shape[1] == 1:
        mix = back[:, :, 0]
    else:
        phi = alpha ** 2 / (2 * beta ** 2 * a2b2)                    # (J, n, 1)
        logits = phi * proj.pow(2).sum(-1)
        if log_weights is not None:
            logits = logits + log_weights
        mix = torch.einsum("jnk,jnkd->jnd", torch.softmax(logits, dim=-1), back)
    return alpha / a2b2 * mix


def subspace_denoiser(bases: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                      log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The talk's parameterized denoiser ``x_U(x_t, t)`` for bases (K, d, r), x_t (n, d) and per-sample
    α_t, β_t (n,). K = 1 is ``α/(α²+β²) U Uᵀ x_t``; K > 1 weights the projections by the lemma's softmax
    with φ_t and the (learned) bases; ``log_weights`` (K,) are the mixture log-weights (default equal).
    With the true bases and weights this is :meth:`MoLRG.posterior_mean`."""
    lw = None if log_weights is None else log_weights[None, None]
    return _denoise(bases[None], x_t[None], alpha.reshape(1, -1), beta.reshape(1, -1), lw)[0]


def _frames(free: torch.Tensor, clusters: int, rank: int) -> torch.Tensor:
    """Free (J, d, K r) -> orthonormal bases (J, K, d, r) via the Q factor of a QR decomposition."""
    q, _ = torch.linalg.qr(free)
    j, d, _ = q.shape
    return q.transpose(1, 2).reshape(j, clusters, rank, d).transpose(2, 3)


T_NODES = 256  # midpoint rule over t for noise="expected"


def _per_sample_loss(bases, x0, t, eps, noise: str, t_range: tuple[float, float]) -> torch.Tensor:
    """DAE loss of each sample, (J, n). ``sampled``: ‖x_U(α_t x0 + β_t ε, t) − x0‖² at the given t, ε.
    ``expected`` (K = 1): its exact mean over ε and t ~ U(t_range): with c = α/(α²+β²),
    E_ε = ‖x0‖² − (2cα − c²α²)‖Uᵀx0‖² + c²β² r, then averaged over t by a midpoint rule."""
    if noise == "expected":
        lo, hi = t_range
        alpha, beta = schedule(lo + (hi - lo) * (torch.arange(T_NODES, dtype=DTYPE) + 0.5) / T_NODES)
        c = alpha / (alpha ** 2 + beta ** 2)
        kappa, const = float((2 * c * alpha - (c * alpha) ** 2).mean()), float((c * beta).pow(2).mean())
        proj = torch.einsum("jdr,jnd->jnr", bases[:, 0], x0).pow(2).sum(-1)
        return x0.pow(2).sum(-1) - kappa * proj + const * bases.shape[-1]
    alpha, beta = schedule(t)
    x_t = alpha[..., None] * x0 + beta[..., None] * eps
    return (_denoise(bases, x_t, alpha, beta) - x0).pow(2).sum(-1)


def _draw(x, w, draws, lo, hi, g, antithetic, noise):
    """Replicate (J, B, d) points ``draws`` times with their own t and ε; weights renormalised.
    ``expected`` needs no draws: t and ε are integrated in :func:`_per_sample_loss`."""
    if noise == "expected":
        return x, w, None, None
    x0 = x.repeat(1, draws, 1)
    ww = w.repeat(1, draws) / draws
    t = lo + (hi - lo) * torch.rand(x0.shape[:2], generator=g, dtype=DTYPE)
    eps = torch.randn(x0.shape, generator=g, dtype=DTYPE)
    if antithetic:
        x0, t, eps, ww = torch.cat([x0, x0], 1), torch.cat([t, t], 1), torch.cat([eps, -eps], 1), \
            torch.cat([ww, ww], 1) / 2
    return x0, ww, t, eps


def _fit(x: torch.Tensor, w: torch.Tensor, rank: int, clusters: int, steps: int, lr: float, seed: int,
         lo: float, hi: float, noise: str, noise_draws: int, antithetic: bool, batch: int | None,
         eval_draws: int, final_lr_fraction: float) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Train J independent denoisers at once. ``x`` (J, M, d) padded data, ``w`` (J, M) per-point weights
    (1/N_j on the N_j real points, 0 on padding). Minibatches (``batch`` < M) need no padding.
    Returns bases (J, K, d, r), loss curves (J, steps) and evaluation losses (J,)."""
    j, m, d = x.shape
    g = torch.Generator().manual_seed(_derive_seed(seed, 1))
    free = torch.randn(j, d, clusters * rank, generator=g, dtype=DTYPE).requires_grad_(True)
    opt = torch.optim.Adam([free], lr=lr)
    curves = np.zeros((j, steps))
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay from lr to final_lr_fraction·lr
            cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
            group["lr"] = lr * (final_lr_fraction + (1 - final_lr_fraction) * cosine)
        if batch is not None and batch < m:
            idx = torch.randperm(m, generator=g)[:batch]
            xb, wb = x[:, idx], torch.full((j, batch), 1.0 / batch, dtype=DTYPE)
        else:
            xb, wb = x, w
        x0, ww, t, eps = _draw(xb, wb, noise_draws, lo, hi, g, antithetic, noise)
        per_problem = (ww * _per_sample_loss(_frames(free, clusters, rank), x0, t, eps, noise, (lo, hi))).sum(1)
        opt.zero_grad(set_to_none=True)
        per_problem.sum().backward()
        opt.step()
        curves[:, step] = per_problem.detach().numpy()
    ge = torch.Generator().manual_seed(_derive_seed(seed, 2))        # fixed evaluation draw
    with torch.no_grad():
        bases = _frames(free, clusters, rank).contiguous()
        x0, ww, t, eps = _draw(x, w, eval_draws, lo, hi, ge, False, noise)
        final = (ww * _per_sample_loss(bases, x0, t, eps, noise, (lo, hi))).sum(1).numpy()
    return bases, curves, final


@dataclass
class DAEResult:
    """Outcome of :func:`train_subspace_dae`.

    ``bases``: learned (K, d, r), orthonormal as a whole; ``loss_curve``: the stochastic DAE loss at
    each step of the kept run; ``final_loss``: the DAE loss of the kept run on a fixed evaluation draw
    of (t, ε); ``restart_losses``: that evaluation loss for every restart (the lowest is kept)."""

    bases: torch.Tensor
    loss_curve: list[float]
    final_loss: float
    restart_losses: list[float]
    config: dict = field(default_factory=dict)
    all_bases: torch.Tensor | None = None  # (restarts, K, d, r)

    @property
    def basis(self) -> torch.Tensor:
        """The (d, r) basis of the first (for K = 1 the only) cluster."""
        return self.bases[0]


def _default_lr_fraction(noise: str, final_lr_fraction: float | None) -> float:
    """Sampled ε: decay to 1 % (averages out the noise). Expected: the loss is deterministic, keep lr
    constant (the weakest data direction of an ill-conditioned problem needs every step it can get)."""
    if final_lr_fraction is None:
        return 0.01 if noise == "sampled" else 1.0
    if not 0.0 <= float(final_lr_fraction) <= 1.0:
        raise InvalidParameterError(f"final_lr_fraction must be in [0, 1]; got {final_lr_fraction}")
    return float(final_lr_fraction)


def _check_training(steps, lr, noise, noise_draws, restarts, eval_draws, batch_size, clusters) -> None:
    if int(steps) != steps or steps < 1:
        raise InvalidParameterError(f"steps must be an integer >= 1; got {steps}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise InvalidParameterError(f"lr must be a positive number; got {lr}")
    if noise not in NOISE_MODES:
        raise InvalidParameterError(f"noise must be one of {', '.join(NOISE_MODES)}; got {noise!r}")
    if noise == "expected" and clusters != 1:
        raise InvalidParameterError("noise='expected' (closed-form mean over ε) exists only for clusters = 1")
    if int(noise_draws) < 1 or int(restarts) < 1 or int(eval_draws) < 1:
        raise InvalidParameterError(
            f"noise_draws, restarts and eval_draws must be >= 1; got {noise_draws}, {restarts}, {eval_draws}")
    if batch_size is not None and int(batch_size) < 1:
        raise InvalidParameterError(f"batch_size must be >= 1 or None; got {batch_size}")


@single_thread()
def train_subspace_dae(data, rank: int, clusters: int = 1, *, steps: int = 400, lr: float = 0.05,
                       seed: int = 0, t_range: Sequence[float] = DEFAULT_T_RANGE, noise: str = "sampled",
                       noise_draws: int = 4, antithetic: bool = True, batch_size: int | None = 512,
                       restarts: int = 1, eval_draws: int = 8, final_lr_fraction: float | None = None) -> DAEResult:
    """Train the talk's parameterized denoiser on ``data`` (N, d) with the DAE loss
    ``E_t E_{x0,ε} ‖x_U(x_t, t) − x0‖²``, t ~ U(t_range).

    Each step takes a minibatch of ``batch_size`` training points (all if N is smaller or it is None),
    ``noise_draws`` draws of (t, ε) per point (with ``antithetic``, each ε also as −ε: an unbiased
    variance reduction), and one Adam step on the free matrix whose QR factor is ``[U_1 … U_K]``; the
    learning rate follows a cosine from ``lr`` to ``final_lr_fraction``·lr (default 1 % with sampled ε,
    constant with ``noise="expected"``). ``noise="expected"`` (K = 1 only) replaces the sampled (t, ε) by
    the loss's exact mean over ε and t (closed form in ε, midpoint rule in t), so training is
    deterministic. ``restarts`` runs independent initialisations side by side and keeps the one with the
    lowest evaluation loss (K > 1: the loss is non-convex and a start can end in a local minimum where
    each U_k holds directions of several true subspaces); ``all_bases`` keeps every restart's bases.
    """
    x = _as_data(data)
    n, d = x.shape
    _check_rank(rank, clusters, d)
    lo, hi = _check_t_range(t_range)
    _check_training(steps, lr, noise, noise_draws, restarts, eval_draws, batch_size, clusters)
    steps, clusters, rank, restarts = int(steps), int(clusters), int(rank), int(restarts)
    frac = _default_lr_fraction(noise, final_lr_fraction)
    batch = n if batch_size is None else min(n, int(batch_size))
    xs = x[None].expand(restarts, n, d)
    w = torch.full((restarts, n), 1.0 / n, dtype=DTYPE)
    bases, curves, final = _fit(xs, w, rank, clusters, steps, float(lr), seed, lo, hi, noise, int(noise_draws),
                                bool(antithetic), batch, int(eval_draws), frac)
    best = int(np.argmin(final))
    config = dict(rank=rank, clusters=clusters, steps=steps, lr=float(lr), seed=seed, t_range=[lo, hi],
                  noise=noise, noise_draws=int(noise_draws), antithetic=bool(antithetic), batch_size=batch,
                  restarts=restarts, samples=n, dim=d, final_lr_fraction=frac)
    return DAEResult(bases[best], curves[best].tolist(), float(final[best]), final.tolist(), config, bases)

# ----------------------------------------------------------------------------------------------
# Posterior mean: closed form vs Monte Carlo
# ----------------------------------------------------------------------------------------------

@single_thread()
def posterior_mean_monte_carlo(model: MoLRG, x_t: torch.Tensor, alpha_bar: float, samples: int = 100_000,
                               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised importance estimate of ``E[x0 | x_t]``: draw ``samples`` x0 from the prior and weight
    each by ``p(x_t | x0) ∝ exp(−‖x_t − √ᾱ x0‖² / (2(1−ᾱ)))``. Returns the estimate (n, d) and the
    effective sample size of the weights for each row (n,)."""
    a2 = float(alpha_bar)
    if not 0.0 < a2 < 1.0:
        raise InvalidParameterError(f"alpha_bar must be in (0, 1); got {alpha_bar}")
    if int(samples) < 1:
        raise InvalidParameterError(f"samples must be >= 1; got {samples}")
    x_t = x_t.to(DTYPE)
    x0 = model.sample(int(samples), generator).to(DTYPE)            # (M, d)
    sq = (x_t.pow(2).sum(-1)[:, None] - 2 * a2 ** 0.5 * x_t @ x0.T + a2 * x0.pow(2).sum(-1)[None])
    logw = -sq / (2 * (1 - a2))                                      # (n, M)
    w = torch.softmax(logw, dim=1)
    return w @ x0, 1.0 / w.pow(2).sum(1)


# ----------------------------------------------------------------------------------------------
# Phase transition in N vs r
# ----------------------------------------------------------------------------------------------

@dataclass
class PhaseResult:
    """Subspace error on a grid of (rank r, samples N), K = 1, dimension d.

    ``distance[i, j]``: mean over trials of ``‖U Uᵀ − U_g U_gᵀ‖_F`` for ``r_values[i]``, ``n_values[j]``
    with the fit named by ``fit`` ("dae" or "pca"); ``normalized`` = distance / √(2r) (1 = orthogonal);
    ``pca_distance``: the same for PCA (always computed, it is cheap); ``per_trial``: (R, N, trials);
    ``bound[i, j] = √(max(r − N, 0))``, the talk's lower bound for N < r; ``cond_per_trial``: λ_r/λ_1 of
    the data's Gram matrix (0 for N < r; small values make gradient training slow), ``cond`` its mean."""

    dim: int
    r_values: list[int]
    n_values: list[int]
    trials: int
    fit: str
    distance: np.ndarray
    normalized: np.ndarray
    pca_distance: np.ndarray
    per_trial: np.ndarray
    bound: np.ndarray
    cond_per_trial: np.ndarray
    config: dict = field(default_factory=dict)

    @property
    def cond(self) -> np.ndarray:
        return self.cond_per_trial.mean(-1)

    def to_dict(self) -> dict:
        return dict(dim=self.dim, r_values=self.r_values, n_values=self.n_values, trials=self.trials,
                    fit=self.fit, distance=_round(self.distance), normalized=_round(self.normalized),
                    pca_distance=_round(self.pca_distance), bound=_round(self.bound),
                    per_trial=_round(self.per_trial), cond=[[float(f"{c:.3g}") for c in row] for row in self.cond],
                    config=self.config)


@single_thread()
def phase_transition(dim: int, r_values: Sequence[int], n_values: Sequence[int], trials: int = 3, seed: int = 0,
                     fit: str = "dae", steps: int = 3000, lr: float = 0.3, noise: str = "expected",
                     noise_draws: int = 4, t_range: Sequence[float] = DEFAULT_T_RANGE,
                     final_lr_fraction: float | None = None) -> PhaseResult:
    """For each rank r and sample count N, draw N points from a random rank-r Gaussian (K = 1) in R^dim,
    fit a rank-r subspace and record its distance to the ground truth.

    ``fit="dae"`` trains the parameterized denoiser in every cell (all N of one (r, trial) side by side,
    same trainer as :func:`train_subspace_dae`); ``fit="pca"`` uses the PCA solution that the DAE loss is
    equivalent to. PCA distances are recorded in both cases. The default ``noise="expected"`` trains on
    the DAE loss's exact mean over ε and t: near N ≈ r the loss is very ill-conditioned (λ_r/λ_1 of YYᵀ
    can be 1e-4 at N = r), so gradient training needs thousands of steps there even without noise, and
    sampled ε would need far more. ``cond[i, j]``: mean λ_r/λ_1 of the cell's data."""
    if fit not in ("dae", "pca"):
        raise InvalidParameterError(f"fit must be 'dae' or 'pca'; got {fit!r}")
    if int(trials) != trials or trials < 1:
        raise InvalidParameterError(f"trials must be an integer >= 1; got {trials}")
    r_values, n_values = [int(r) for r in r_values], [int(n) for n in n_values]
    if not r_values or not n_values:
        raise InvalidParameterError("r_values and n_values must be non-empty")
    for r in r_values:
        _check_rank(r, 1, int(dim))
    for n in n_values:
        if n < 1:
            raise InvalidParameterError(f"every N must be >= 1; got {n}")
    lo, hi = _check_t_range(t_range)
    if fit == "dae":
        _check_training(steps, lr, noise, noise_draws, 1, 1, None, 1)
        frac = _default_lr_fraction(noise, final_lr_fraction)
    trials, n_max = int(trials), max(n_values)
    per = np.zeros((len(r_values), len(n_values), trials))
    per_pca = np.zeros_like(per)
    cond = np.zeros_like(per)
    # padded data: cell j sees the first N_j points of the pool, weighted 1/N_j (0 on the rest)
    w = torch.tensor([[1.0 / n if i < n else 0.0 for i in range(n_max)] for n in n_values], dtype=DTYPE)
    for i, r in enumerate(r_values):
        for k in range(trials):
            cell_seed = _derive_seed(seed, 1000 * r + k)
            model = MoLRG.random(int(dim), r, 1, seed=_derive_seed(cell_seed, 3))
            truth = model.bases[0]
            # nested samples: N grows along a row
            pool = model.sample(n_max, torch.Generator().manual_seed(_derive_seed(cell_seed, 4)))
            for j, n in enumerate(n_values):
                per_pca[i, j, k] = subspace_distance(pca_subspace(pool[:n], r), truth)
                sv = torch.linalg.svdvals(pool[:n])
                cond[i, j, k] = float(sv[r - 1] ** 2 / sv[0] ** 2) if n >= r else 0.0
            if fit == "dae":
                xs = pool[None].expand(len(n_values), n_max, int(dim)) * (w > 0)[..., None]
                bases, _, _ = _fit(xs, w, r, 1, int(steps), float(lr), cell_seed, lo, hi, noise, int(noise_draws),
                                   True, None, 1, frac)
                per[i, :, k] = [subspace_distance(bases[j, 0], truth) for j in range(len(n_values))]
            else:
                per[i, :, k] = per_pca[i, :, k]
    dist = per.mean(-1)
    scale = np.sqrt(2.0 * np.array(r_values, dtype=float))[:, None]
    bound = np.sqrt(np.maximum(np.array(r_values)[:, None] - np.array(n_values)[None, :], 0)).astype(float)
    config = dict(dim=int(dim), trials=trials, seed=seed, fit=fit, t_range=[lo, hi])
    if fit == "dae":
        config.update(steps=int(steps), lr=float(lr), noise=noise, noise_draws=int(noise_draws),
                      final_lr_fraction=frac)
    return PhaseResult(int(dim), r_values, n_values, trials, fit, dist, dist / scale, per_pca.mean(-1),
                       per, bound, cond, config)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    return Figure(figsize=(w, h), dpi=110)


def plot_phase_heatmap(res: PhaseResult, path: Path) -> None:
    fig = _figure(6.0, 4.4)
    ax = fig.add_subplot()
    im = ax.imshow(res.normalized, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                   extent=(-0.5, len(res.n_values) - 0.5, -0.5, len(res.r_values) - 0.5))
    ax.set_xticks(range(len(res.n_values)), [str(n) for n in res.n_values],
                  fontsize=7 if len(res.n_values) > 12 else 9)
    ax.set_yticks(range(len(res.r_values)), [str(r) for r in res.r_values])
    # staircase between the last cell with N < r and the first with N >= r in every row
    xs, ys = [], []
    for i, r in enumerate(res.r_values):
        x = sum(n < r for n in res.n_values) - 0.5
        xs += [x, x]
        ys += [i - 0.5, i + 0.5]
    ax.plot(xs, ys, "w--", lw=1.2, label="N = r")
    ax.set_xlabel("number of training samples N")
    ax.set_ylabel("intrinsic rank r")
    ax.set_title(f"Subspace error ‖UUᵀ−U*U*ᵀ‖_F/√(2r), d = {res.dim}, fit = {res.fit.upper()}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.colorbar(im, ax=ax, label="normalised distance")
    fig.tight_layout()
    fig.savefig(path)


def plot_phase_lines(res: PhaseResult, path: Path, show: Sequence[int] | None = None) -> None:
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot()
    if show is None:
        last = len(res.r_values) - 1
        idx = sorted({min(1, last), len(res.r_values) // 2, last})  # skip r = r_values[0] (often 1)
    else:
        idx = [res.r_values.index(r) for r in show]
    n = np.array(res.n_values)
    for c, i in enumerate(idx):
        r, colour = res.r_values[i], f"C{c}"
        ax.plot(n, res.distance[i], "o-", color=colour, ms=3, label=f"r = {r} ({res.fit.upper()})")
        if res.fit != "pca":
            ax.plot(n, res.pca_distance[i], "x", color=colour, ms=4, alpha=0.7)
        below = n < r
        nb = np.concatenate([n[below], [r]]) if below.any() else n[below]
        ax.plot(nb, np.sqrt(np.maximum(r - nb, 0)), ":", color=colour, lw=1.5)
    ax.plot([], [], "k:", label="√(r − N) lower bound")
    if res.fit != "pca":
        ax.plot([], [], "kx", label="PCA")
    ax.set_xlabel("number of training samples N")
    ax.set_ylabel("‖UUᵀ − U*U*ᵀ‖_F")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Subspace error vs N (d = {res.dim}, mean of {res.trials} trials)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_loss_curves(curves: dict[str, list[float]], path: Path) -> None:
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        c = np.asarray(curve)
        w = max(1, len(c) // 50)
        smooth = np.convolve(c, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w - 1, smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("DAE loss (moving average)")
    ax.set_title("DAE training of the parameterized denoiser", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------------
# The whole analysis
# ----------------------------------------------------------------------------------------------

def _round(a, nd: int = 5):
    if isinstance(a, np.ndarray):
        return np.round(a.astype(float), nd).tolist()
    if isinstance(a, torch.Tensor):
        return _round(a.detach().cpu().numpy(), nd)
    return round(float(a), nd)


def _settings(quick: bool) -> dict:
    if quick:
        return dict(
            posterior=dict(dim=8, rank=2, alpha_bars=[0.3, 0.7], points=4, samples=40_000),
            pca=dict(dim=16, rank=3, samples=100, steps=200),
            clustering=dict(dim=16, rank=2, clusters=2, samples=200, steps=300, restarts=8, noise_draws=2),
            phase=dict(dim=24, r_values=[2, 4], n_values=[1, 2, 3, 4, 6, 8], trials=1, fit="dae", steps=1500),
        )
    return dict(
        posterior=dict(dim=16, rank=3, alpha_bars=[0.1, 0.3, 0.5, 0.7, 0.9], points=8, samples=200_000),
        pca=dict(dim=48, rank=6, samples=500, steps=600),
        clustering=dict(dim=48, rank=4, clusters=2, samples=1000, steps=600, restarts=8, noise_draws=2),
        phase=dict(dim=48, r_values=[1, 2, 4, 6, 8, 10, 12, 14, 16], n_values=list(range(1, 21)), trials=3,
                   fit="dae", steps=3000),
    )


def _posterior_check(cfg: dict, seed: int) -> dict:
    rows = []
    for clusters in (1, 2):
        model = MoLRG.random(cfg["dim"], cfg["rank"], clusters, seed=_derive_seed(seed, 10 + clusters))
        for a2 in cfg["alpha_bars"]:
            g = torch.Generator().manual_seed(_derive_seed(seed, 100 * clusters + int(1000 * a2)))
            x0 = model.sample(cfg["points"], g)
            x_t = a2 ** 0.5 * x0 + (1 - a2) ** 0.5 * torch.randn(x0.shape, generator=g, dtype=DTYPE)
            exact = model.posterior_mean(x_t, a2)
            mc, ess = posterior_mean_monte_carlo(model, x_t, a2, cfg["samples"], g)
            rel = (mc - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-12)
            rows.append(dict(clusters=clusters, alpha_bar=a2, max_relative_error=_round(rel.max()),
                             mean_relative_error=_round(rel.mean()), min_ess=_round(ess.min(), 1)))
    worst = max(r["max_relative_error"] for r in rows)
    return dict(settings=cfg, rows=rows, worst_relative_error=worst)


def _pca_check(cfg: dict, seed: int) -> tuple[dict, list[float]]:
    model = MoLRG.random(cfg["dim"], cfg["rank"], 1, seed=_derive_seed(seed, 21))
    data = model.sample(cfg["samples"], torch.Generator().manual_seed(_derive_seed(seed, 22)))
    dae = train_subspace_dae(data, cfg["rank"], 1, steps=cfg["steps"], seed=_derive_seed(seed, 23))
    exact = train_subspace_dae(data, cfg["rank"], 1, steps=cfg["steps"], seed=_derive_seed(seed, 23),
                               noise="expected")
    pca = pca_subspace(data, cfg["rank"])
    truth = model.bases[0]
    r = cfg["rank"]
    out = dict(settings=cfg, dae_vs_pca_distance=_round(subspace_distance(dae.basis, pca)),
               dae_vs_pca_largest_angle_deg=_round(math.degrees(largest_principal_angle(dae.basis, pca)), 3),
               dae_expected_noise_vs_pca_distance=_round(subspace_distance(exact.basis, pca), 8),
               dae_vs_truth_distance=_round(subspace_distance(dae.basis, truth)),
               pca_vs_truth_distance=_round(subspace_distance(pca, truth)),
               random_subspace_distance_scale=_round(math.sqrt(2 * r * (1 - r / cfg["dim"]))),
               dae_final_loss=_round(dae.final_loss))
    return out, dae.loss_curve


def _clustering_check(cfg: dict, seed: int) -> tuple[dict, list[float]]:
    k, r = cfg["clusters"], cfg["rank"]
    model = MoLRG.random(cfg["dim"], r, k, seed=_derive_seed(seed, 31))
    data = model.sample(cfg["samples"], torch.Generator().manual_seed(_derive_seed(seed, 32)))
    dae = train_subspace_dae(data, r, k, steps=cfg["steps"], seed=_derive_seed(seed, 33), restarts=cfg["restarts"],
                             noise_draws=cfg["noise_draws"])
    perm, dists = match_subspaces(dae.bases, model.bases)
    # cluster assignment by the largest projection, learned (matched) vs true subspaces
    true_lab = torch.einsum("kdr,nd->nkr", model.bases, data).pow(2).sum(-1).argmax(1)
    learned = dae.bases[list(perm)]
    lab = torch.einsum("kdr,nd->nkr", learned, data).pow(2).sum(-1).argmax(1)
    # the subspace-clustering objective (1/N) Σ_k Σ_{i∈C_k} ‖U_kᵀx_i‖² at the learned and true bases
    def objective(b):
        return float(torch.einsum("kdr,nd->nkr", b, data).pow(2).sum(-1).max(1).values.mean())
    per_restart = [max(match_subspaces(b, model.bases)[1]) for b in dae.all_bases]
    out = dict(settings=cfg, matched_permutation=perm, per_cluster_distance=[_round(x) for x in dists],
               restart_max_cluster_distance=[_round(x) for x in per_restart],
               restarts_recovering_all_subspaces=int(sum(x < 0.1 for x in per_restart)),
               per_cluster_largest_angle_deg=[
                   _round(math.degrees(largest_principal_angle(learned[i], model.bases[i])), 3) for i in range(k)],
               assignment_accuracy=_round(float((lab == true_lab).double().mean())),
               clustering_objective_learned=_round(objective(dae.bases)),
               clustering_objective_truth=_round(objective(model.bases)),
               restart_losses=[_round(x) for x in dae.restart_losses], dae_final_loss=_round(dae.final_loss),
               # the union of the learned subspaces vs the rank-K·r PCA subspace (which spans all clusters
               # but cannot separate them)
               union_distance_to_pca_rank_kr=_round(subspace_distance(
                   dae.bases.transpose(0, 1).reshape(cfg["dim"], k * r), pca_subspace(data, k * r))))
    return out, dae.loss_curve


def _phase_summary(res: PhaseResult, tol: float = 0.1) -> dict:
    below, above, slow, above_pca = [], [], [], []
    for i, r in enumerate(res.r_values):
        for j, n in enumerate(res.n_values):
            if n < r:
                below.append(float(res.per_trial[i, j].min() - res.bound[i, j]))
            else:
                above.append(float(res.per_trial[i, j].max()))
                above_pca.append(float(res.pca_distance[i, j]))
                for k in range(res.trials):
                    if res.per_trial[i, j, k] > tol:
                        slow.append(dict(r=r, n=n, trial=k, distance=_round(res.per_trial[i, j, k]),
                                         lambda_ratio=float(f"{res.cond_per_trial[i, j, k]:.3g}")))
    cells_at = sum(n >= r for r in res.r_values for n in res.n_values) * res.trials
    return dict(min_margin_over_bound_n_below_r=_round(min(below)) if below else None,
                max_distance_n_at_least_r=_round(max(above)) if above else None,
                median_distance_n_at_least_r=_round(float(np.median(above))) if above else None,
                max_pca_mean_distance_n_at_least_r=float(f"{max(above_pca):.3g}") if above else None,
                fits_n_at_least_r=cells_at, tolerance=tol, fits_n_at_least_r_above_tolerance=slow,
                max_abs_fit_minus_pca_mean_distance=_round(float(np.abs(res.distance - res.pca_distance).max())))


@single_thread()
def run_molrg_analysis(out_dir, quick: bool = False, *, seed: int = 0, command: str | None = None) -> dict:
    """Run the MoLRG checks and write ``report.json``, ``report.md`` and PNG figures into ``out_dir``.

    (a) closed-form posterior mean vs a Monte-Carlo estimate (K = 1, 2); (b) K = 1: the trained DAE
    subspace vs PCA; (c) K = 2: DAE recovery of both subspaces (subspace-clustering equivalence);
    (d) the N-vs-r phase transition with the trained DAE. ``quick`` shrinks every part (seconds).
    Returns the report as a dict (the content of ``report.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _settings(bool(quick))
    if command is None:
        command = f"shallowmark analyze molrg --out {out}" + (" --quick" if quick else "")
    timings = {}
    t0 = time.perf_counter()

    t = time.perf_counter()
    posterior = _posterior_check(cfg["posterior"], seed)
    timings["posterior_mean"] = time.perf_counter() - t

    t = time.perf_counter()
    pca, curve1 = _pca_check(cfg["pca"], seed)
    timings["dae_vs_pca"] = time.perf_counter() - t

    t = time.perf_counter()
    clus, curve2 = _clustering_check(cfg["clustering"], seed)
    timings["subspace_clustering"] = time.perf_counter() - t

    t = time.perf_counter()
    ph = cfg["phase"]
    phase = phase_transition(ph["dim"], ph["r_values"], ph["n_values"], trials=ph["trials"], seed=seed,
                             fit=ph["fit"], steps=ph["steps"])
    timings["phase_transition"] = time.perf_counter() - t

    figures = dict(heatmap="phase_transition_heatmap.png", lines="phase_transition_lines.png",
                   loss="dae_loss_curves.png")
    plot_phase_heatmap(phase, out / figures["heatmap"])
    plot_phase_lines(phase, out / figures["lines"])
    plot_loss_curves({f"K=1 (d={cfg['pca']['dim']}, r={cfg['pca']['rank']})": curve1,
                      f"K=2 (d={cfg['clustering']['dim']}, r={cfg['clustering']['rank']})": curve2},
                     out / figures["loss"])
    timings["total"] = time.perf_counter() - t0

    report = dict(
        analysis="molrg", quick=bool(quick), seed=seed, command=command,
        python_api=f"shallowmark.research.molrg_theory.run_molrg_analysis({str(out)!r}, quick={bool(quick)}, seed={seed})",
        torch_version=torch.__version__, dtype="float64",
        schedule="t ~ U(t_min, t_max), alpha_t = cos(pi t / 2), beta_t = sin(pi t / 2)",
        t_range=list(DEFAULT_T_RANGE),
        posterior_mean=posterior, dae_vs_pca=pca, subspace_clustering=clus,
        phase_transition=dict(phase.to_dict(), summary=_phase_summary(phase)),
        figures=figures, timings_s={k: round(v, 2) for k, v in timings.items()},
    )
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report


def _markdown(rep: dict) -> str:
    lines = [
        "# MoLRG analysis" + (" (quick)" if rep["quick"] else ""),
        "",
        f"Reproduce: `{rep['command']}` (seed {rep['seed']}, float64, torch {rep['torch_version']}). "
        f"Total time {rep['timings_s']['total']} s. All numbers are also in `report.json`.",
        "",
        "Data: mixtures of low-rank Gaussians p(x) = Σ_k π_k N(0, U_k U_kᵀ), orthonormal and mutually "
        "orthogonal U_k ∈ R^(d×r). Denoiser: x_U(x_t, t) = α_t/(α_t²+β_t²) Σ_k w_k U_k U_kᵀ x_t (the talk's "
        "parameterization), trained by Adam on the DAE loss E_t E_(x0,ε) ‖x_U(x_t, t) − x0‖² with "
        f"t ~ U{tuple(rep['t_range'])}, α_t = cos(πt/2), β_t = sin(πt/2), [U_1 … U_K] the Q factor of a free matrix.",
        "",
    ]
    lines += _md_posterior(rep["posterior_mean"]) + _md_pca(rep["dae_vs_pca"])
    lines += _md_clustering(rep["subspace_clustering"]) + _md_phase(rep)
    return "\n".join(lines)


def _md_posterior(p: dict) -> list[str]:
    """(a): the closed-form posterior mean against Monte Carlo."""
    return _section(
        "(a) Posterior mean: closed form vs Monte Carlo",
        f"Self-normalised importance sampling with {p['settings']['samples']:,} prior draws weighted by "
        f"p(x_t | x0); d = {p['settings']['dim']}, r = {p['settings']['rank']}, "
        f"{p['settings']['points']} points x_t per row. Error: ‖MC − closed form‖ / ‖closed form‖.",
        "",
        *markdown_table(["K", "ᾱ", "max rel. error", "mean rel. error", "min ESS"],
                        ([r["clusters"], r["alpha_bar"], f"{r['max_relative_error']:.4f}",
                          f"{r['mean_relative_error']:.4f}", f"{r['min_ess']:.0f}"] for r in p["rows"])),
        "",
        f"Worst row: {p['worst_relative_error']:.2%}. The residual is Monte-Carlo error (it falls with the "
        "effective sample size), so the lemma's closed form is confirmed for K = 1 and K = 2.",
        "",
    )


def _section(title: str, *lines: str) -> list[str]:
    """A report section: its heading, a blank line, then ``lines``."""
    return [f"## {title}", "", *lines]


def _sizes(s: dict) -> str:
    """The problem size of a DAE training run, as the report states it."""
    return f"d = {s['dim']}, r = {s['rank']}, N = {s['samples']}, {s['steps']}"


def _md_pca(c: dict) -> list[str]:
    """(b): K = 1, the DAE's subspace against PCA's."""
    return _section(
        "(b) K = 1: DAE training finds the PCA subspace",
        f"{_sizes(c['settings'])} Adam steps.",
        "",
        f"- sampled ε: ‖U Uᵀ − U_pca U_pcaᵀ‖_F = {c['dae_vs_pca_distance']:.4f} (largest principal angle "
        f"{c['dae_vs_pca_largest_angle_deg']:.3f}°); a random rank-r subspace sits at ≈ "
        f"{c['random_subspace_distance_scale']:.2f}. The residual is SGD noise from the sampled ε.",
        f"- loss averaged exactly over ε (closed form) and t (quadrature), so training is deterministic: "
        f"distance to PCA {c['dae_expected_noise_vs_pca_distance']:.2e}.",
        f"- distance to the true subspace: DAE {c['dae_vs_truth_distance']:.4f}, PCA {c['pca_vs_truth_distance']:.2e} "
        "(noiseless rank-r data with N ≥ r: PCA is exact).",
        "",
    )


def _md_clustering(k: dict) -> list[str]:
    """(c): K = 2, DAE training as subspace clustering."""
    return _section(
        "(c) K = 2: DAE training does subspace clustering",
        f"{_sizes(k['settings'])} steps, sampled ε, {k['settings']['restarts']} random restarts, the one with the "
        f"lowest evaluation loss kept. The loss is non-convex: {k['restarts_recovering_all_subspaces']} of "
        f"{k['settings']['restarts']} restarts recovered both subspaces (largest per-cluster distance per restart "
        f"{k['restart_max_cluster_distance']}, evaluation losses {k['restart_losses']}). A restart that fails "
        "typically stops in a local minimum where each U_k holds directions of both true subspaces (distance "
        "√2 per cluster for one swapped direction) and its loss is higher; "
        + ("the kept (lowest-loss) run is a recovering one." if max(k["per_cluster_distance"]) < 0.1 else
           "here the kept (lowest-loss) run did NOT recover the subspaces."),
        "",
        f"- per-cluster ‖U_k U_kᵀ − U*_k U*_kᵀ‖_F after matching: {k['per_cluster_distance']} (largest angles "
        f"{k['per_cluster_largest_angle_deg']}°; orthogonal subspaces would give √(2r) = "
        f"{math.sqrt(2 * k['settings']['rank']):.2f}).",
        f"- points assigned to the same cluster by the learned and the true subspaces (largest ‖U_kᵀx‖): "
        f"{k['assignment_accuracy']:.1%}.",
        "- subspace-clustering objective (1/N) Σ_k Σ_(i∈C_k) ‖U_kᵀx_i‖²: "
        f"learned {k['clustering_objective_learned']:.4f}, true subspaces {k['clustering_objective_truth']:.4f}.",
        "",
    )


def _md_phase(rep: dict) -> list[str]:
    """(d): the phase transition in N vs r, and the figures."""
    ph = rep["phase_transition"]
    s, cfg = ph["summary"], ph["config"]
    lines = ["## (d) Phase transition in N vs r (K = 1)", ""]
    if ph["fit"] == "dae":
        lines.append(
            f"d = {ph['dim']}, r ∈ {ph['r_values']}, N ∈ {ph['n_values'][0]}…{ph['n_values'][-1]}, {ph['trials']} "
            f"trial(s) per cell. Every cell is fitted by training the DAE ({cfg['steps']} Adam steps, lr {cfg['lr']}, "
            f"{'loss averaged exactly over ε and t' if cfg['noise'] == 'expected' else 'sampled ε'}); "
            "PCA (the DAE loss's global solution) is computed beside it (crosses in the line plot).")
    else:
        lines.append(f"d = {ph['dim']}, r ∈ {ph['r_values']}, N ∈ {ph['n_values'][0]}…{ph['n_values'][-1]}, "
                     f"{ph['trials']} trial(s) per cell, every cell fitted by PCA (the DAE loss's global solution).")
    slow = s["fits_n_at_least_r_above_tolerance"]
    n_ok = s["fits_n_at_least_r"] - len(slow)
    lines += [
        "",
        f"![heatmap]({rep['figures']['heatmap']})",
        "",
        f"![lines]({rep['figures']['lines']})",
        "",
        f"- N ≥ r: {n_ok} of {s['fits_n_at_least_r']} fits are within {s['tolerance']} of the true subspace "
        f"(median distance {s['median_distance_n_at_least_r']}, largest {s['max_distance_n_at_least_r']}).",
    ]
    if slow:
        lines.append(
            "  Not yet converged: " + ", ".join(f"r={x['r']}, N={x['n']} (trial {x['trial']}: distance "
                                               f"{x['distance']}, λ_r/λ_1 = {x['lambda_ratio']})"
                                               for x in slow[:12]) + ("…" if len(slow) > 12 else "")
            + ". The loss is flat along the weakest data direction when λ_r/λ_1 of the data's Gram matrix is "
            "tiny (typical at N ≈ r; `cond` in report.json), so gradient descent converges slowly there; the "
            f"global solution (PCA) reaches at most {s['max_pca_mean_distance_n_at_least_r']} in the N ≥ r cells.")
    lines += [
        f"- N < r: the smallest margin of a fit over the talk's lower bound √(r − N) is "
        f"{s['min_margin_over_bound_n_below_r']}. The r − N directions the data do not reach are unconstrained, "
        "so a fit sits near a random completion, ‖·‖_F² ≈ 2(r − N)(1 − (r − N)/(d − N)).",
        f"- largest |mean fit distance − mean PCA distance| over the grid: {s['max_abs_fit_minus_pca_mean_distance']}.",
        "",
        f"![loss]({rep['figures']['loss']})",
        "",
    ]
    return lines
