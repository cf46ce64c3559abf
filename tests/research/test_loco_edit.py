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


def test_cli_masked_edit_changes_the_mask_more_than_the_outside(photo_file, tmp_path, capsys):
    """``edit --rect`` on the input's own pixels (the 400×300 photo is resized and cropped to 256²,
    and the rectangle with it): the summary reports the outside's PSNR, and the change per pixel is
    larger inside the mask than outside it."""
    from PIL import Image

    from shallowmark.cli import main

    out, base = tmp_path / "edit.png", tmp_path / "base.png"
    rc = main(["edit", "--image", str(photo_file), "--rect", "60,150,150,100", "--null-rank", "2", "--t", "0.5",
               "--lambda", "0.1", "--rank", "1", "--iters", "2", "--steps", "10", "--out", str(out), "--base", str(base)])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "masked LOCO edit" in line and "lies in the mask" in line and "outside it PSNR" in line
    edited, unedited = (np.asarray(Image.open(p)).astype(float) for p in (out, base))
    region = le.prepare_mask(le.rect_mask_of((300, 400), (60, 150, 150, 100)), (300, 400), 256)
    assert 0.1 < region.mean() < 0.5            # 150×100 of 400×300, scaled by 256/300, then to latent cells
    change = ((edited - unedited) ** 2).sum(-1)
    assert change[region].mean() > 2 * change[~region].mean()


def test_prepare_mask_follows_the_image_or_is_refused():
    square = le.rect_mask(256, (0, 0, 128, 256))
    assert np.array_equal(le.prepare_mask(square, (300, 400), 256), square)     # already on the model's grid
    wide = le.rect_mask_of((300, 400), (0, 0, 300, 200))                        # left half of a 400×300 photo
    got = le.prepare_mask(wide, (300, 400), 256)
    # short side 300 -> 256: the 400-wide image becomes 341 wide, cropped by 42 on each side
    assert got.shape == (256, 256) and abs(int(got[0].sum()) - (171 - 42)) <= 1
    with pytest.raises(InvalidParameterError, match="must be the image's own size"):
        le.prepare_mask(le.rect_mask(28, (0, 0, 5, 5)), (300, 400), 256)


@pytest.mark.parametrize("argv, message", [
    (["--image", "{photo}", "--mask", "{missing}"], "no such file"),
    (["--image", "{photo}", "--mask", "{small_mask}"], "must be the image's own size"),
    (["--image", "{photo}", "--rect", "0,0,0,10"], "empty or leaves"),
    (["--image", "{photo}", "--rect", "290,0,20,10"], "empty or leaves"),
    (["--image", "{photo}", "--rect", "a,b,c,d"], "(top, left, height, width)"),
    (["--image", "{photo}", "--rect", "0,0,300,400"], "covers the whole image"),
    (["--image", "{photo}", "--rect", "0,0,10,10", "--null-rank", "-1"], "null_rank"),
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
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "small.png")
    subs = dict(missing=str(tmp_path / "missing.png"), junk=str(junk), photo=str(photo_file), tmp=str(tmp_path),
                small_mask=str(tmp_path / "small.png"))
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


# -- masked LOCO: the mask, the masked Jacobian, the null-space projection ---------------------------

def test_masked_mean_is_the_masked_posterior_mean(planted):
    b, grid, pos, x_t = planted
    t = grid.timesteps[pos - 1]
    cells = le.rect_mask(8, (0, 0, 4, 8))                        # upper half of the 8×8 latent
    m = torch.as_tensor(cells, dtype=x_t.dtype)[None, None]
    wrapped = le.MaskedMean(b, m)
    assert torch.allclose(jac.posterior_mean(wrapped, x_t, t), m * jac.posterior_mean(b, x_t, t), atol=1e-12)
    v = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(2), dtype=x_t.dtype)
    assert torch.allclose(jac.jvp(wrapped, x_t, t, v), m * jac.jvp(b, x_t, t, v), atol=1e-12)
    assert wrapped.latent_shape == b.latent_shape                # everything else is the backend's


def _first_order_leakage(backend, x_t, t, cells, v) -> float:
    """‖P_Ωᶜ J v‖ / ‖P_Ω J v‖ through the masked adapter."""
    m = torch.as_tensor(cells, dtype=x_t.dtype)[None, None]
    out, inside = (jac.jvp(le.MaskedMean(backend, w), x_t, t, v[None]).norm() for w in (1 - m, m))
    return float(out / inside)


def test_null_projection_is_orthogonal_to_the_complement_with_the_exact_answers_of_one_cluster(planted):
    """K = 1: J = c·U Uᵀ, so P_Ω J = c·U (UᵀP_Ω U) Uᵀ and P_Ωᶜ J = c·U (I − UᵀP_Ω U) Uᵀ share their right
    singular vectors, in reverse order: the top of P_Ω J is the bottom of P_Ωᶜ J. Projecting out the
    complement's top 2 keeps v_Ω whole; its top 4 span all of range(U), and nothing is left."""
    b, grid, pos, x_t = planted
    mask = le.rect_mask(8, (0, 0, 8, 3))                         # the 3 left columns
    d = le.masked_direction(b, x_t, grid, pos, mask, rank=2, null_rank=2, iters=30)
    vc = d.complement.subspace.vectors.flatten(1)
    assert float(d.vector.norm()) == pytest.approx(1.0, abs=1e-12)
    assert float((vc @ d.vector.flatten()).abs().max()) < 1e-10  # in the null space of the top r' = 2
    assert d.kept == pytest.approx(1.0, abs=1e-8)
    assert d.projected(0)[0].equal(d.raw / d.raw.norm()) and d.projected(0)[1] == 1.0
    with pytest.raises(InvalidParameterError, match="leaves nothing"):
        le.masked_direction(b, x_t, grid, pos, mask, rank=2, null_rank=4, iters=30)


def test_masks_map_onto_latent_cells():
    m = le.rect_mask(256, (56, 80, 80, 96))
    cells = le.mask_cells(m, (64, 64))                           # 4×4 pixels a cell: exact on multiples of 4
    assert cells.sum() == 20 * 24 and cells[14:34, 20:44].all()
    assert np.array_equal(le.upsample_mask(cells, 256), m)
    half = le.mask_cells(le.rect_mask(256, (2, 0, 6, 4)), (64, 64))   # half of cell (0, 0), all of (1, 0)
    assert half.sum() == 2 and half[0, 0] and half[1, 0]
    quarter = le.mask_cells(le.rect_mask(256, (2, 2, 5, 5)), (64, 64))  # 4/16 of (0, 0): out; 9/16 of (1, 1): in
    assert quarter.sum() == 1 and quarter[1, 1]
    grey = np.zeros((28, 28), np.uint8)
    grey[3:9, 4:10] = 200
    assert np.array_equal(le.mask_from_image(grey), le.rect_mask(28, (3, 4, 6, 6)))
    assert np.array_equal(le.mask_from_image(np.stack([grey] * 3, -1)), le.mask_from_image(grey))


def test_mask_image_files(tmp_path):
    from PIL import Image

    grey = np.zeros((28, 28), np.uint8)
    grey[10:20, 5:9] = 255
    Image.fromarray(grey).save(tmp_path / "mask.png")
    assert np.array_equal(le.mask_from_image(tmp_path / "mask.png"), le.rect_mask(28, (10, 5, 10, 4)))
    with pytest.raises(InvalidImageError, match="cannot read mask .* no such file"):
        le.mask_from_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InvalidImageError, match="cannot read mask .* not a decodable image"):
        le.mask_from_image(str(tmp_path / "junk.png"))


@pytest.mark.parametrize("make, match", [
    (lambda: le.mask_cells(np.zeros((28, 28), bool), (28, 28)), "empty"),
    (lambda: le.mask_cells(np.ones((28, 28), bool), (28, 28)), "whole image"),
    (lambda: le.mask_cells(le.rect_mask(256, (0, 0, 1, 1)), (64, 64)), "covers no latent cell"),
    (lambda: le.mask_cells(~le.rect_mask(256, (0, 0, 1, 1)), (64, 64)), "every latent cell"),
    (lambda: le.mask_cells(np.ones((28, 28)), (28, 28)), "square bool"),
    (lambda: le.mask_cells(np.ones((30, 30), bool), (28, 28)), "multiple"),
    (lambda: le.rect_mask(28, (0, 0, 0, 5)), "empty or leaves"),
    (lambda: le.rect_mask(28, (20, 0, 10, 5)), "empty or leaves"),
    (lambda: le.rect_mask(28, (1, 2, 3)), "top, left, height, width"),
    (lambda: le.mask_from_image(np.zeros((28, 28), np.float32)), "bool"),
])
def test_bad_masks_are_refused(make, match):
    with pytest.raises(InvalidParameterError, match=match):
        make()


class _NoModel:
    """Shapes only: any model call fails, so these checks must run before one."""
    image_size = 28
    latent_shape = (1, 28, 28)


@pytest.mark.parametrize("mask, kw, match", [
    (np.zeros((28, 28), bool), {}, "empty"),
    (np.ones((28, 28), bool), {}, "whole image"),
    (np.ones((27, 27), bool), {}, "shape"),
    (le.rect_mask(28, (0, 0, 5, 5)), dict(null_rank=784), "null_rank"),
    (le.rect_mask(28, (0, 0, 5, 5)), dict(null_rank=-1), "null_rank"),
    (le.rect_mask(28, (0, 0, 5, 5)), dict(index=2, rank=2), "computed rank 2"),
    (le.rect_mask(28, (0, 0, 5, 5)), dict(iters=0), "iters"),
])
def test_masked_direction_checks_before_any_model_call(mask, kw, match):
    with pytest.raises(InvalidParameterError, match=match):
        le.masked_direction(_NoModel(), torch.zeros(1, 1, 28, 28), None, 1, mask, **kw)


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), "big"])
def test_edit_with_bad_lambda_is_refused_before_denoising(lam):
    with pytest.raises(InvalidParameterError, match="λ must be"):
        le.edit_latents(_NoModel(), torch.zeros(1, 1, 28, 28), None, 1, torch.zeros(1, 28, 28), [0.0, lam])


def test_masked_direction_on_tiny_ldm_stays_in_its_cells(tiny_ldm):
    """The same code on a 4-channel latent with 4×4-pixel cells: the masked left vector lives in Ω's
    cells, the projection is orthogonal to the complement's vectors, and the edit's change is
    concentrated in Ω beyond chance (smoke sizes: one iteration, 10-step grid)."""
    from shallowmark.core.photos import center_crop, heldout_photo
    from shallowmark.research.loco_masked import LDM_MASKS, region_stats

    grid = ddim.make_grid(tiny_ldm, 10)
    k = grid.position(0.5)
    x = le.image_to_xt(tiny_ldm, center_crop(heldout_photo(), 256), grid, k)
    mask = le.rect_mask(256, LDM_MASKS[0])
    d = le.masked_direction(tiny_ldm, x, grid, k, mask, rank=1, null_rank=2, iters=1)
    left = d.masked.subspace.left[0]
    assert float(left[:, ~d.cells].abs().max()) < 1e-4 * float(left.abs().max())
    assert float((d.complement.subspace.vectors.flatten(1) @ d.vector.flatten()).abs().max()) < 1e-5
    levels = le.decode_levels(tiny_ldm, le.edit_latents(tiny_ldm, x, grid, k, d.vector, [0.0, 0.05 * float(x.norm())]))
    s = region_stats(levels[1], levels[0], d.region)
    assert s["locality"] > 2 * float(d.region.mean())           # chance is Ω's area (0.117)


# -- the five properties on a small trained model -------------------------------------------------------

@pytest.fixture(scope="module")
def small_fmnist(fmnist_dir, tmp_path_factory):
    from shallowmark.research.fmnist_backend import FmnistBackend
    from shallowmark.research.regimes import RegimesConfig, generalizing_model, to_rgb
    from shallowmark.research import fmnist

    cfg = RegimesConfig.quick(data_dir=str(fmnist_dir), cache_dir=str(tmp_path_factory.mktemp("cache")))
    model, _ = generalizing_model(cfg)
    return FmnistBackend(model.net), to_rgb(fmnist.load_fashion_mnist("test", str(fmnist_dir))[:4])


def test_projected_edit_changes_the_outside_less_than_the_unprojected(small_fmnist):
    from shallowmark.research.loco_masked import FMNIST_MASKS, region_stats

    backend, images = small_fmnist
    grid = ddim.make_grid(backend, 20)
    k = grid.position(0.5)
    mask = le.rect_mask(28, FMNIST_MASKS[0])
    for image in images[:2]:
        x = le.image_to_xt(backend, image, grid, k)
        d = le.masked_direction(backend, x, grid, k, mask, rank=2, null_rank=8, iters=4)
        lam = 0.1 * float(x.norm())
        lv = le.decode_levels(backend, le._denoise_all(backend, torch.cat([x, x + lam * d.raw[None],
                                                                          x + lam * d.vector[None]]), grid, k))
        raw, proj = (region_stats(e, lv[0], d.region) for e in lv[1:])
        t = grid.timesteps[k - 1]                                # first order, at x_t: the leak is cut
        assert _first_order_leakage(backend, x, t, d.cells, d.vector) < _first_order_leakage(backend, x, t, d.cells, d.raw)
        assert proj["rms_out"] < raw["rms_out"]                  # measured on the final image
        assert proj["psnr_out"] > raw["psnr_out"]
        assert proj["rms_in"] > 2 * proj["rms_out"]              # and it still edits inside Ω


def test_property_measures_on_known_arrays():
    from shallowmark.research.loco_masked import composability, linearity, region_stats

    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8, 3))
    b = rng.normal(size=(8, 8, 3))
    assert composability(a + b, a, b) == pytest.approx(0.0, abs=1e-12)
    assert composability(np.zeros_like(a), a, b) == pytest.approx(np.linalg.norm(a + b) / (np.linalg.norm(a) + np.linalg.norm(b)))
    lin = linearity([-1.0, 1.0, 2.0], [-a, a, 2 * a])
    assert lin["r2"] == pytest.approx(1.0) and lin["symmetry"]["1"] == pytest.approx(0.0, abs=1e-12)
    assert lin["doubling"]["1"] == pytest.approx(0.0, abs=1e-12) and max(lin["off_axis"].values()) < 1e-12
    assert lin["slope"] == pytest.approx(np.linalg.norm(a) / np.sqrt(a.size))   # RMS per unit λ
    sat = linearity([-1.0, 1.0, 2.0], [-a, a, 1.2 * a])          # saturating: doubling error 0.4
    assert sat["doubling"]["1"] == pytest.approx(0.4) and sat["r2"] < 1.0
    base = np.full((28, 28, 3), 100.0)
    region = le.rect_mask(28, (0, 0, 14, 28))
    inside = base.copy()
    inside[region] += 10.0
    s = region_stats(inside, base, region)
    assert s["locality"] == 1.0 and s["rms_out"] == 0.0 and s["rms_in"] == pytest.approx(10.0)
    assert s["psnr_out"] == float("inf") and s["ssim_out"] == pytest.approx(1.0)


def test_quick_masked_analysis_writes_its_report(tmp_path, fmnist_dir, capsys):
    from shallowmark.cli import main
    from shallowmark.research.loco_masked import LocoMaskedConfig

    out = tmp_path / "lm"
    argv = ["analyze", "loco-masked", "--quick", "--data", str(fmnist_dir), "--cache", str(tmp_path / "c"),
            "--out", str(out)]
    assert main(argv) == 0
    assert {"report.md", "report.json", "edits_fmnist.png", "properties.png"} <= {p.name for p in out.iterdir()}
    rep = json.loads((out / "report.json").read_text())
    assert rep["command"] == "shallowmark " + " ".join(argv)
    cfg = LocoMaskedConfig.quick().fmnist
    f = rep["parts"]["fmnist"]
    assert set(rep["parts"]) == {"fmnist"} and len(f["results"]) == cfg.images + 1   # + the source at t_other
    for r in f["results"].values():
        assert {"raw1", "p1", "random"} <= set(r["stats"])
        assert all(0.0 <= s["locality"] <= 1.0 for s in r["stats"].values())
        assert r["linearity"]["r2"] <= 1.0 and r["composability"]["projected"] >= 0.0
        assert len(r["linearity"]["lambdas"]) == len(cfg.multiples) + 1
    md = (out / "report.md").read_text()
    assert rep["command"] in md and "Not tested here" in md and "edits_fmnist.png" in md
    assert "Fashion-MNIST model" in capsys.readouterr().out


@pytest.mark.parametrize("kw, match", [
    (dict(lam=0.0), "lam must be > 0"),
    (dict(lam=float("nan")), "λ must be"),
    (dict(multiples=(1.0, 2.0)), "negative"),
    (dict(multiples=(-1.0, 0.0, 1.0)), "non-zero"),
    (dict(masks=((3, 6, 10, 16), (10, 6, 10, 16))), "disjoint"),
    (dict(masks=((3, 6, 10, 16),)), "two masks"),
    (dict(null_sweep=(0, 2)), "null_sweep"),
    (dict(t_other=0.5), "t_other"),
    (dict(t=1.0), "t must be"),
])
def test_masked_analysis_rejects_bad_config(kw, match, tmp_path):
    from dataclasses import replace

    from shallowmark.research.loco_masked import LocoMaskedConfig, run_loco_masked_analysis

    cfg = LocoMaskedConfig.quick()
    with pytest.raises(InvalidParameterError, match=match):
        run_loco_masked_analysis(tmp_path, replace(cfg, fmnist=replace(cfg.fmnist, **kw)))
    assert not (tmp_path / "report.json").exists()
