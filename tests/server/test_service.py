"""The gRPC service end to end: a real server on localhost (see conftest), the SDK client and raw stubs."""

from __future__ import annotations

import dataclasses
import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from shallowmark._proto.shallowmark.v1 import watermark_pb2 as pb
from shallowmark._proto.shallowmark.v1 import watermark_pb2_grpc as pb_grpc
from shallowmark.attestation import UNCHECKED, AttestationError, AttestationUsageError, verify_attestation
from shallowmark.client import Client, ServerError



TOKEN_A = "token-for-tenant-a"  # as in conftest.py


def _raw(server, token=TOKEN_A):
    """A raw stub plus the metadata that authenticates it."""
    channel = grpc.insecure_channel(server.address)
    md = [("authorization", f"Bearer {token}")] if token else []
    return channel, pb_grpc.WatermarkStub(channel), md


def _png(arr: np.ndarray, mode=None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h RGB but carries almost no data (a decompression-bomb shape)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


# -- round trips -----------------------------------------------------------------------------------


def test_embed_then_verify_identifies_the_key(client_a, keys, embedded):
    assert embedded.key_id == keys[0].key_id_for("shallow-diffuse") and embedded.method == "shallow-diffuse"
    assert embedded.image.startswith(b"\x89PNG") and embedded.to_array().shape == (256, 256, 3)
    res = client_a.verify(embedded.image, keys, method="shallow-diffuse")
    assert res.detected and res.identified_key_id == keys[0].key_id_for("shallow-diffuse")
    by_id = {v.key_id: v for v in res.verdicts}
    assert [v.key_id for v in res.verdicts] == [k.key_id_for("shallow-diffuse") for k in keys]  # request order
    assert by_id[keys[0].key_id_for("shallow-diffuse")].detected and not by_id[keys[1].key_id_for("shallow-diffuse")].detected
    assert by_id[keys[0].key_id_for("shallow-diffuse")].p_value_corrected == pytest.approx(min(1, 3 * by_id[keys[0].key_id_for("shallow-diffuse")].p_value))
    assert by_id[keys[0].key_id_for("shallow-diffuse")].score > 2 > by_id[keys[1].key_id_for("shallow-diffuse")].score
    assert res.image_sha256 == embedded.image_sha256 and res.model == "tiny-ldm"


def test_wrong_keys_are_not_detected(client_a, keys, embedded):
    res = client_a.verify(embedded.image, keys[1:], method="shallow-diffuse")
    assert not res.detected and res.identified_key_id is None
    assert all(not v.detected for v in res.verdicts)


def test_watermark_an_uploaded_image(client_a, keys, embedded):
    out = client_a.embed(keys[1], method="shallow-diffuse", image=embedded.to_array())
    res = client_a.verify(out.image, [keys[1], keys[2]], method="shallow-diffuse")
    assert res.detected and res.identified_key_id == keys[1].key_id_for("shallow-diffuse")


def test_tree_ring_round_trip_and_embed_refusal(client_a, keys, embedded):
    out = client_a.embed(keys[2], method="tree-ring", seed=11)
    res = client_a.verify(out.image, [k.for_method("tree-ring") for k in keys])
    assert res.detected and res.identified_key_id == keys[2].key_id_for("tree-ring")
    with pytest.raises(ServerError) as e:  # tree-ring cannot mark an existing image
        client_a.embed(keys[2], method="tree-ring", image=embedded.image)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "shallow-diffuse" in e.value.details


def test_bits_method_and_mixed_methods_in_one_verify(client_a, server, keys):
    from shallowmark.keys import payload_bits

    gs = keys[1].for_method("gaussian-shading")
    out = client_a.embed(gs, seed=21)
    res = client_a.verify(out.image, [keys[0].for_method("shallow-diffuse"), gs, keys[2].for_method("gaussian-shading")])
    assert res.detected and res.identified_key_id == gs.commitment
    assert [v.method for v in res.verdicts] == ["shallow-diffuse", "gaussian-shading", "gaussian-shading"]
    assert not res.verdicts[0].detected and res.verdicts[1].detected
    assert res.verdicts[1].p_value_corrected == pytest.approx(min(1.0, 3 * res.verdicts[1].p_value))
    assert res.num_bits == 256 and (res.bits == payload_bits(gs, 256)).mean() > 0.9
    assert 0.9 < res.method_score <= 1.0  # bit accuracy
    verify_attestation(res, server.signer.public_key_raw, image=out.image)


def test_info_lists_models_methods_limits(client_a):
    info = client_a.info()
    assert info.tenant == "a" and info.default_model == "tiny-ldm"
    assert info.models[0].loaded and info.models[0].image_size == 256
    sd = {m.name: m for m in info.methods}["shallow-diffuse"]
    assert sd.supports_embed and sd.verify_model_evals == 3 and sd.generate_model_evals == 13
    assert info.limits.max_message_bytes == 4 * 1024 * 1024 and len(info.attestation_public_key) == 32


# -- attestation -----------------------------------------------------------------------------------


def test_attestation_verifies_and_tampering_fails(client_a, client_b, server, keys, embedded):
    res = client_a.verify(embedded.image, keys[:2])
    pinned = client_b.info().attestation_public_key   # stored earlier, e.g. at deployment
    assert pinned == server.signer.public_key_raw
    payload = verify_attestation(res, pinned, image=embedded.image)
    assert payload["identified_key_id"] == keys[0].key_id_for("shallow-diffuse") and payload["image_sha256"] == embedded.image_sha256

    att = res.attestation
    forged = att.payload.replace(b'"detected":true', b'"detected":false', 1)
    with pytest.raises(AttestationError, match="signature"):
        verify_attestation(dataclasses.replace(res, attestation=dataclasses.replace(att, payload=forged)), pinned,
                           image=embedded.image)
    flipped = dataclasses.replace(res, detected=False, identified_key_id=None)  # result changed, payload not
    with pytest.raises(AttestationError, match="does not match"):
        verify_attestation(flipped, pinned, image=embedded.image)
    with pytest.raises(AttestationError, match="different key"):
        verify_attestation(res, bytes(32 * [7]), image=embedded.image)
    with pytest.raises(AttestationError, match="SHA-256"):
        verify_attestation(res, pinned, image=embedded.image + b"x")
    assert res.attestation.payload_format == "shallowmark.verify.v2" and b'"format":"shallowmark.verify.v2"' in att.payload


def test_attestation_needs_a_pinned_key_and_the_image(client_a, server, keys, embedded):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives import serialization

    res = client_a.verify(embedded.image, keys[:1])
    pinned = server.signer.public_key_raw
    with pytest.raises(AttestationUsageError, match="trusted_public_key"):
        verify_attestation(res, image=embedded.image)
    with pytest.raises(AttestationUsageError, match="image"):
        verify_attestation(res, pinned)
    # opting out of the image check is explicit, and the rest is still checked
    assert verify_attestation(res, pinned, image=UNCHECKED)["image_sha256"] == embedded.image_sha256
    with pytest.raises(AttestationError, match="does not match"):
        verify_attestation(dataclasses.replace(res, detected=not res.detected), pinned, image=UNCHECKED)
    # a result re-signed by someone else, carrying their own key, fails against the pinned one
    mallory = Ed25519PrivateKey.generate()
    forged = res.attestation.payload.replace(b'"detected":true', b'"detected":false', 1)
    resigned = dataclasses.replace(res, detected=False, attestation=dataclasses.replace(
        res.attestation, payload=forged, signature=mallory.sign(forged),
        public_key=mallory.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)))
    with pytest.raises(AttestationError, match="different key"):
        verify_attestation(resigned, pinned, image=embedded.image)


# -- auth and tenants ------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_bad_token_is_unauthenticated(server, token):
    with Client(server.address, token, retries=0) as c:
        with pytest.raises(ServerError) as e:
            c.info()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_token(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"shallowmark.v1.Watermark", "grpc.health.v1.Health"} <= services


def test_malformed_authorization_header(server):
    channel, stub, _ = _raw(server, None)
    with channel, pytest.raises(grpc.RpcError) as e:
        stub.GetInfo(pb.GetInfoRequest(), metadata=[("authorization", "Basic abc")], timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.details()


def test_tenants_see_only_their_ledger(client_a, client_b, embedded):
    mine = list(client_a.list_embeds())
    assert embedded.image_sha256 in {e.image_sha256 for e in mine} and {e.tenant for e in mine} == {"a"}
    assert all(e.image_sha256 != embedded.image_sha256 for e in client_b.list_embeds())
    with pytest.raises(ServerError) as e:
        list(client_b.list_embeds(tenant="a"))
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    only = list(client_a.list_embeds(key_id=embedded.key_id, page_size=1))
    assert only and {e.key_id for e in only} == {embedded.key_id}


def test_retried_embed_is_recorded_once(server, client_a, keys):
    before = server.ledger.count("a")
    one = client_a.embed(keys[2], seed=5, request_id="retry-test-1")
    two = client_a.embed(keys[2], seed=5, request_id="retry-test-1")
    assert one.image_sha256 == two.image_sha256 and one.request_id == "retry-test-1"
    assert server.ledger.count("a") == before + 1
    with pytest.raises(ServerError) as e:   # the same id for another image is refused, not lost
        client_a.embed(keys[2], seed=6, request_id="retry-test-1")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "already used" in e.value.details
    assert server.ledger.count("a") == before + 1


# -- bad input: each refused with its status code, nothing recorded --------------------------------


def _embed_req(keys, **kw):
    return pb.EmbedRequest(method_key=keys[0].for_method("shallow-diffuse").to_bytes(), **kw)


def _bad_requests(keys, embedded):
    img = embedded.to_array()
    mk = keys[0].for_method("shallow-diffuse").to_bytes()
    return {
        "not an image": ("Embed", _embed_req(keys, image=b"this is not an image"), "not a PNG or JPEG"),
        "truncated png": ("Embed", _embed_req(keys, image=embedded.image[: len(embedded.image) // 2]), "truncated"),
        "zero-size": ("Embed", _embed_req(keys, image=b""), "empty"),
        "bomb header": ("Verify", pb.VerifyRequest(image=_png_header_only(20000, 20000), method_keys=[mk]),
                        "pixels"),
        "1x1": ("Embed", _embed_req(keys, image=_png(img[:1, :1])), "short side must be at least 64 pixels"),
        "1x1 verify": ("Verify", pb.VerifyRequest(image=_png(img[:1, :1]), method_keys=[mk]), "at least 64 pixels"),
        "100000x1": ("Verify", pb.VerifyRequest(image=_png(np.zeros((1, 100000, 3), np.uint8)), method_keys=[mk]),
                     "image is 100000x1: its short side must be at least 64"),
        "short side 63": ("Embed", _embed_req(keys, image=_png(img[:63, :200])), "at least 64 pixels"),
        "beyond 1:4": ("Embed", _embed_req(keys, image=_png(np.tile(img[:64], (1, 2, 1))[:, :257])),
                       "at most 4:1 (or 1:4)"),
        "beyond 4:1 verify": ("Verify", pb.VerifyRequest(image=_png(np.tile(img[:, :64], (2, 1, 1))[:257]),
                                                          method_keys=[mk]), "at most 4:1"),
        "decode at another size": ("Embed", _embed_req(keys, image=_png(img[:200, :256]), output="decode"),
                                   "cannot keep a 256x200 image's size; use output 'residual'"),
        "unknown method": ("Embed", _embed_req(keys, method="nope", generate=pb.GenerateSource(seed=1)),
                           "valid choices"),
        "unknown model": ("Embed", _embed_req(keys, model="sdxl", generate=pb.GenerateSource(seed=1)),
                          "tiny-ldm"),
        "short key": ("Embed", pb.EmbedRequest(method_key=mk[:20], generate=pb.GenerateSource(seed=1)),
                      "MethodKey"),
        "no key": ("Verify", pb.VerifyRequest(image=embedded.image), "at least one"),
        "no source": ("Embed", _embed_req(keys), "either"),
        "bad fpr": ("Verify", pb.VerifyRequest(image=embedded.image, method_keys=[mk], target_fpr=1.5),
                    "target_fpr"),
        "unknown output": ("Embed", _embed_req(keys, image=embedded.image, output="sharp"), "output must be one of"),
        "output with generate": ("Embed", _embed_req(keys, generate=pb.GenerateSource(seed=1), output="residual"),
                                 "applies to an uploaded image"),
        "output for a method without modes": (
            "Embed", pb.EmbedRequest(method_key=keys[0].for_method("dwtdct").to_bytes(), image=embedded.image,
                                     output="residual"), "no output modes"),
    }


@pytest.mark.parametrize("case", ["not an image", "truncated png", "zero-size", "bomb header", "1x1", "1x1 verify",
                                  "100000x1", "short side 63", "beyond 1:4", "beyond 4:1 verify",
                                  "decode at another size",
                                  "unknown method", "unknown model", "short key", "no key", "no source",
                                  "bad fpr", "unknown output", "output with generate",
                                  "output for a method without modes"])
def test_bad_input_is_invalid_argument_and_ledger_unchanged(server, keys, embedded, case):
    if case == "output for a method without modes" and "dwtdct" not in server.pool.get("").available:
        pytest.skip("dwtdct needs the 'bench' extra (invisible-watermark)")
    rpc, req, needle = _bad_requests(keys, embedded)[case]
    before = server.ledger.count()
    channel, stub, md = _raw(server)
    with channel, pytest.raises(grpc.RpcError) as e:
        getattr(stub, rpc)(req, metadata=md, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert needle in e.value.details()
    assert server.ledger.count() == before


def test_oversized_message_is_refused_by_grpc(server, keys):
    channel, stub, md = _raw(server)
    with channel, pytest.raises(grpc.RpcError) as e:
        stub.Embed(_embed_req(keys, image=b"\0" * (5 * 1024 * 1024)), metadata=md, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_rgba_input_is_converted_and_said_so(client_a, keys, embedded):
    rgba = np.concatenate([embedded.to_array(), np.full((256, 256, 1), 255, np.uint8)], axis=2)
    res = client_a.verify(_png(rgba, "RGBA"), keys[:1])
    assert res.detected and any("RGBA" in n for n in res.notes)


def test_call_without_deadline_runs(server, keys, embedded):
    channel, stub, md = _raw(server)
    req = pb.VerifyRequest(image=embedded.image, method_keys=[keys[0].for_method("shallow-diffuse").to_bytes()])
    with channel:
        assert stub.Verify(req, metadata=md).detected   # no timeout: gRPC's "infinite" deadline


def test_short_deadline_is_refused_before_the_job(server, keys):
    lm = server.pool.get("tiny-ldm")
    saved, lm.sec_per_eval = lm.sec_per_eval, 10.0   # pretend a slow model: 13 evaluations ~ 130 s
    before = server.ledger.count()
    try:
        with Client(server.address, TOKEN_A, retries=0) as c, pytest.raises(ServerError) as e:
            c.embed(keys[0], seed=1, timeout=5)
    finally:
        lm.sec_per_eval = saved
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline leaves" in e.value.details and "13 evaluations" in e.value.details
    assert server.ledger.count() == before


# -- lifecycle -------------------------------------------------------------------------------------


def test_health_not_serving_until_models_load(tmp_path, loader, keys, make_config):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from shallowmark.server.app import ServerApp

    app = ServerApp(make_config(tmp_path), backend_loader=loader).start(load_models=False)
    try:
        channel = grpc.insecure_channel(app.address)
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="shallowmark.v1.Watermark")
        assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with Client(app.address, TOKEN_A, retries=0) as c:
            with pytest.raises(ServerError) as e:
                c.embed(keys[0], seed=1)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details
            assert app.load_models()
            assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            assert c.info().models[0].loaded

            # graceful stop: the in-flight embed finishes; new calls are refused meanwhile
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(c.embed, keys[0], seed=2)
                time.sleep(0.3)
                stopper = pool.submit(app.stop, 30.0)
                time.sleep(0.1)
                with pytest.raises(grpc.RpcError) as refused:
                    health.Check(check, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert running.result(timeout=60).key_id == keys[0].key_id_for("shallow-diffuse")
                stopper.result(timeout=60)
        channel.close()
    finally:
        app.stop(0.5)
    # after a stop, health answers NOT_SERVING until the port closes; the port is closed now
    with pytest.raises(grpc.RpcError):
        grpc.insecure_channel(app.address).unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=2)


def test_client_retries_unavailable_until_the_model_loads(tmp_path, loader, keys, make_config):
    import threading

    from shallowmark.server.app import ServerApp

    app = ServerApp(make_config(tmp_path), backend_loader=loader).start(load_models=False)
    try:
        threading.Timer(0.5, app.load_models).start()
        with Client(app.address, TOKEN_A, retries=8, backoff=0.2, timeout=60) as c:
            assert c.info().tenant == "a"   # no model needed
            assert len(c.verify(_png(np.zeros((256, 256, 3), np.uint8)), keys[:1]).verdicts) == 1
    finally:
        app.stop(0.5)


# -- key ids ---------------------------------------------------------------------------------------


def test_a_key_id_cannot_be_borrowed(server, client_a, client_b, keys, embedded):
    """Tenant b labels its own material with tenant a's public key id: the server names the key by
    the commitment of the material it received, so neither the ledger, nor the verdicts, nor the
    signed attestation can name a's key."""
    from shallowmark.keys import MethodKey, WatermarkKey

    a_mk = keys[0].for_method("shallow-diffuse")
    b_key = WatermarkKey.from_hex(f"{0xB0B:064x}")
    spoof = MethodKey(method="shallow-diffuse", key_id=a_mk.key_id, material=b_key.for_method("shallow-diffuse").material)
    a_id, b_id = a_mk.commitment, b_key.key_id_for("shallow-diffuse")
    assert spoof.commitment == b_id != a_id

    a_rows = {e.image_sha256 for e in client_a.list_embeds(key_id=a_id, page_size=1000)}
    out = client_b.embed(spoof, seed=77)
    assert out.key_id == b_id
    rows = [e for e in client_b.list_embeds(page_size=1000) if e.image_sha256 == out.image_sha256]
    assert [e.key_id for e in rows] == [b_id]
    assert {e.image_sha256 for e in client_a.list_embeds(key_id=a_id, page_size=1000)} == a_rows  # a's rows unchanged

    res = client_b.verify(out.image, [spoof])
    assert res.detected and res.identified_key_id == b_id and [v.key_id for v in res.verdicts] == [b_id]
    payload = verify_attestation(res, client_b.info().attestation_public_key, image=out.image)
    assert payload["identified_key_id"] == b_id and a_id not in res.attestation.payload.decode()
    # a's image verified with the spoofed key is not a's: b's material does not detect it
    assert not client_b.verify(embedded.image, [spoof]).detected


def test_the_same_material_twice_is_one_key_whatever_its_labels(client_a, keys, embedded):
    """Two labels on one material are one key to the server: refused as a repeated candidate."""
    from shallowmark.keys import MethodKey

    mk = keys[0].for_method("shallow-diffuse")
    relabelled = MethodKey(method=mk.method, key_id=keys[1].key_id, material=mk.material)
    with pytest.raises(ServerError) as e:
        client_a.verify(embedded.image, [mk, relabelled])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "repeats key" in e.value.details


def test_attestation_binds_tenant_methods_and_the_callers_nonce(server, client_a, keys, embedded):
    res = client_a.verify(embedded.image, keys[:2])
    pinned = client_a.info().attestation_public_key
    payload = verify_attestation(res, pinned, image=embedded.image)
    assert len(res.nonce) == 16 and payload["nonce"] == res.nonce.hex() and payload["tenant"] == "a"
    assert [m["name"] for m in payload["methods"]] == ["shallow-diffuse"]
    # the method's effective configuration, built-in defaults included: a change of a default shows
    from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuseConfig
    from shallowmark.server.attestation import config_sha256

    # key_variants unset resolves to 16 on tiny-ldm's rings, and the digest holds the resolved value
    effective = dataclasses.replace(ShallowDiffuseConfig(**dict(server.config.method_options.get("shallow-diffuse", {}))),
                                    key_variants=16)
    assert payload["methods"][0]["config_sha256"] == config_sha256(effective)
    assert config_sha256(dataclasses.replace(effective, key_variants=2)) != config_sha256(effective)
    assert {v["key_id"] for v in payload["verdicts"]} == {k.key_id_for("shallow-diffuse") for k in keys[:2]}
    other = client_a.verify(embedded.image, keys[:2])
    with pytest.raises(AttestationError, match="'nonce' differs"):   # a replayed attestation of another call
        verify_attestation(dataclasses.replace(other, attestation=res.attestation, request_id=res.request_id),
                           pinned, image=embedded.image)


def test_an_oversized_nonce_is_refused(server, keys, embedded):
    channel, stub, md = _raw(server)
    req = pb.VerifyRequest(image=embedded.image, method_keys=[keys[0].for_method("shallow-diffuse").to_bytes()],
                           nonce=b"n" * 65)
    with pytest.raises(grpc.RpcError) as e:
        stub.Verify(req, metadata=md, timeout=60)
    channel.close()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nonce" in e.value.details()


def test_an_image_verifies_under_the_configuration_it_was_embedded_with(tmp_path, running_server, keys):
    """The ledger records each embed's method configuration and Verify uses it: an image embedded
    before the server's options (or a built-in default) changed is still found, the attestation
    names the configuration, and a key embedded under two is tried under both at twice the p-value.
    A key with no record is verified under the current configuration, and a record made before
    configurations were recorded under the method's ``unrecorded_options``."""
    from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
    from shallowmark.server.attestation import config_sha256
    from shallowmark.server.ledger import open_ledger

    from tests.server.conftest import STEPS, TOKEN_A

    old_options = {**STEPS, "shallow-diffuse": {**STEPS["shallow-diffuse"], **ShallowDiffuse.unrecorded_options}}
    old_sha = config_sha256(ShallowDiffuseConfig(**old_options["shallow-diffuse"]))
    new_sha = config_sha256(ShallowDiffuseConfig(**STEPS["shallow-diffuse"], key_variants=16))
    assert old_sha != new_sha
    key = keys[2]
    state = tmp_path / "state"
    with running_server(state, method_options=old_options) as app, Client(app.address, TOKEN_A, timeout=120) as c:
        old = c.embed(key, method="shallow-diffuse", seed=11)

    def configs_signed(res, client, image):
        return [m["config_sha256"] for m in verify_attestation(res, client.info().attestation_public_key,
                                                                image=image)["methods"]]

    with running_server(state) as app, Client(app.address, TOKEN_A, timeout=120) as c:   # defaults changed since
        res = c.verify(old.image, [key])
        assert res.detected and res.identified_key_id == old.key_id
        assert any(f"embedded with ({old_sha[:12]}; the server's current one is {new_sha[:12]})" in n
                   for n in res.notes)
        assert configs_signed(res, c, old.image) == [old_sha]
        new = c.embed(key, method="shallow-diffuse", seed=12)   # the key now has images under both
        both = c.verify(new.image, [key])
        assert both.detected and configs_signed(both, c, new.image) == sorted([old_sha, new_sha])
        assert any("multiplied by 2" in n for n in both.notes)
        again = c.verify(old.image, [key])
        assert again.detected and again.verdicts[0].p_value == pytest.approx(2 * res.verdicts[0].p_value, rel=1e-6)

    with running_server(tmp_path / "fresh") as app, Client(app.address, TOKEN_A, timeout=120) as c:
        res = c.verify(old.image, [key])   # no record of the key: the current configuration, which misses it
        assert not res.detected and configs_signed(res, c, old.image) == [new_sha]
        assert not any("embedded with" in n for n in res.notes)

    # records without a configuration that rebuild to the recorded one are one hypothesis, not two
    dup = tmp_path / "dup"
    with running_server(dup, method_options=old_options) as app, Client(app.address, TOKEN_A, timeout=120) as c:
        c.embed(key, method="shallow-diffuse", seed=11)
    led = open_ledger(str(dup / "ledger.sqlite3"))
    led.record(tenant="a", key_id=old.key_id, method="shallow-diffuse", model=old.model,
               image_sha256=old.image_sha256, request_id="from-an-older-version", source="generate")
    led.close()
    with running_server(dup, method_options=old_options) as app, Client(app.address, TOKEN_A, timeout=120) as c:
        res = c.verify(old.image, [key])
        assert res.detected and configs_signed(res, c, old.image) == [old_sha]
        assert not any("embedded with" in n for n in res.notes)

    # a ledger an older version wrote: the record names no configuration
    legacy = tmp_path / "legacy"
    led = open_ledger(str(legacy / "ledger.sqlite3"))
    led.record(tenant="a", key_id=old.key_id, method="shallow-diffuse", model=old.model,
               image_sha256=old.image_sha256, request_id="from-an-older-version", source="generate")
    led.close()
    with running_server(legacy) as app, Client(app.address, TOKEN_A, timeout=120) as c:
        res = c.verify(old.image, [key])
        assert res.detected and configs_signed(res, c, old.image) == [old_sha]
