"""The invisible-watermark baselines (DwtDct, DwtDctSvd, RivaGAN): embed/detect, calibration, fidelity,
input checks. Measured on 256×256 natural images (deterministic keys, so the numbers are fixed)."""

import numpy as np
import pytest

pytest.importorskip("imwatermark")
pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402

from shallowmark.core.images import psnr  # noqa: E402
from shallowmark.core.watermarks.invisible import DwtDct, DwtDctConfig, DwtDctSvd, RivaGAN, RivaGANConfig  # noqa: E402
from shallowmark.errors import InvalidImageError, InvalidParameterError, KeyMaterialError  # noqa: E402
from shallowmark.keys import WatermarkKey  # noqa: E402

METHODS = [DwtDct, DwtDctSvd, RivaGAN]
CREATED = "2025-01-01T00:00:00+00:00"
MASTERS = [WatermarkKey(secret=bytes([i + 1]) * 32, created=CREATED) for i in range(8)]

# Lowest PSNR (dB) each method reached on the two test images at its default payload; measured
# 35.9/39.5 (dwtdct), 36.1/39.6 (dwtdctsvd), 40.9/40.4 (rivagan) on astronaut/chelsea.
MIN_PSNR = {"dwtdct": 35.0, "dwtdctsvd": 35.0, "rivagan": 40.0}


def _square_256(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    return np.asarray(Image.fromarray(img[top:top + m, left:left + m]).resize((256, 256), Image.BICUBIC))


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    import skimage.data

    return np.stack([_square_256(skimage.data.astronaut()), _square_256(skimage.data.chelsea())])


def _keys(cls):
    return [m.for_method(cls.name) for m in MASTERS]


@pytest.fixture(scope="module", params=METHODS, ids=lambda c: c.name)
def marked(request, photos):
    """(method, its 8 candidate keys, watermarked photos: image i carries key i)."""
    method = request.param()
    keys = _keys(request.param)
    return method, keys, method.embed(keys[:2], photos)


def test_embed_detect_right_key(marked, photos):
    method, keys, wm = marked
    assert wm.shape == photos.shape and wm.dtype == np.uint8
    dets = method.detect(wm, keys, target_fpr=0.01)  # 8 candidates: Bonferroni over 8
    assert len(dets) == 2
    for i, d in enumerate(dets):
        print(f"{method.name} image {i}: bit acc {d.bit_accuracy:.3f}, p {d.p_value:.2e}, "
              f"PSNR {psnr(photos[i], wm[i]):.2f} dB")
        assert d.method == method.name and d.model_evals == 0
        assert d.key_id == keys[i].key_id
        assert d.detected
        assert d.p_value < 1e-6
        assert d.p_value_corrected == pytest.approx(min(1.0, d.p_value * 8))
        assert d.bit_accuracy >= 0.9 and d.score == d.bit_accuracy
        assert d.bits.shape == (method.n_bits,) and set(np.unique(d.bits)) <= {0, 1}
        assert set(d.per_key_p) == {k.key_id for k in keys}


def test_wrong_keys_and_clean_images_not_detected(marked, photos):
    method, keys, wm = marked
    for i in range(2):
        others = [k for j, k in enumerate(keys) if j != i]
        (d,) = method.detect(wm[i], others, target_fpr=0.01)
        assert not d.detected, (method.name, i, d.p_value)
    for d in method.detect(photos, keys, target_fpr=0.01):
        assert not d.detected, (method.name, d.p_value)
        assert d.bit_accuracy < 0.8


def test_psnr(marked, photos):
    method, _, wm = marked
    for i in range(2):
        assert psnr(photos[i], wm[i]) >= MIN_PSNR[method.name]


def test_payload_length():
    assert DwtDct().n_bits == 64 and DwtDctSvd().n_bits == 64 and RivaGAN().n_bits == 32
    assert DwtDctSvd(config=DwtDctConfig(n_bits=32)).n_bits == 32
    for bad in (16, 64, 0, True, 32.0):
        with pytest.raises(InvalidParameterError, match="32"):
            RivaGAN(config=RivaGANConfig(n_bits=bad))
    for bad in (0, 1025, 2.5):
        with pytest.raises(InvalidParameterError, match="n_bits"):
            DwtDct(config=DwtDctConfig(n_bits=bad))


def test_generate_is_reference_plus_embed(tiny_ldm):
    method = DwtDctSvd(backend=tiny_ldm)
    key = _keys(DwtDctSvd)[0]
    ref = method.reference([0])
    img = method.generate([key], [0])
    assert ref.shape == img.shape == (1, 256, 256, 3)
    assert np.array_equal(img, method.embed([key], ref))
    (d,) = method.detect(img, _keys(DwtDctSvd))
    assert d.detected and d.key_id == key.key_id
    (d,) = method.detect(ref, _keys(DwtDctSvd))
    assert not d.detected


def test_generate_needs_backend():
    with pytest.raises(InvalidParameterError, match="backend"):
        RivaGAN().generate([_keys(RivaGAN)[0]], [0])


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
def test_bad_inputs(cls, photos):
    method = cls()
    key = _keys(cls)[0]
    small = photos[0][:128, :128]
    with pytest.raises(InvalidImageError, match="256"):
        method.embed([key], small)
    assert len(method.detect(small, [key])) == 1         # verify scales a small image up to be read
    for fn in (lambda im: method.embed([key], im), lambda im: method.detect(im, [key])):
        with pytest.raises(InvalidImageError, match="grayscale"):
            fn(photos[0, ..., 0])
        with pytest.raises(InvalidImageError, match="RGBA"):
            fn(np.concatenate([photos[0], np.full((256, 256, 1), 255, np.uint8)], axis=-1))
    ring = MASTERS[0].for_method("tree-ring")
    with pytest.raises(KeyMaterialError, match="tree-ring"):
        method.embed([ring], photos[0])
    with pytest.raises(KeyMaterialError, match="tree-ring"):
        method.detect(photos[0], [key, ring])
    for fpr in (0, 1):
        with pytest.raises(InvalidParameterError, match="target_fpr"):
            method.detect(photos[0], [key], target_fpr=fpr)


def test_images_below_the_decoders_minimum_are_scaled_up_to_be_read():
    """A 4:5 crop or an aspect change leaves a 256² image narrower than the decoder reads: verify
    scales it up (aspect kept) instead of refusing it; embed still refuses it."""
    from shallowmark.core.watermarks import load_method
    from shallowmark.errors import InvalidImageError

    m = load_method("dwtdctsvd")
    key = WatermarkKey.generate().for_method("dwtdctsvd")
    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    marked = m.embed([key], img)[0]
    narrow = marked[:, 25:230]                                  # 205×256
    assert [im.shape for im in m.invert([narrow])] == [(320, 256, 3)]
    assert m.detect([narrow], [key])[0].p_value <= 1.0          # read, not refused
    with pytest.raises(InvalidImageError, match="at least 256"):
        m.embed([key], narrow)
