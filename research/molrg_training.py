"""``shallowmark analyze molrg-training``: the talk's N-vs-r phase transition with real training.

The ``molrg`` analysis trains its phase grid on the DAE loss averaged exactly over ε and t, which for
K = 1 is the PCA objective, so its heatmap is gradient ascent on PCA by construction. Here nothing is
averaged analytically:

(a) **Parameterized denoiser, sampled noise.** The talk's denoiser
    ``x_U(x_t, t) = α_t/(α_t²+β_t²) Σ_k w_k(x_t) U_k U_kᵀ x_t`` is trained by Adam on the DAE loss
    ``‖x_U(α_t x0 + β_t ε, t) − x0‖²`` with a fresh t ~ U(t_range) and ε ~ N(0, I) at every step
    (:func:`~shallowmark.research.molrg_theory.train_subspace_dae`'s trainer with ``noise="sampled"``),
    for K = 1 and K = 2, on a grid of ranks r and N/r, several trials per cell. N is the number of
    samples *per component* (exactly N from each subspace, K·N in all). K = 2 is non-convex: every
    cell trains :attr:`MolrgTrainingConfig.phase_restarts` random starts and keeps the one with the
    lowest training loss, evaluated on one common draw of (t, ε) for all of them (so the choice is
    not decided by evaluation noise); that loss is also evaluated at the true subspaces, which tells
    an optimisation failure (learned loss above the truth's) from a statistical one.
(b) **A generic network.** A time-conditioned MLP predicting x0 (:class:`BatchedMLP`), trained by
    ordinary denoising score matching ``‖f(x_t, t) − x0‖²`` (the DSM loss in the x0 parameterization,
    weight β_t⁴/α_t² on the score), on N samples per component of a K = 2 MoLRG in d = 48, for N from
    r/4 to 64 r; several seeds (each: a new MoLRG, data, initialisation). Against N it measures
    (i) the subspace error of the denoiser's Jacobian ∂f/∂x_t (its output subspace at held-out noisy
    points of each true component, at t = ``jacobian_t``: :func:`jacobian_subspace`), (ii) the relative MSE to the
    exact posterior mean E[x0 | x_t] of the true MoLRG (:meth:`MoLRG.posterior_mean`; the score is
    (α_t E[x0|x_t] − x_t)/β_t²), and (iii) the DSM loss on fresh samples vs on the training samples.
    The empirical optimum (the posterior mean of the training set, the global minimizer of the DSM
    loss on it: perfect memorization) is measured the same way beside it.

:func:`run_molrg_training_analysis` runs both and writes report.md, report.json and the figures.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from shallowmark.core.molrg import MoLRG
from shallowmark.errors import InvalidParameterError
from shallowmark.reports import markdown_table, pyplot, save_figure, write_report
from shallowmark.research.molrg_theory import (
    DEFAULT_T_RANGE,
    DTYPE,
    _check_t_range,
    _derive_seed,
    _fit,
    _per_sample_loss,
    _round,
    match_subspaces,
    pca_subspace,
    schedule,
    subspace_denoiser,
)
from shallowmark.research.threads import single_thread

#: Terms (point × noise draw) of every fixed-draw loss evaluation.
EVAL_TERMS = 4096


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MolrgTrainingConfig:
    """Everything the analysis depends on (all of it goes into report.json).

    Attributes:
        dim: ambient dimension d of both parts.
        phase_ranks_k1, phase_ranks_k2: ranks r of the phase grid for K = 1 and K = 2.
        phase_ratios: N/r of the grid (N per component); every N/r · r must be a whole number.
        phase_trials: independent (MoLRG, data, initialisation) trials per cell.
        phase_restarts: random starts per cell for K = 2 (the lowest training loss is kept; K = 1,
            whose loss has no spurious local minima, trains one start).
        phase_steps, phase_steps_k2: Adam steps of every K = 1 and K = 2 cell. K = 1 near N = r needs
            many (the loss is flat along the weakest data direction); K = 2 spends its budget on
            restarts instead, which it needs more (measured at r = 4, N/r = 2 and 4, 3 trials × 16
            starts: a start recovers both subspaces in 8 % / 25 % of the cases after 1000 steps and
            15 % / 25 % after 2000, so 16 × 1000 steps succeed about as often as 8 × 2000).
        phase_lr: Adam's learning rate (cosine-decayed to 1 %).
        phase_noise_draws: (t, ε) draws per point and step (each also as −ε).
        net_clusters, net_ranks: K and the ranks r of the network part.
        net_ratios: N/r of the network part (N per component); N/r · r must be whole.
        net_seeds: seeds per (r, N); each draws a new MoLRG, training set and initialisation.
        width, depth: the MLP's hidden width and number of hidden layers.
        net_steps, batch, net_lr: DSM training (Adam, cosine-decayed to 5 %), the same for every N.
        eval_t: noise levels t at which the distance to the exact posterior mean is measured.
        jacobian_t: noise level of the Jacobian subspace measurement.
        eval_points: held-out samples for the distance to the exact posterior mean.
        jacobian_points: held-out samples per component for the Jacobian.
        tolerance: an error below it counts as recovered (both parts' transition rule).
        t_range: training noise levels t ~ U(t_range); α_t = cos(πt/2), β_t = sin(πt/2).
        seed: shifts every seed of the analysis.
    """

    dim: int = 48
    phase_ranks_k1: tuple = (4, 8, 12, 16)
    phase_ranks_k2: tuple = (4, 8)
    phase_ratios: tuple = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
    phase_trials: int = 3
    phase_restarts: int = 16
    phase_steps: int = 2000
    phase_steps_k2: int = 1000
    phase_lr: float = 0.3
    phase_noise_draws: int = 1
    net_clusters: int = 2
    net_ranks: tuple = (4, 8)
    net_ratios: tuple = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    net_seeds: int = 3
    width: int = 128
    depth: int = 3
    net_steps: int = 3000
    batch: int = 128
    net_lr: float = 2e-3
    eval_t: tuple = (0.2, 0.4, 0.6, 0.8)
    jacobian_t: float = 0.3
    eval_points: int = 2048
    jacobian_points: int = 64
    tolerance: float = 0.1
    t_range: tuple = DEFAULT_T_RANGE
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> "MolrgTrainingConfig":
        """A small grid, a tiny network and few steps: seconds, for the tests."""
        base = dict(dim=16, phase_ranks_k1=(2, 4), phase_ranks_k2=(2,), phase_ratios=(0.5, 1.0, 2.0, 4.0),
                    phase_trials=1, phase_restarts=4, phase_steps=400, phase_steps_k2=300, net_ranks=(2,),
                    net_ratios=(0.5, 2.0, 16.0), net_seeds=1, width=32, depth=2, net_steps=150, batch=32,
                    eval_t=(0.3, 0.6), eval_points=256, jacobian_points=16)
        base.update(kw)
        return cls(**base)

    def check(self) -> None:
        """Raise :class:`InvalidParameterError` naming the first bad field."""
        _whole("dim", self.dim, 2)
        for name in ("phase_trials", "phase_restarts", "phase_steps", "phase_steps_k2", "phase_noise_draws",
                     "net_clusters",
                     "net_seeds", "width", "depth", "net_steps", "batch", "eval_points", "jacobian_points"):
            _whole(name, getattr(self, name), 1)
        _whole("seed", self.seed, 0)
        for name in ("phase_lr", "net_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise InvalidParameterError(f"{name} must be a positive finite number; got {v!r}")
        for name, clusters in (("phase_ranks_k1", 1), ("phase_ranks_k2", 2), ("net_ranks", self.net_clusters)):
            _ranks(name, getattr(self, name), clusters, self.dim)
        for name, ranks in (("phase_ratios", self.phase_ranks_k1 + self.phase_ranks_k2),
                            ("net_ratios", self.net_ranks)):
            _ratios(name, getattr(self, name), ranks)
        if not self.eval_t or any(not _in_open_unit(t) for t in self.eval_t):
            raise InvalidParameterError(
                f"eval_t must be a non-empty tuple of noise levels in (0, 1); got {self.eval_t!r}")
        if not _in_open_unit(self.jacobian_t):
            raise InvalidParameterError(f"jacobian_t must be a noise level in (0, 1); got {self.jacobian_t!r}")
        if not _in_open_unit(self.tolerance):
            raise InvalidParameterError(f"tolerance must be in (0, 1) (a normalised error); got {self.tolerance!r}")
        if not isinstance(self.t_range, (tuple, list)) or len(self.t_range) != 2:
            raise InvalidParameterError(f"t_range must be a pair (t_min, t_max); got {self.t_range!r}")
        _check_t_range(self.t_range)


def _whole(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise InvalidParameterError(f"{name} must be an integer >= {lo}; got {v!r}")


def _in_open_unit(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 < v < 1.0


def _ranks(name: str, ranks, clusters: int, dim: int) -> None:
    if not isinstance(ranks, (tuple, list)) or not ranks:
        raise InvalidParameterError(f"{name} must be a non-empty tuple of ranks; got {ranks!r}")
    for r in ranks:
        _whole(f"every rank in {name}", r, 1)
        if clusters * r > dim:
            raise InvalidParameterError(
                f"{name}: K·r = {clusters}·{r} = {clusters * r} orthogonal directions do not fit in dim = {dim}")
    if list(ranks) != sorted(set(ranks)):
        raise InvalidParameterError(f"{name} must be increasing and distinct; got {ranks!r}")


def _ratios(name: str, ratios, ranks) -> None:
    if not isinstance(ratios, (tuple, list)) or not ratios:
        raise InvalidParameterError(f"{name} must be a non-empty tuple of N/r values; got {ratios!r}")
    if any(isinstance(q, bool) or not isinstance(q, (int, float)) or not q > 0 for q in ratios):
        raise InvalidParameterError(f"{name} must hold positive numbers; got {ratios!r}")
    if list(ratios) != sorted(set(ratios)):
        raise InvalidParameterError(f"{name} must be increasing and distinct; got {ratios!r}")
    for r in ranks:
        for q in ratios:
            if abs(q * r - round(q * r)) > 1e-9 or round(q * r) < 1:
                raise InvalidParameterError(
                    f"{name}: N = (N/r)·r must be a whole number >= 1 for every rank; {q}·{r} = {q * r:g}")


def _counts(ratios: Sequence[float], rank: int) -> list[int]:
    return [int(round(q * rank)) for q in ratios]


def _timed(fn: Callable, *args, **kw):
    """``fn(*args, **kw)`` and the seconds it took."""
    start = time.perf_counter()
    result = fn(*args, **kw)
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def component_pools(model: MoLRG, n: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``n`` samples of every component (K tensors (n, d)): the balanced draw, exactly n per subspace.
    A training set of N per component is the first N of each pool, so the sets are nested in N."""
    one = torch.ones(1, dtype=model.bases.dtype)
    return [MoLRG(model.bases[k:k + 1], one).sample(n, generator) for k in range(model.clusters)]


def _first(pools: list[torch.Tensor], n: int) -> torch.Tensor:
    return torch.cat([p[:n] for p in pools])


def _cluster_errors(bases: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """``‖U_k U_kᵀ − U*_k U*_kᵀ‖_F / √(2r)`` per true cluster after matching (0: recovered, 1: orthogonal)."""
    _, dists = match_subspaces(bases, truth)
    return [x / math.sqrt(2 * truth.shape[-1]) for x in dists]


def _energy_shares(bases: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Where the learned (K, d, r) bases lie, averaged over the K learned subspaces: the share of
    ‖U_k‖_F² = r inside the union of the true subspaces, and inside true subspaces other than the
    one U_k is matched to (0 for a recovered or a K = 1 fit)."""
    perm, _ = match_subspaces(bases, truth)
    # energy[k, i] = ‖U*_iᵀ U_k‖_F² / r: the share of learned U_k inside true subspace i
    energy = torch.einsum("idr,kde->kire", truth, bases).pow(2).sum((-1, -2)) / truth.shape[-1]
    own = torch.stack([energy[perm[i], i] for i in range(len(truth))]).mean()
    union = energy.sum(1).mean()
    return float(union), float(union - own)


# ----------------------------------------------------------------------------------------------
# (a) The parameterized denoiser trained with sampled noise
# ----------------------------------------------------------------------------------------------

def _fixed_draw_losses(bases: torch.Tensor, points: torch.Tensor, t_range: tuple[float, float],
                       seed: int) -> np.ndarray:
    """The DAE loss of each of the (R, K, d, r) ``bases`` on ``points``, all on one common draw of
    (t, ε), about :data:`EVAL_TERMS` terms: the restarts of a cell compared without evaluation noise."""
    g = torch.Generator().manual_seed(seed)
    x0 = points.repeat(max(8, math.ceil(EVAL_TERMS / len(points))), 1)
    lo, hi = t_range
    t = lo + (hi - lo) * torch.rand(len(x0), generator=g, dtype=DTYPE)
    eps = torch.randn(x0.shape, generator=g, dtype=DTYPE)
    r = len(bases)
    per = _per_sample_loss(bases, x0[None].expand(r, -1, -1), t[None].expand(r, -1), eps[None].expand(r, -1, -1),
                           "sampled", t_range)
    return per.mean(1).numpy()


@single_thread()
def sampled_phase_grid(dim: int, rank: int, clusters: int, n_values: Sequence[int], *, trials: int = 3,
                       restarts: int = 1, steps: int = 2000, lr: float = 0.3, noise_draws: int = 1,
                       t_range: Sequence[float] = DEFAULT_T_RANGE, seed: int = 0, tol: float = 0.1) -> dict:
    """Train the talk's parameterized denoiser with sampled (t, ε) on N = ``n_values`` samples per
    component of random rank-``rank`` K-component MoLRGs in R^dim, ``trials`` trials per N.

    Every (trial, N, restart) is one problem of one batched Adam run (the trainer of
    :func:`~shallowmark.research.molrg_theory.train_subspace_dae`, every step a fresh (t, ε) per point).
    Returns, per trial and N (arrays (trials, len(n_values))): ``error``, the normalised subspace error
    ``mean_k ‖U_k U_kᵀ − U*_k U*_kᵀ‖_F / √(2r)`` of the kept restart (lowest training loss on a common
    draw); ``max_cluster_error``; ``restart_success``, the share of restarts with error < ``tol``;
    ``loss_excess``, the kept restart's training loss minus that of the true subspaces on the same draw
    (> 0: the optimiser stopped above a better point); ``oracle``: PCA of each component's own samples
    (labels known); ``cond``: the smallest λ_r/λ_1 of a component's sample Gram matrix (0 for N < r;
    tiny values make gradient training slow); per restart (trials, len(n_values), restarts):
    ``restart_error``, and where the learned subspaces lie (:func:`_energy_shares`):
    ``restart_union_share`` inside the union of the true subspaces, ``restart_cross_share`` inside a
    true subspace other than the matched one; and ``bound`` (len(n_values)), the lower bound
    √(max(r − N, 0)/(2r)) of every fit."""
    n_values = [int(n) for n in n_values]
    if not n_values or min(n_values) < 1:
        raise InvalidParameterError(f"n_values must be non-empty and >= 1; got {n_values}")
    lo, hi = _check_t_range(t_range)
    n_max = max(n_values)
    xs, ws, cells = [], [], []
    for k in range(trials):
        cell = _derive_seed(seed, 10_000 * clusters + 100 * rank + k)
        model = MoLRG.random(dim, rank, clusters, seed=_derive_seed(cell, 1))
        pools = component_pools(model, n_max, torch.Generator().manual_seed(_derive_seed(cell, 2)))
        x = torch.cat(pools)                                          # component c in rows c·n_max …
        cells.append((cell, model, pools))
        for n in n_values:
            mask = (torch.arange(n_max) < n).repeat(clusters)
            xs += [x * mask[:, None]] * restarts                         # padding rows zero, weight 0
            ws += [mask.to(DTYPE) / (clusters * n)] * restarts
    (bases, _, _), seconds = _timed(_fit, torch.stack(xs), torch.stack(ws), rank, clusters, int(steps), float(lr),
                                    _derive_seed(seed, 10_000 * clusters + 100 * rank + 99), lo, hi, "sampled",
                                    int(noise_draws), True, None, 1, 0.01)
    bases = bases.reshape(trials, len(n_values), restarts, clusters, dim, rank)
    shape = (trials, len(n_values))
    out = {name: np.zeros(shape) for name in ("error", "max_cluster_error", "restart_success", "loss_excess",
                                              "oracle", "cond")}
    out.update({name: np.zeros(shape + (restarts,)) for name in ("restart_error", "restart_union_share",
                                                                  "restart_cross_share")})
    for k, (cell, model, pools) in enumerate(cells):
        for j, n in enumerate(n_values):
            losses = _fixed_draw_losses(torch.cat([bases[k, j], model.bases[None]]), _first(pools, n), (lo, hi),
                                        _derive_seed(cell, 3 + j))
            errs = [_cluster_errors(b, model.bases) for b in bases[k, j]]
            shares = np.array([_energy_shares(b, model.bases) for b in bases[k, j]])
            out["restart_error"][k, j] = [np.mean(e) for e in errs]
            out["restart_union_share"][k, j], out["restart_cross_share"][k, j] = shares.T
            best = int(np.argmin(losses[:-1]))
            out["error"][k, j] = np.mean(errs[best])
            out["max_cluster_error"][k, j] = max(errs[best])
            out["restart_success"][k, j] = np.mean([np.mean(e) < tol for e in errs])
            out["loss_excess"][k, j] = losses[best] - losses[-1]
            out["oracle"][k, j] = np.mean(_cluster_errors(
                torch.stack([pca_subspace(p[:n], rank) for p in pools]), model.bases))
            if n >= rank:  # the worst-conditioned component: λ_r/λ_1 of its samples' Gram matrix
                sv = [torch.linalg.svdvals(p[:n]) for p in pools]
                out["cond"][k, j] = min(float(v[rank - 1] ** 2 / v[0] ** 2) for v in sv)
    bound = np.sqrt(np.maximum(rank - np.array(n_values), 0) / (2 * rank))
    return dict(rank=rank, clusters=clusters, dim=dim, n_values=n_values,
                ratios=[n / rank for n in n_values], trials=trials, restarts=restarts, bound=bound,
                train_seconds=seconds, **out)


def transition_ratio(ratios: Sequence[float], errors: Sequence[float], tol: float) -> Optional[float]:
    """The smallest N/r from which the error stays below ``tol`` at every larger N/r of the grid
    (None if it is not below ``tol`` at the largest)."""
    ok = np.asarray(errors) < tol
    return next((float(ratios[i]) for i in range(len(ratios)) if ok[i:].all()), None)


def _phase_part(config: MolrgTrainingConfig, log: Callable[[str], None]) -> dict:
    part = {}
    for clusters, ranks in ((1, config.phase_ranks_k1), (2, config.phase_ranks_k2)):
        rows = []
        for r in ranks:
            g = sampled_phase_grid(config.dim, r, clusters, _counts(config.phase_ratios, r),
                                   trials=config.phase_trials, restarts=1 if clusters == 1 else config.phase_restarts,
                                   steps=config.phase_steps if clusters == 1 else config.phase_steps_k2,
                                   lr=config.phase_lr, noise_draws=config.phase_noise_draws,
                                   t_range=config.t_range, seed=config.seed, tol=config.tolerance)
            g["transition_ratio"] = transition_ratio(g["ratios"], g["error"].mean(0), config.tolerance)
            rows.append(g)
            log(f"(a) K={clusters} r={r}: error by N/r {np.round(g['error'].mean(0), 3).tolist()} "
                f"({g['train_seconds']:.0f} s)")
        pooled = np.mean([g["error"].mean(0) for g in rows], 0)
        part[f"k{clusters}"] = dict(
            clusters=clusters, ranks=list(ranks), ratios=list(config.phase_ratios),
            restarts=rows[0]["restarts"], steps=config.phase_steps if clusters == 1 else config.phase_steps_k2,
            mean_error_by_ratio=_round(pooled),
            transition_ratio=transition_ratio(config.phase_ratios, pooled, config.tolerance),
            error_at_n_equal_r=(_round(pooled[list(config.phase_ratios).index(1.0)])
                                if 1.0 in config.phase_ratios else None),
            rows=[_grid_json(g) for g in rows])
    return part


def _grid_json(g: dict) -> dict:
    out = {k: (_round(v) if isinstance(v, np.ndarray) else v) for k, v in g.items()}
    out["train_seconds"] = round(g["train_seconds"], 1)
    out["mean_error"] = _round(g["error"].mean(0))
    out["mean_restart_success"] = _round(g["restart_success"].mean(0), 3)
    return out


# ----------------------------------------------------------------------------------------------
# (b) A time-conditioned MLP trained by denoising score matching
# ----------------------------------------------------------------------------------------------

class BatchedMLP(nn.Module):
    """``models`` independent MLP denoisers ``x̂0 = F_j([x_t, e(t)])`` evaluated side by side (one
    batched matrix product per layer): ``depth`` hidden layers of ``width`` SiLU units;
    e(t) = (sin, cos)(π 2^i t), i < ``freqs``. Inputs (J, n, d) and t (J, n); output (J, n, d).
    Initialised like ``nn.Linear`` (uniform ±1/√fan_in) from ``generator``."""

    def __init__(self, models: int, dim: int, width: int = 128, depth: int = 3, freqs: int = 6,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.freqs = freqs
        sizes = [dim + 2 * freqs] + [width] * depth + [dim]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            w = (2 * torch.rand(models, fan_in, fan_out, generator=generator) - 1) * bound
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter((2 * torch.rand(models, 1, fan_out, generator=generator) - 1) * bound))

    def forward(self, x: torch.Tensor, t: torch.Tensor, models: torch.Tensor | None = None) -> torch.Tensor:
        """x (J', n, d), t (J', n) or a number; ``models``: which J' of the networks (default all)."""
        t = torch.full(x.shape[:2], float(t)) if not isinstance(t, torch.Tensor) else t
        a = t.to(x.dtype)[..., None] * (math.pi * 2.0 ** torch.arange(self.freqs, dtype=x.dtype))
        h = torch.cat([x, torch.sin(a), torch.cos(a)], -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b if models is None else b[models], h, w if models is None else w[models])
            h = nn.functional.silu(h) if i < last else h
        return h


def _noised(x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator):
    """``x_t = α_t x0 + β_t ε`` with a fresh ε; returns x_t, α_t, β_t."""
    alpha, beta = schedule(t)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return alpha[..., None] * x0 + beta[..., None] * eps, alpha, beta


def _uniform_t(shape, t_range, generator, dtype) -> torch.Tensor:
    lo, hi = t_range
    return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)


@single_thread()
def train_dsm(train_sets: Sequence[torch.Tensor], config: MolrgTrainingConfig, seed: int = 0
              ) -> tuple[BatchedMLP, np.ndarray]:
    """Train one :class:`BatchedMLP` per training set (N_j, d) side by side by denoising score
    matching: each step every model draws ``batch`` of its own points (with replacement), a fresh
    t ~ U(t_range) and ε per point, and takes an Adam step on ``‖f(α_t x0 + β_t ε, t) − x0‖²``.
    Returns the networks and the loss curves (J, steps)."""
    j, dim = len(train_sets), int(train_sets[0].shape[1])
    g = torch.Generator().manual_seed(seed)
    net = BatchedMLP(j, dim, config.width, config.depth, generator=g)
    sizes = torch.tensor([len(s) for s in train_sets])
    padded = torch.zeros(j, int(sizes.max()), dim)
    for i, s in enumerate(train_sets):
        padded[i, :len(s)] = s.float()
    opt = torch.optim.Adam(net.parameters(), lr=config.net_lr)
    rows = torch.arange(j)[:, None]
    curves = np.zeros((j, config.net_steps))
    for step in range(config.net_steps):
        for group in opt.param_groups:  # cosine decay to 5 %
            group["lr"] = config.net_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / config.net_steps)))
        idx = (torch.rand(j, config.batch, generator=g) * sizes[:, None]).long()
        x0 = padded[rows, idx]
        t = _uniform_t((j, config.batch), config.t_range, g, torch.float32)
        x_t, _, _ = _noised(x0, t, g)
        loss = (net(x_t, t) - x0).pow(2).sum(-1).mean(1)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        curves[:, step] = loss.detach().numpy()
    return net, curves


def _empirical_weights(train: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                       ) -> torch.Tensor:
    """p(y_i | x_t) under the empirical distribution of ``train`` (M, d): softmax of −‖x_t − α y_i‖²/(2β²), (n, M)."""
    a = alpha[:, None]
    sq = x_t.pow(2).sum(-1, keepdim=True) - 2 * a * x_t @ train.T + a ** 2 * train.pow(2).sum(-1)[None]
    return torch.softmax(-sq / (2 * beta[:, None] ** 2), dim=1)


def empirical_optimum(train: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                      ) -> torch.Tensor:
    """The posterior mean of the empirical distribution of ``train`` (M, d) at x_t (n, d), per-point
    α, β (n,): the DSM loss's global minimizer on the training set (it returns training points at
    small t: memorization). (n, d)."""
    return _empirical_weights(train, x_t, alpha, beta) @ train


def empirical_optimum_jacobian(train: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                               ) -> torch.Tensor:
    """∂/∂x_t of :func:`empirical_optimum`: (α/β²)·Cov_w(y) under the weights p(y_i | x_t), (n, d, d)."""
    w = _empirical_weights(train, x_t, alpha, beta)
    mean = w @ train
    second = (w[:, :, None] * train[None]).transpose(1, 2) @ train    # Σ_i w_i y_i y_iᵀ
    return (alpha / beta ** 2)[:, None, None] * (second - mean[:, :, None] * mean[:, None, :])


def pointwise_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Jacobians of a map that acts on each point (row of the last axis) separately: x (..., d) ->
    (..., d_out, d), one backward pass per output coordinate."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    rows = [torch.autograd.grad(out[..., i].sum(), x, retain_graph=i < out.shape[-1] - 1)[0]
            for i in range(out.shape[-1])]
    return torch.stack(rows, -2)


def jacobian_subspace(jac: torch.Tensor, rank: int) -> torch.Tensor:
    """The denoiser's output subspace near a set of points: per point the top-``rank`` left singular
    vectors of J (its leading output directions), their projectors averaged over the points (axis −3),
    and the top-``rank`` eigenvectors of that average: (..., d, rank). Every point weighs the same, so
    the few points near a cluster boundary, where the soft cluster weights make J large and mixed,
    cannot decide it (a plain mean of J Jᵀ is dominated by them)."""
    u = torch.linalg.svd(jac.to(DTYPE))[0][..., :rank]
    m = (u @ u.transpose(-1, -2)).mean(-3)
    return torch.linalg.eigh(m)[1][..., -rank:]


def _subspace_errors(subspaces: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(K, ..., d, r) subspaces found at the points of each true component -> normalised errors (...,),
    averaged over the components: no matching, the points name their component."""
    r = truth.shape[-1]
    errs = [torch.linalg.matrix_norm(s @ s.transpose(-1, -2) - u @ u.T) / math.sqrt(2 * r)
            for s, u in zip(subspaces, truth.to(DTYPE))]
    return torch.stack(errs).mean(0)


def _relative(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ‖a − b‖² and Σ‖b‖² over the points (axis −2): a relative MSE's numerator and denominator."""
    return (a - b).pow(2).sum((-1, -2)), b.pow(2).sum((-1, -2))


def _dsm_loss(f: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return (f.to(DTYPE) - x0).pow(2).sum(-1).mean(-1)


@single_thread()
def evaluate_networks(net: BatchedMLP, model: MoLRG, trains: Sequence[torch.Tensor], members: torch.Tensor,
                      config: MolrgTrainingConfig, seed: int) -> list[dict]:
    """Metrics (i)–(iii) of the networks ``members`` of ``net``, trained on ``trains`` drawn from
    ``model``, and of each training set's empirical optimum; all on shared held-out draws.

    (i) ``subspace_error``: at t = ``jacobian_t`` and ``jacobian_points`` noisy held-out points of each
    true component k, the output subspace of J = ∂f/∂x_t there (:func:`jacobian_subspace`) against U_k,
    normalised by √(2r) and averaged over k. (ii) ``exact_relative_mse``: Σ‖f − E[x0|x_t]‖² / Σ‖E[x0|x_t]‖² over
    ``eval_points`` held-out x_t at every t of ``eval_t`` (per t, and pooled: sums over all t).
    (iii) ``train_loss``/``test_loss``: the DSM loss on the training points / on fresh samples, one
    fixed draw of :data:`EVAL_TERMS` (t ~ U(t_range), ε) each; ``bayes_test_loss``: the exact posterior
    mean's loss on the same test draw (the floor)."""
    g = torch.Generator().manual_seed(seed)
    k = len(members)
    results: list[dict] = [dict(net={}, empirical_optimum={}) for _ in range(k)]

    def on_nets(x: torch.Tensor, t) -> torch.Tensor:  # the members' networks at the same points x (n, d)
        xs = x.float()[None].expand(k, -1, -1)
        return net(xs, t if not isinstance(t, torch.Tensor) else t.float()[None].expand(k, -1), members)

    # (i) Jacobian subspaces
    alpha, beta = (float(v) for v in schedule(torch.tensor(config.jacobian_t, dtype=DTYPE)))
    pts = [alpha * p + beta * torch.randn(p.shape, generator=g, dtype=DTYPE)
           for p in component_pools(model, config.jacobian_points, g)]
    ab = torch.full((config.jacobian_points,), alpha, dtype=DTYPE)
    bb = torch.full((config.jacobian_points,), beta, dtype=DTYPE)
    net_sub = torch.stack([jacobian_subspace(pointwise_jacobian(
        lambda x: net(x, config.jacobian_t, members), p.float()[None].expand(k, -1, -1).contiguous()), model.rank)
        for p in pts])
    exact_sub = torch.stack([jacobian_subspace(pointwise_jacobian(
        lambda x: model.posterior_mean(x, alpha ** 2), p), model.rank) for p in pts])
    emp_sub = torch.stack([torch.stack([jacobian_subspace(empirical_optimum_jacobian(tr, p, ab, bb), model.rank)
                                        for tr in trains]) for p in pts])
    exact_err = float(_subspace_errors(exact_sub, model.bases))
    for name, err in (("net", _subspace_errors(net_sub, model.bases)), ("empirical_optimum",
                                                                         _subspace_errors(emp_sub, model.bases))):
        for res, e in zip(results, err):
            res[name]["subspace_error"] = float(e)

    with torch.no_grad():
        # (ii) distance to the exact posterior mean, per t and pooled over t
        x0 = model.sample(config.eval_points, g)
        sums = {name: [torch.zeros(k, dtype=DTYPE), torch.zeros((), dtype=DTYPE)] for name in
                ("net", "empirical_optimum", "net_to_empirical_optimum")}
        by_t: dict[str, list] = {name: [] for name in sums}
        for t in config.eval_t:
            x_t, a, b = _noised(x0, torch.full((config.eval_points,), float(t), dtype=DTYPE), g)
            exact = model.posterior_mean(x_t, float(a[0]) ** 2)
            f = on_nets(x_t, float(t)).to(DTYPE)
            emp = torch.stack([empirical_optimum(tr, x_t, a, b) for tr in trains])
            for name, (num, den) in (("net", _relative(f, exact)), ("empirical_optimum", _relative(emp, exact)),
                                     ("net_to_empirical_optimum", _relative(f, emp))):
                sums[name][0] += num
                sums[name][1] = sums[name][1] + den
                by_t[name].append(num / den)
        for name in ("net", "empirical_optimum"):
            for pos, res in enumerate(results):
                res[name]["exact_relative_mse_by_t"] = [float(v[pos]) for v in by_t[name]]
                res[name]["exact_relative_mse"] = float(sums[name][0][pos] / sums[name][1])
        for pos, res in enumerate(results):
            res["net"]["relative_mse_to_empirical_optimum_by_t"] = [
                float(v[pos]) for v in by_t["net_to_empirical_optimum"]]
            res["net"]["relative_mse_to_empirical_optimum"] = float(
                sums["net_to_empirical_optimum"][0][pos] / sums["net_to_empirical_optimum"][1][pos])

        # (iii) DSM loss on the training points and on fresh samples
        test0 = model.sample(EVAL_TERMS, g)
        t_te = _uniform_t((EVAL_TERMS,), config.t_range, g, DTYPE)
        x_te, a_te, b_te = _noised(test0, t_te, g)
        test_loss = _dsm_loss(on_nets(x_te, t_te), test0)
        bayes = float(_dsm_loss(subspace_denoiser(model.bases, x_te, a_te, b_te, torch.log(model.weights)), test0))
        tr0 = torch.stack([tr[torch.arange(EVAL_TERMS) % len(tr)] for tr in trains])   # each point equally often
        t_tr = _uniform_t((k, EVAL_TERMS), config.t_range, g, DTYPE)
        x_tr, a_tr, b_tr = _noised(tr0, t_tr, g)
        train_loss = _dsm_loss(net(x_tr.float(), t_tr.float(), members), tr0)
        for pos, (res, tr) in enumerate(zip(results, trains)):
            res["net"].update(train_loss=float(train_loss[pos]), test_loss=float(test_loss[pos]))
            res["empirical_optimum"].update(
                train_loss=float(_dsm_loss(empirical_optimum(tr, x_tr[pos], a_tr[pos], b_tr[pos]), tr0[pos])),
                test_loss=float(_dsm_loss(empirical_optimum(tr, x_te, a_te, b_te), test0)))
            res.update(exact_jacobian_subspace_error=exact_err, bayes_test_loss=bayes)
    return results


#: The network part's metrics, as (key in a cell's "net" dict, label); the transition rule of each.
NET_METRICS = (("subspace_error", "Jacobian subspace error"),
               ("exact_relative_mse", "relative MSE to the exact posterior mean"),
               ("relative_gap", "relative generalization gap (test − train)/test"))


def _network_part(config: MolrgTrainingConfig, log: Callable[[str], None]) -> dict:
    k = config.net_clusters
    cells, models = [], []
    for r in config.net_ranks:
        counts = _counts(config.net_ratios, r)
        for s in range(config.net_seeds):
            base = _derive_seed(config.seed, 20_000 + 100 * r + s)
            model = MoLRG.random(config.dim, r, k, seed=_derive_seed(base, 1))
            pools = component_pools(model, max(counts), torch.Generator().manual_seed(_derive_seed(base, 2)))
            models.append((r, s, base, model))
            cells += [dict(rank=r, seed=s, n=n, ratio=n / r, model=len(models) - 1, train=_first(pools, n))
                      for n in counts]
    (net, curves), train_seconds = _timed(train_dsm, [c["train"] for c in cells], config,
                                          seed=_derive_seed(config.seed, 30_000))
    log(f"(b) trained {len(cells)} networks side by side in {train_seconds:.0f} s")
    eval_start = time.perf_counter()
    for m, (r, s, base, model) in enumerate(models):
        members = [i for i, c in enumerate(cells) if c["model"] == m]
        res = evaluate_networks(net, model, [cells[i]["train"] for i in members], torch.tensor(members), config,
                                _derive_seed(base, 3))
        for i, out in zip(members, res):
            for who in ("net", "empirical_optimum"):
                out[who]["relative_gap"] = (out[who]["test_loss"] - out[who]["train_loss"]) / out[who]["test_loss"]
            cells[i].update(out, final_train_loss_avg=float(curves[i, -max(1, config.net_steps // 10):].mean()))
    eval_seconds = time.perf_counter() - eval_start
    by_rank = []
    for r in config.net_ranks:
        row = dict(rank=r, ratios=list(config.net_ratios), n_values=_counts(config.net_ratios, r))
        mine = [c for c in cells if c["rank"] == r]
        for who in ("net", "empirical_optimum"):
            stats = {}
            for key in ("subspace_error", "exact_relative_mse", "relative_gap", "train_loss", "test_loss"):
                v = np.array([[c[who][key] for c in mine if c["ratio"] == q] for q in config.net_ratios])
                stats[key] = dict(mean=_round(v.mean(1)), min=_round(v.min(1)), max=_round(v.max(1)))
            row[who] = stats
        closer = np.array([[c["net"]["exact_relative_mse"] / c["net"]["relative_mse_to_empirical_optimum"]
                            for c in mine if c["ratio"] == q] for q in config.net_ratios])
        row["net"]["exact_over_empirical_distance"] = dict(mean=_round(closer.mean(1)), min=_round(closer.min(1)),
                                                           max=_round(closer.max(1)))
        row["bayes_test_loss"] = _round(np.mean([c["bayes_test_loss"] for c in mine
                                                 if c["ratio"] == config.net_ratios[0]]))
        row["exact_jacobian_subspace_error"] = _round(np.mean([c["exact_jacobian_subspace_error"] for c in mine]))
        row["transition_ratio"] = {
            who: {key: transition_ratio(config.net_ratios, row[who][key]["mean"], config.tolerance)
                  for key, _ in NET_METRICS} for who in ("net", "empirical_optimum")}
        row["transition_ratio"]["net"]["closer_to_exact_than_to_empirical_optimum"] = transition_ratio(
            config.net_ratios, row["net"]["exact_over_empirical_distance"]["mean"], 1.0)
        by_rank.append(row)
        log(f"(b) r={r}: net subspace error {row['net']['subspace_error']['mean']}, relative MSE to exact "
            f"{row['net']['exact_relative_mse']['mean']}")
    per_cell = [{k2: v for k2, v in c.items() if k2 not in ("train", "model")} for c in cells]
    return dict(clusters=k, ranks=list(config.net_ranks), ratios=list(config.net_ratios), seeds=config.net_seeds,
                network=dict(kind="MLP, x0 prediction, input [x_t, sin/cos(π 2^i t), i < 6]", width=config.width,
                             depth=config.depth, parameters=sum(p[0].numel() for p in net.parameters())),
                rows=by_rank, cells=per_cell, train_seconds=round(train_seconds, 1),
                eval_seconds=round(eval_seconds, 1),
                loss_curves={f"r={c['rank']} N={c['n']} seed={c['seed']}": _round(_smooth(curves[i]), 4)
                             for i, c in enumerate(cells) if c["seed"] == 0})


def _smooth(curve: np.ndarray, points: int = 100) -> np.ndarray:
    """The curve averaged over ``points`` equal windows (what the loss figure draws)."""
    w = max(1, len(curve) // points)
    return curve[:len(curve) // w * w].reshape(-1, w).mean(1)


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------

def run_molrg_training_analysis(out_dir, config: MolrgTrainingConfig | None = None, *, command: str | None = None,
                                log: Optional[Callable[[str], None]] = None) -> dict:
    """Run (a) the sampled-noise phase grid for K = 1 and K = 2 and (b) the DSM-trained networks;
    write report.json, report.md and the figures into ``out_dir``. Returns the report (report.json)."""
    config = config or MolrgTrainingConfig()
    config.check()
    log = log or (lambda m: None)
    t_all = time.perf_counter()
    phase, t_phase = _timed(_phase_part, config, log)
    network, t_net = _timed(_network_part, config, log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = dict(heatmaps="phase_heatmaps.png", lines="phase_lines.png", network="network_metrics.png",
                   curves="network_loss_curves.png")
    _plot_heatmaps(phase, config, out / figures["heatmaps"])
    _plot_phase_lines(phase, config, out / figures["lines"])
    _plot_network(network, config, out / figures["network"])
    _plot_curves(network, out / figures["curves"])
    timings = dict(phase_transition=round(t_phase, 1), network=round(t_net, 1),
                   network_training=network["train_seconds"], total=round(time.perf_counter() - t_all, 1))
    report = dict(
        analysis="molrg-training",
        command=command or f"shallowmark analyze molrg-training --out {out}",
        python_api=f"shallowmark.research.molrg_training.run_molrg_training_analysis({str(out)!r}, "
                   f"MolrgTrainingConfig(...))",
        config=asdict(config),
        schedule="t ~ U(t_range), alpha_t = cos(pi t / 2), beta_t = sin(pi t / 2), x_t = alpha_t x0 + beta_t eps",
        samples="N per component: exactly N samples of each of the K subspaces (K·N in all), nested in N",
        phase_transition=phase, network=network, reading=_reading(phase, network, config),
        figures=figures, timings_s=timings,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
    )
    write_report(out, report, _markdown(report))
    return report


#: A transition "at N ≈ r": recovered from N/r at most this (within a factor of two of N = r).
NEAR_R = 2.0


def _near(q: Optional[float]) -> str:
    if q is None:
        return "never within the grid"
    return f"N/r = {q:g} ({'≈ r' if q <= NEAR_R else 'later than N ≈ r'})"


def _reading(phase: dict, network: dict, config: MolrgTrainingConfig) -> dict:
    out = {}
    for key in ("k1", "k2"):
        p = phase[key]
        fits = [(g["error"][k][j], g["loss_excess"][k][j]) for g in p["rows"]
                for j, q in enumerate(g["ratios"]) if q >= 1 for k in range(g["trials"])]
        missed = [f for f in fits if f[0] >= config.tolerance]
        at_r = [g["cond"][k][g["ratios"].index(1.0)] for g in p["rows"] if 1.0 in g["ratios"]
                for k in range(g["trials"])]
        above = [j for j, q in enumerate(p["ratios"]) if q > 1]
        next_cond = [g["cond"][k][above[0]] for g in p["rows"] for k in range(g["trials"])] if above else []
        oracle = np.mean([np.mean(g["oracle"], 0) for g in p["rows"]], 0)
        failed = [(u, x) for g in p["rows"] for j, q in enumerate(g["ratios"]) if q >= 1 for k in range(g["trials"])
                  for e, u, x in zip(g["restart_error"][k][j], g["restart_union_share"][k][j],
                                     g["restart_cross_share"][k][j]) if e >= config.tolerance]
        out[key] = dict(transition_ratio=p["transition_ratio"], near_r=_is_near(p["transition_ratio"]),
                        failed_starts_n_at_least_r=len(failed),
                        failed_starts_union_share=_round(np.mean([f[0] for f in failed]), 3) if failed else None,
                        failed_starts_cross_share=_round(np.mean([f[1] for f in failed]), 3) if failed else None,
                        per_rank={g["rank"]: g["transition_ratio"] for g in p["rows"]},
                        oracle_transition_ratio=transition_ratio(p["ratios"], oracle, config.tolerance),
                        fits_n_at_least_r=len(fits), fits_n_at_least_r_not_recovered=len(missed),
                        not_recovered_with_loss_above_truth=int(sum(f[1] > 0 for f in missed)),
                        median_cond_at_n_equal_r=float(f"{np.median(at_r):.3g}") if at_r else None,
                        next_ratio_above_r=p["ratios"][above[0]] if above else None,
                        median_cond_next_ratio=float(f"{np.median(next_cond):.3g}") if next_cond else None,
                        restart_success_by_ratio=_round(
                            np.mean([np.mean(g["restart_success"], 0) for g in p["rows"]], 0), 3))
    net = {}
    for key in [k for k, _ in NET_METRICS] + ["closer_to_exact_than_to_empirical_optimum"]:
        values = [row["transition_ratio"]["net"][key] for row in network["rows"]]
        net[key] = dict(by_rank=dict(zip(network["ranks"], values)), near_r=all(_is_near(v) for v in values),
                        same_n_over_r_across_ranks=None not in values and len(set(values)) == 1)
    at_r = [i for i, q in enumerate(network["ratios"]) if q == 1.0]
    if at_r:
        net["at_n_equal_r"] = {row["rank"]: {who: {key: row[who][key]["mean"][at_r[0]] for key in
                                                   ("exact_relative_mse", "relative_gap", "subspace_error")}
                                             for who in ("net", "empirical_optimum")} for row in network["rows"]}
    out["network"] = net
    out["goal_transition_near_r"] = dict(k1=out["k1"]["near_r"], k2=out["k2"]["near_r"],
                                         network=all(v["near_r"] for k, v in net.items() if k != "at_n_equal_r"))
    return out


def _is_near(q: Optional[float]) -> bool:
    return q is not None and q <= NEAR_R


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def _plot_heatmaps(phase: dict, config: MolrgTrainingConfig, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ratios = list(config.phase_ratios)
    for ax, key in zip(axes, ("k1", "k2")):
        p = phase[key]
        grid = np.array([g["mean_error"] for g in p["rows"]])
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 0.5 else "black")
        ax.set_xticks(range(len(ratios)), [f"{q:g}" for q in ratios])
        ax.set_yticks(range(len(p["ranks"])), [str(r) for r in p["ranks"]])
        if 1.0 in ratios:
            ax.axvline(ratios.index(1.0) - 0.5, color="w", ls="--", lw=1.2)
        ax.set_xlabel("N / r (N samples per component)")
        ax.set_ylabel("rank r")
        ax.set_title(f"K = {p['clusters']}: subspace error / √(2r), sampled noise, d = {config.dim}", fontsize=9)
        fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def _band(ax, x, v, lo, hi, label, **kw):
    line, = ax.plot(x, v, marker="o", ms=3, label=label, **kw)
    ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color())
    return line


def _plot_phase_lines(phase: dict, config: MolrgTrainingConfig, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    q = np.array(config.phase_ratios, dtype=float)
    for ax, key in zip(axes[:2], ("k1", "k2")):
        p = phase[key]
        for c, g in enumerate(p["rows"]):
            e = np.array(g["error"])
            line = _band(ax, q, e.mean(0), e.min(0), e.max(0), f"r = {g['rank']}", color=f"C{c}")
            ax.plot(q, np.array(g["oracle"]).mean(0), "x", color=line.get_color(), ms=5)
        qq = np.linspace(q.min(), 1.0, 50)
        ax.plot(qq, np.sqrt((1 - qq) / 2), "k:", label="bound √((1 − N/r)/2)")
        ax.plot([], [], "kx", label="oracle: PCA of each component")
        ax.axhline(config.tolerance, color="grey", lw=0.8, ls="--", label=f"tolerance {config.tolerance:g}")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N / r")
        ax.set_ylabel("subspace error / √(2r)")
        ax.set_title(f"K = {p['clusters']} (band: min–max over {p['rows'][0]['trials']} trials)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes[2]
    for c, g in enumerate(phase["k2"]["rows"]):
        ax.plot(q, np.array(g["restart_success"]).mean(0), "o-", ms=3, color=f"C{c}", label=f"r = {g['rank']}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("N / r")
    ax.set_ylabel("share of random starts recovering both subspaces")
    ax.set_title(f"K = 2: {phase['k2']['restarts']} random starts per cell", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_network(network: dict, config: MolrgTrainingConfig, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    q = np.array(config.net_ratios, dtype=float)
    panels = [("subspace_error", "Jacobian subspace error / √(2r)", False),
              ("exact_relative_mse", "relative MSE to exact E[x0|x_t] (pooled over t)", True),
              ("test_loss", "DSM loss: test (solid/dashed), train (dotted)", False),
              ("relative_gap", "(test − train) / test DSM loss", False)]
    for ax, (key, title, logy) in zip(axes.flat, panels):
        for c, row in enumerate(network["rows"]):
            colour = f"C{c}"
            for who, ls, name in (("net", "-", "MLP"), ("empirical_optimum", "--", "empirical optimum")):
                s = row[who][key]
                _band(ax, q, s["mean"], s["min"], s["max"], f"{name}, r = {row['rank']}", color=colour, ls=ls)
                if key == "test_loss":
                    ax.plot(q, row[who]["train_loss"]["mean"], ls=":", color=colour, marker=".")
            if key == "test_loss":
                ax.axhline(row["bayes_test_loss"], color=colour, lw=0.8, alpha=0.6)
            if key == "subspace_error":
                ax.axhline(row["exact_jacobian_subspace_error"], color=colour, lw=0.8, alpha=0.6)
        if key in ("subspace_error", "exact_relative_mse", "relative_gap"):
            ax.axhline(config.tolerance, color="grey", lw=0.8, ls="--")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("N / r (N samples per component)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"MLP {config.width}×{config.depth} trained by DSM on a K = {network['clusters']} MoLRG, "
                 f"d = {config.dim} (bands: min–max over {network['seeds']} seeds)", fontsize=10)
    save_figure(fig, path)


def _plot_curves(network: dict, path: Path) -> None:
    plt = pyplot()
    ranks = network["ranks"]
    fig, axes = plt.subplots(1, len(ranks), figsize=(5.5 * len(ranks), 3.8), squeeze=False)
    for ax, r in zip(axes[0], ranks):
        mine = [(c["n"], network["loss_curves"][f"r={r} N={c['n']} seed=0"]) for c in network["cells"]
                if c["rank"] == r and c["seed"] == 0]
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(mine)))
        for colour, (n, curve) in zip(colours, mine):
            ax.plot(np.linspace(0, 1, len(curve)), curve, lw=1, color=colour, label=f"N = {n}")
        ax.set_xlabel("training progress")
        ax.set_ylabel("DSM training loss (window mean)")
        ax.set_title(f"r = {r}, seed 0", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------

def _f(v, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _spread(s: dict, i: int, nd: int = 3) -> str:
    return f"{s['mean'][i]:.{nd}f} [{s['min'][i]:.{nd}f}, {s['max'][i]:.{nd}f}]"


def _markdown(rep: dict) -> str:
    c, ph, nw, rd, tm = rep["config"], rep["phase_transition"], rep["network"], rep["reading"], rep["timings_s"]
    lines = [
        "# MoLRG with real training: the N-vs-r transition with sampled noise and a DSM-trained network", "",
        f"Command: `{rep['command']}`  ",
        f"Machine: {rep['machine']}. Time: total {tm['total']:.0f} s, (a) {tm['phase_transition']:.0f} s, "
        f"(b) {tm['network']:.0f} s (of which training {tm['network_training']:.0f} s). All numbers are in "
        "`report.json`, the full configuration under `config`.", "",
        f"Data: mixtures of K low-rank Gaussians in R^{c['dim']}, x = U_k a, a ~ N(0, I_r), orthonormal and "
        "mutually orthogonal U_k, equal weights. **N is the number of samples per component**: exactly N from "
        "each subspace (K·N in all), the sets nested in N. Noise: x_t = α_t x0 + β_t ε, α_t = cos(πt/2), "
        f"β_t = sin(πt/2), t ~ U{tuple(c['t_range'])} during training. Nothing is averaged analytically: every "
        "training step draws t and ε afresh. Errors are normalised subspace distances "
        "‖ÛÛᵀ − UUᵀ‖_F / √(2r) (0: the subspace, 1: an orthogonal one); a fit counts as recovered below "
        f"{c['tolerance']:g}, and a *transition* is the smallest N/r of the grid from which the mean error "
        "stays below that at every larger N/r. For N < r per component no fit can reach it: the r − N unseen "
        "directions give at least √((1 − N/r)/2).", "",
    ]
    lines += _md_phase(ph, c) + _md_network(nw, c) + _md_reading(rd, ph, nw, c)
    return "\n".join(lines) + "\n"


def _md_phase(ph: dict, c: dict) -> list[str]:
    lines = [
        "## (a) The parameterized denoiser, trained with sampled noise", "",
        "The talk's denoiser x_U(x_t, t) = α_t/(α_t²+β_t²) Σ_k w_k(x_t) U_k U_kᵀ x_t (K = 1: U Uᵀ), [U_1 … U_K] "
        "the Q factor of a free matrix, trained by Adam on ‖x_U(α_t x0 + β_t ε, t) − x0‖² over all the training "
        f"points with {c['phase_noise_draws']} fresh (t, ε) per point and step (each ε also as −ε), lr "
        f"{c['phase_lr']:g} cosine-decayed to 1 %, {c['phase_trials']} trials (new subspaces, data and start) per "
        f"cell. K = 1: one start, {c['phase_steps']} steps. K = 2: {c['phase_restarts']} random starts of "
        f"{c['phase_steps_k2']} steps per cell, the one with the lowest training loss kept; the "
        "loss is evaluated for all of them and for the true subspaces on one common draw of "
        f"about {EVAL_TERMS} (t, ε) terms. K = 1 needs no restarts (its loss has no spurious local minima). "
        "Oracle: PCA of each component's own samples (the labels known), the statistical limit.", "",
    ]
    for key in ("k1", "k2"):
        p = ph[key]
        head = ["r"] + [f"N/r = {q:g}" for q in p["ratios"]] + ["transition"]
        rows = [[g["rank"]] + [_f(v) for v in g["mean_error"]] + [_f(g["transition_ratio"], 2)] for g in p["rows"]]
        rows.append(["all r"] + [_f(v) for v in p["mean_error_by_ratio"]] + [_f(p["transition_ratio"], 2)])
        lines += [f"**K = {p['clusters']}**, mean subspace error over the trials:", "", *markdown_table(head, rows), ""]
        if key == "k2":
            lines += ["K = 2, share of random starts that recover both subspaces (error < tolerance):", "",
                      *markdown_table(["r"] + [f"N/r = {q:g}" for q in p["ratios"]],
                                      [[g["rank"]] + [f"{v:.2f}" for v in g["mean_restart_success"]]
                                       for g in p["rows"]]), ""]
    lines += ["![heatmaps](phase_heatmaps.png)", "", "![lines](phase_lines.png)", ""]
    return lines


def _md_network(nw: dict, c: dict) -> list[str]:
    net = nw["network"]
    lines = [
        "## (b) A generic network trained by denoising score matching", "",
        f"K = {nw['clusters']}, r ∈ {nw['ranks']}, d = {c['dim']}. One {net['kind']}, {net['depth']} hidden "
        f"layers of {net['width']} SiLU units ({net['parameters']:,} parameters), per (r, N, seed), trained on "
        f"‖f(x_t, t) − x0‖² (DSM in the x0 parameterization) for {c['net_steps']} Adam steps of {c['batch']} "
        f"points (with replacement) and fresh (t, ε), lr {c['net_lr']:g} cosine-decayed to 5 %, the same for every "
        f"N; {nw['seeds']} seed(s) per (r, N), each a new MoLRG, training set and initialisation. "
        "Measured on held-out draws of the true MoLRG:", "",
        f"- (i) **subspace error**: at t = {c['jacobian_t']:g}, {c['jacobian_points']} noisy held-out points per "
        "true component k; at each the top-r left singular vectors of J = ∂f/∂x_t (by autograd; the "
        "empirical optimum's J = (α/β²)·Cov of its posterior over the training points), their projectors "
        "averaged over the points, the top-r eigenvectors of that average against U_k, averaged over k "
        "(a plain mean of J Jᵀ would be decided by the few points near the cluster boundary, where J is "
        "large and mixes both subspaces). The exact posterior mean scores "
        + ", ".join(f"{row['exact_jacobian_subspace_error']:.3f} (r = {row['rank']})" for row in nw["rows"])
        + " by the same measure (its soft cluster weights mix in the other subspace a little).",
        f"- (ii) **distance to the exact score**: Σ‖f − E[x0|x_t]‖² / Σ‖E[x0|x_t]‖² over {c['eval_points']} "
        f"held-out x_t at t ∈ {list(c['eval_t'])}, pooled (sums over all t) and per t; E[x0|x_t] is the lemma's "
        "closed form, and the score is (α_t E[x0|x_t] − x_t)/β_t².",
        f"- (iii) **generalization**: the DSM loss on the training points and on fresh samples, one fixed draw of "
        f"{EVAL_TERMS} (point, t, ε) terms each; the relative gap is (test − train)/test. The exact posterior "
        "mean's test loss (the floor) is the thin line in the loss panel.",
        "- the **empirical optimum** (posterior mean of the training set: the DSM loss's minimizer on it, "
        "perfect memorization) is measured the same way (dashed).", "",
        "Mean over the seeds [min, max]:", "",
    ]
    for row in nw["rows"]:
        n, e = row["net"], row["empirical_optimum"]
        head = ["N/r", "N", "subspace MLP", "subspace emp.", "rel. MSE MLP", "rel. MSE emp.",
                "MLP: exact/emp. distance",
                "train MLP", "test MLP", "gap MLP", "gap emp."]
        rows = [[f"{q:g}", row["n_values"][i], _spread(n["subspace_error"], i), f"{e['subspace_error']['mean'][i]:.3f}",
                 _spread(n["exact_relative_mse"], i), f"{e['exact_relative_mse']['mean'][i]:.3f}",
                 f"{n['exact_over_empirical_distance']['mean'][i]:.2f}", f"{n['train_loss']['mean'][i]:.3f}",
                 f"{n['test_loss']['mean'][i]:.3f}", _spread(n["relative_gap"], i),
                 f"{e['relative_gap']['mean'][i]:.3f}"] for i, q in enumerate(row["ratios"])]
        lines += [f"**r = {row['rank']}** (exact posterior mean's test loss {row['bayes_test_loss']:.3f}):", "",
                  *markdown_table(head, rows), ""]
    lines += ["\"exact/emp. distance\": the MLP's relative MSE to the exact posterior mean over that to its training "
              "set's empirical optimum; below 1 it is closer to the true distribution's denoiser than to "
              "memorization.", "", "Relative MSE to the exact posterior mean by t (MLP, mean over seeds):", ""]
    for row in nw["rows"]:
        cells = [cc for cc in nw["cells"] if cc["rank"] == row["rank"]]
        head = ["N/r"] + [f"t = {t:g}" for t in c["eval_t"]]
        by_t = [[np.mean([cc["net"]["exact_relative_mse_by_t"][k] for cc in cells if cc["ratio"] == q])
                 for k in range(len(c["eval_t"]))] for q in row["ratios"]]
        body = [[f"{q:g}"] + [f"{v:.3f}" for v in vals] for q, vals in zip(row["ratios"], by_t)]
        lines += [f"r = {row['rank']}:", "", *markdown_table(head, body), ""]
    lines += ["![network](network_metrics.png)", "", "![curves](network_loss_curves.png)", ""]
    return lines


def _md_reading(rd: dict, ph: dict, nw: dict, c: dict) -> list[str]:
    tol, goal = c["tolerance"], rd["goal_transition_near_r"]
    yes = {True: "yes", False: "**no**"}
    lines = ["## Reading", "",
             f"Goal: the transition at N ≈ r (here: recovered from N/r ≤ {NEAR_R:g}, tolerance {tol:g}). "
             f"(a) K = 1: {yes[goal['k1']]} (N/r = {_f(rd['k1']['transition_ratio'], 2)}); (a) K = 2: "
             f"{yes[goal['k2']]} (N/r = {_f(rd['k2']['transition_ratio'], 2)}); (b) the MLP: {yes[goal['network']]} "
             "(N/r = " + ", ".join(f"{_f(v, 2)}" for v in rd["network"]["subspace_error"]["by_rank"].values())
             + " for its subspace error at r = " + ", ".join(str(r) for r in nw["ranks"]) + ").", ""]
    for key in ("k1", "k2"):
        r, p = rd[key], ph[key]
        per = ", ".join(f"r = {k}: {_f(v, 2)}" for k, v in r["per_rank"].items())
        text = (f"- (a) K = {p['clusters']}: the transition is at {_near(r['transition_ratio'])}; per rank {per}. "
                f"The oracle (PCA of each component's own samples) is at N/r = {_f(r['oracle_transition_ratio'], 2)}: "
                "with N ≥ r noiseless samples the subspaces are determined, so any delay past that is the training's. "
                f"Mean error at N = r: {_f(p['error_at_n_equal_r'])}.")
        if key == "k1" and p["error_at_n_equal_r"] is not None and p["error_at_n_equal_r"] >= tol \
                and r["median_cond_at_n_equal_r"]:
            text += (f" There the median λ_r/λ_1 of a component's samples is {r['median_cond_at_n_equal_r']} "
                     f"(at N/r = {r['next_ratio_above_r']:g}: {r['median_cond_next_ratio']}): the loss is nearly flat "
                     f"along the weakest direction, and {p['steps']} steps of sampled-noise Adam do not finish it.")
        missed, above = r["fits_n_at_least_r_not_recovered"], r["not_recovered_with_loss_above_truth"]
        text += (f" Of the {r['fits_n_at_least_r']} fits with N ≥ r, {missed} did not recover"
                 + (f", and {above} of those stopped at a training loss above the true subspaces' on the same draw of "
                    "(t, ε)" + (": the optimiser, not the data, fell short there." if above == missed else ".")
                    if missed else "."))
        if key == "k2":
            share = r["restart_success_by_ratio"]
            text += (" The share of random starts that recover both subspaces, by N/r: "
                     + ", ".join(f"{q:g}: {v:.2f}" for q, v in zip(p["ratios"], share)) + f" ({p['restarts']} starts "
                     "per cell, the lowest-loss one kept). The K = 2 loss is non-convex.")
            if r["failed_starts_n_at_least_r"]:
                text += (f" The {r['failed_starts_n_at_least_r']} starts with N ≥ r that fail have on average "
                         f"{r['failed_starts_union_share']:.0%} of each learned U_k inside the union of the true "
                         f"subspaces, {r['failed_starts_cross_share']:.0%} of it inside the *other* component's "
                         "subspace" + (": they find the union but split it wrongly, each U_k holding directions of "
                                       "both (a local minimum of subspace clustering)."
                                       if r["failed_starts_union_share"] >= 0.9
                                       and r["failed_starts_cross_share"] >= 0.1
                                       else "."))
            if missed and above == missed:
                text += (" Every unrecovered fit with N ≥ r sits above the truth's training loss, so the K = 2 "
                         "transition measured here is set by the optimiser (how often a random start lands in the "
                         "right basin); where the loss's global minimum starts to recover the subspaces is not "
                         "measured, only that the true subspaces beat every fit that missed them.")
        lines.append(text)
    for row in nw["rows"]:
        tr = row["transition_ratio"]
        lines.append(
            f"- (b) r = {row['rank']}: the MLP's subspace error is below {tol:g} from "
            f"{_near(tr['net']['subspace_error'])} (empirical optimum: "
            f"{_near(tr['empirical_optimum']['subspace_error'])}); "
            f"its relative MSE to the exact posterior mean from {_near(tr['net']['exact_relative_mse'])} "
            f"(empirical optimum: {_near(tr['empirical_optimum']['exact_relative_mse'])}); its relative "
            f"generalization gap from {_near(tr['net']['relative_gap'])}; it is closer to the exact posterior mean "
            f"than to its empirical optimum from {_near(tr['net']['closer_to_exact_than_to_empirical_optimum'])}.")
    netr = rd["network"]
    if len(nw["ranks"]) > 1:
        same = [label for key, label in NET_METRICS if netr[key]["same_n_over_r_across_ranks"]]
        lines.append(
            "- (b) scaling with r: " + (f"the transitions of the {', '.join(same)} fall at the same N/r for every r, "
                                       "i.e. the samples the MLP needs grow in proportion to r, as the talk says"
                                       if same else "no metric's transition falls at the same N/r for every r")
            + (", but the factor is not near 1." if same and not goal["network"] else "."))
    if "at_n_equal_r" in netr:
        close = all(abs(v["net"]["exact_relative_mse"] - v["empirical_optimum"]["exact_relative_mse"])
                    <= 0.25 * v["empirical_optimum"]["exact_relative_mse"] for v in netr["at_n_equal_r"].values())
        lines.append(
            "- (b) at N = r: " + "; ".join(
                f"r = {r}: the MLP's relative MSE to the exact posterior mean {v['net']['exact_relative_mse']:.2f} "
                f"(empirical optimum {v['empirical_optimum']['exact_relative_mse']:.2f}), generalization gap "
                f"{v['net']['relative_gap']:.2f} ({v['empirical_optimum']['relative_gap']:.2f})"
                for r, v in netr["at_n_equal_r"].items())
            + (". The MLP is within 25 % of the memorizing empirical optimum there: with N = r samples per subspace "
               "the subspaces are determined, but not the Gaussian inside each, and the MLP, trained towards the "
               "DSM loss's minimizer on its training set (the empirical optimum), reproduces the samples rather "
               "than the distribution."
               if close else "."))
    lines += [
        "- Limits: one architecture (the MLP above; no U-Net), one training budget for every N, one noise level "
        f"for the Jacobian (t = {c['jacobian_t']:g}), {nw['seeds']} seed(s) per cell; every transition N/r depends "
        "on the tolerance, and another network (narrower, or a U-Net's inductive bias) may move part (b)'s.", ""]
    return lines
