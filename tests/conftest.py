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
