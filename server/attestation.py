"""Signing Verify results with the server's Ed25519 key.

The private key lives in a PEM file (PKCS#8, unencrypted), created on first start with mode 0600
and reused afterwards, so the public key clients pin survives restarts. Back it up like any
signing key; replicas behind one address should share it. A file readable by group or others is
used but logged as a warning.

The payload is the canonical JSON described in :mod:`shallowmark.attestation` (the SDK side), built
by :func:`verify_payload` and signed by :meth:`Signer.sign`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shallowmark.attestation import PAYLOAD_FORMAT, canonical_json
from shallowmark.errors import KeystoreError

__all__ = ["Signer", "config_json", "config_sha256", "verify_payload"]

log = logging.getLogger("shallowmark.server")


class Signer:
    """Holds the Ed25519 key; build with :meth:`load_or_create` (or :meth:`ephemeral` for tests)."""

    def __init__(self, key: Ed25519PrivateKey, path: Path | None = None):
        self._key = key
        self.path = path

    @classmethod
    def ephemeral(cls) -> "Signer":
        """A fresh in-memory key; signatures will not verify against it after a restart."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> "Signer":
        """Load the key at ``path``, or create it there (mode 0600, parent folders 0700).

        Raises:
            KeystoreError: the file exists but is not an unencrypted Ed25519 PEM key, or cannot be written.
        """
        path = Path(path)
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process created it first: load theirs
            except OSError as e:
                raise KeystoreError(f"cannot create the attestation key {path}: {e}") from None
            else:
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(pem)
                        f.flush()
                        os.fsync(f.fileno())
                except OSError as e:
                    raise KeystoreError(f"cannot write the attestation key {path}: {e}") from None
                log.info("created attestation key %s", path)
                return cls(key, path)
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("attestation key %s is accessible by group/others (mode %o); chmod 600 it",
                            path, stat.S_IMODE(mode))
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise KeystoreError(f"cannot load the attestation key {path}: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeystoreError(f"attestation key {path} is a {type(key).__name__}, not Ed25519")
        return cls(key, path)

    @property
    def public_key_raw(self) -> bytes:
        """The 32-byte public key clients pin."""
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, payload: dict[str, Any]) -> tuple[bytes, bytes]:
        """Canonical JSON of ``payload`` and its Ed25519 signature."""
        data = canonical_json(payload)
        return data, self._key.sign(data)


def config_json(config: Any) -> str:
    """A method's effective configuration (its config dataclass, defaults included, or a mapping)
    as canonical JSON: keys sorted, no whitespace; values JSON cannot hold are written by repr."""
    options = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    return json.dumps(options, sort_keys=True, separators=(",", ":"), default=repr)


def config_sha256(config: Any) -> str:
    """Hex SHA-256 of :func:`config_json`, so an attestation says which settings produced the
    verdict, a change of a built-in default changes it too, and the ledger can name the
    configuration each image was embedded with."""
    return hashlib.sha256(config_json(config).encode("utf-8")).hexdigest()


def verify_payload(*, request_id: str, image_sha256: str, model: str, target_fpr: float, detected: bool,
                   identified_key_id: str, method_score: float, bits_packed: bytes, num_bits: int,
                   verdicts: Sequence[dict[str, Any]], tenant: str = "",
                   methods: Sequence[tuple[str, str]] | dict[str, str] | None = None,
                   nonce: bytes = b"", issued_at: datetime | None = None,
                   identified_member: int | None = None) -> dict[str, Any]:
    """The payload to sign for one Verify result (see :mod:`shallowmark.attestation`).

    ``methods`` lists each ``(method, config_sha256)`` that ran (a method appears once per
    configuration it verified under: a key is verified under the ones it was embedded with); ``nonce``
    is the caller's (empty when none was sent). A key family's verdict also signs its size, best
    member and that member's id; ``identified_member``, the index of a member found by searching a
    family, is signed when there is one (a payload without it is a v2 payload as before)."""
    when = (issued_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    payload = {
        "format": PAYLOAD_FORMAT,
        "tenant": tenant,
        "methods": [{"name": n, "config_sha256": h}
                    for n, h in sorted(set(methods.items() if isinstance(methods, dict) else methods or ()))],
        "nonce": bytes(nonce).hex(),
        "request_id": request_id,
        "issued_at": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "image_sha256": image_sha256,
        "model": model,
        "target_fpr": float(target_fpr),
        "detected": bool(detected),
        "identified_key_id": identified_key_id,
        "method_score": float(method_score),
        "bits": bytes(bits_packed).hex(),
        "num_bits": int(num_bits),
        "verdicts": [{k: v[k] for k in ("key_id", "method", "score", "p_value", "p_value_corrected", "detected",
                                        "family_size", "member", "member_key_id") if k in v}
                     for v in verdicts],
    }
    if identified_member is not None:
        payload["identified_member"] = int(identified_member)
    return payload
