"""LOCO edit: directions against the analytic model's planted subspace, the locality measure on
arrays with known answers, input checks, and the two commands at smoke size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from shallowmark.core import ddim
from shallowmark.core import jacobian as jac
from shallowmark.research import loco_edit as le
from shallowmark.core.backends import load_backend
from shallowmark.errors import InvalidImageError, InvalidParameterError


# -- directions on the analytic MoLRG (J = c·U Uᵀ for one cluster: known range and null space) -------

@pytest.fixture(scope="module")
def planted():
    """K = 1, planted rank 4 in d = 64; x_t is a noisy sample at t = 0.5T of a 50-step grid."""
    b = load_backend("analytic", latent_shape=(1, 8, 8), rank=4, clusters=1, seed=5)
    grid = ddim.make_grid(b, 50)
    pos = grid.position(0.5)
    a = float(grid.alphas[pos])
    g = torch.Generator().manual_seed(0)
    x0 = b.sample_data(1, seed=1)
    x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    return b, grid, pos, x_t


def _max_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    return float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)).max())


def test_directions_lie_in_planted_subspace(planted):
    b, grid, pos, x_t = planted
    d = le.loco_directions(b, x_t, grid, pos, rank=6, iters=8)
    u_true = b.model.bases[0]                                    # (64, 4)
    v = d.subspace.vectors.flatten(1)
    assert _max_angle(v[:4].T, u_true) < 1e-6                    # top 4 = the planted span
    s = d.subspace.singular_values
    assert float(s[4] / s[0]) < 1e-8                             # nothing beyond the planted rank
    assert (d.residuals[:4] < 1e-8).all()                        # converged singular pairs
    a = float(b.alphas_cumprod[d.timestep])
    # One cluster: x̂0 = √ᾱ / (ᾱ + (1 − ᾱ)) · U Uᵀ x_t, so every planted σ_i is √ᾱ.
    assert torch.allclose(s[:4], torch.full((4,), a ** 0.5, dtype=s.dtype), rtol=1e-8)
    assert d.timestep == grid.timesteps[pos - 1]


def test_edit_moves_x0hat_along_u_and_null_direction_does_not(planted):
    b, grid, pos, x_t = planted
    d = le.loco_directions(b, x_t, grid, pos, rank=4, iters=8)
    t, lam = d.timestep, 3.0
    x0 = jac.posterior_mean(b, x_t, t)
    v0, u0, s0 = d.subspace.vectors[0:1], d.subspace.left[0:1], float(d.subspace.singular_values[0])
    moved = jac.posterior_mean(b, x_t + lam * v0, t) - x0
    assert torch.allclose(moved, lam * s0 * u0, atol=1e-10)     # linear model: exactly λ σ_0 u_0
    r = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=x_t.dtype)
    null = jac.nullspace_project(r, b.model.bases[0].T.reshape(4, 1, 8, 8))
    null = null / null.norm()
    assert float((jac.posterior_mean(b, x_t + lam * null, t) - x0).norm()) < 1e-10
    # Through the whole DDIM descent: the final latent barely moves along the null direction.
    base = le.edit_latents(b, x_t, grid, pos, v0[0], [0.0])[0]
    along_v = le.edit_latents(b, x_t, grid, pos, v0[0], [lam])[0]
    along_null = le.edit_latents(b, x_t, grid, pos, null[0], [lam])[0]
    dv, dn = float((along_v - base).norm()), float((along_null - base).norm())
    assert dv > 1.0 and dn < 0.1 * dv


def test_edit_latents_zero_lambda_is_plain_denoise(planted):
    b, grid, pos, x_t = planted
    v = torch.randn(1, 8, 8, dtype=x_t.dtype)
    out = le.edit_latents(b, x_t, grid, pos, v, [0.0])
    assert torch.allclose(out, ddim.denoise(b, x_t, grid, pos, 0))


# -- locality on arrays with known answers -----------------------------------------------------------

def test_highlight_region_is_smallest_set_reaching_the_mass():
    heat = np.array([[4.0, 3.0], [2.0, 1.0]])                    # total 10
    assert le.highlight_region(heat, 0.5).tolist() == [[True, True], [False, False]]   # 7 ≥ 5
    assert le.highlight_region(heat, 0.4).tolist() == [[True, False], [False, False]]  # 4 ≥ 4
    assert le.highlight_region(heat, 0.95).sum() == 4


def test_locality_inside_uniform_and_outside():
    heat = np.zeros((8, 8))
    heat[2:4, 2:4] = 1.0                                         # all the heat in 4 of 64 cells
    region = le.upsample_mask(le.highlight_region(heat, 0.9), 32)   # 4×4 pixel blocks
    assert region.shape == (32, 32)
    area = float(region.mean())
    assert region[8:16, 8:16].all() and area == 1 / 16          # exactly the 4 hot cells
    half = le.highlight_region(heat, 0.5)                        # ties: the first 2 in reading order
    assert half.sum() == 2 and half[2, 2] and half[2, 3]
    base = np.zeros((32, 32, 3))
    inside = base.copy()
    inside[region] = 7.0
    assert le.locality(le.change_energy(inside, base), region) == 1.0
    uniform = base + 2.0
    assert math.isclose(le.locality(le.change_energy(uniform, base), region), area)
    outside = base.copy()
    outside[~region] = 1.0
    assert le.locality(le.change_energy(outside, base), region) == 0.0
    assert math.isnan(le.locality(le.change_energy(base, base), region))   # nothing changed


def test_heat_map_sums_channels_and_region_for_maps_to_pixels():
    u = np.zeros((4, 4, 4))
    u[0, 1, 1], u[3, 1, 1] = 3.0, 4.0                           # 9 + 16 in one cell
    u[1, 3, 0] = 1.0
    h = le.heat_map(u)
    assert h[1, 1] == 25.0 and h[3, 0] == 1.0 and h.sum() == 26.0
    region = le.region_for(torch.tensor(u), 16, 0.5)
    assert region.sum() == 16 and region[4:8, 4:8].all()


# -- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 1.0, 1.5, -0.2, float("nan")])
def test_t_outside_open_interval_is_refused(t):
    with pytest.raises(InvalidParameterError, match="t must be"):
        le.check_t(t)


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -float("inf"), "big"])
def test_non_finite_lambda_is_refused(lam):
    with pytest.raises(InvalidParameterError, match="λ must be"):
        le.check_lambda(lam)


def test_index_rank_and_mass_checks():
    with pytest.raises(InvalidParameterError, match="index 8 >= computed rank 8"):
        le.check_index(8, 8)
    with pytest.raises(InvalidParameterError, match="index"):
        le.check_index(-1, 8)
    with pytest.raises(InvalidParameterError, match="rank"):
        le.check_index(0, 0)
    for m in (0.0, 1.0, 2.0):
        with pytest.raises(InvalidParameterError, match="mass"):
            le.highlight_region(np.ones((2, 2)), m)
    with pytest.raises(InvalidParameterError, match="all zero"):
        le.highlight_region(np.zeros((2, 2)))
    with pytest.raises(InvalidParameterError, match="multiple"):
        le.upsample_mask(np.ones((3, 3), bool), 16)
    with pytest.raises(InvalidParameterError, match="differ"):
        le.locality(np.ones((4, 4)), np.ones((2, 2), bool))


def test_loco_edit_image_checks_before_any_model_call():
    class NoModel:  # any model call would fail: the checks must come first
        image_size = 256

    img = np.zeros((256, 256, 3), np.uint8)
    with pytest.raises(InvalidParameterError, match="computed rank 4"):
        le.loco_edit_image(NoModel(), img, index=4, rank=4)
    with pytest.raises(InvalidParameterError, match="t must be"):
        le.loco_edit_image(NoModel(), img, t=1.0)
    with pytest.raises(InvalidParameterError, match="λ must be finite"):
        le.loco_edit_image(NoModel(), img, lam=float("inf"))
    with pytest.raises(InvalidImageError, match="uint8 RGB"):
        le.loco_edit_image(NoModel(), np.zeros((256, 256), np.uint8))


def test_read_image_missing_unreadable_and_resized(tmp_path):
    from PIL import Image

    with pytest.raises(InvalidImageError, match="no such file"):
        le.read_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(InvalidImageError, match="not a decodable image"):
        le.read_image(junk)
    p = tmp_path / "wide.png"
    Image.fromarray(np.full((120, 300, 3), 90, np.uint8)).save(p)
    assert le.read_image(p).shape == (120, 300, 3)
    out = le.read_image(p, 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8


# -- the commands at smoke size ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    """A non-square crop of the held-out photo, so `edit` also exercises the resize path."""
    from PIL import Image

    from shallowmark.core.photos import heldout_photo

    p = tmp_path_factory.mktemp("loco") / "photo.png"
    Image.fromarray(heldout_photo()[100:400, 50:450]).save(p)
    return p


def test_cli_edit_writes_png_and_prints_locality(photo_file, tmp_path, capsys):
    from PIL import Image

    from shallowmark.cli import main

    out, base = tmp_path / "edit.png", tmp_path / "base.png"
    rc = main(["edit", "--image", str(photo_file), "--t", "0.5", "--index", "0", "--lambda", "0.1", "--rank", "1",
               "--iters", "1", "--steps", "10", "--out", str(out), "--base", str(base)])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}") and "of the pixel change lies in the region" in line
    edited, unedited = np.asarray(Image.open(out)), np.asarray(Image.open(base))
    assert edited.shape == unedited.shape == (256, 256, 3)
    assert np.abs(edited.astype(int) - unedited.astype(int)).mean() > 0.5   # λ = 0.1‖x_t‖ visibly changes it


@pytest.mark.parametrize("argv, message", [
    (["--image", "{missing}"], "no such file"),
    (["--image", "{junk}"], "not a decodable image"),
    (["--image", "{photo}", "--lambda", "nan"], "λ must be finite"),
    (["--image", "{photo}", "--lambda", "inf"], "λ must be finite"),
    (["--image", "{photo}", "--index", "3", "--rank", "3"], "computed rank 3"),
    (["--image", "{photo}", "--t", "1.0"], "t must be"),
    (["--image", "{photo}", "--t", "0"], "t must be"),
    (["--image", "{photo}", "--out", "{tmp}/no/such/dir/x.png"], "existing folder"),
])
def test_cli_edit_bad_input(argv, message, photo_file, tmp_path, capsys):
    from shallowmark.cli import main

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG but truncated")
    subs = dict(missing=str(tmp_path / "missing.png"), junk=str(junk), photo=str(photo_file), tmp=str(tmp_path))
    argv = [a.format(**subs) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o.png")]
    assert main(["edit", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_quick_analysis_writes_report(tmp_path, capsys):
    from shallowmark.cli import main

    out = tmp_path / "loco"
    assert main(["analyze", "loco-edit", "--quick", "--out", str(out)]) == 0
    assert {"report.md", "report.json", "edits_grace_hopper.png", "locality.png"} <= {p.name for p in out.iterdir()}
    rep = json.loads((out / "report.json").read_text())
    assert rep["command"] == f"shallowmark analyze loco-edit --quick --out {out}"
    f = rep["results"]["grace_hopper"]
    cfg = le.LocoAnalysisConfig.quick()
    assert len(f["singular_values"]) == cfg.rank and f["singular_values"] == sorted(f["singular_values"], reverse=True)
    assert np.array(f["locality"]).shape == (cfg.rank, len(cfg.lambdas))
    assert all(0.0 <= v <= 1.0 for row in f["locality"] for v in row)
    assert all(0.0 < a < 1.0 for a in f["region_area"])
    md = (out / "report.md").read_text()
    assert rep["command"] in md and "edits_grace_hopper.png" in md
    assert "LOCO edit" in capsys.readouterr().out


def test_analysis_rejects_bad_config(tmp_path):
    with pytest.raises(InvalidParameterError, match="non-zero"):
        le.run_loco_edit_analysis(tmp_path, config=le.LocoAnalysisConfig(lambdas=(0.0, 0.1)))
    with pytest.raises(InvalidParameterError, match="t must be"):
        le.run_loco_edit_analysis(tmp_path, config=le.LocoAnalysisConfig(t=1.0))
