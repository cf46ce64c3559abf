import numpy as np
import pytest
import torch

from shallowmark.core.watermarks.gaussian_shading import GaussianShading, GaussianShadingConfig
from shallowmark.errors import InvalidImageError, InvalidParameterError, InvalidShapeError, KeyMaterialError
from shallowmark.keys import WatermarkKey, payload_bits

N_KEYS = 8


@pytest.fixture(scope="module")
def gs(tiny_ldm):
    return GaussianShading(tiny_ldm)


@pytest.fixture(scope="module")
def keys():
    # Fixed secrets so the test is deterministic.
    return [WatermarkKey(secret=bytes([i + 1]) * 32).for_method("gaussian-shading") for i in range(N_KEYS)]


@pytest.fixture(scope="module")
def marked(gs, keys):
    # One image per call, so the same-seed test below compares like with like (batch size 1).
    return np.concatenate([gs.generate([keys[0]], [s]) for s in (11, 12)])


@pytest.fixture(scope="module")
def ref(gs):
    return gs.reference([11])


def test_capacity_and_shapes(gs, tiny_ldm):
    assert tiny_ldm.latent_shape == (4, 64, 64)
    assert gs.capacity == 256 and gs.message_shape == (4, 8, 8) and gs.copies == 64
    assert not gs.supports_embed and gs.name == "gaussian-shading"


def test_roundtrip_without_diffusion(gs, keys):
    """encrypt -> sample -> signs -> decrypt -> vote recovers the message exactly, and the noise is N(0, 1)."""
    from scipy.stats import kstest

    x = gs.watermarked_noise([keys[0], keys[1]], [3, 4])
    assert x.shape == (2, 4, 64, 64) and torch.isfinite(x).all()
    signs = (x.numpy() > 0).astype(np.uint8)
    assert np.array_equal(signs[0], gs.encrypted_bits(keys[0]))
    assert np.array_equal(gs.decrypt(signs[:1], keys[0])[0], payload_bits(keys[0], 256))
    assert np.array_equal(gs.decrypt(signs[1:], keys[1])[0], payload_bits(keys[1], 256))
    # The wrong key decrypts to noise.
    assert (gs.decrypt(signs[:1], keys[1])[0] == payload_bits(keys[1], 256)).mean() < 0.7
    # Encryption whitens the tiled message: the signs are balanced and the values standard normal.
    assert abs(signs.mean() - 0.5) < 0.02
    assert kstest(x[0].flatten().numpy(), "norm").pvalue > 1e-3
    # The vote tolerates a minority of flipped copies.
    rng = np.random.default_rng(0)
    noisy = signs[:1] ^ (rng.random(signs[:1].shape) < 0.2).astype(np.uint8)
    assert np.array_equal(gs.decrypt(noisy, keys[0])[0], payload_bits(keys[0], 256))
    # Same key and seed give the same noise; another seed keeps the signs but not the magnitudes.
    assert torch.equal(gs.watermarked_noise([keys[0]], [3]), x[:1])
    y = gs.watermarked_noise([keys[0]], [5])
    assert torch.equal(y > 0, x[:1] > 0) and not torch.equal(y, x[:1])


def test_tile_and_vote_are_inverse(gs):
    m = np.random.default_rng(1).integers(0, 2, gs.capacity).astype(np.uint8)
    t = gs.tile(m)
    assert t.shape == (4, 64, 64)
    assert np.array_equal(t[:, :8, :8], m.reshape(4, 8, 8)) and np.array_equal(t[:, 8:16, 56:], m.reshape(4, 8, 8))
    assert np.array_equal(gs.vote(t[None])[0], m)


def test_detect_right_key_and_unwatermarked(gs, keys, marked, ref):
    dets = gs.detect(np.concatenate([marked, ref]), [keys[0]], target_fpr=1e-6)
    for d in dets[:2]:
        assert d.detected and d.p_value < 1e-6 and d.key_id == keys[0].key_id
        assert d.bit_accuracy >= 0.95  # measured: 1.0 on tiny-ldm
        assert d.score == d.bit_accuracy and d.model_evals == 50
        assert d.bits.shape == (256,) and (d.bits == payload_bits(keys[0], 256)).mean() == d.bit_accuracy
    r = dets[2]
    assert not r.detected and r.p_value > 1e-3 and r.bit_accuracy < GaussianShading.threshold_for_fpr(256, 1e-6)


def test_identification_among_keys(gs, keys, marked):
    (d,) = gs.detect(marked[1:], keys, target_fpr=1e-6)
    assert d.detected and d.key_id == keys[0].key_id
    assert d.p_value_corrected == pytest.approx(min(1.0, d.p_value * N_KEYS))
    assert len(d.per_key_p) == N_KEYS
    assert all(p > 1e-3 for kid, p in d.per_key_p.items() if kid != keys[0].key_id)


def test_wrong_key_alone_not_detected(gs, keys, marked):
    (d,) = gs.detect(marked[:1], [keys[3]], target_fpr=0.01)
    assert not d.detected and d.key_id == keys[3].key_id and d.bit_accuracy < 0.7


def test_same_seed_and_key_bit_identical(gs, keys, marked):
    assert np.array_equal(gs.generate([keys[0]], [11])[0], marked[0])
    assert not np.array_equal(marked[0], marked[1])


def test_threshold_for_fpr():
    from scipy.special import betainc
    from scipy.stats import binom

    tau = GaussianShading.threshold_for_fpr(256, 1e-6)
    assert tau == 167 / 256
    assert binom.sf(166, 256, 0.5) <= 1e-6 < binom.sf(165, 256, 0.5)
    # The reference's rule: the smallest i with P(X > i) <= fpr, then "accuracy >= i/n" -> 166/256,
    # one bit looser (P(X >= 166) ~ 1.18e-6).
    ref_i = next(i for i in range(256) if betainc(i + 1, 256 - i, 0.5) <= 1e-6)
    assert ref_i == 166 and tau * 256 == ref_i + 1
    assert GaussianShading.threshold_for_fpr(8, 1e-3) > 1  # unreachable with 8 bits
    with pytest.raises(InvalidParameterError):
        GaussianShading.threshold_for_fpr(256, 0.0)


def test_bad_inputs(gs, tiny_ldm, keys):
    tr = WatermarkKey(secret=bytes([9]) * 32).for_method("tree-ring")
    with pytest.raises(KeyMaterialError):
        gs.generate([tr], [1])
    with pytest.raises(KeyMaterialError):
        gs.detect(np.zeros((1, 256, 256, 3), np.uint8), [tr])
    with pytest.raises(InvalidImageError):
        gs.detect(np.zeros((1, 32, 128, 3), np.uint8), keys[:1])
    with pytest.raises(InvalidParameterError):
        gs.detect(np.zeros((1, 256, 256, 3), np.uint8), keys[:1], target_fpr=1.5)
    with pytest.raises(NotImplementedError, match="cannot watermark an existing image"):
        gs.embed(keys[:1], np.zeros((1, 256, 256, 3), np.uint8))
    with pytest.raises(InvalidParameterError):
        gs.generate(keys[:2], [1, 2, 3])
    with pytest.raises(InvalidParameterError):
        gs.generate(keys[:1], [])
    nan = torch.full((1, 4, 64, 64), float("nan"))
    with pytest.raises(InvalidShapeError):
        gs.score(nan, keys[:1])
    for kw in ({"hw_copy": 3}, {"ch_copy": 3}, {"hw_copy": 0}, {"ch_copy": 1, "hw_copy": 1}):
        with pytest.raises(InvalidParameterError):
            GaussianShading(tiny_ldm, GaussianShadingConfig(**kw))
