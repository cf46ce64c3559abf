"""MoLRG theory: closed-form posterior mean, DAE ≡ PCA (K = 1), subspace clustering (K = 2), and the
N-vs-r phase transition. All problems are tiny and seeded, so the whole file runs in seconds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shallowmark.core.molrg import MoLRG
from shallowmark.research.molrg_theory import (
    largest_principal_angle,
    match_subspaces,
    pca_subspace,
    phase_transition,
    posterior_mean_monte_carlo,
    principal_angles,
    run_molrg_analysis,
    subspace_denoiser,
    subspace_distance,
    train_subspace_dae,
)
from shallowmark.errors import InvalidParameterError


def _mc_posterior_mean(model: MoLRG, x_t: torch.Tensor, abar: float, m: int, seed: int) -> torch.Tensor:
    """Independent importance-sampling estimate: x0 ~ prior, weights p(x_t | x0) = N(√ᾱ x0, (1−ᾱ) I)."""
    g = torch.Generator().manual_seed(seed)
    x0 = model.sample(m, g)
    logw = -torch.cdist(x_t, abar ** 0.5 * x0).pow(2) / (2 * (1 - abar))
    return torch.softmax(logw, dim=1) @ x0


@pytest.mark.parametrize("clusters", [1, 2])
@pytest.mark.parametrize("abar", [0.3, 0.8])
def test_posterior_mean_matches_monte_carlo(clusters, abar):
    model = MoLRG.random(dim=6, rank=2, clusters=clusters, seed=3)
    g = torch.Generator().manual_seed(11)
    x_t = abar ** 0.5 * model.sample(5, g) + (1 - abar) ** 0.5 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    exact = model.posterior_mean(x_t, abar)
    mc = _mc_posterior_mean(model, x_t, abar, 60_000, seed=5)
    rel = (mc - exact).norm(dim=1) / exact.norm(dim=1)
    assert rel.max() < 0.06, rel
    # the module's own Monte-Carlo helper agrees too, and reports a healthy effective sample size
    mc2, ess = posterior_mean_monte_carlo(model, x_t, abar, 60_000, torch.Generator().manual_seed(6))
    assert ((mc2 - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.06
    assert ess.min() > 200


def test_denoiser_with_true_bases_is_the_posterior_mean():
    model = MoLRG.random(dim=10, rank=2, clusters=3, seed=1)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(7, 10, generator=g, dtype=torch.float64)
    for abar in (0.2, 0.9):
        a = torch.full((7,), abar ** 0.5, dtype=torch.float64)
        b = torch.full((7,), (1 - abar) ** 0.5, dtype=torch.float64)
        out = subspace_denoiser(model.bases, x_t, a, b, torch.log(model.weights))
        torch.testing.assert_close(out, model.posterior_mean(x_t, abar))


def test_subspace_metrics():
    u = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    assert subspace_distance(u, u @ torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]) < 1e-12
    e = torch.eye(8, dtype=torch.float64)
    assert subspace_distance(e[:, :3], e[:, 3:6]) == pytest.approx(math.sqrt(6))
    assert largest_principal_angle(e[:, :3], e[:, 3:6]) == pytest.approx(math.pi / 2)
    v = torch.stack([e[:, 0], math.cos(0.3) * e[:, 1] + math.sin(0.3) * e[:, 5]], 1)
    torch.testing.assert_close(principal_angles(e[:, :2], v), torch.tensor([0.0, 0.3], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_pca_recovers_planted_subspace():
    model = MoLRG.random(dim=30, rank=4, seed=7)
    g = torch.Generator().manual_seed(8)
    data = model.sample(200, g) + 0.01 * torch.randn(200, 30, generator=g, dtype=torch.float64)
    u = pca_subspace(data, 4)
    assert u.shape == (30, 4)
    torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=torch.float64))
    assert largest_principal_angle(u, model.bases[0]) < math.radians(1.0)


def test_dae_k1_recovers_pca_subspace():
    model = MoLRG.random(dim=16, rank=3, seed=4)
    data = model.sample(120, torch.Generator().manual_seed(5)) \
        + 0.05 * torch.randn(120, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pca = pca_subspace(data, 3)
    res = train_subspace_dae(data, 3, steps=250, seed=0)
    assert res.bases.shape == (1, 16, 3)
    torch.testing.assert_close(res.basis.T @ res.basis, torch.eye(3, dtype=torch.float64))
    assert len(res.loss_curve) == 250 and res.loss_curve[-1] < res.loss_curve[0]
    assert subspace_distance(res.basis, pca) < 0.08  # sampled ε: SGD noise only
    exact = train_subspace_dae(data, 3, steps=250, seed=0, noise="expected")
    assert subspace_distance(exact.basis, pca) < 1e-3


def test_dae_k2_recovers_both_subspaces():
    model = MoLRG.random(dim=12, rank=2, clusters=2, seed=9)
    data = model.sample(200, torch.Generator().manual_seed(10))
    res = train_subspace_dae(data, 2, clusters=2, steps=250, seed=1, restarts=6, noise_draws=2)
    assert len(res.restart_losses) == 6 and res.final_loss == min(res.restart_losses)
    perm, dists = match_subspaces(res.bases, model.bases)
    assert sorted(perm) == [0, 1]
    assert max(dists) < 0.1, dists


def test_phase_transition_tiny_grid():
    res = phase_transition(20, r_values=[2, 4], n_values=[1, 2, 3, 5, 7], trials=1, seed=0, steps=1200)
    assert res.distance.shape == (2, 5) and res.per_trial.shape == (2, 5, 1)
    for i, r in enumerate(res.r_values):
        for j, n in enumerate(res.n_values):
            d_dae, d_pca = res.distance[i, j], res.pca_distance[i, j]
            if n < r:
                assert d_dae >= math.sqrt(r - n) - 0.1, (r, n, d_dae)
                assert d_pca >= math.sqrt(r - n) - 0.1, (r, n, d_pca)
            else:
                assert d_dae < 0.05, (r, n, d_dae)
                assert d_pca < 1e-8, (r, n, d_pca)
    assert 0.0 <= res.normalized.min() and res.normalized.max() <= 1.0
    pca_only = phase_transition(20, [3], [1, 2, 3, 4], trials=2, fit="pca")
    assert pca_only.distance[0, -1] < 1e-8 and pca_only.distance[0, 0] >= math.sqrt(2) - 0.1


@pytest.mark.parametrize("call", [
    lambda: train_subspace_dae(torch.zeros(0, 5), 2),                       # N = 0
    lambda: pca_subspace(torch.zeros(0, 5), 2),
    lambda: train_subspace_dae(torch.randn(10, 5), 6),                      # rank > d
    lambda: pca_subspace(torch.randn(10, 5), 6),
    lambda: train_subspace_dae(torch.randn(10, 6), 2, clusters=4),          # K·r > d
    lambda: train_subspace_dae(torch.randn(10, 5), 0),                      # rank 0
    lambda: train_subspace_dae(torch.randn(10), 1),                         # not 2-D
    lambda: train_subspace_dae(torch.full((4, 5), float("nan")), 1),
    lambda: train_subspace_dae(torch.randn(10, 5), 2, steps=0),
    lambda: train_subspace_dae(torch.randn(10, 5), 2, lr=-1.0),
    lambda: train_subspace_dae(torch.randn(10, 5), 2, t_range=(0.0, 0.5)),
    lambda: train_subspace_dae(torch.randn(10, 5), 2, clusters=2, noise="expected"),
    lambda: train_subspace_dae(torch.randn(10, 5), 2, noise="bogus"),
    lambda: phase_transition(10, [2], [0, 3]),                              # N = 0 in the grid
    lambda: phase_transition(10, [11], [3]),                                # r > d
    lambda: phase_transition(10, [2], [3], fit="svd"),
    lambda: subspace_distance(torch.eye(4)[:, :2], torch.eye(5)[:, :2]),
    lambda: posterior_mean_monte_carlo(MoLRG.random(4, 1), torch.zeros(1, 4), 1.0),
])
def test_bad_input_raises(call):
    with pytest.raises(InvalidParameterError):
        call()


def test_quick_analysis_writes_report(tmp_path):
    rep = run_molrg_analysis(tmp_path, quick=True)
    for name in ("report.json", "report.md", *rep["figures"].values()):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / rep["figures"]["heatmap"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["command"] and saved["seed"] == 0 and saved["quick"] is True
    assert saved["posterior_mean"]["worst_relative_error"] < 0.1
    assert saved["dae_vs_pca"]["dae_vs_pca_distance"] < 0.1
    assert max(saved["subspace_clustering"]["per_cluster_distance"]) < 0.1
    summary = saved["phase_transition"]["summary"]
    assert summary["min_margin_over_bound_n_below_r"] > -0.1 and summary["max_distance_n_at_least_r"] < 0.1
    md = (tmp_path / "report.md").read_text()
    assert "phase_transition_heatmap.png" in md and "Phase transition" in md
