import pytest
import torch

from shallowmark.core import jacobian as J
from shallowmark.core.backends import load_backend
from shallowmark.errors import InvalidParameterError


@pytest.fixture(scope="module")
def planted():
    """Analytic MoLRG with planted rank r = 6 (K = 2 clusters of rank 3) in d = 64."""
    b = load_backend("analytic", latent_shape=(1, 8, 8), rank=3, clusters=2, seed=1)
    t = 400
    a = float(b.alphas_cumprod[t])
    g = torch.Generator().manual_seed(0)
    x0 = b.sample_data(1, seed=2)
    x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    return b, x_t, t


def _max_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return float(torch.arccos(cos).max())


def test_jvp_vjp_match_dense_jacobian(planted):
    b, x_t, t = planted
    dense = J.full_jacobian(b, x_t, t)
    v = torch.randn_like(x_t)
    assert torch.allclose(J.jvp(b, x_t, t, v).flatten(), dense @ v.flatten(), atol=1e-10)
    assert torch.allclose(J.vjp(b, x_t, t, v).flatten(), dense.T @ v.flatten(), atol=1e-10)


def test_subspace_iteration_recovers_planted_subspace(planted):
    b, x_t, t = planted
    dense = J.full_jacobian(b, x_t, t)
    sigma = torch.linalg.svdvals(dense)
    rank = int((sigma > 1e-8 * sigma[0]).sum())
    sub = J.top_subspace(b, x_t, t, rank=rank, iters=20)
    truth = b.model.bases.permute(1, 0, 2).reshape(64, -1)  # the union of the planted U_k
    # Only the clusters that carry posterior weight show up in J; use the dense J's own range.
    _, _, vh = torch.linalg.svd(dense)
    assert _max_principal_angle(sub.vectors.flatten(1).T, vh[:rank].T) < 1e-3
    assert _max_principal_angle(sub.vectors.flatten(1).T, truth) < torch.pi / 2  # inside the planted span
    assert torch.allclose(sub.singular_values, sigma[:rank], rtol=1e-6)


def test_k1_subspace_equals_planted_basis_and_nullspace_projection():
    b = load_backend("analytic", latent_shape=(1, 8, 8), rank=5, clusters=1, seed=3)
    x_t = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    sub = J.top_subspace(b, x_t, 500, rank=5, iters=5)
    assert _max_principal_angle(sub.vectors.flatten(1).T, b.model.bases[0]) < 1e-3
    r = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    p = J.nullspace_project(r, sub)
    u = b.model.bases[0]
    before = (r.flatten(1) @ u).norm(dim=1)
    after = (p.flatten(1) @ u).norm(dim=1)
    assert (after / before < 1e-3).all()  # removes at least 99.9% of the in-subspace component
    # and the posterior mean does not move along the null space (exactly rank-5 Jacobian)
    assert J.jvp(b, x_t.expand(3, -1, -1, -1), 500, p).abs().max() < 1e-10


def test_tiny_ldm_products_are_adjoint(tiny_ldm):
    x = tiny_ldm.randn_latents([0])
    g = torch.Generator().manual_seed(0)
    v, w = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    lhs = (J.jvp(tiny_ldm, x, 301, v) * w).sum()
    rhs = (v * J.vjp(tiny_ldm, x, 301, w)).sum()
    assert float((lhs - rhs).abs() / lhs.abs()) < 1e-3


def test_rank_ratio_and_bad_input(planted):
    assert J.rank_ratio(torch.tensor([3.0, 2.0, 1e-9, 0.0]), dim=8, tol=1e-6) == pytest.approx(2 / 8)
    with pytest.raises(InvalidParameterError, match=r"tolerance must be in \(0, 1\)"):
        J.rank_ratio(torch.ones(3), 3, tol=1.5)
    b, x_t, t = planted
    with pytest.raises(InvalidParameterError, match="rank must be in"):
        J.top_subspace(b, x_t, t, rank=0)
    with pytest.raises(InvalidParameterError, match="one x_t"):
        J.top_subspace(b, x_t.expand(2, -1, -1, -1), t, rank=2)


def test_energy_rank_is_the_papers_rule():
    # σ² = 50, 30, 15, 4, 1 (total 100): the top 3 hold 95 %, the top 4 99 %, past 0.99² = 98.01 %: k = 4
    s = torch.tensor([50, 30, 15, 4, 1], dtype=torch.float64).sqrt()
    assert J.energy_rank(s) == 4
    assert J.energy_rank(s, energy=0.97) == 3  # 0.97² = 94.09 %, reached by 95 %
    assert J.energy_rank(s.flip(0)) == 4  # order does not matter
    assert J.energy_rank(torch.zeros(5)) == 0
    # a σ > tol·σ_max count would call a flat spectrum of 100 equal values rank 100, as does the rule
    assert J.energy_rank(torch.ones(100)) == 99  # 99 of 100 hold 99 % ≥ 98.01 %
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(InvalidParameterError, match=r"energy must be in \(0, 1\)"):
            J.energy_rank(s, energy=bad)


def _operator(spectrum: torch.Tensor, seed: int = 0):
    d = len(spectrum)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    a = q @ torch.diag(spectrum.double() ** 2) @ q.T  # JᵀJ with singular values `spectrum`
    return lambda v: (v.flatten(1) @ a).view_as(v)


def test_lanczos_quadrature_estimates_energy_and_rank():
    d = 300
    s = torch.exp(-torch.arange(d, dtype=torch.float64) / 25.0)
    est = J.lanczos_spectrum(_operator(s), (d,), probes=16, steps=40, seed=1)
    assert est.weights.sum(1).allclose(torch.ones(16, dtype=torch.float64))
    assert est.total_energy() == pytest.approx(float((s ** 2).sum()), rel=0.15)
    exact = J.energy_rank(s)  # 50
    assert abs(est.energy_rank() - exact) < 0.2 * exact
    assert 0 < est.energy_rank_spread() < 0.2 * exact
    # a flat spectrum is full rank by the rule, and the estimate says so
    flat = J.lanczos_spectrum(_operator(torch.ones(d)), (d,), probes=4, steps=10)
    assert flat.energy_rank() == pytest.approx(J.energy_rank(torch.ones(d)), rel=0.02)


def test_lanczos_stops_at_a_low_rank_operator(planted):
    b, x_t, t = planted
    rank = int((torch.linalg.svdvals(J.full_jacobian(b, x_t, t)) > 1e-8).sum())
    est = J.lanczos_spectrum(J.jtj(b, x_t, t), tuple(x_t.shape[1:]), probes=8, steps=30, seed=0)
    # the Krylov space of a rank-6 operator is exhausted after 7 steps: no node beyond the planted rank
    assert int((est.weights[0] > 1e-12).sum()) <= rank + 1
    assert 1 <= est.energy_rank() <= rank + 1e-9


def test_lanczos_bad_input():
    with pytest.raises(InvalidParameterError, match="probes and steps must be >= 1"):
        J.lanczos_spectrum(lambda v: v, (4,), probes=0)
    with pytest.raises(InvalidParameterError, match="probes and steps must be >= 1"):
        J.lanczos_spectrum(lambda v: v, (4,), steps=0)
