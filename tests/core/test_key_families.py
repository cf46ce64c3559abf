"""Key families on the ring methods: members embed, one family of 100 000 verifies at no model
cost, the correction counts every member, and the vectorised draw and chunked scoring are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shallowmark.core.watermarks import load_method, rings
from shallowmark.errors import InvalidParameterError, KeyMaterialError
from shallowmark.keys import KeyFamily, WatermarkKey

GEOM = rings.RingGeometry(64, 16, "dc", inner=8, complex_values=True)


def _family(size, method="shallow-diffuse", secret="5e" * 32):
    return WatermarkKey.from_hex(secret).family(method, size)


def test_one_member_is_drawn_directly_and_equals_its_row():
    seed = 0x57a1003b6e6716d84eea15d34a7aef0d
    for geom in (GEOM, rings.RingGeometry(64, 10, "nyquist")):      # 18 and 11 values a member (odd: pairs straddle)
        rows = rings.family_key_values(seed, geom, 2000)
        for start in (0, 1, 3, 1001, 1999):
            torch.testing.assert_close(rings.family_key_values(seed, geom, 1, start=start), rows[start:start + 1],
                                       rtol=0, atol=0)
    # the last member of the largest family costs one member's draw, not a million
    fam = _family(1 << 20)
    sd_values = rings.family_key_values(0, GEOM, 1, start=(1 << 20) - 1)
    assert sd_values.shape == (1, GEOM.n_values) and fam.member((1 << 20) - 1).index == (1 << 20) - 1


def test_family_values_are_prefix_stable_gaussian_and_pinned():
    seed = 0x57a1003b6e6716d84eea15d34a7aef0d
    small, big = rings.family_key_values(seed, GEOM, 3), rings.family_key_values(seed, GEOM, 5000)
    torch.testing.assert_close(small, big[:3])            # growing a family keeps its members
    # pinned: the first values of this seed's stream (Philox raw words, Box-Muller here)
    torch.testing.assert_close(small[0, :2], torch.tensor([-0.0169 - 0.3304j, 1.2701 - 0.5309j],
                                                          dtype=torch.complex128), atol=1e-4, rtol=0)
    parts = torch.cat([big.real.ravel(), big.imag.ravel()]).numpy()
    assert abs(parts.mean()) < 0.02 and abs(parts.std() - 1.0) < 0.02
    # as directions, the members are independent: mean |cos| of random pairs in 18 dimensions
    w = rings.key_vector(GEOM, big)
    w = w / w.norm(dim=1, keepdim=True)
    cos = (w[:2500] * w[2500:]).sum(1).abs().mean()
    assert 0.17 < float(cos) < 0.21                        # E|cos| = 0.19 in 18 dimensions


def test_chunked_max_cosines_equal_the_whole_product():
    g = torch.Generator().manual_seed(3)
    prof = torch.randn(2, GEOM.dims, 50, generator=g, dtype=torch.float64)
    vals = rings.family_key_values(7, GEOM, 1000)
    whole = rings.max_cosines(prof, GEOM, vals, chunk=10_000)
    torch.testing.assert_close(rings.max_cosines(prof, GEOM, vals, chunk=64), whole)
    w = rings.key_vector(GEOM, vals)
    direct = torch.einsum("bdh,kd->bkh", prof, w) / (prof.norm(dim=1)[:, None, :] * w.norm(dim=1)[None, :, None])
    torch.testing.assert_close(whole, direct.amax(2))


@pytest.fixture(scope="module")
def sd(tiny_ldm):
    return load_method("shallow-diffuse", tiny_ldm, num_steps=20)


@pytest.fixture(scope="module")
def marked(sd):
    """Members 3 and 70 000 of a 100 000 family, generated; and the inverted latents."""
    fam = _family(100_000)
    images = sd.generate([fam.member(3), fam.member(70_000)], [11, 12])
    return fam, images, sd.invert(images)


def test_a_family_of_100000_identifies_each_member_and_pays_for_every_one(sd, marked):
    fam, _, inv = marked
    det = sd.score(inv, [fam])
    assert [d.member for d in det] == [3, 70_000]
    assert [d.key_id for d in det] == [fam.member_id(3), fam.member_id(70_000)]
    for d in det:
        assert d.detected and d.per_key_member == {fam.key_id: d.member}
        assert d.p_value_corrected == pytest.approx(min(1.0, d.p_value * 100_000))
    # the same member scored alone: the same p-value, corrected for one key only
    alone = sd.score(inv[:1], [fam.member(3)])[0]
    assert alone.p_value == pytest.approx(det[0].p_value, rel=1e-9) and alone.member is None
    assert alone.p_value_corrected == pytest.approx(alone.p_value)


def test_a_family_beside_single_keys_counts_all_of_its_members(sd, marked):
    fam, _, inv = marked
    other = WatermarkKey.from_hex("77" * 32).for_method("shallow-diffuse")
    small = KeyFamily(method=fam.method, key_id=fam.key_id, material=fam.material, size=10)
    det = sd.score(inv[:1], [other, small])[0]
    assert det.member == 3 and det.key_id == fam.member_id(3)
    assert det.p_value_corrected == pytest.approx(min(1.0, det.p_value * 11))
    assert set(det.per_key_p) == {other.key_id, fam.key_id}
    # a family that does not reach member 70 000 does not find it: no verdict, whatever member ranks first
    miss = sd.score(inv[1:], [small])[0]
    assert not miss.detected and 0 <= miss.member < 10 and miss.p_value_corrected > 0.01


def test_unwatermarked_images_are_not_attributed_to_any_member(sd):
    det = sd.detect(sd.reference([21, 22, 23]), [_family(100_000)])
    assert not any(d.detected for d in det)


def test_ringid_members_are_discrete_and_tree_ring_members_embed(tiny_ldm):
    ringid = load_method("ringid", tiny_ldm, num_steps=10)
    vals = ringid.family_values(_family(50, "ringid"), 50)
    assert set(vals.abs().unique().tolist()) == {ringid.config.strength}
    tr = load_method("tree-ring", tiny_ldm, num_steps=10)
    fam = _family(1000, "tree-ring")
    det = tr.detect(tr.generate([fam.member(417)], [5]), [fam])[0]
    assert det.detected and det.member == 417


def test_families_verify_beside_variant_keys(tiny_ldm):
    """With key_variants > 1 a plain key is searched over its variants and a family over its
    members, one pattern each, in one call: a member's image is identified as the member, with no
    variant payload, and a variant key's image keeps its bits and its own key's verdict."""
    m = load_method("shallow-diffuse", tiny_ldm, num_steps=20, key_variants=4)
    fam, plain = _family(50), WatermarkKey.from_hex("22" * 32).for_method("shallow-diffuse")
    images = np.concatenate([m.generate([fam.member(7)], [3]), m.generate([plain], [4])])
    by_member, by_plain = m.detect(images, [plain, fam])
    assert by_member.detected and by_member.member == 7 and by_member.bits is None
    assert by_plain.detected and by_plain.key_id == plain.key_id and by_plain.bits.shape == (2,)
    p, found = m.variant_p_values(m.invert(images), [plain, fam])
    assert p.shape == found.shape == (2, 51) and (found[:, 1:] == 0).all()   # members: one variant each
    # the family's p-values are what a one-variant configuration gives it, the plain key pays ×4
    one = load_method("shallow-diffuse", tiny_ldm, num_steps=20)
    assert np.allclose(p[:, 1:], one.variant_p_values(m.invert(images), [fam])[0], rtol=1e-9)


def test_family_misuse_in_the_methods(tiny_ldm, sd):
    fam = _family(10)
    with pytest.raises(KeyMaterialError, match="only verifies"):
        sd.generate([fam], [1])
    gs = load_method("gaussian-shading", tiny_ldm, num_steps=10)
    with pytest.raises(KeyMaterialError, match="does not take key families"):
        gs.generate([WatermarkKey.from_hex("11" * 32).family("ringid", 4).member(0)], [1])
