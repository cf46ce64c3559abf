import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from shallowmark.core.backends import backend_names, load_backend
from shallowmark.core.backends.tiny_ldm import DEFAULT_PATH
from shallowmark.core.images import to_tensor, to_uint8
from shallowmark.errors import InvalidImageError, InvalidShapeError, UnknownNameError


def test_unknown_backend_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        load_backend("sd-xxl")
    assert "unknown backend 'sd-xxl'" in str(e.value)
    for name in backend_names():
        assert name in str(e.value)


def test_tiny_ldm_shape_and_sizes(tiny_ldm):
    assert tiny_ldm.latent_shape == (4, 64, 64)
    assert tiny_ldm.image_size == 256
    weights = sum(p.stat().st_size for p in DEFAULT_PATH.rglob("*.safetensors"))
    assert weights < 25 * 2 ** 20
    info = tiny_ldm.info()
    assert info.parameters > 1_000_000 and not info.conditional


def test_tiny_ldm_loads_with_plain_diffusers():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    vae = AutoencoderKL.from_pretrained(DEFAULT_PATH / "vae")
    unet = UNet2DModel.from_pretrained(DEFAULT_PATH / "unet")
    DDIMScheduler.from_pretrained(DEFAULT_PATH / "scheduler")
    assert vae.config.latent_channels == 4 and unet.config.sample_size == 64
    for name in ("README.md", "samples.png", "training_log.json"):
        assert (DEFAULT_PATH / name).is_file(), name


def test_encode_decode_round_trip_quality(tiny_ldm):
    from shallowmark.core.images import psnr
    from shallowmark.core.photos import center_crop, heldout_photo

    photo = center_crop(heldout_photo(), 256)
    rec = to_uint8(tiny_ldm.decode(tiny_ldm.encode(to_tensor(photo))))[0]
    assert psnr(rec, photo) >= 24.0


def test_bad_images_and_latents_are_refused(tiny_ldm):
    with pytest.raises(InvalidShapeError, match=r"images of shape \(batch, 3, 256, 256\)"):
        tiny_ldm.encode(torch.zeros(1, 3, 128, 128))
    with pytest.raises(InvalidShapeError, match="latents of shape"):
        tiny_ldm.decode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(InvalidImageError, match="uint8"):
        to_tensor(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(InvalidImageError, match="RGB"):
        to_tensor(np.zeros((8, 8), dtype=np.uint8))


def test_analytic_posterior_mean_is_exact_low_rank():
    b = load_backend("analytic", latent_shape=(2, 4, 4), rank=3)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    eps = b.eps(x, 300)
    a = float(b.alphas_cumprod[300])
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    u = b.model.bases[0]
    assert torch.allclose(x0.flatten(1), (x0.flatten(1) @ u) @ u.T, atol=1e-10)  # lies in span(U)


def test_models_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "shallowmark.cli", "models", "--json"], capture_output=True,
                         text=True, check=True).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(backend_names())
    assert rows["tiny-ldm"]["default"] and rows["tiny-ldm"]["latent_shape"] == "(4, 64, 64)"
