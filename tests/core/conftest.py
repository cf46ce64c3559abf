"""Shared fixtures for the core tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _load_local(name: str):
    """Import a helper module that sits beside this conftest (works with any pytest import mode)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_shallowmark_tests_core_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """A saved (``save_pretrained``) tiny random-weight Stable Diffusion pipeline folder."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    _load_local("sd_tiny").build_tiny_sd_pipeline(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_pipeline():
    """A tiny random-weight ``StableDiffusionPipeline`` built offline from configs (sd_tiny.py).
    Shared by the session: treat it as read-only."""
    return _load_local("sd_tiny").build_tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_sd_watermark_backend():
    """A tiny random-weight SD pipeline with 32×32 latents (room for a radius-8 ring) behind the
    adapter. Its UNet output is scaled down (×0.01) so that DDIM inversion with random weights is
    nearly exact; its random VAE is not invertible, so tests check the latent and conditioning path."""
    import torch

    from shallowmark.core.backends.stable_diffusion import StableDiffusion

    pipe = _load_local("sd_tiny").build_tiny_sd_pipeline(seed=0, latent_size=32)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.01)
        pipe.unet.conv_out.bias.mul_(0.01)
    return StableDiffusion(pipeline=pipe, guidance_scale=3.0)
