"""Shared fixtures. The tiny-ldm backend is loaded once per test session (about 1 s)."""

import pytest


@pytest.fixture(scope="session")
def tiny_ldm():
    from shallowmark.core.backends import load_backend

    return load_backend("tiny-ldm")


@pytest.fixture(scope="session")
def ddim_grid(tiny_ldm):
    from shallowmark.core import ddim

    return ddim.make_grid(tiny_ldm, 50)


@pytest.fixture(scope="module")
def molrg_k1():
    """Analytic MoLRG, one cluster of rank 5 in d = 64: J = √ᾱ_t·U Uᵀ exactly (α² + β² = 1).
    Used by the t* tests (core) and the jacobian-rank analysis tests (research)."""
    from shallowmark.core.backends import load_backend

    return load_backend("analytic", latent_shape=(1, 8, 8), rank=5, clusters=1, seed=3)
