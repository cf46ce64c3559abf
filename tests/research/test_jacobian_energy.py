"""The jacobian-energy analysis: the dense Fashion-MNIST Jacobian, the linear reference, the
randomized estimator against the exact rank, the quick report and bad configurations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shallowmark.core.jacobian import energy_rank, lanczos_spectrum
from shallowmark.errors import InvalidParameterError
from shallowmark.research import fmnist, jacobian_energy as je


@pytest.fixture(scope="module")
def small_model(fmnist_data):
    images = fmnist_data.synthetic_images(64, seed=3)
    return fmnist.train_model(images, fmnist.TrainConfig(width=32, depth=1, steps=30, batch=16, seed=0)), images


def test_dense_jacobian_matches_products(small_model):
    model, images = small_model
    den = fmnist.NetDenoiser(model.net)
    x = fmnist.to_tensor(images[:1]) * 0.8 + 0.3 * torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    jac = je.dense_fmnist_jacobian(den, x, 400)
    assert jac.shape == (784, 784)
    v = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    _, jv = torch.autograd.functional.jvp(lambda z: den.x0_grad(z, 400), x, v)
    assert torch.allclose(jac @ v.flatten(), jv.flatten(), atol=1e-4)
    # the JᵀJ operator the estimator uses is the dense one's
    got = je.fmnist_jtj(den, x, 400)(v)
    assert torch.allclose(got.flatten(), jac.T @ (jac @ v.flatten()), atol=1e-3)


def test_estimator_close_to_exact_on_a_trained_model(small_model):
    model, images = small_model
    den = fmnist.NetDenoiser(model.net)
    x = fmnist.to_tensor(images[:1])
    exact = energy_rank(torch.linalg.svdvals(je.dense_fmnist_jacobian(den, x, 600).double()))
    est = lanczos_spectrum(je.fmnist_jtj(den, x, 600), (1, 28, 28), probes=6, steps=30, dtype=torch.float32)
    assert abs(est.energy_rank() - exact) <= 0.1 * exact


def test_gaussian_reference_falls_with_noise(fmnist_data):
    r = je.gaussian_ratios(fmnist_data.synthetic_images(200, seed=1), (0.1, 0.3, 0.5, 0.8), 0.99)
    assert all(0 < a <= 1 for a in r) and r == sorted(r, reverse=True)


def test_middle_range():
    assert je.middle_range([0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.05, 0.08, 0.2, 0.01]) == (0.2, 0.3)
    assert je.middle_range([0.1, 0.2], [0.5, 0.4]) is None


def test_quick_report_from_the_cli(tmp_path, fmnist_dir, capsys):
    from shallowmark.cli import main

    assert main(["analyze", "jacobian-energy", "--quick", "--data", str(fmnist_dir), "--cache", str(tmp_path / "c"),
                 "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["analysis"] == "jacobian-energy" and rep["command"].startswith("shallowmark analyze jacobian-energy")
    assert rep["tiny_ldm"]["is_auto_recipe"] is False  # --quick runs a shorter Lanczos than t_star="auto"
    for png in ("energy_rank.png", "spectra.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    g = rep["fmnist"]["generalizing"]
    assert len(g["energy_ratio_mean"]) == 4 and all(0 < v <= 1 for v in g["energy_ratio_mean"])
    assert rep["fmnist"]["smallest_n"]["n_train"] == 16
    ld = rep["tiny_ldm"]
    assert ld["d"] == 4 * 64 * 64 and 0 < ld["energy_ratio"][0][0] <= 1 and 0 < ld["t_star_rule"] < 1
    for row in rep["estimator_check"]["rows"]:
        assert abs(row["estimate"] - row["exact"]) < 0.1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "99 % energy rule" in md and "best linear denoiser" in md and "t* =" in md


@pytest.mark.parametrize("kw, match", [
    (dict(energy=1.0), r"energy must be in \(0, 1\)"),
    (dict(fmnist_images=0), "fmnist_images must be a positive integer"),
    (dict(ldm_steps=True), "ldm_steps must be a positive integer"),
    (dict(fmnist_fractions=(0.5, 0.3)), "fmnist_fractions must be increasing"),
    (dict(ldm_fractions=(0.0, 0.3)), r"ldm_fractions must be increasing and distinct, each in \(0, 1\)"),
    (dict(margin=1.0), r"margin must be in \[0, 1\)"),
])
def test_bad_config(kw, match):
    with pytest.raises(InvalidParameterError, match=match):
        je.JacobianEnergyConfig.quick(**kw).check()
