"""Attack suite: shapes, determinism, reference behaviour, and input errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shallowmark.attacks import (
    AttackSpec,
    apply_attack,
    get_attack,
    jpeg_bytes,
    list_attacks,
    psnr,
    register,
    unregister,
)
from shallowmark.errors import InvalidImageError, InvalidParameterError, UnknownNameError


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A small natural image: the scikit-image astronaut at 96x96."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((96, 96), Image.Resampling.BILINEAR))


def test_builtin_names():
    assert list_attacks()[0] == "clean"
    expected = {"clean", "jpeg", "blur", "noise", "jitter", "resize", "crop", "rotate", "median", "drop", "saltpepper"}
    assert expected <= set(list_attacks())


def test_reference_strengths():
    assert get_attack("jpeg").default == 25
    assert get_attack("blur").default == 4
    assert get_attack("noise").default == 0.1
    assert get_attack("jitter").default == 6
    assert get_attack("rotate").default == 15


@pytest.mark.parametrize("name", list_attacks())
def test_shape_dtype_determinism(name, image):
    before = image.copy()
    a = apply_attack(name, image, rng=np.random.default_rng(7))
    b = apply_attack(name, image, rng=np.random.default_rng(7))
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert a.shape == image.shape or not get_attack(name).keeps_size   # the platform pipelines resize
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(image, before)  # input untouched
    assert a is not image


@pytest.mark.parametrize("name", [n for n in list_attacks() if n != "clean"])
def test_reference_strength_changes_image(name, image):
    assert not np.array_equal(apply_attack(name, image, rng=1), image)


def test_clean_is_identity(image):
    np.testing.assert_array_equal(apply_attack("clean", image), image)


def test_jpeg_quality_orders_size_and_psnr(image):
    assert len(jpeg_bytes(image, 25)) < len(jpeg_bytes(image, 95))
    assert psnr(image, apply_attack("jpeg", image, 25)) < psnr(image, apply_attack("jpeg", image, 95))
    assert jpeg_bytes(image, 25)[:2] == b"\xff\xd8"  # a real JPEG stream (SOI marker)


def test_noise_seeded_and_in_range(image):
    a = apply_attack("noise", image, 0.1, rng=np.random.default_rng(3))
    b = apply_attack("noise", image, 0.1, rng=np.random.default_rng(3))
    c = apply_attack("noise", image, 0.1, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.min() >= 0 and a.max() <= 255


def test_noise_std_on_mid_grey():
    grey = np.full((128, 128, 3), 128, np.uint8)
    out = apply_attack("noise", grey, 0.1, rng=np.random.default_rng(0)).astype(np.float64) / 255.0
    assert abs(out.std() - 0.1) < 0.005
    assert abs(out.mean() - 128 / 255) < 0.005


def test_noise_saturates_instead_of_wrapping():
    white = np.full((64, 64, 3), 250, np.uint8)
    out = apply_attack("noise", white, 0.1, rng=np.random.default_rng(0))
    # Wrap-around would turn overflowing pixels into near-black ones.
    assert out.min() > 150
    assert (out == 255).mean() > 0.3


def test_jitter_factor_range():
    grey = np.full((8, 8, 3), 100, np.uint8)
    values = {int(apply_attack("jitter", grey, 0.5, rng=s)[0, 0, 0]) for s in range(50)}
    assert min(values) >= 50 and max(values) <= 150 and len(values) > 10
    # strength 0 draws a factor of exactly 1
    np.testing.assert_array_equal(apply_attack("jitter", grey, 0, rng=0), grey)


def test_saltpepper_rate():
    grey = np.full((200, 200, 3), 128, np.uint8)
    out = apply_attack("saltpepper", grey, 0.05, rng=0)
    hit = (out != 128).any(axis=2)
    assert abs(hit.mean() - 0.05) < 0.01
    assert set(np.unique(out[hit])) <= {0, 255}


def test_drop_area():
    grey = np.full((100, 100, 3), 128, np.uint8)
    out = apply_attack("drop", grey, 0.25, rng=0)
    assert abs((out == 0).all(axis=2).mean() - 0.25) < 0.01


def test_median_and_rotate_keep_size(image):
    assert apply_attack("median", image, 3).shape == image.shape
    out = apply_attack("rotate", image, 45)
    assert out.shape == image.shape and (out[0, 0] == 0).all()  # black corner


def test_unknown_name_lists_valid():
    with pytest.raises(UnknownNameError) as e:
        apply_attack("jpg", np.zeros((8, 8, 3), np.uint8))
    msg = str(e.value)
    assert "jpg" in msg and "jpeg" in msg and "saltpepper" in msg


@pytest.mark.parametrize(
    "name, strength, needle",
    [("jpeg", 0, "[1, 100]"), ("noise", -0.1, "[0, 1]"), ("rotate", 200, "[-180, 180]"), ("blur", float("nan"), "range")],
)
def test_strength_out_of_range(name, strength, needle, image):
    with pytest.raises(InvalidParameterError) as e:
        apply_attack(name, image, strength)
    assert needle in str(e.value)


@pytest.mark.parametrize("strength", [4, 7.5, "7"])
def test_median_needs_odd_int(strength, image):
    with pytest.raises(InvalidParameterError):
        apply_attack("median", image, strength)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((8, 8, 3), np.float32),
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        [[[0, 0, 0]]],
    ],
    ids=["float", "gray2d", "rgba", "list"],
)
def test_bad_image(bad):
    with pytest.raises(InvalidImageError):
        apply_attack("blur", bad)


def test_bad_rng(image):
    with pytest.raises(InvalidParameterError):
        apply_attack("noise", image, rng="seed")


def test_register_context_attack(image):
    def fake_regen(img, strength, rng, *, model):
        return model(img)

    spec = AttackSpec("fake_regen", fake_regen, 0.3, (0, 1), "noise level t", context=("model",))
    register(spec)
    try:
        with pytest.raises(InvalidParameterError):
            register(spec)
        out = apply_attack("fake_regen", image, model=lambda x: 255 - x)
        np.testing.assert_array_equal(out, 255 - image)
        with pytest.raises(InvalidParameterError, match="model"):
            apply_attack("fake_regen", image)
        with pytest.raises(InvalidParameterError):
            apply_attack("blur", image, model=None)
        with pytest.raises(RuntimeError):
            apply_attack("fake_regen", image, model=lambda x: x[:4])
    finally:
        unregister("fake_regen")
    assert "fake_regen" not in list_attacks()


def test_spec_default_must_be_valid():
    with pytest.raises(InvalidParameterError):
        AttackSpec("bad", lambda i, s, r: i, 2.0, (0, 1), "x")


@pytest.mark.parametrize("name, strength, shape", [("platform-1080", 1080, (810, 1080, 3)),
                                                   ("platform-4x5", 80, (300, 240, 3)),
                                                   ("platform-1x1", 512, (512, 512, 3))])
def test_platform_pipelines_change_the_size_as_documented(name, strength, shape):
    from shallowmark.attacks import apply_attack

    img = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)   # 4:3 landscape
    out = apply_attack(name, img, strength, rng=np.random.default_rng(1))
    assert out.shape == shape and out.dtype == np.uint8


def test_geometric_family_sizes_and_placement():
    img = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    assert apply_attack("crop-keep", img, 0.75, rng=1).shape == (173, 260, 3)          # sqrt(0.75) of each side
    assert apply_attack("aspect", img, 0.8, rng=1).shape == (200, 240, 3)              # width only
    for name in ("crop-centre", "crop-corner", "translate", "zoom", "crop-jpeg"):
        assert apply_attack(name, img, rng=1).shape == img.shape, name
    # the centred crop is symmetric: a left-right mirrored input gives the mirrored output
    np.testing.assert_array_equal(apply_attack("crop-centre", img[:, ::-1].copy(), 0.75),
                                  apply_attack("crop-centre", img, 0.75)[:, ::-1])
    # zoom 2 is the centred quarter of the area scaled back up
    np.testing.assert_array_equal(apply_attack("zoom", img, 2.0), apply_attack("crop-centre", img, 0.25))


def test_crop_corner_touches_a_corner_and_translate_fills_black():
    img = np.zeros((100, 100, 3), dtype=np.uint8)
    img[:10, :10] = 255                                         # a bright top-left corner
    seen = {bool(apply_attack("crop-corner", img, 0.5, rng=r)[0, 0, 0] == 255) for r in range(12)}
    assert seen == {True, False}                                # the top-left corner is kept by some draws only
    flat = np.full((100, 100, 3), 200, dtype=np.uint8)
    out = apply_attack("translate", flat, 0.1, rng=0)
    assert (out == 0).all(axis=2).mean() == pytest.approx(1 - 0.9 * 0.9, abs=1e-9)   # 10 % of each side comes in black
