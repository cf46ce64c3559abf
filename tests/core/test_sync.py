"""The synchronisation template: its energy, what the estimator recovers, and what it leaves alone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shallowmark.attacks import apply_attack
from shallowmark.core import sync
from shallowmark.errors import InvalidParameterError

T = sync.SyncTemplate()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A bundled photo's centre square on a 256² grid. (Busier photos hold the template less well:
    the held-out one reaches z 6.6-7.1 after a crop, below ``min_z``.)"""
    from shallowmark.core.photos import training_photos
    from shallowmark.core.resolution import to_grid

    return to_grid(training_photos()["chelsea"][None], 256)[0]


def templated(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image + sync.pattern(T, image.shape[0])[..., None]), 0, 255).astype(np.uint8)


def test_pattern_energy_is_what_the_amplitude_says():
    # K cosines of amplitude a have RMS a·sqrt(K/2): 0.8·sqrt(3) grey levels, about 45 dB PSNR
    p = sync.pattern(T, 256)
    assert np.sqrt((p ** 2).mean()) == pytest.approx(T.amplitude * np.sqrt(T.peaks / 2), rel=0.02)
    assert 10 * np.log10(255 ** 2 / (p ** 2).mean()) > 44.5


@pytest.mark.parametrize("attack, strength, rotation, scale, aspect, mirrored", [
    ("clean", 0, 0.0, 1.0, 1.0, False),
    ("rotate", 15, -15.0, 1.0, 1.0, False),       # counter-clockwise on screen: −15° with y down
    ("rotate", 90, 90.0, 1.0, 1.0, False),
    ("crop-centre", 0.75, 0.0, 1 / np.sqrt(0.75), 1.0, False),
    ("zoom", 1.25, 0.0, 1.25, 1.0, False),
    ("flip", 0, 0.0, 1.0, 1.0, True),
])
def test_estimate_recovers_the_transform(photo, attack, strength, rotation, scale, aspect, mirrored):
    est = sync.estimate(apply_attack(attack, templated(photo), strength, rng=3), T)
    assert est.found and est.z >= T.min_z and est.support >= T.min_peak
    assert abs((est.rotation - rotation + 90) % 180 - 90) < 1.0
    assert est.scale == pytest.approx(scale, rel=0.02)
    assert est.aspect == pytest.approx(aspect, rel=0.025)
    assert est.mirrored is mirrored


def test_aspect_change_is_estimated_after_the_grid_mapping(photo):
    from shallowmark.core.resolution import to_grid

    stretched = apply_attack("aspect", templated(photo), 0.8, rng=0)      # 205×256
    est = sync.estimate(to_grid(stretched[None], 256)[0], T)
    # width 0.8 then the centre square scaled back up by 256/205: x scale 1.0, y scale 1.25
    assert est.found and est.aspect == pytest.approx(0.8, rel=0.025)
    assert est.scale == pytest.approx(np.sqrt(1.25), rel=0.02)


def test_no_template_is_left_alone(photo):
    images = np.stack([photo, apply_attack("rotate", photo, 15), apply_attack("crop-centre", photo, 0.75)])
    out, ests = sync.synchronise(images, T)
    assert not any(e.undone for e in ests)
    np.testing.assert_array_equal(out, images)


def test_untouched_templated_image_is_not_resampled(photo):
    img = templated(photo)
    out, (est,) = sync.synchronise(img[None], T)
    assert est.found and not est.undone
    np.testing.assert_array_equal(out[0], img)


@pytest.mark.parametrize("attack, strength", [("translate", 0.1), ("crop-corner", 0.75)])
def test_shift_is_estimated_from_the_phases_and_undone(photo, attack, strength):
    img = templated(photo)
    attacked = apply_attack(attack, img, strength, rng=np.random.default_rng(1))
    out, (est,) = sync.synchronise(attacked[None], T)
    assert est.undone and est.coherence >= T.min_coherence and est.margin >= T.min_margin
    # translate 0.1 moves the content by 26 pixels each way; a 75 % corner crop scaled back by
    # 1/√0.75 puts its centre 17 pixels from the image's once the scale is undone
    expected = 26.0 if attack == "translate" else 17.0
    assert np.abs(est.shift) == pytest.approx([expected, expected], abs=0.3)
    # the centre (inside what the attack kept) comes back close to the original
    c = slice(96, 160)
    err = np.abs(out[0][c, c].astype(float) - img[c, c].astype(float)).mean()
    assert err < 0.25 * np.abs(attacked[c, c].astype(float) - img[c, c].astype(float)).mean()


def test_sub_pixel_shift_is_estimated(photo):
    from scipy import ndimage

    img = templated(photo)
    moved = np.stack([ndimage.shift(img[..., ch].astype(float), (-2.4, 5.3), order=3, mode="reflect")
                      for ch in range(3)], -1)
    sh = sync.estimate_shift(np.clip(np.round(moved), 0, 255).astype(np.uint8), T)
    assert sh.coherence > 0.95 and not sh.turned
    assert sh.shift == pytest.approx((5.3, -2.4), abs=0.15)


@pytest.mark.parametrize("attack, strength", [("rotate", 180), ("rotate", -90), ("flip", 1)])
def test_half_turn_is_told_apart_by_the_phases(photo, attack, strength):
    # a magnitude spectrum reads a 180° turn as none (and 270° as 90°, a vertical flip as a
    # horizontal one); the phases tell them apart, so the image comes back upright
    img = templated(photo)
    out, (est,) = sync.synchronise(apply_attack(attack, img, strength, rng=0)[None], T)
    assert est.undone
    assert np.abs(out[0].astype(float) - img.astype(float)).mean() < 2.0


def test_untouched_and_untemplated_images_get_no_shift(photo):
    _, ests = sync.synchronise(np.stack([templated(photo), apply_attack("translate", photo, 0.1, rng=0)]), T)
    assert ests[0].found and ests[0].shift == (0.0, 0.0) and not ests[0].undone
    assert not ests[1].found and ests[1].shift == (0.0, 0.0) and not ests[1].undone


def test_ambiguous_shift_is_left_to_the_shift_search(photo):
    # a margin no estimate can reach: the shift is measured and reported, never acted upon
    strict = sync.SyncTemplate(min_margin=0.2)
    _, (est,) = sync.synchronise(apply_attack("translate", templated(photo), 0.1, rng=0)[None], strict)
    assert est.found and est.margin < 0.2 and est.shift == (0.0, 0.0) and not est.undone


def test_shift_estimate_can_be_turned_off(photo):
    off = sync.SyncTemplate(max_shift=0.0)
    _, (est,) = sync.synchronise(apply_attack("translate", templated(photo), 0.1, rng=0)[None], off)
    assert est.shift == (0.0, 0.0) and est.coherence == 0.0


def test_undo_inverts_a_rotation(photo):
    img = templated(photo)
    rotated = np.asarray(Image.fromarray(img).rotate(15, resample=Image.Resampling.BICUBIC))
    out, (est,) = sync.synchronise(rotated[None], T)
    assert est.undone
    # the centre (no corner lost to the rotation) comes back close to the original
    c = slice(80, 176)
    err = np.abs(out[0][c, c].astype(float) - img[c, c].astype(float)).mean()
    assert err < 0.25 * np.abs(rotated[c, c].astype(float) - img[c, c].astype(float)).mean()


@pytest.mark.parametrize("kw, needle", [(dict(peaks=2), "at least 3 peaks"),
                                        (dict(min_frequency=0.3, max_frequency=0.2), "frequencies"),
                                        (dict(amplitude=-1), "amplitude"),
                                        (dict(min_scale=1.2), "min_scale"),
                                        (dict(max_shift=-1), "max_shift"),
                                        (dict(min_coherence=0), "min_coherence")])
def test_bad_template_parameters(kw, needle):
    with pytest.raises(InvalidParameterError, match=needle):
        sync.SyncTemplate(**kw).validate()
