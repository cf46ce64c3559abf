"""Check the server's signature on a Verify result (Ed25519, no torch needed).

A shallowmark server signs every ``Verify`` result: it serializes the result as canonical JSON (the
*payload*) and signs those bytes with its Ed25519 key. :func:`verify_attestation` checks that

1. the signature over the payload is valid for the server public key *you* trust, which you must
   pass as ``trusted_public_key``: pin it once (``Client.info().attestation_public_key`` stored at
   deployment time, your operator, or the key ``shallowmark serve`` prints at start) and load it from
   your configuration. A key fetched in the same session as the result would prove nothing about who
   signed it, so there is no default and the key carried in the attestation is never trusted;
2. the payload says the same thing as the result you hold (verdicts, identified key, image hash,
   request id...), so nobody swapped the result while keeping a valid signature;
3. the payload's image hash is the SHA-256 of the image you pass as ``image`` (required; pass
   :data:`UNCHECKED` to skip this one check explicitly);
4. the payload signs the nonce the client sent with the call (``VerifyResult.nonce``), when
   there is one, so an attestation made for another call cannot be passed off as this one's.

Payload layout (``payload_format = "shallowmark.verify.v2"``): a JSON object, UTF-8, keys sorted,
no whitespace, floats in Python's shortest round-trip form::

    {"detected": bool, "format": "shallowmark.verify.v2", "identified_key_id": str,
     "image_sha256": hex, "issued_at": "YYYY-MM-DDTHH:MM:SS.ffffffZ", "method_score": float,
     "model": str, "bits": hex of the packed bits, "num_bits": int, "request_id": str,
     "target_fpr": float, "tenant": str, "nonce": hex (empty: none sent),
     "methods": [{"name", "config_sha256"}, ...] (each method and configuration that ran, sorted;
       a method is listed once per configuration: a key is verified under the configurations it
       was embedded with, which the server's ledger records),
     "identified_member": int (only when a member was found by searching a key family),
     "verdicts": [{"detected", "key_id", "method", "p_value", "p_value_corrected", "score"}, ...]}

A key family's verdict also carries ``family_size``, ``member`` (its best member's index) and
``member_key_id``; a single key's carries none of the three.

v2 added ``tenant``, ``methods`` and ``nonce`` to v1 and names keys by their commitment; v1
payloads are refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shallowmark.errors import ShallowmarkError

__all__ = ["AttestationError", "AttestationUsageError", "PAYLOAD_FORMAT", "UNCHECKED", "canonical_json",
           "verify_attestation", "load_public_key"]

PAYLOAD_FORMAT = "shallowmark.verify.v2"
_VERDICT_FIELDS = ("key_id", "method", "score", "p_value", "p_value_corrected", "detected")
#: Signed only in a key family's verdict (the result's verdict then has them non-empty).
_FAMILY_FIELDS = ("family_size", "member", "member_key_id")


class AttestationError(ShallowmarkError):
    """An attestation is missing, malformed, signed by another key, or does not match its result."""


class AttestationUsageError(AttestationError):
    """:func:`verify_attestation` was called without what it needs to check (the pinned server key,
    or the image); the message names the argument. Nothing was verified."""


class _Unchecked:
    __slots__ = ()

    def __repr__(self) -> str:
        return "shallowmark.attestation.UNCHECKED"

    def __reduce__(self):
        return "UNCHECKED"


#: Pass as ``verify_attestation(..., image=UNCHECKED)`` to skip the image-hash check on purpose, when
#: you no longer hold the bytes that were sent (e.g. re-checking an archived result whose image was
#: deleted, or one whose image hash you compare against your own records separately). Everything else
#: is still checked; the signed ``image_sha256`` then only says which image the server saw.
UNCHECKED: Any = _Unchecked()


def canonical_json(obj: Any) -> bytes:
    """The deterministic serialization used for payloads: sorted keys, no whitespace, ASCII.

    Raises:
        ValueError: ``obj`` holds NaN or infinity (JSON cannot represent them).
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def load_public_key(key: Any) -> Ed25519PublicKey:
    """An Ed25519 public key from 32 raw bytes, PEM (bytes or str), hex (64 characters), base64 of the
    32 raw bytes (44 characters), or a key object.

    Raises:
        AttestationError: not an Ed25519 public key.
    """
    if isinstance(key, Ed25519PublicKey):
        return key
    try:
        if isinstance(key, str):
            text = key.strip()
            if "BEGIN" in text:
                key = text.encode("ascii")
            elif len(text) == 44 and text.endswith("="):
                key = base64.b64decode(text, validate=True)
            else:
                key = bytes.fromhex(text)
        key = bytes(key)
        if key.startswith(b"-----BEGIN"):
            loaded = serialization.load_pem_public_key(key)
            if not isinstance(loaded, Ed25519PublicKey):
                raise AttestationError(f"trusted key is a {type(loaded).__name__}, not Ed25519")
            return loaded
        if len(key) != 32:
            raise AttestationError(f"an Ed25519 public key is 32 raw bytes; got {len(key)}")
        return Ed25519PublicKey.from_public_bytes(key)
    except AttestationError:
        raise
    except (ValueError, TypeError, binascii.Error) as e:
        raise AttestationError(f"cannot read the public key: {e}") from None


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
        except (TypeError, ValueError):
            return False
    return a == b


def verify_attestation(result: Any, trusted_public_key: Any = None, *, image: Any = None) -> dict:
    """Check the signature on a :class:`~shallowmark.client.VerifyResult` and that it matches the result.

    Args:
        result: what ``Client.verify`` returned (anything with ``attestation`` and the result fields).
        trusted_public_key: required. The server key you pinned: 32 raw bytes, hex, base64, PEM, or an
            ``Ed25519PublicKey``, from your configuration or a ``GetInfo`` you stored earlier, not
            one fetched alongside this result (that would accept any server's signature).
        image: required. The image bytes you sent; the signed SHA-256 must be theirs. Pass
            :data:`UNCHECKED` to skip this check deliberately (see there for when that is sensible).

    Returns:
        The decoded payload (a dict), e.g. to archive with the image.

    Raises:
        AttestationUsageError: ``trusted_public_key`` or ``image`` is missing (nothing was checked).
        AttestationError: no attestation, another signer, a bad signature, another image, or a
            payload that differs from ``result`` (the message names the first differing field).
    """
    if trusted_public_key is None:
        raise AttestationUsageError(
            "verify_attestation needs trusted_public_key: the server's Ed25519 public key you pinned "
            "(from your config or a GetInfo stored at deployment), not one fetched with this result")
    if image is None:
        raise AttestationUsageError(
            "verify_attestation needs image: the bytes you sent, whose SHA-256 must be the signed one; "
            "pass image=shallowmark.attestation.UNCHECKED to skip that check on purpose")
    if image is not UNCHECKED and not isinstance(image, (bytes, bytearray, memoryview)):
        raise AttestationUsageError(f"image must be the image's bytes (or UNCHECKED), not {type(image).__name__}")
    trusted = load_public_key(trusted_public_key)
    att = getattr(result, "attestation", None)
    if att is None or not getattr(att, "payload", b"") or not getattr(att, "signature", b""):
        raise AttestationError("the result carries no attestation")
    if getattr(att, "payload_format", PAYLOAD_FORMAT) != PAYLOAD_FORMAT:
        raise AttestationError(f"unknown attestation payload format {att.payload_format!r}; expected {PAYLOAD_FORMAT!r}")
    # the carried key only helps say why a check fails; the signature is checked with the pinned one
    if bytes(getattr(att, "public_key", b"") or b"") not in (b"", _raw(trusted)):
        raise AttestationError("the result was signed by a different key than the trusted one")
    try:
        trusted.verify(bytes(att.signature), bytes(att.payload))
    except InvalidSignature:
        raise AttestationError("invalid signature: the attestation payload was altered or not signed by this key") from None

    try:
        payload = json.loads(bytes(att.payload).decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise AttestationError("the attestation payload is not JSON") from None
    if not isinstance(payload, dict) or payload.get("format") != PAYLOAD_FORMAT:
        raise AttestationError(f"the attestation payload is not a {PAYLOAD_FORMAT} object")

    checks = {
        "request_id": getattr(result, "request_id", None),
        "image_sha256": getattr(result, "image_sha256", None),
        "model": getattr(result, "model", None),
        "target_fpr": getattr(result, "target_fpr", None),
        "detected": getattr(result, "detected", None),
        "identified_key_id": getattr(result, "identified_key_id", None) or "",
        "method_score": getattr(result, "method_score", None),
        "num_bits": getattr(result, "num_bits", None),
        "bits": (getattr(result, "bits_packed", b"") or b"").hex(),
    }
    member = getattr(result, "identified_member", None)
    if ("identified_member" in payload) != (member is not None) or (
            member is not None and not _same(payload["identified_member"], member)):
        raise AttestationError("the signed payload does not match the result: field 'identified_member' differs")
    nonce = bytes(getattr(result, "nonce", b"") or b"")
    if nonce:
        checks["nonce"] = nonce.hex()
    for name, value in checks.items():
        if name not in payload or not _same(payload[name], value):
            raise AttestationError(f"the signed payload does not match the result: field {name!r} differs")
    verdicts = list(getattr(result, "verdicts", []))
    signed = payload.get("verdicts")
    if not isinstance(signed, list) or len(signed) != len(verdicts):
        raise AttestationError("the signed payload does not match the result: the verdict lists differ")
    for i, (s, v) in enumerate(zip(signed, verdicts)):
        for f in _VERDICT_FIELDS:
            if not isinstance(s, dict) or f not in s or not _same(s[f], getattr(v, f, None)):
                raise AttestationError(f"the signed payload does not match the result: verdicts[{i}].{f} differs")
        family = bool(getattr(v, "family_size", 0))
        for f in _FAMILY_FIELDS:   # a family's verdict must have them signed; a single key's must not
            if (f in s) != family or (family and not _same(s[f], getattr(v, f, None))):
                raise AttestationError(f"the signed payload does not match the result: verdicts[{i}].{f} differs")
    if image is not UNCHECKED and hashlib.sha256(bytes(image)).hexdigest() != payload["image_sha256"]:
        raise AttestationError("the image given is not the one whose verification was signed (SHA-256 differs)")
    return payload
