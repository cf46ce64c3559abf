"""Shared fixtures for the core tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory, load_local) -> Path:
    """A saved (``save_pretrained``) tiny random-weight Stable Diffusion pipeline folder."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    load_local(__file__, "sd_tiny").build_tiny_sd_pipeline(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_pipeline(load_local):
    """A tiny random-weight ``StableDiffusionPipeline`` built offline from configs (sd_tiny.py).
    Shared by the session: treat it as read-only."""
    return load_local(__file__, "sd_tiny").build_tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_sd_watermark_backend(load_local):
    """A tiny random-weight SD pipeline with 32×32 latents (room for a radius-8 ring) behind the
    adapter. Its UNet output is scaled down (×0.01) so that DDIM inversion with random weights is
    nearly exact; its random VAE is not invertible, so tests check the latent and conditioning path."""
    import torch

    from shallowmark.core.backends.stable_diffusion import StableDiffusion

    pipe = load_local(__file__, "sd_tiny").build_tiny_sd_pipeline(seed=0, latent_size=32)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.01)
        pipe.unet.conv_out.bias.mul_(0.01)
    return StableDiffusion(pipeline=pipe, guidance_scale=3.0)
