"""The regeneration attack: registration, shape/dtype, determinism, input errors."""

from __future__ import annotations

import numpy as np
import pytest

from shallowmark.errors import InvalidImageError, InvalidParameterError


@pytest.fixture(scope="module")
def regen_spec():
    # imported here, not at module level: registering "regen" while other test modules are being
    # collected would add it to their parametrised lists of context-free attacks
    from shallowmark.attacks import regen

    return regen.ensure_registered()


@pytest.fixture(scope="module")
def photo():
    from shallowmark.core.photos import center_crop, heldout_photo

    return center_crop(heldout_photo(), 256)


def test_registered_with_model_context(regen_spec):
    from shallowmark.attacks import get_attack, list_attacks

    assert "regen" in list_attacks()
    spec = get_attack("regen")
    assert spec is regen_spec
    assert spec.context == ("model",)
    assert 0.0 < spec.default < 1.0


def test_shape_dtype_determinism(regen_spec, tiny_ldm, photo):
    from shallowmark.attacks import apply_attack, psnr

    before = photo.copy()
    a = apply_attack("regen", photo, 0.1, rng=np.random.default_rng(3), model=tiny_ldm)
    b = apply_attack("regen", photo, 0.1, rng=np.random.default_rng(3), model=tiny_ldm)
    c = apply_attack("regen", photo, 0.1, rng=np.random.default_rng(4), model=tiny_ldm)
    assert a.shape == photo.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(photo, before)
    assert not np.array_equal(a, c)  # the noise comes from the rng
    assert 15.0 < psnr(a, photo) < 60.0  # changed, but still the same picture


@pytest.mark.parametrize("strength", [0.0, 1.0, -0.1, 1.5])
def test_strength_out_of_range(regen_spec, tiny_ldm, photo, strength):
    from shallowmark.attacks import apply_attack

    with pytest.raises(InvalidParameterError, match="regen"):
        apply_attack("regen", photo, strength, model=tiny_ldm)


def test_needs_model(regen_spec, photo):
    from shallowmark.attacks import apply_attack

    with pytest.raises(InvalidParameterError, match="model"):
        apply_attack("regen", photo)


def test_wrong_size(regen_spec, tiny_ldm):
    from shallowmark.attacks import apply_attack

    with pytest.raises(InvalidImageError, match="256"):
        apply_attack("regen", np.zeros((64, 64, 3), np.uint8), model=tiny_ldm)
