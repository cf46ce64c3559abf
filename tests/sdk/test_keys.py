"""Keys and derivations. The hex below was computed once and pinned: if a test vector fails, the
derivation changed and every deployed key would produce different watermarks. Do not update the
vectors unless you mean to break compatibility (and bump the "v1" domain label)."""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from shallowmark.errors import InvalidParameterError, KeyMaterialError, UnknownNameError
from shallowmark.keys import (METHODS, MethodKey, WatermarkKey, chacha20_key_nonce, method_seed, payload_bits, ring_seed,
                              ring_variant_choice, ring_variants_seed)

CREATED = "2025-01-01T00:00:00+00:00"
ZERO = WatermarkKey(secret=bytes(32), created=CREATED)
COUNT = WatermarkKey(secret=bytes(range(32)), created=CREATED)

VECTORS = {
    "zero": {
        "key": ZERO,
        "key_id": "sm1_7ff84d12ddffce3ae5d2297ead416e16",
        "material": {
            "shallow-diffuse": "4141d65ae01f760a5e946af24349a51826d8f9a9912a126456e8d842e2d63fdc",
            "tree-ring": "503081f95bb2c7200b1209831a1faca1703c745ab4eebe375e3c741498ec9ab2",
            "ringid": "6d83354bb47f2021047317c94aa8da287e66be98b58876f7be140121bcd9f606",
            "gaussian-shading": "21a17f822ada3c31e4f5c882fe50af50849688c3c956334328946f059e7e8883",
            "dwtdct": "15c42784efe67caabebdaea3f219e222f3ea85fec5fa3f2c32f3e5ff4b5b90a4",
            "dwtdctsvd": "ff3b229cd470b81abb052621e5944d94f30efdca70a157d1d84b90d0ee137844",
            "rivagan": "5b08b85c1589bb1493b1fabaf9438ea96d65c0a8464386a58c3a425c87b23368",
        },
        "ring_seed": {"shallow-diffuse": 4961901425916713598, "tree-ring": 11396648260832089242,
                      "ringid": 5032533159811698845},
        "chacha_key": "5bb4e95551032171792ca0aaaea28bf8f0ac6291a092f778cdddd19129c8cbbc",
        "chacha_nonce": "000000009de7816e0daf43afaf423705",
        "bits256_gs": "d17b67fb2d045aede0fb863eba57ee24f1607ccf627d440bd31f0b8e9ae4285d",
        "bits32_rivagan": "230680d9",
        "bits13_dwtdct": [0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1],
        "seed_noise_channel_sd": 12281724321879778879,
        "wire_sd": "534d4b310f7368616c6c6f772d646966667573657ff84d12ddffce3ae5d2297ead416e16"
                   "4141d65ae01f760a5e946af24349a51826d8f9a9912a126456e8d842e2d63fdc",
    },
    "count": {
        "key": COUNT,
        "key_id": "sm1_0585b0abd109d4c42eabd909cfcd2bee",
        "material": {
            "shallow-diffuse": "200aaadab760aaf58526d63a4aa2b8dc68d8f5c358f45659ba3423c6957f87ca",
            "tree-ring": "68afed82a357369bfe3e45b6d798efe312c23c493d6d221abb67c24cef6bdda6",
            "ringid": "10927cb1319095a1d70d8488f7a43f6d3b8c28a37a6fbd3f3de15dd9bdbfc23e",
            "gaussian-shading": "dd5a9436b05d2558470ea38f15b39c94139dd2d408fee710d5344f75a6bf209c",
            "dwtdct": "204143218d27aebdd158486f75427ed3a18af94064494ba0a458fff33fb74f92",
            "dwtdctsvd": "2045782c6771e91caef99de7020ec170ac975e9aef54b30190c6f0e381bac70f",
            "rivagan": "f5fd99511684c392b070c65add350c5d7d4c2dcce46030629b70d97551b2d771",
        },
        "ring_seed": {"shallow-diffuse": 17317901995616765624, "tree-ring": 1375037680059341228,
                      "ringid": 13438019192650497403},
        "chacha_key": "17d452ef5ac0c2babf14d5434bbff38aa02653405e43f8154d863bbce610a7fb",
        "chacha_nonce": "0000000098b5f837a4319fc84bd042b2",
        "bits256_gs": "5114b52e2b88128a60a643db6224ae225954f38a5e02a8987b20f670379adee9",
        "bits32_rivagan": "d8bb5eb2",
        "bits13_dwtdct": [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1],
        "seed_noise_channel_sd": 8807421091063888614,
        "wire_sd": "534d4b310f7368616c6c6f772d646966667573650585b0abd109d4c42eabd909cfcd2bee"
                   "200aaadab760aaf58526d63a4aa2b8dc68d8f5c358f45659ba3423c6957f87ca",
    },
}


@pytest.fixture(params=sorted(VECTORS))
def vec(request):
    return VECTORS[request.param]


def test_key_id_vector(vec):
    assert vec["key"].key_id == vec["key_id"]


def test_method_material_vectors(vec):
    assert set(vec["material"]) == set(METHODS)
    for method, hexmat in vec["material"].items():
        mk = vec["key"].for_method(method)
        assert mk.method == method and mk.key_id == vec["key_id"]
        assert mk.material.hex() == hexmat


def test_ring_seed_vectors(vec):
    for method, seed in vec["ring_seed"].items():
        assert ring_seed(vec["key"].for_method(method)) == seed
        assert 0 <= seed < 2**64


def test_chacha_vectors(vec):
    key, nonce = chacha20_key_nonce(vec["key"].for_method("gaussian-shading"))
    assert key.hex() == vec["chacha_key"]
    assert nonce.hex() == vec["chacha_nonce"]
    # The pair must be directly usable with cryptography's ChaCha20 and round-trip a 256-bit message.
    msg = np.packbits(payload_bits(vec["key"].for_method("gaussian-shading"), 256)).tobytes()
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(msg)
    assert enc != msg
    assert Cipher(algorithms.ChaCha20(key, nonce), mode=None).decryptor().update(enc) == msg


def test_payload_bit_vectors(vec):
    k = vec["key"]
    bits = payload_bits(k.for_method("gaussian-shading"), 256)
    assert bits.dtype == np.uint8 and bits.shape == (256,) and set(np.unique(bits)) <= {0, 1}
    assert np.packbits(bits).tobytes().hex() == vec["bits256_gs"]
    assert np.packbits(payload_bits(k.for_method("rivagan"), 32)).tobytes().hex() == vec["bits32_rivagan"]
    assert payload_bits(k.for_method("dwtdct"), 13).tolist() == vec["bits13_dwtdct"]


def test_method_seed_and_wire_vectors(vec):
    mk = vec["key"].for_method("shallow-diffuse")
    assert method_seed(mk, "noise-channel") == vec["seed_noise_channel_sd"]
    assert mk.to_bytes().hex() == vec["wire_sd"]


def _hkdf_reference(ikm: bytes, info: bytes, length: int) -> bytes:
    # RFC 5869 from the stdlib, independent of the implementation under test.
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + block, i + 1
    return out[:length]


def test_derivation_matches_documented_hkdf_scheme():
    k = COUNT
    assert k.key_id == "sm1_" + _hkdf_reference(k.secret, b"shallowmark/v1/key-id", 16).hex()
    mk = k.for_method("tree-ring")
    assert mk.material == _hkdf_reference(k.secret, b"shallowmark/v1/tree-ring", 32)


def test_derivations_are_distinct_and_deterministic():
    mk = ZERO.for_method("ringid")
    assert ring_seed(mk) == ring_seed(ZERO.for_method("ringid"))
    assert method_seed(mk, "a") != method_seed(mk, "b")
    assert method_seed(mk, "a") != ring_seed(mk)
    # Length is in the label: 32 bits are not a prefix of 256 bits.
    assert payload_bits(mk, 32).tolist() != payload_bits(mk, 256)[:32].tolist()
    assert len({ZERO.for_method(m).material for m in METHODS}) == len(METHODS)


def test_ring_variants_are_distinct_per_key_and_the_choice_is_keyed_and_spread():
    a, b = ZERO.for_method("shallow-diffuse"), COUNT.for_method("shallow-diffuse")
    assert ring_variants_seed(a) == ring_variants_seed(ZERO.for_method("shallow-diffuse")) != ring_variants_seed(b)
    assert ring_variants_seed(a) != ring_seed(a)
    choices = [ring_variant_choice(a, b"seed:%d" % i, 8) for i in range(4000)]
    assert set(choices) == set(range(8))
    assert max(np.bincount(choices)) < 4000 / 8 * 1.2       # each variant about as often
    # another key's holder cannot predict which variant an image carries
    other = [ring_variant_choice(b, b"seed:%d" % i, 8) for i in range(4000)]
    assert 0.09 < np.mean(np.array(choices) == np.array(other)) < 0.16
    assert ring_variant_choice(a, b"x", 1) == 0
    with pytest.raises(InvalidParameterError, match="number of ring variants must be >= 1"):
        ring_variant_choice(a, b"x", 0)
    with pytest.raises(KeyMaterialError, match="cannot be used for ring_seed"):
        ring_variants_seed(ZERO.for_method("gaussian-shading"))


@pytest.mark.parametrize("method", ["tree-ring", "shallow-diffuse", "dwtdct", "rivagan", "ringid"])
def test_chacha_refuses_other_methods(method):
    with pytest.raises(KeyMaterialError, match=f"key derived for method '{method}' cannot be used for chacha20"):
        chacha20_key_nonce(ZERO.for_method(method))


@pytest.mark.parametrize("method", ["gaussian-shading", "dwtdct", "dwtdctsvd", "rivagan"])
def test_ring_seed_refuses_other_methods(method):
    with pytest.raises(KeyMaterialError, match="cannot be used for ring_seed"):
        ring_seed(ZERO.for_method(method))


@pytest.mark.parametrize("method", ["shallow-diffuse", "tree-ring"])
def test_payload_bits_refuses_methods_without_payload(method):
    with pytest.raises(KeyMaterialError, match="cannot be used for payload_bits"):
        payload_bits(ZERO.for_method(method), 32)


def test_method_seed_works_for_every_method():
    assert len({method_seed(ZERO.for_method(m), "x") for m in METHODS}) == len(METHODS)


def test_master_key_is_refused_by_derivations():
    with pytest.raises(KeyMaterialError, match="for_method"):
        ring_seed(ZERO)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, -1, 4097, 2.0, True, "8"])
def test_payload_bits_range(n):
    with pytest.raises(InvalidParameterError):
        payload_bits(ZERO.for_method("rivagan"), n)


def test_payload_bits_bounds_ok():
    mk = ZERO.for_method("gaussian-shading")
    assert payload_bits(mk, 1).shape == (1,)
    assert payload_bits(mk, 4096).shape == (4096,)
    assert payload_bits(mk, np.int64(64)).shape == (64,)


def test_method_seed_needs_purpose():
    with pytest.raises(InvalidParameterError):
        method_seed(ZERO.for_method("tree-ring"), "")


def test_unknown_method_lists_valid():
    with pytest.raises(UnknownNameError) as exc:
        ZERO.for_method("treering")
    assert "tree-ring" in str(exc.value) and "gaussian-shading" in str(exc.value)


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), "00" * 32, None])
def test_secret_length_checked(bad):
    with pytest.raises(KeyMaterialError):
        WatermarkKey(secret=bad)


@pytest.mark.parametrize("bad", [b"", bytes(16), bytes(64)])
def test_method_material_length_checked(bad):
    with pytest.raises(KeyMaterialError):
        MethodKey(method="tree-ring", key_id=ZERO.key_id, material=bad)


def test_tampered_material_caught_at_derivation():
    mk = ZERO.for_method("tree-ring")
    object.__setattr__(mk, "material", b"short")
    with pytest.raises(KeyMaterialError):
        ring_seed(mk)


@pytest.mark.parametrize("bad", ["", "sm1_", "sm1_" + "0" * 31, "sm1_" + "G" * 32, "sm1_" + "AB" * 16, "xx1_" + "0" * 32])
def test_malformed_key_id(bad):
    with pytest.raises(KeyMaterialError):
        MethodKey(method="tree-ring", key_id=bad, material=bytes(32))


def test_secret_not_in_repr():
    k = WatermarkKey.generate(label="prod")
    mk = k.for_method("gaussian-shading")
    for text in (repr(k), str(k), repr(mk), str(mk)):
        assert k.secret.hex() not in text
        assert mk.material.hex() not in text
        assert repr(k.secret) not in text and repr(mk.material) not in text
    assert k.key_id in repr(k) and "prod" in repr(k)


def test_generate_is_random_and_stamped():
    a, b = WatermarkKey.generate(), WatermarkKey.generate("x")
    assert a.secret != b.secret and len(a.secret) == 32
    assert a.created.endswith("+00:00") and b.label == "x" and not a.retired
    assert a.key_id.startswith("sm1_") and len(a.key_id) == 4 + 32


def test_hex_round_trip():
    k = WatermarkKey.generate()
    assert WatermarkKey.from_hex(k.to_hex(), created=k.created) == k
    with pytest.raises(KeyMaterialError):
        WatermarkKey.from_hex("zz" * 32)
    with pytest.raises(KeyMaterialError):
        WatermarkKey.from_hex("00" * 31)


def test_wire_round_trip_and_errors():
    for m in METHODS:
        mk = COUNT.for_method(m)
        assert MethodKey.from_bytes(mk.to_bytes()) == mk
    data = COUNT.for_method("ringid").to_bytes()
    for bad in (b"", data[:-1], data + b"\x00", b"XXXX" + data[4:]):
        with pytest.raises(KeyMaterialError):
            MethodKey.from_bytes(bad)
    forged = data[:4] + bytes([6]) + b"ringix" + data[11:]
    with pytest.raises(UnknownNameError):
        MethodKey.from_bytes(forged)


def test_import_does_not_pull_torch():
    code = ("import sys; import shallowmark.keys, shallowmark.keystore; "
            "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_commitment_is_derived_from_the_material_not_the_label():
    """What a server records for a method key: the commitment, pinned here like the other derivations."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    key = WatermarkKey.from_hex("00" * 32)
    mk = key.for_method("tree-ring")
    want = "sm1_" + HKDFExpand(algorithm=hashes.SHA256(), length=16,
                               info=b"shallowmark/v1/tree-ring/key-id").derive(mk.material).hex()
    assert mk.commitment == want == key.key_id_for("tree-ring") != key.key_id
    assert key.key_id_for("shallow-diffuse") != mk.commitment        # per method
    relabelled = MethodKey(method="tree-ring", key_id="sm1_" + "ab" * 16, material=mk.material)
    assert relabelled.commitment == mk.commitment                     # the label plays no part
    assert MethodKey.from_bytes(mk.to_bytes()).commitment == mk.commitment


# -- key families ------------------------------------------------------------------------------------

FAMILY_VECTOR = dict(secret="00" * 31 + "2a", method="shallow-diffuse",
                     family_id="sm1_ce649dc8dab86ffa65641b8fd195f817",
                     member_0="sm1_d90eb728500207b3dd5afc509a7ce78b",
                     member_99999="sm1_79afa0ec32d1fe323f4deec1acd150ee",
                     seed=0x57a1003b6e6716d84eea15d34a7aef0d)


def test_family_derivation_vector():
    from shallowmark.keys import family_seed

    v = FAMILY_VECTOR
    fam = WatermarkKey.from_hex(v["secret"]).family(v["method"], 100_000)
    assert fam.commitment == v["family_id"]
    assert fam.member_id(0) == v["member_0"] and fam.member_id(99_999) == v["member_99999"]
    assert family_seed(fam) == family_seed(fam.member(12)) == v["seed"]
    assert fam.member(5).commitment == fam.member_id(5)
    # the family's material is its own: neither the method key's nor another method's family
    key = WatermarkKey.from_hex(v["secret"])
    assert fam.material != key.for_method(v["method"]).material
    assert fam.material != key.family("tree-ring", 10).material


def test_family_and_member_wire_round_trip_and_sizes():
    from shallowmark.keys import FamilyMember, KeyFamily, parse_key

    fam = WatermarkKey.from_hex("ab" * 32).family("shallow-diffuse", 100_000)
    wire = fam.to_bytes()
    assert wire[:4] == b"SMF1" and len(wire) < 80                  # 100 000 keys in one short entry
    assert parse_key(wire) == fam and isinstance(parse_key(wire), KeyFamily)
    m = fam.member(99_999)
    assert parse_key(m.to_bytes()) == m and isinstance(parse_key(m.to_bytes()), FamilyMember)
    assert m.family.size == 100_000 and m.family.member_id(99_999) == fam.member_id(99_999)
    plain = WatermarkKey.from_hex("ab" * 32).for_method("shallow-diffuse")
    assert type(parse_key(plain.to_bytes())) is MethodKey and parse_key(plain.to_bytes()) == plain
    assert "material" not in repr(fam) and fam.material.hex() not in repr(m)


@pytest.mark.parametrize("make, error, needle", [
    (lambda k: k.family("gaussian-shading", 10), KeyMaterialError, "ring methods"),
    (lambda k: k.family("shallow-diffuse", 0), InvalidParameterError, "family size"),
    (lambda k: k.family("shallow-diffuse", 1 << 21), InvalidParameterError, "family size"),
    (lambda k: k.family("shallow-diffuse", 10).member(10), InvalidParameterError, "member index"),
    (lambda k: ring_seed(k.family("shallow-diffuse", 10).member(1)), KeyMaterialError, "single method key"),
    (lambda k: ring_seed(k.family("shallow-diffuse", 10)), KeyMaterialError, "single method key"),
])
def test_family_misuse_is_refused(make, error, needle):
    with pytest.raises(error, match=needle):
        make(WatermarkKey.from_hex("cd" * 32))


@pytest.mark.parametrize("data, needle", [
    (b"SMF1", "truncated"), (b"XXXX" + bytes(60), "not a serialized key"),
    (WatermarkKey.from_hex("cd" * 32).family("shallow-diffuse", 4).to_bytes()[:-1], "bytes, expected"),
    (WatermarkKey.from_hex("cd" * 32).family("shallow-diffuse", 4).to_bytes() + b"\0", "bytes, expected"),
])
def test_malformed_family_bytes_are_refused(data, needle):
    from shallowmark.keys import parse_key

    with pytest.raises(KeyMaterialError, match=needle):
        parse_key(data)
