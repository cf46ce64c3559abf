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
                                        (dict(min_scale=1.2), "min_scale")])
def test_bad_template_parameters(kw, needle):
    with pytest.raises(InvalidParameterError, match=needle):
        sync.SyncTemplate(**kw).validate()
