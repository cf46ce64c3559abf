"""Image helpers: black borders filled, everything else left as it is."""

from __future__ import annotations

import numpy as np

from shallowmark.attacks import apply_attack
from shallowmark.core.images import fill_black_borders


def _photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(1, 256, (64, 80, 3), dtype=np.uint8)   # no exactly black pixel


def test_rotation_corners_are_filled_from_their_neighbours():
    rotated = apply_attack("rotate", _photo(), 30)
    black = (rotated == 0).all(-1)
    assert black[0, 0] and black.sum() > 300
    out = fill_black_borders(rotated)
    assert not (out == 0).all(-1).any()
    np.testing.assert_array_equal(out[~black], rotated[~black])   # only the corners change


def test_interior_black_and_clean_images_are_kept():
    img = _photo()
    np.testing.assert_array_equal(fill_black_borders(img), img)
    img[20:30, 30:40] = 0                       # black, but not touching the edge
    np.testing.assert_array_equal(fill_black_borders(img), img)


def test_an_all_black_image_is_returned_as_is():
    img = np.zeros((16, 16, 3), np.uint8)
    np.testing.assert_array_equal(fill_black_borders(img), img)


def test_the_fill_is_on_by_default():
    from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuseConfig

    assert ShallowDiffuseConfig().fill_borders is True
