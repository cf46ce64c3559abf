"""Key families through a real server: a member embeds and the ledger names it; one Verify searches
100 000 keys sent as one 70-byte entry, names the member, and signs it; each bad family input gets
INVALID_ARGUMENT with what to send, and leaves the ledger as it was."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from shallowmark._proto.shallowmark.v1 import watermark_pb2 as pb
from shallowmark._proto.shallowmark.v1 import watermark_pb2_grpc as pb_grpc
from shallowmark.keys import KeyFamily, WatermarkKey

MD = [("authorization", "Bearer token-for-tenant-a")]   # as in conftest.py


@pytest.fixture(scope="module")
def family():
    return WatermarkKey.from_hex("fa" * 32).family("shallow-diffuse", 100_000)


@pytest.fixture(scope="module")
def member_embed(client_a, family):
    return client_a.embed(family.member(61_234), seed=3)


def test_a_member_embeds_and_the_ledger_names_the_member(client_a, family, member_embed):
    assert member_embed.key_id == family.member_id(61_234) != family.commitment
    rows = list(client_a.list_embeds(key_id=family.member_id(61_234)))
    assert [r.image_sha256 for r in rows] == [member_embed.image_sha256]


def test_one_verify_searches_100000_members_and_signs_the_one_it_found(server, client_a, family, member_embed):
    from shallowmark.attestation import AttestationError, verify_attestation

    other = WatermarkKey.from_hex("0b" * 32)
    family = dataclasses.replace(family, size=99_999)        # with the other key: the limit, 100 000
    res = client_a.verify(member_embed.image, [other, family])
    assert res.detected and res.identified_member == 61_234
    assert res.identified_key_id == family.member_id(61_234)
    single, fam_v = res.verdicts
    assert (single.family_size, single.member, single.member_key_id) == (0, 0, "")
    assert fam_v.key_id == family.commitment and fam_v.family_size == 99_999 and fam_v.member == 61_234
    assert fam_v.member_key_id == family.member_id(61_234)
    assert fam_v.p_value_corrected == pytest.approx(min(1.0, fam_v.p_value * 100_000))   # every key searched
    payload = verify_attestation(res, server.signer.public_key_raw, image=member_embed.image)
    assert payload["identified_member"] == 61_234 and payload["verdicts"][1]["member"] == 61_234
    assert "member" not in payload["verdicts"][0]
    # a result whose member was changed after signing does not check out
    forged = dataclasses.replace(res, verdicts=(single, dataclasses.replace(fam_v, member=7)))
    with pytest.raises(AttestationError, match="member differs"):
        verify_attestation(forged, server.signer.public_key_raw, image=member_embed.image)
    for member in (7, None):     # another member, or none at all
        with pytest.raises(AttestationError, match="identified_member"):
            verify_attestation(dataclasses.replace(res, identified_member=member), server.signer.public_key_raw,
                               image=member_embed.image)


def test_an_unwatermarked_image_names_no_member(server, client_a, family, embedded):
    from shallowmark.attestation import verify_attestation

    res = client_a.verify(embedded.image, [family])    # marked, but by another key
    assert not res.detected and res.identified_member is None and res.identified_key_id is None
    assert "identified_member" not in verify_attestation(res, server.signer.public_key_raw, image=embedded.image)


def test_a_member_sent_alone_is_a_single_key(client_a, family, member_embed):
    res = client_a.verify(member_embed.image, [family.member(61_234)])
    assert res.detected and res.identified_key_id == family.member_id(61_234) and res.identified_member is None
    assert res.verdicts[0].family_size == 0


def _refused(server, rpc, request) -> grpc.RpcError:
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            getattr(pb_grpc.WatermarkStub(channel), rpc)(request, metadata=MD, timeout=60)
    return e.value


def _gs_family():
    fam = WatermarkKey.from_hex("fa" * 32).family("shallow-diffuse", 4)
    # a family labelled for a method that takes none (the SDK will not make one; a raw client can)
    return KeyFamily(method="gaussian-shading", key_id=fam.key_id, material=fam.material, size=4)


@pytest.mark.parametrize("case, needle", [
    ("embed-family", "only verifies"),
    ("verify-too-many-members", "families of at most 100000 members"),
    ("verify-too-many-keys-together", "split the entries"),
    ("verify-too-many-entries", "more than 1024"),
    ("verify-family-of-a-method-without-families", "does not take key families"),
    ("verify-family-index-out-of-range", "member index"),
])
def test_bad_family_input_is_invalid_argument_and_the_ledger_unchanged(server, family, embedded, case, needle):
    before = server.ledger.count()
    big = KeyFamily(method=family.method, key_id=family.key_id, material=family.material, size=100_001)
    if case == "embed-family":
        rpc, req = "Embed", pb.EmbedRequest(method_key=family.to_bytes(), generate=pb.GenerateSource(seed=1))
    else:
        half = KeyFamily(method=family.method, key_id=family.key_id, material=family.material, size=60_000)
        other_half = WatermarkKey.from_hex("fb" * 32).family("shallow-diffuse", 60_000)
        keys = {"verify-too-many-members": [big.to_bytes()],
                "verify-too-many-keys-together": [half.to_bytes(), other_half.to_bytes()],
                "verify-too-many-entries": [WatermarkKey.from_hex(f"{i + 1:064x}").for_method("tree-ring").to_bytes()
                                            for i in range(1025)],
                "verify-family-of-a-method-without-families": [_gs_family().to_bytes()],
                "verify-family-index-out-of-range": [family.member(0).to_bytes()[:-4] + (1 << 20).to_bytes(4, "big")],
                }[case]
        rpc, req = "Verify", pb.VerifyRequest(image=embedded.image, method_keys=keys)
    err = _refused(server, rpc, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.details(), err.details()
    assert server.ledger.count() == before
