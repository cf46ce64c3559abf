"""verify_attestation without a server: a payload signed here, checked the way a client checks one."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import pickle

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shallowmark.attestation import (PAYLOAD_FORMAT, UNCHECKED, AttestationError, AttestationUsageError,
                                     load_public_key, verify_attestation)
from shallowmark.client import Attestation, KeyVerdict, VerifyResult
from shallowmark.server.attestation import Signer, verify_payload

IMAGE = b"\x89PNG not really an image"
NONCE = bytes(range(16))


def _raw(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _result(signer: Signer, *, fmt: str | None = None, nonce: bytes = NONCE) -> VerifyResult:
    verdicts = [dict(key_id="c0", method="shallow-diffuse", score=3.5, p_value=1e-6, p_value_corrected=2e-6,
                     detected=True)]
    payload = verify_payload(request_id="r1", image_sha256=hashlib.sha256(IMAGE).hexdigest(), model="tiny-ldm",
                             target_fpr=0.01, detected=True, identified_key_id="c0", method_score=3.5,
                             bits_packed=b"", num_bits=0, verdicts=verdicts, tenant="a",
                             methods={"shallow-diffuse": "00" * 32}, nonce=nonce)
    if fmt is not None:
        payload["format"] = fmt
    data, sig = signer.sign(payload)
    att = Attestation(payload=data, signature=sig, public_key=signer.public_key_raw,
                      payload_format=fmt or PAYLOAD_FORMAT)
    fields = {f.name for f in dataclasses.fields(VerifyResult)}
    values = dict(detected=True, identified_key_id="c0", verdicts=(KeyVerdict(**verdicts[0]),), method_score=3.5,
                  bits_packed=b"", num_bits=0, target_fpr=0.01, model="tiny-ldm",
                  image_sha256=hashlib.sha256(IMAGE).hexdigest(), request_id="r1", notes=(), model_evals=3,
                  attestation=att, nonce=NONCE)
    return VerifyResult(**{k: v for k, v in values.items() if k in fields})


def test_the_format_is_v2_on_both_sides():
    assert PAYLOAD_FORMAT == "shallowmark.verify.v2"
    signer = Signer.ephemeral()
    assert verify_attestation(_result(signer), signer.public_key_raw, image=IMAGE)["format"] == PAYLOAD_FORMAT
    with pytest.raises(AttestationError, match="format"):
        verify_attestation(_result(signer, fmt="shallowmark.verify.v1"), signer.public_key_raw, image=IMAGE)


def test_the_pinned_key_and_the_image_are_required():
    signer = Signer.ephemeral()
    res = _result(signer)
    with pytest.raises(AttestationUsageError, match="trusted_public_key"):
        verify_attestation(res, image=IMAGE)
    with pytest.raises(AttestationUsageError, match="image"):
        verify_attestation(res, signer.public_key_raw)
    with pytest.raises(AttestationUsageError, match="image"):
        verify_attestation(res, signer.public_key_raw, image="wm.png")   # a path is not the bytes
    assert issubclass(AttestationUsageError, AttestationError)
    # the explicit opt-out skips the image hash only
    assert verify_attestation(res, signer.public_key_raw, image=UNCHECKED)["request_id"] == "r1"
    with pytest.raises(AttestationError, match="SHA-256"):
        verify_attestation(res, signer.public_key_raw, image=IMAGE + b"x")
    assert pickle.loads(pickle.dumps(UNCHECKED)) is UNCHECKED and "UNCHECKED" in repr(UNCHECKED)


def test_the_carried_key_is_never_trusted():
    signer, mallory = Signer.ephemeral(), Signer.ephemeral()
    res = _result(mallory)   # consistent and validly signed, by someone else, carrying their key
    with pytest.raises(AttestationError, match="different key"):
        verify_attestation(res, signer.public_key_raw, image=IMAGE)
    # nor does an attestation that omits the carried key slip past the pinned one
    bare = dataclasses.replace(res, attestation=dataclasses.replace(res.attestation, public_key=b""))
    with pytest.raises(AttestationError, match="invalid signature"):
        verify_attestation(bare, signer.public_key_raw, image=IMAGE)


def test_a_replayed_nonce_is_refused():
    signer = Signer.ephemeral()
    res = dataclasses.replace(_result(signer, nonce=b"\x01" * 16), nonce=NONCE)
    with pytest.raises(AttestationError, match="'nonce' differs"):
        verify_attestation(res, signer.public_key_raw, image=IMAGE)


def test_pinned_key_forms():
    key = Ed25519PrivateKey.generate()
    raw = _raw(key)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for form in (raw, raw.hex(), base64.b64encode(raw).decode(), pem, pem.decode(), key.public_key()):
        assert _raw_of(load_public_key(form)) == raw
    with pytest.raises(AttestationError):
        load_public_key("not a key")


def _raw_of(pub) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
