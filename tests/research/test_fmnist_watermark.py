"""Shallow Diffuse in pixel space on a Fashion-MNIST model: the backend's conventions and checks, a
measured embed → verify round trip on a quickly trained model, bad configurations, and the quick
analysis with its report."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from shallowmark.core import ddim
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse
from shallowmark.errors import InvalidParameterError, InvalidShapeError, UnknownNameError
from shallowmark.research import fmnist
from shallowmark.research import fmnist_watermark as fw
from shallowmark.research.fmnist_backend import FmnistBackend
from shallowmark.research.regimes import RegimesConfig


@pytest.fixture(scope="module")
def trained_backend(fmnist_data):
    """A small MLP trained for a few seconds on generated garment-like images."""
    torch.manual_seed(0)
    model = fmnist.train_model(fmnist_data.synthetic_images(256, 3),
                               fmnist.TrainConfig(width=64, depth=1, steps=200, batch=64, seed=3))
    return FmnistBackend(model.net)


# -- the backend ------------------------------------------------------------------------------------

def test_backend_schedule_matches_the_models_training():
    from diffusers import DDIMScheduler

    b = FmnistBackend(fmnist.ResMLP(16, 1))
    assert b.latent_shape == (1, 28, 28) and b.image_size == 28 and b.alphas_cumprod.dtype == torch.float64
    # backend timestep k is model step k + 1, which is what diffusers' squaredcos_cap_v2 computes
    assert torch.allclose(b.alphas_cumprod, fmnist.Schedule().alpha_bar[1:].double())
    sched = DDIMScheduler.from_config(b.scheduler_config)
    assert torch.allclose(sched.alphas_cumprod.double(), b.alphas_cumprod, atol=1e-6)
    # the project's DDIM grid is the Fashion-MNIST sampler's grid, ending at ᾱ = 1
    grid = ddim.make_grid(b, 50)
    assert [t + 1 for t in reversed(grid.timesteps)] + [0] == fmnist.Schedule().grid(50)
    assert float(grid.alphas[0]) == 1.0
    assert grid.timesteps[grid.position(0.3) - 1] + 1 == 300


def test_backend_eps_is_the_models_noise_prediction(trained_backend):
    b = trained_backend
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    want = fmnist.NetDenoiser(b.net).eps(x, 300)
    assert torch.allclose(b.eps(x, 299), want, atol=1e-5)
    # per-sample timesteps: each row at its own step
    t = torch.tensor([299, 299, 99, 99, 0])
    got = b.eps(x, t)
    assert torch.allclose(got[:2], want[:2], atol=1e-5)
    assert torch.allclose(got[2:4], fmnist.NetDenoiser(b.net).eps(x[2:4], 100), atol=1e-5)
    # differentiable, for the Jacobian tools
    xg = x[:1].clone().requires_grad_(True)
    b.eps(xg, 500).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_backend_images_are_grey_pixels():
    b = FmnistBackend(fmnist.ResMLP(16, 1))
    z = torch.rand(3, 1, 28, 28) * 2 - 1
    rgb = b.decode(z)
    assert rgb.shape == (3, 3, 28, 28) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert torch.equal(b.encode(rgb), z)          # grey given as RGB: the identity
    assert torch.equal(b.encode(z), z)            # single-channel tensors too
    assert torch.equal(b.decode(z * 3).max(), torch.tensor(1.0))   # decoded images are clipped


@pytest.mark.parametrize("bad", [torch.zeros(2, 2, 28, 28), torch.zeros(2, 3, 32, 32), torch.zeros(3, 28, 28),
                                 torch.full((1, 3, 28, 28), float("nan")), np.zeros((1, 3, 28, 28))])
def test_backend_refuses_bad_images(bad):
    with pytest.raises(InvalidShapeError):
        FmnistBackend(fmnist.ResMLP(16, 1)).encode(bad)


def test_backend_refuses_bad_latents_timesteps_and_nets():
    b = FmnistBackend(fmnist.ResMLP(16, 1))
    for bad in (torch.zeros(2, 3, 28, 28), torch.zeros(2, 1, 14, 14)):
        with pytest.raises(InvalidShapeError, match=r"\(batch, 1, 28, 28\)"):
            b.decode(bad)
        with pytest.raises(InvalidShapeError):
            b.eps(bad, 10)
    x = torch.zeros(2, 1, 28, 28)
    for t in (-1, 1000):
        with pytest.raises(InvalidParameterError, match=r"\[0, 999\]"):
            b.eps(x, t)
    with pytest.raises(InvalidShapeError, match="one per sample"):
        b.eps(x, torch.tensor([1, 2, 3]))
    with pytest.raises(InvalidParameterError, match="nn.Module"):
        FmnistBackend("weights.pt")
    with pytest.raises(InvalidParameterError, match="T = 1000"):
        FmnistBackend(fmnist.ResMLP(16, 1), fmnist.Schedule(steps=500))
    with pytest.raises(InvalidParameterError, match="batch"):
        FmnistBackend(fmnist.ResMLP(16, 1), batch=0)


# -- a measured round trip ----------------------------------------------------------------------------

def test_embed_then_verify_round_trip(trained_backend):
    """Generated with the key: detected with a small p; the same-seed twin without it: not flagged.
    The analysis's own generation path gives the images ``ShallowDiffuse.generate`` gives."""
    from shallowmark.attacks.bench_config import bench_keys

    cfg = fw.FmnistWatermarkConfig.quick(num_steps=20)
    method = ShallowDiffuse(trained_backend, cfg.method_config(0.3, 0.8))
    key = bench_keys(1, "shallow-diffuse")[0]
    seeds = list(range(6))
    wm = method.generate([key], seeds)
    twins = method.reference(seeds)
    assert wm.shape == (6, 28, 28, 3) and wm.dtype == np.uint8
    assert (wm != twins).any(axis=(1, 2, 3)).all()
    on_wm, on_twins = method.detect(wm, [key]), method.detect(twins, [key])
    assert all(d.detected and d.p_value < 1e-3 for d in on_wm), [d.p_value for d in on_wm]
    assert not any(d.detected for d in on_twins), [d.p_value for d in on_twins]
    # another key does not fire on the watermarked images
    assert not any(d.detected for d in method.detect(wm, bench_keys(2, "shallow-diffuse")[1:]))

    x_star = ddim.denoise(trained_backend, trained_backend.randn_latents(seeds), method.grid,
                          method.grid.num_steps, method.k_star)
    pair = fw.generate_pair(method, key, x_star)
    mine = fw._images(trained_backend, pair["z_wm"])
    assert np.abs(mine.astype(int) - wm.astype(int)).max() <= 1
    assert np.abs(fw._images(trained_backend, pair["z_ref"]).astype(int) - twins.astype(int)).max() <= 1


def test_grey_attack_keeps_the_image_grey_at_its_stated_strength():
    from shallowmark.attacks.bench_config import parse_attack

    flat = np.full((200, 28, 28, 3), 128, np.uint8)
    noisy = fw.grey_attack(parse_attack("noise:0.05"), flat, range(200), "test")
    assert noisy.shape == flat.shape and (noisy[..., 0] == noisy[..., 2]).all()
    # the grey image gets the full std (0.05 on [0, 1] = 12.75 grey levels), not a channel average's
    assert abs(float(noisy[..., 0].std()) - 12.75) < 0.5


# -- configuration ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, error, words", [
    (dict(samples=1), InvalidParameterError, "samples"),
    (dict(real_negatives=0), InvalidParameterError, "real_negatives"),
    (dict(t_stars=()), InvalidParameterError, "t_stars"),
    (dict(t_stars=(0.3, 0.3)), InvalidParameterError, "distinct"),
    (dict(t_stars=(0.3, 0.31)), InvalidParameterError, "distinct steps"),
    (dict(t_stars=(1.2,)), InvalidParameterError, "t_star"),
    (dict(strengths=(-0.5,)), InvalidParameterError, "strength"),
    (dict(radius=8), InvalidParameterError, "ring radius"),
    (dict(inner_radius=9, radius=7), InvalidParameterError, "inner ring radius"),
    (dict(attacks=("rotate:400",)), InvalidParameterError, "outside valid range"),
    (dict(attacks=("platform-1080",)), InvalidParameterError, "image size"),
    (dict(attacks=("clean", "clean")), InvalidParameterError, "distinct"),
    (dict(attacks=("smudge",)), UnknownNameError, "smudge"),
    (dict(jacobian_images=99), InvalidParameterError, "jacobian_images"),
    (dict(target_fpr=1.0), InvalidParameterError, "target_fpr"),
    (dict(regimes="default"), InvalidParameterError, "RegimesConfig"),
])
def test_bad_configs_fail_before_any_work(kw, error, words, tmp_path):
    cfg = replace(fw.FmnistWatermarkConfig.quick(RegimesConfig.quick(data_dir=str(tmp_path / "none"))), **kw)
    with pytest.raises(error, match=words):
        fw.run_fmnist_watermark_analysis(tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_runs_cover_strengths_at_the_main_t_star_and_t_stars_at_the_main_strength():
    cfg = fw.FmnistWatermarkConfig(t_stars=(0.3, 0.1), strengths=(0.8, 0.2))
    assert cfg.runs() == [(0.3, 0.8), (0.3, 0.2), (0.1, 0.8)]
    mc = cfg.method_config(0.1, 0.2)
    assert (mc.t_star, mc.strength, mc.channel, mc.radius, mc.sync_amplitude, mc.fill_borders) == \
        (0.1, 0.2, 0, 7, 0.0, False)


# -- the quick analysis ------------------------------------------------------------------------------------

def test_quick_analysis_writes_its_report(tmp_path, fmnist_dir):
    cfg = fw.FmnistWatermarkConfig.quick(RegimesConfig.quick(data_dir=str(fmnist_dir), cache_dir=str(tmp_path / "c")))
    out = tmp_path / "out"
    rep = fw.run_fmnist_watermark_analysis(out, cfg, command="shallowmark analyze fmnist-watermark --quick")
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["analysis"] == "fmnist-watermark" and on_disk["command"].endswith("--quick")
    for png in rep["figures"].values():
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run,) = rep["runs"]
    assert run["t_star"] == 0.3 and run["k_star"] == 6 and run["timestep"] == 300
    assert set(run["detection"]) == {"clean", "noise:0.05", "jpeg:50"}
    for row in run["detection"].values():
        for neg in ("generated", "real", "both"):
            assert 0 <= row[neg]["auc"] <= 1 and 0 <= row[neg]["tpr_at_1pct_fpr"] <= 1
        assert row["generated"]["n_neg"] == 16 and row["real"]["n_neg"] == 16 and row["both"]["n_neg"] == 32
        assert 0 <= row["generated"]["flagged_at_target"]["value"] <= 1
    # the watermark is there on the clean images even with this barely trained model
    assert run["detection"]["clean"]["tpr_at_target"]["value"] >= 0.9
    assert run["fidelity"]["psnr_mean"] > 0 and 0 < run["fidelity"]["ssim_mean"] < 1
    assert 0 < run["change_reaching_image"]["median"]
    assert 0 < run["jacobian"]["rank_ratio"] <= 1 and 0 <= run["jacobian"]["share_in_top"] <= 1
    assert rep["changed_from_default"]["fill_borders"]["value"] is False
    assert [r["ring"] for r in rep["ring_spectrum"]] == list(range(15))
    assert all(r["power"] > 0 and r["power_generated"] > 0 for r in rep["ring_spectrum"])
    md = (out / "report.md").read_text()
    for words in ("## Reading", "## Fidelity", "## Detection", "## Jacobian at x_t*", "fill_borders",
                  "shallowmark analyze fmnist-watermark --quick", "## Timings"):
        assert words in md
    assert rep["timings_s"]["total"] > 0


def test_cli_quick(tmp_path, fmnist_dir):
    from shallowmark.cli import main

    out = tmp_path / "cli"
    assert main(["analyze", "fmnist-watermark", "--quick", "--data", str(fmnist_dir), "--cache", str(tmp_path / "c"),
                 "--out", str(out), "--seed", "2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["command"].startswith("shallowmark analyze fmnist-watermark --quick")
    assert rep["config"]["seed"] == 2 and rep["data"]["seeds"][0] == 2 * fw.SEED_STRIDE
