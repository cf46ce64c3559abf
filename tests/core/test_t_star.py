"""The rank profile of the posterior-mean Jacobian, the rule for t* and auto_t_star (core.t_star).
The analysis and its report are tested in tests/research/test_jacobian_rank.py."""

import json

import numpy as np
import pytest
import torch

from shallowmark.core import jacobian as J
from shallowmark.core import t_star as R
from shallowmark.core.backends import load_backend
from shallowmark.errors import InvalidParameterError


def _synthetic(ratios, positions, d=10, num_steps=50, images=1):
    """A profile whose rank ratio at any tol in (0, 1) is ``ratios`` (ones, then zeros)."""
    spectra = torch.zeros(images, len(ratios), d, dtype=torch.float64)
    for j, r in enumerate(ratios):
        spectra[:, j, :round(r * d)] = 1.0
    return R.RankProfile(fractions=tuple(k / num_steps for k in positions), positions=tuple(positions),
                         timesteps=tuple(20 * (k - 1) + 1 for k in positions), num_steps=num_steps, tol=0.01,
                         jacobian_shape=(1, 1, d), images=tuple(f"im{i}" for i in range(images)),
                         spectra=spectra, sigma_max=torch.ones(images, len(ratios), dtype=torch.float64))


def test_dense_jacobian_matches_autograd(molrg_k1):
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = R.dense_jacobian(molrg_k1, x, 400, chunk=7)  # a chunk that does not divide d
    assert torch.allclose(dense, J.full_jacobian(molrg_k1, x, 400), atol=1e-12)


def test_profile_recovers_planted_rank_and_sigma(molrg_k1):
    x0 = molrg_k1.sample_data(2, seed=1)
    prof = R.rank_profile(molrg_k1, x0, fractions=(0.1, 0.3, 0.5, 0.9), crop=None, tol=1e-2)
    assert prof.positions == (5, 15, 25, 45) and prof.dim == 64 and prof.jacobian_shape == (1, 8, 8)
    assert np.all(prof.ratios() == 5 / 64)  # the planted rank at every t, for every image
    assert np.all(prof.ratios(1e-6) == 5 / 64) and np.all(prof.spread() == 0)
    abar = molrg_k1.alphas_cumprod[list(prof.timesteps)].numpy()
    assert np.allclose(prof.sigma_max.numpy(), np.sqrt(abar)[None], rtol=1e-9)
    # J = c·UUᵀ: five equal singular values, so both effective ranks are exactly r / d as well
    assert np.allclose(prof.participation_ratio(), 5 / 64) and np.allclose(prof.stable_rank_ratio(), 5 / 64)
    assert np.allclose(prof.mean_square_gain(), 5 * abar[None] / 64)
    sub = prof.subset([0.5, 0.1])
    assert sub.positions == (5, 25) and torch.equal(sub.spectra, prof.spectra[:, [0, 2]])
    with pytest.raises(InvalidParameterError, match=r"no t at grid positions \[20\]"):
        prof.subset([0.4])


def test_profile_two_clusters_rank_between_r_and_kr():
    b = load_backend("analytic", latent_shape=(1, 8, 8), rank=3, clusters=2, seed=1)
    prof = R.rank_profile(b, b.sample_data(3, seed=2), fractions=(0.2, 0.6), crop=None, tol=1e-6)
    assert np.all(prof.ratios() >= 3 / 64) and np.all(prof.ratios() <= 6 / 64)


def test_choose_t_star_on_synthetic_profile():
    prof = _synthetic([1.0, 0.8, 0.5, 0.3, 0.3, 0.4], [5, 10, 15, 20, 25, 30])
    # threshold 0.3 + 0.1·0.7 = 0.37, reached between positions 15 (0.5) and 20 (0.3) at 18.25 → 19
    assert R.choose_t_star(prof) == pytest.approx(19 / 50)
    assert R.choose_t_star(prof, margin=0.0) == pytest.approx(20 / 50)  # the first minimum itself
    assert R.choose_t_star(prof, margin=0.5) == pytest.approx(13 / 50)  # 0.65 at 12.5 → 13
    assert R.choose_t_star(_synthetic([0.4, 0.4, 0.4], [10, 20, 30])) == pytest.approx(10 / 50)  # flat
    # the mean over images is what counts
    two = _synthetic([1.0, 0.2, 0.2], [10, 20, 30], images=2)
    two.spectra[1, 1, :] = 1.0  # image 1 is full rank at position 20: means 1.0, 0.6, 0.2
    assert R.choose_t_star(two) == pytest.approx(28 / 50)  # threshold 0.28, reached at 28
    assert two.image(0).images == ("im0",) and R.choose_t_star(two.image(0)) == pytest.approx(19 / 50)


def test_bad_input_is_rejected(molrg_k1, tiny_ldm):
    x0 = molrg_k1.sample_data(1, seed=0)
    for tol in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(InvalidParameterError, match=r"tolerance must be in \(0, 1\)"):
            R.rank_profile(molrg_k1, x0, tol=tol, crop=None)
    with pytest.raises(InvalidParameterError, match="t list is empty"):
        R.rank_profile(molrg_k1, x0, fractions=[], crop=None)
    with pytest.raises(InvalidParameterError, match=r"fractions of T in \(0, 1\]"):
        R.rank_profile(molrg_k1, x0, fractions=[0.3, 1.5], crop=None)
    with pytest.raises(InvalidParameterError, match="N = 0"):
        R.rank_profile(molrg_k1, x0[:0], crop=None)
    with pytest.raises(InvalidParameterError, match="batch of latents"):
        R.rank_profile(molrg_k1, x0[0], crop=None)
    with pytest.raises(InvalidParameterError, match="2 names for 1 latents"):
        R.rank_profile(molrg_k1, x0, crop=None, names=["a", "b"])
    with pytest.raises(InvalidParameterError, match="multiple of 8"):
        R.rank_profile(tiny_ldm, torch.zeros(1, 4, 64, 64), crop=12)
    with pytest.raises(InvalidParameterError, match=r"crop must be a latent side in \[1, 64\]"):
        R.rank_profile(tiny_ldm, torch.zeros(1, 4, 64, 64), crop=128)
    prof = _synthetic([1.0, 0.5], [10, 20])
    for margin in (-0.1, 1.0):
        with pytest.raises(InvalidParameterError, match=r"margin must be in \[0, 1\)"):
            R.choose_t_star(prof, margin=margin)
    with pytest.raises(InvalidParameterError, match="tolerance"):
        prof.ratios(1.5)
    with pytest.raises(InvalidParameterError, match="energy must be in"):
        R.auto_t_star(molrg_k1, energy=1.0)
    with pytest.raises(InvalidParameterError, match="energy must be in"):
        R.energy_profile(molrg_k1, molrg_k1.sample_data(1, seed=0), energy=0.0)
    with pytest.raises(InvalidParameterError, match="non-empty batch"):
        R.energy_profile(molrg_k1, torch.zeros(0, 1, 8, 8))
    with pytest.raises(InvalidParameterError, match="num_steps"):
        R.auto_t_star(molrg_k1, num_steps=5)
    with pytest.raises(InvalidParameterError, match="unknown photo 'nope'"):
        R.photo_latents(tiny_ldm, ["nope"])
    with pytest.raises(InvalidParameterError, match="no photos"):
        R.photo_latents(tiny_ldm, [])
    big = load_backend("analytic", latent_shape=(4, 64, 64), rank=2, seed=0)
    with pytest.raises(InvalidParameterError, match="give t\\* as a number"):
        R.auto_t_star(big, cache=False)


def test_auto_t_star_caches_per_model(molrg_k1, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(R, "_auto_memory", {})
    calls = []
    real = R.rank_profile
    monkeypatch.setattr(R, "rank_profile", lambda *a, **k: calls.append(1) or real(*a, **k))
    # K = 1: the rank ratio is r/d at every t, a flat profile, so the rule's answer is its first t
    assert R.auto_t_star(molrg_k1) == pytest.approx(0.1)
    files = list((tmp_path / "shallowmark" / "jacobian-rank").glob("*.json"))
    assert len(files) == 1 and len(calls) == 1
    saved = json.loads(files[0].read_text())
    assert saved["t_star"] == pytest.approx(0.1) and saved["fingerprint"] == R.model_fingerprint(molrg_k1)
    assert R.auto_t_star(molrg_k1) == pytest.approx(0.1) and len(calls) == 1  # memory
    monkeypatch.setattr(R, "_auto_memory", {})
    assert R.auto_t_star(molrg_k1) == pytest.approx(0.1) and len(calls) == 1  # disk
    assert R.auto_t_star(molrg_k1, cache=False) == pytest.approx(0.1) and len(calls) == 2
    R.auto_t_star(molrg_k1, margin=0.2)  # other settings: another entry
    assert len(calls) == 3 and len(list(files[0].parent.glob("*.json"))) == 2
    # a different model (other planted subspace) has another fingerprint and so another entry
    other = load_backend("analytic", latent_shape=(1, 8, 8), rank=5, clusters=1, seed=4)
    assert R.model_fingerprint(other) != R.model_fingerprint(molrg_k1)
    assert R.model_fingerprint(load_backend("analytic", latent_shape=(1, 8, 8), rank=5, clusters=1, seed=3)) \
        == R.model_fingerprint(molrg_k1)


def test_energy_profile_finds_the_planted_rank(molrg_k1):
    """K = 1 MoLRG: J = c·UUᵀ with rank 5 at every t. Lanczos finds the one eigenvalue c² exactly,
    but how many directions carry it is a Hutchinson-type estimate, d·mean‖Uᵀv‖² over the probes:
    unbiased, with a spread the bootstrap reports (about 0.3 of a direction with 64 probes)."""
    prof = R.energy_profile(molrg_k1, molrg_k1.sample_data(2, seed=1), fractions=(0.1, 0.5), probes=64, steps=12)
    assert prof.ratios.shape == (2, 2) and prof.positions == (5, 25) and prof.dim == 64
    err = np.abs(prof.ratios * 64 - 5)
    assert (err < 1.0).all() and (err < 3 * prof.ratio_sd * 64).all() and (prof.ratio_sd > 0).all()
    # Σσ²/d: five equal σ = c_t, so it is 5·c_t²/64, and c_t shrinks as t grows
    assert prof.mean_square_gain[0, 0] > prof.mean_square_gain[0, 1] > 0


def test_auto_t_star_on_a_unet_uses_the_full_size_energy_profile(tiny_ldm, tmp_path, monkeypatch):
    """A convolutional model gets the energy rule on its whole latent (never a crop): the rule runs
    on energy_profile's mean curve, and the cache records that curve and the recipe."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(R, "_auto_memory", {})
    seen = {}
    curve = np.array([0.44, 0.39, 0.35, 0.46, 0.58, 0.70, 0.78, 0.80])  # the shape tiny-ldm measured

    def fake(backend, x0, **kw):
        seen.update(kw, shape=tuple(x0.shape))
        pos = tuple(round(f * kw["num_steps"]) for f in kw["fractions"])
        return R.EnergyProfile(fractions=tuple(kw["fractions"]), positions=pos, timesteps=pos,
                               num_steps=kw["num_steps"], energy=kw["energy"], probes=kw["probes"],
                               steps=kw["steps"], jacobian_shape=tuple(x0.shape[1:]), images=tuple(kw["names"]),
                               ratios=curve[None], ratio_sd=np.zeros((1, 8)), mean_square_gain=np.zeros((1, 8)))
    monkeypatch.setattr(R, "energy_profile", fake)
    monkeypatch.setattr(R, "rank_profile", lambda *a, **k: pytest.fail("a UNet must not get the crop profile"))
    value = R.auto_t_star(tiny_ldm)
    assert seen["shape"] == (1, *tiny_ldm.latent_shape)          # the full latent of one photo
    assert seen["probes"] == R.AUTO_PROBES and seen["steps"] == R.AUTO_STEPS
    assert value == R.t_star_from_curve([5, 10, 15, 20, 25, 30, 35, 40], curve, 50, R.DEFAULT_MARGIN)
    assert 0.1 < value < 0.3                                     # 0.35 + 0.1·(0.80 − 0.35) = 0.395: before 0.2T
    record = json.loads(next((tmp_path / "shallowmark" / "jacobian-rank").glob("*.json")).read_text())
    assert record["settings"]["version"] == 2 and record["settings"]["photos"] == list(R.AUTO_PHOTOS)
    assert record["mean_energy_rank_ratio"] == pytest.approx(curve.tolist())


@pytest.mark.slow
def test_auto_t_star_on_tiny_ldm(tiny_ldm, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(R, "_auto_memory", {})
    value = R.auto_t_star(tiny_ldm)
    assert min(R.AUTO_FRACTIONS) <= value <= max(R.AUTO_FRACTIONS)
    assert R.auto_t_star(tiny_ldm) == value


def test_energy_ratios_and_rule_on_any_curve(molrg_k1):
    prof = R.rank_profile(molrg_k1, molrg_k1.sample_data(1, seed=1), fractions=(0.1, 0.5), crop=None)
    # J = c·UUᵀ with rank 5: five equal σ hold all the energy, so the energy rank is 5 as well
    assert np.allclose(prof.energy_ratios(), 5 / 64)
    synthetic = _synthetic([1.0, 0.8, 0.5, 0.3, 0.3, 0.4], [5, 10, 15, 20, 25, 30])
    assert R.t_star_from_curve(synthetic.positions, synthetic.mean(), 50, 0.1) == R.choose_t_star(synthetic)
    with pytest.raises(InvalidParameterError, match="as many ratios as positions"):
        R.t_star_from_curve([5, 10], [0.3], 50, 0.1)
