"""Shared fixtures for the research tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fmnist_data(load_local):
    """The generated stand-in for Fashion-MNIST (fmnist_data.py)."""
    return load_local(__file__, "fmnist_data")


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory, fmnist_data):
    """A folder of generated IDX files: 600 training and 100 test images."""
    return fmnist_data.write_dataset(tmp_path_factory.mktemp("fmnist"))
