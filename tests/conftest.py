"""Shared fixtures. The tiny-ldm backend is loaded once per test session (about 1 s)."""

import importlib.util
from pathlib import Path

import pytest


def _load_local(beside: str, name: str):
    """Import the helper module ``name``.py that sits beside the file ``beside`` (a conftest), under a
    name unique to its folder: works with any pytest import mode, where a plain import would not."""
    path = Path(beside).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_shallowmark_tests_{path.parent.name}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_local():
    """:func:`_load_local` for the folders' conftests: ``load_local(__file__, "sd_tiny")``."""
    return _load_local


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
