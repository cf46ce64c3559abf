"""Fashion-MNIST loading, the schedule, the networks, training, DDIM and the empirical optimum.

Every test runs on generated IDX files or generated arrays: the Debian package is not needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shallowmark.errors import InvalidParameterError
from shallowmark.research import fmnist as F


# -- data ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_load_from_a_folder(tmp_path, fmnist_data, gz):
    folder = fmnist_data.write_dataset(tmp_path / "d", n_train=30, n_test=7, gz=gz)
    train, test = F.load_fashion_mnist("train", folder), F.load_fashion_mnist("test", folder)
    assert train.shape == (30, 28, 28) and test.shape == (7, 28, 28) and train.dtype == np.uint8
    np.testing.assert_array_equal(train, fmnist_data.synthetic_images(30, 1))
    assert F.load_fashion_mnist("all", folder).shape == (37, 28, 28)


def test_a_missing_dataset_names_the_debian_package(tmp_path):
    with pytest.raises(F.DatasetMissingError) as e:
        F.load_fashion_mnist("train", tmp_path)
    assert "dataset-fashion-mnist" in str(e.value) and "train-images-idx3-ubyte" in str(e.value)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("mangle, words", [
    (lambda b: b[:10], ["too short"]),
    (lambda b: b[:-5], ["header says 3 images"]),
    (lambda b: b"\x00\x00\x08\x01" + b[4:], ["magic 0x00000801", "0x00000803"]),
    (lambda b: b[:8] + (32).to_bytes(4, "big") + b[12:], ["32×28"]),
])
def test_a_broken_file_says_what_is_wrong(tmp_path, fmnist_data, mangle, words):
    data = fmnist_data.idx_bytes(fmnist_data.synthetic_images(3, 0))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(mangle(data))
    with pytest.raises(F.DatasetFormatError) as e:
        F.load_fashion_mnist("train", tmp_path)
    for w in words:
        assert w in str(e.value)


def test_bad_split():
    with pytest.raises(InvalidParameterError, match="split"):
        F.load_fashion_mnist("validation")


def test_subsets_are_nested(fmnist_data):
    x = fmnist_data.synthetic_images(50, 3)
    small, big = F.subset(x, 10), F.subset(x, 20)
    assert {a.tobytes() for a in small} <= {a.tobytes() for a in big}
    with pytest.raises(InvalidParameterError):
        F.subset(x, 51)


def test_pixels_round_trip(fmnist_data):
    x = fmnist_data.synthetic_images(4, 0)
    t = F.to_tensor(x)
    assert t.shape == (4, 1, 28, 28) and float(t.min()) >= -1 and float(t.max()) <= 1
    np.testing.assert_array_equal(F.to_uint8(t), x)


# -- schedule and preconditioning ----------------------------------------------------------------
def test_schedule_and_grid():
    s = F.Schedule()
    ab = s.alpha_bar
    assert float(ab[0]) == 1.0 and torch.all(ab[1:] < ab[:-1]) and float(ab[-1]) > 0
    g = s.grid(10)
    assert g[0] == 1000 and g[-1] == 0 and len(g) == 11
    assert s.grid(5, t_end=300)[0] == 300
    with pytest.raises(InvalidParameterError):
        s.grid(0)


def test_preconditioning_limits():
    # σ → 0: the network's output is not needed (x0 = x̃); σ → ∞: the skip vanishes
    sigma, c_skip, c_out, c_in = F.preconditioning(torch.tensor([0.9999, 1e-5]))
    assert float(c_skip[0]) > 0.999 and float(c_out[0]) < 0.01
    assert float(c_skip[1]) < 1e-4 and float(c_out[1]) == pytest.approx(F.SIGMA_DATA, rel=1e-3)
    assert torch.allclose(c_in * (sigma ** 2 + F.SIGMA_DATA ** 2).sqrt(), torch.ones(2))


# -- networks and training -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_networks_map_images_to_images(arch):
    net = F.make_net(F.TrainConfig(arch=arch, width=16, depth=1))
    x = torch.randn(3, 1, 28, 28)
    assert net(x, torch.tensor([1, 500, 1000])).shape == x.shape
    assert net(x, torch.tensor(7)).shape == x.shape


@pytest.mark.parametrize("kw", [dict(arch="cnn"), dict(steps=0), dict(batch=-1), dict(lr=2.0)])
def test_bad_training_config(kw):
    with pytest.raises(InvalidParameterError):
        F.TrainConfig(**kw).check()


def test_bad_widths():
    with pytest.raises(InvalidParameterError):
        F.ResMLP(width=4)
    with pytest.raises(InvalidParameterError):
        F.PixelUNet(width=2)


def test_training_lowers_the_loss_and_is_deterministic(fmnist_data):
    x = fmnist_data.synthetic_images(16, 0)
    cfg = F.TrainConfig(width=32, depth=1, steps=150, batch=16, lr=3e-3, seed=5)
    a, b = F.train_model(x, cfg), F.train_model(x, cfg)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    # the loss of the trained network beats the untrained one on fresh noise
    torch.manual_seed(cfg.seed)
    untrained = F.make_net(cfg)
    d_new, d_old = F.NetDenoiser(a.net), F.NetDenoiser(untrained)
    x0 = F.to_tensor(x)
    g = torch.Generator().manual_seed(1)
    errs = {}
    for name, d in (("trained", d_new), ("untrained", d_old)):
        e = 0.0
        for t in (100, 400, 700):
            ab = d.schedule.ab(t)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=g)
            e += float(((d.x0(xt, t) - x0) ** 2).mean())
        errs[name] = e
    assert errs["trained"] < 0.7 * errs["untrained"]
    assert a.parameters == F.parameter_count(a.net) and a.n_train == 16 and math.isfinite(a.final_loss)


# -- the empirical optimum and DDIM --------------------------------------------------------------
def test_the_empirical_optimum_is_the_softmax_average(fmnist_data):
    y = fmnist_data.synthetic_images(9, 4)
    opt = F.EmpiricalOptimum(y, chunk=4)  # three chunks: the running log-sum-exp must not matter
    x = torch.randn(5, 1, 28, 28)
    t = 600
    ab = float(opt.schedule.ab(t))
    yt = F.to_tensor(y).reshape(9, -1).double()
    d2 = ((x.reshape(5, 1, -1).double() - math.sqrt(ab) * yt[None]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * (1 - ab)), dim=1)
    want = (w @ yt).float().reshape(x.shape)
    assert torch.allclose(opt.x0(x, t), want, atol=1e-5)
    # ε and x0 are consistent
    assert torch.allclose(opt.eps(x, t), (x - math.sqrt(ab) * want) / math.sqrt(1 - ab), atol=1e-4)


def test_sampling_the_optimum_lands_on_training_images(fmnist_data):
    y = fmnist_data.synthetic_images(6, 5)
    out = F.to_uint8(F.ddim_sample(F.EmpiricalOptimum(y), F.initial_noise(10, 0), num_steps=30))
    d = np.abs(out[:, None].astype(int) - y[None].astype(int)).max(axis=(2, 3)).min(axis=1)
    assert d.max() <= 2  # each sample is a training image to within rounding


def test_the_same_seed_gives_the_same_noise():
    assert torch.equal(F.initial_noise(3, 9), F.initial_noise(3, 9))
    assert not torch.equal(F.initial_noise(3, 9), F.initial_noise(3, 10))


def test_inversion_then_sampling_returns_the_image(fmnist_data):
    """DDIM is invertible for a smooth denoiser: x0 -> x_t -> x0 with the same grid."""
    x = fmnist_data.synthetic_images(4, 6)
    cfg = F.TrainConfig(width=32, depth=1, steps=100, batch=16, seed=2)
    d = F.NetDenoiser(F.train_model(x, cfg).net)
    x0 = F.to_tensor(x)
    xt = F.ddim_invert(d, x0, t_end=300, num_steps=30)
    back = F.ddim_sample(d, xt, num_steps=30, t_end=300)
    assert float((back - x0).abs().mean()) < 0.05 < float((xt - x0).abs().mean())
