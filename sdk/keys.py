"""Watermark keys and the per-method material derived from them.

A :class:`WatermarkKey` is 32 random bytes (the *master secret*) plus a little metadata. It never
leaves the caller's machine: before talking to a server, call :meth:`WatermarkKey.for_method` to get
a :class:`MethodKey`, which holds only material scoped to one watermark method. A leaked
``MethodKey`` for ``tree-ring`` reveals nothing about the master secret or about the material of any
other method.

Typical use::

    key = WatermarkKey.generate(label="prod")
    mk = key.for_method("shallow-diffuse")
    seed = ring_seed(mk)               # what the Fourier-ring methods draw their pattern from
    wire = mk.to_bytes()               # what goes into a request

Derivation scheme (version 1, pinned by test vectors, so never change it silently):

* ``key_id``   = ``"sm1_" + hex(HKDF-SHA256(secret, info=b"shallowmark/v1/key-id", 16 bytes))``
* ``material`` = ``HKDF-SHA256(secret, info=b"shallowmark/v1/" + method, 32 bytes)``
* each value derived from a ``MethodKey`` is ``HKDF-Expand-SHA256(material,
  info=b"shallowmark/v1/" + method + b"/" + label)`` with its own label (``ring-seed``,
  ``chacha20``, ``payload-bits/<n>``, ``seed/<purpose>``).

* ``commitment`` = ``"sm1_" + hex(HKDF-Expand-SHA256(material, info=b"shallowmark/v1/" + method +
  b"/key-id", 16 bytes))``: the key id a *server* records and signs for a method key.

HKDF is one-way, so publishing ``key_id`` and ``commitment`` (in ledgers, logs, verify results) is safe.

Why two ids: ``key_id`` fingerprints the master secret, which a server never sees, so a server cannot
tell whether the ``key_id`` inside a method key belongs to its material; anyone could label their
own material with someone else's ``key_id``. The server therefore ignores the ``key_id`` a request
carries and names each method key by its ``commitment``, which it recomputes from the material it
received: naming a key you do not hold would need a preimage of HKDF. Use
:meth:`WatermarkKey.key_id_for` (or :attr:`MethodKey.commitment`) to find the id a server reports.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from shallowmark.errors import InvalidParameterError, KeyMaterialError, check_int, shown
from shallowmark.methods import BUILTIN_METHODS, method_names, method_spec

__all__ = [
    "METHODS",
    "SECRET_BYTES",
    "check_key_id",
    "WatermarkKey",
    "MethodKey",
    "KeyFamily",
    "FamilyMember",
    "MAX_FAMILY_SIZE",
    "parse_key",
    "keys_searched",
    "family_seed",
    "ring_seed",
    "ring_variant_choice",
    "ring_variants_seed",
    "chacha20_key_nonce",
    "payload_bits",
    "method_seed",
]

#: The built-in watermark methods a key can be scoped to (the registry, :mod:`shallowmark.methods`,
#: may hold more). The names are part of the derivation: renaming one changes every key's material.
METHODS: tuple[str, ...] = tuple(spec.name for spec in BUILTIN_METHODS)

#: Length of a master secret and of a method's material, in bytes.
SECRET_BYTES = 32

_DOMAIN = b"shallowmark/v1/"
_KEY_ID_PREFIX = "sm1_"
_KEY_ID_BYTES = 16
_MAX_PAYLOAD_BITS = 4096

def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    # No salt: the input is already 32 uniformly random bytes, so HKDF-Extract with the default
    # all-zero salt is sound (RFC 5869 §3.1) and keeps the scheme reproducible from the secret alone.
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def _expand(material: bytes, info: bytes, length: int) -> bytes:
    # Method material is already a uniform pseudorandom key, so Expand alone is enough.
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(material)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_method(method: str) -> str:
    if not isinstance(method, str):
        raise KeyMaterialError(f"method must be a str, got {type(method).__name__}")
    return method_spec(method).name


@dataclass(frozen=True)
class WatermarkKey:
    """A master watermark key: 32 secret bytes plus metadata.

    Create one with :meth:`generate` (or get one from a :class:`~shallowmark.keystore.Keystore`).
    Treat ``secret`` like a private key: store it only in a keystore, and send only
    :meth:`for_method` output to a server. ``repr()`` never shows the secret.

    Attributes:
        secret: the 32 secret bytes.
        created: creation time, ISO 8601 in UTC (``2025-01-31T12:00:00+00:00``).
        label: free text for people ("prod", "staging-2025"); not secret, not part of derivations.
        retired: True once the key was rotated out; it should no longer embed but still verifies.

    Raises:
        KeyMaterialError: ``secret`` is not exactly 32 bytes.
    """

    secret: bytes = field(repr=False)
    created: str = field(default_factory=_utc_now)
    label: str = ""
    retired: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.secret, (bytearray, memoryview)):
            object.__setattr__(self, "secret", bytes(self.secret))
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_BYTES:
            got = len(self.secret) if isinstance(self.secret, bytes) else type(self.secret).__name__
            raise KeyMaterialError(f"a watermark key secret must be {SECRET_BYTES} bytes, got {got}")
        if not isinstance(self.created, str) or not isinstance(self.label, str):
            raise KeyMaterialError("created and label must be str")
        if not isinstance(self.retired, bool):
            raise KeyMaterialError("retired must be a bool")

    @classmethod
    def generate(cls, label: str = "") -> "WatermarkKey":
        """Make a new key from the operating system's CSPRNG, stamped with the current UTC time."""
        return cls(secret=secrets.token_bytes(SECRET_BYTES), label=label)

    @classmethod
    def from_hex(cls, hex_secret: str, *, label: str = "", created: str | None = None,
                 retired: bool = False) -> "WatermarkKey":
        """Rebuild a key from the 64 hex characters :meth:`to_hex` printed.

        Raises:
            KeyMaterialError: not hex, or not 32 bytes once decoded.
        """
        try:
            secret = bytes.fromhex(hex_secret.strip())
        except (ValueError, AttributeError) as exc:
            raise KeyMaterialError(f"key secret is not valid hex: {exc}") from None
        return cls(secret=secret, created=created or _utc_now(), label=label, retired=retired)

    def to_hex(self) -> str:
        """The secret as 64 lowercase hex characters. Sensitive: anyone holding it can embed."""
        return self.secret.hex()

    @property
    def key_id(self) -> str:
        """Public fingerprint ``sm1_<32 hex>``; safe to log and to send. Reveals nothing about the secret."""
        return _KEY_ID_PREFIX + _hkdf(self.secret, _DOMAIN + b"key-id", _KEY_ID_BYTES).hex()

    def for_method(self, method: str) -> "MethodKey":
        """Derive the material for one watermark method; this, not the key, is what a server sees.

        Raises:
            UnknownNameError: ``method`` is not one of :data:`METHODS` (the message lists them).
        """
        _check_method(method)
        material = _hkdf(self.secret, _DOMAIN + method.encode("ascii"), SECRET_BYTES)
        return MethodKey(method=method, key_id=self.key_id, material=material)

    def family(self, method: str, size: int) -> "KeyFamily":
        """A family of ``size`` keys for ``method`` (a ring method: ``shallow-diffuse``, ``tree-ring``,
        ``ringid``), sent to a server in one compact form so that one Verify searches all of them.

        Give each of your users, accounts or records its own member (:meth:`KeyFamily.member`) and
        embed with it; Verify against the family says which member marked an image. The family's
        material is derived from this key and the method under its own label, so it is independent
        of :meth:`for_method`'s; members ``0..size-1`` do not depend on ``size`` (a grown family
        keeps its members).

        Raises:
            UnknownNameError: ``method`` is not one of :data:`METHODS`.
            InvalidParameterError: ``size`` not in 1..:data:`MAX_FAMILY_SIZE`.
            KeyMaterialError: ``method`` does not draw ring keys.
        """
        _check_method(method)
        if "ring_seed" not in method_spec(method).derivations:
            ring = [n for n in method_names() if "ring_seed" in method_spec(n).derivations]
            raise KeyMaterialError(f"key families are for the ring methods ({', '.join(sorted(ring))}); "
                                   f"{method!r} is not one")
        material = _hkdf(self.secret, _DOMAIN + b"family/" + method.encode("ascii"), SECRET_BYTES)
        return KeyFamily(method=method, key_id=self.key_id, material=material, size=size)

    def key_id_for(self, method: str) -> str:
        """The id a server records, reports and signs for this key's ``method`` material
        (:attr:`MethodKey.commitment`); compare it with ``EmbedResult.key_id``,
        ``VerifyResult.identified_key_id`` and ledger entries."""
        return self.for_method(method).commitment

    def __repr__(self) -> str:
        return (f"WatermarkKey(key_id={self.key_id!r}, label={self.label!r}, "
                f"created={self.created!r}, retired={self.retired!r})")


_WIRE_MAGIC = b"SMK1"


@dataclass(frozen=True)
class MethodKey:
    """Key material scoped to one watermark method; the only key form that should leave the SDK.

    Attributes:
        method: one of :data:`METHODS`.
        key_id: the public fingerprint of the master key it came from. A label only: servers cannot
            check it against the material and ignore it (see :attr:`commitment`).
        material: 32 pseudorandom bytes. Secret for this method, but useless for any other method
            and never revealing the master secret.

    Wire format (:meth:`to_bytes`): ``b"SMK1" | len(method): u8 | method (ASCII) |
    key_id fingerprint (16 raw bytes) | material (32 bytes)``.

    Raises:
        KeyMaterialError: material not 32 bytes, or a malformed ``key_id``.
        UnknownNameError: unknown method.
    """

    method: str
    key_id: str
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.material, (bytearray, memoryview)):
            object.__setattr__(self, "material", bytes(self.material))
        _check_method(self.method)
        _key_id_bytes(self.key_id)  # validates the format
        if not isinstance(self.material, bytes) or len(self.material) != SECRET_BYTES:
            got = len(self.material) if isinstance(self.material, bytes) else type(self.material).__name__
            raise KeyMaterialError(f"method key material must be {SECRET_BYTES} bytes, got {got}")

    @property
    def commitment(self) -> str:
        """The public key id derived from this method and material (``sm1_`` + 32 hex digits).

        Servers compute it from the material they receive and use it, not :attr:`key_id` (which they
        cannot check), in the ledger, in results and in attestations. Differs per method.
        """
        return _KEY_ID_PREFIX + _expand(self.material, _info(self, "key-id"), _KEY_ID_BYTES).hex()

    def to_bytes(self) -> bytes:
        """Serialize for a request (see the class docstring for the layout)."""
        m = self.method.encode("ascii")
        return _WIRE_MAGIC + bytes([len(m)]) + m + _key_id_bytes(self.key_id) + self.material

    @classmethod
    def from_bytes(cls, data: bytes) -> "MethodKey":
        """Parse :meth:`to_bytes` output.

        Raises:
            KeyMaterialError: wrong magic, truncated or trailing bytes.
            UnknownNameError: the method named inside is unknown.
        """
        data = bytes(data)
        if len(data) < len(_WIRE_MAGIC) + 1 or data[:4] != _WIRE_MAGIC:
            raise KeyMaterialError("not a serialized MethodKey (expected it to start with b'SMK1')")
        n = data[4]
        want = 5 + n + _KEY_ID_BYTES + SECRET_BYTES
        if len(data) != want:
            raise KeyMaterialError(f"serialized MethodKey has {len(data)} bytes, expected {want}")
        try:
            method = data[5:5 + n].decode("ascii")
        except UnicodeDecodeError:
            raise KeyMaterialError("serialized MethodKey has a non-ASCII method name") from None
        fp = data[5 + n:5 + n + _KEY_ID_BYTES]
        return cls(method=method, key_id=_KEY_ID_PREFIX + fp.hex(), material=data[5 + n + _KEY_ID_BYTES:])

    def __eq__(self, other: object) -> bool:
        # Constant-time on the secret part, so equality checks on a server do not leak timing. Only
        # keys of the same type compare: a family or a member is not the plain key of its material.
        if not isinstance(other, MethodKey) or type(other) is not type(self):
            return NotImplemented
        return (self.method == other.method and self.key_id == other.key_id
                and hmac.compare_digest(self.material, other.material))

    def __hash__(self) -> int:
        return hash((self.method, self.key_id, self.material))


#: Most members one family can have: what one Verify can search at once (the server may allow fewer).
MAX_FAMILY_SIZE = 1 << 20

_FAMILY_MAGIC = b"SMF1"
_MEMBER_MAGIC = b"SMM1"


class _FamilyWire(MethodKey):
    """What :class:`KeyFamily` and :class:`FamilyMember` share: a method key's layout plus one u32
    (the field named by ``_number``), under their own magic, and equality over all of it."""

    _magic = b""
    _number = ""

    def to_bytes(self) -> bytes:
        m = self.method.encode("ascii")
        return (self._magic + bytes([len(m)]) + m + _key_id_bytes(self.key_id) + self.material
                + struct.pack(">I", getattr(self, self._number)))

    @classmethod
    def from_bytes(cls, data: bytes):
        data = bytes(data)
        if data[:4] != cls._magic:
            raise KeyMaterialError(f"not a serialized {cls.__name__} (expected it to start with {cls._magic!r})")
        if len(data) < len(cls._magic) + 1:
            raise KeyMaterialError(f"serialized {cls.__name__} is truncated ({len(data)} bytes)")
        n = data[4]
        want = 5 + n + _KEY_ID_BYTES + SECRET_BYTES + 4
        if len(data) != want:
            raise KeyMaterialError(f"serialized {cls.__name__} has {len(data)} bytes, expected {want}")
        try:
            method = data[5:5 + n].decode("ascii")
        except UnicodeDecodeError:
            raise KeyMaterialError(f"serialized {cls.__name__} has a non-ASCII method name") from None
        fp = data[5 + n:5 + n + _KEY_ID_BYTES]
        return cls(method=method, key_id=_KEY_ID_PREFIX + fp.hex(), material=data[5 + n + _KEY_ID_BYTES:-4],
                   **{cls._number: struct.unpack(">I", data[-4:])[0]})

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return MethodKey.__eq__(self, other) and getattr(self, self._number) == getattr(other, self._number)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.method, self.key_id, self.material, getattr(self, self._number)))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.method!r}, key_id={self.key_id!r}, "
                f"{self._number}={getattr(self, self._number)})")


@dataclass(frozen=True, eq=False, repr=False)
class KeyFamily(_FamilyWire):
    """``size`` ring keys (members ``0..size-1``) derived from one method's family material: the
    compact form in which a Verify searches up to 100 000 keys (see :meth:`WatermarkKey.family`).

    A server derives every member's ring values from the material with one vectorised generator
    (:func:`family_seed`), so sending a family costs about 70 bytes whatever its size, and the server keeps
    nothing. Each member has its own public id (:meth:`member_id`); Verify names the family by
    :attr:`commitment` and the member it found by its index and id.

    Holding the family material lets one embed as any member: members are identities within one
    tenant's family, not separate secrets. Give a party its own :class:`WatermarkKey` when it must
    not be able to mark as another.

    Wire format (:meth:`to_bytes`): ``b"SMF1" | len(method): u8 | method | key_id fingerprint (16) |
    material (32) | size: u32 big-endian``.

    Raises:
        KeyMaterialError: material not 32 bytes, a malformed ``key_id``.
        InvalidParameterError: ``size`` not in 1..:data:`MAX_FAMILY_SIZE`.
    """

    size: int = 1
    _magic = _FAMILY_MAGIC
    _number = "size"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("family size", self.size, 1, MAX_FAMILY_SIZE)

    @property
    def commitment(self) -> str:
        """The family's public id (``sm1_`` + 32 hex), derived from the material as a method key's is."""
        return _KEY_ID_PREFIX + _expand(self.material, _info(self, "family/key-id"), _KEY_ID_BYTES).hex()

    def member_id(self, index: int) -> str:
        """Member ``index``'s public id: what a server records for an embed with it and reports
        when Verify identifies it."""
        index = check_int("member index", index, 0, MAX_FAMILY_SIZE - 1)
        return _KEY_ID_PREFIX + _expand(self.material, _info(self, f"family/member/{index}/key-id"),
                                        _KEY_ID_BYTES).hex()

    def member(self, index: int) -> "FamilyMember":
        """The key to embed with for member ``index`` (0 .. size - 1).

        Raises:
            InvalidParameterError: ``index`` outside the family.
        """
        index = check_int("member index", index, 0, self.size - 1)
        return FamilyMember(method=self.method, key_id=self.key_id, material=self.material, index=index)



@dataclass(frozen=True, eq=False, repr=False)
class FamilyMember(_FamilyWire):
    """Member ``index`` of a :class:`KeyFamily`: embed with it (``Client.embed(family.member(i),
    ...)``); its id on the server is :meth:`KeyFamily.member_id`. It carries the family's material
    (see :class:`KeyFamily` for what that allows).

    Wire format: ``b"SMM1" | len(method): u8 | method | key_id fingerprint (16) | material (32) |
    index: u32 big-endian``.
    """

    index: int = 0
    _magic = _MEMBER_MAGIC
    _number = "index"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("member index", self.index, 0, MAX_FAMILY_SIZE - 1)

    @property
    def family(self) -> KeyFamily:
        """The smallest family that holds this member (``size = index + 1``)."""
        return KeyFamily(method=self.method, key_id=self.key_id, material=self.material, size=self.index + 1)

    @property
    def commitment(self) -> str:
        return self.family.member_id(self.index)



def parse_key(data: bytes) -> MethodKey:
    """A serialized :class:`MethodKey`, :class:`KeyFamily` or :class:`FamilyMember`, by its magic.

    Raises:
        KeyMaterialError: none of the three (the message names them), truncated or trailing bytes.
        InvalidParameterError: a family size or member index out of range.
    """
    data = bytes(data)
    if data[:4] == _FAMILY_MAGIC:
        return KeyFamily.from_bytes(data)
    if data[:4] == _MEMBER_MAGIC:
        return FamilyMember.from_bytes(data)
    if data[:4] == _WIRE_MAGIC:
        return MethodKey.from_bytes(data)
    raise KeyMaterialError("not a serialized key: expected MethodKey (b'SMK1'), KeyFamily (b'SMF1') or "
                           "FamilyMember (b'SMM1') bytes")


def family_seed(mk: MethodKey) -> int:
    """128-bit seed of a family's member ring values (``KeyFamily`` or ``FamilyMember``): member i's
    values are row i of one generator's output (see the ring methods), so a server derives 100 000
    members in one vectorised call.

    Raises:
        KeyMaterialError: ``mk`` is not a family or a member, or its method draws no ring values.
    """
    if not isinstance(mk, (KeyFamily, FamilyMember)):
        raise KeyMaterialError(f"family_seed takes a KeyFamily or FamilyMember, got {type(mk).__name__}")
    material = _material_for(mk, "ring_seed", family=True)
    return int.from_bytes(_expand(material, _info(mk, "family/ring-seed"), 16), "big")


def keys_searched(keys) -> int:
    """How many keys a Verify with ``keys`` searches: every member of a :class:`KeyFamily`, one
    for each other key. The Bonferroni correction and the server's limit count this."""
    return sum(k.size if isinstance(k, KeyFamily) else 1 for k in keys)


def check_key_id(key_id: str) -> str:
    """Return ``key_id`` if it has the public key-id format (``sm1_`` + 32 lowercase hex digits);
    else raise :class:`KeyMaterialError` naming the format."""
    _key_id_bytes(key_id)
    return key_id


def _key_id_bytes(key_id: str) -> bytes:
    ok = isinstance(key_id, str) and key_id.startswith(_KEY_ID_PREFIX)
    raw = b""
    if ok:
        hexpart = key_id[len(_KEY_ID_PREFIX):]
        ok = len(hexpart) == 2 * _KEY_ID_BYTES and hexpart == hexpart.lower()
        try:
            raw = bytes.fromhex(hexpart)
        except ValueError:
            ok = False
    if not ok:
        raise KeyMaterialError(f"malformed key_id {shown(key_id)}; expected 'sm1_' followed by 32 lowercase hex digits")
    return raw


def _material_for(mk: MethodKey, derivation: str, restricted: bool = True, family: bool = False) -> bytes:
    """Check that ``mk`` may feed ``derivation`` (with ``restricted``, only the methods whose
    registry entry lists it may) and return its material. A family or a member feeds only
    :func:`family_seed` (``family=True``): a method that took its material as one plain key would
    silently score the wrong pattern."""
    if isinstance(mk, (KeyFamily, FamilyMember)) and not family:
        raise KeyMaterialError(f"{derivation} takes a single method key, not a {type(mk).__name__}; key families are "
                               "searched by the ring methods (shallow-diffuse, tree-ring, ringid) only")
    if isinstance(mk, WatermarkKey):
        raise KeyMaterialError(f"{derivation} takes a MethodKey, not the master key; call key.for_method(method) first")
    if not isinstance(mk, MethodKey):
        raise KeyMaterialError(f"{derivation} takes a MethodKey, got {type(mk).__name__}")
    # Re-check the material even though __post_init__ did: object.__setattr__ can bypass frozen.
    if not isinstance(mk.material, bytes) or len(mk.material) != SECRET_BYTES:
        raise KeyMaterialError(f"method key material must be {SECRET_BYTES} bytes")
    if restricted and derivation not in method_spec(mk.method).derivations:
        allowed = [n for n in method_names() if derivation in method_spec(n).derivations]
        raise KeyMaterialError(
            f"key derived for method {mk.method!r} cannot be used for {derivation}, which is for "
            f"{', '.join(sorted(allowed))}; derive a key with key.for_method(...) for that method")
    return mk.material


def _info(mk: MethodKey, label: str) -> bytes:
    return _DOMAIN + mk.method.encode("ascii") + b"/" + label.encode("utf-8")


def ring_seed(mk: MethodKey) -> int:
    """64-bit seed for the Fourier ring pattern (``shallow-diffuse``, ``tree-ring``, ``ringid``).

    Raises:
        KeyMaterialError: ``mk`` was derived for another method, or is malformed.
    """
    material = _material_for(mk, "ring_seed")
    return struct.unpack(">Q", _expand(material, _info(mk, "ring-seed"), 8))[0]


def ring_variants_seed(mk: MethodKey) -> int:
    """64-bit seed of the orthonormal basis Shallow Diffuse's per-image key variants are drawn from
    (per-image key diversity: each image carries one of several patterns derived from the key, so
    that averaging many watermarked images does not converge on one pattern).

    Raises:
        KeyMaterialError: ``mk`` was derived for another method, or is malformed.
    """
    material = _material_for(mk, "ring_seed")
    return struct.unpack(">Q", _expand(material, _info(mk, "ring-seed/variants"), 8))[0]


def ring_variant_choice(mk: MethodKey, token: bytes, n_variants: int) -> int:
    """Which of ``n_variants`` ring variants an image carries: a keyed hash (HMAC-SHA256 under a
    key derived from the material) of ``token`` (what identifies the image: its seed, or a hash of
    its pixels), so the choice is reproducible for the key's holder and unpredictable without it.

    Raises:
        KeyMaterialError: ``mk`` was derived for another method, or is malformed.
        InvalidParameterError: ``n_variants`` < 1.
    """
    if int(n_variants) < 1:
        raise InvalidParameterError(f"the number of ring variants must be >= 1; got {n_variants}")
    mac_key = _expand(_material_for(mk, "ring_seed"), _info(mk, "ring-variant-choice"), 32)
    digest = hmac.new(mac_key, bytes(token), "sha256").digest()
    return int.from_bytes(digest[:8], "big") % int(n_variants)


def chacha20_key_nonce(mk: MethodKey) -> tuple[bytes, bytes]:
    """ChaCha20 ``(key, nonce)`` for Gaussian Shading, shaped for ``cryptography``'s ``ChaCha20``.

    ``key`` is 32 bytes. ``nonce`` is 16 bytes as ``cryptography`` takes it: a 4-byte little-endian
    block counter, set to 0, then a 12-byte derived nonce (RFC 7539 layout). Starting the counter at
    zero matches other ChaCha20 libraries given the same 12-byte nonce and can never wrap for a
    message of 4096 bits. Fixed per key by design: the same key must encrypt the same message
    identically so detection can decrypt it.

    Raises:
        KeyMaterialError: ``mk`` is not a ``gaussian-shading`` key, or is malformed.
    """
    material = _material_for(mk, "chacha20_key_nonce")
    out = _expand(material, _info(mk, "chacha20"), 32 + 12)
    return out[:32], b"\x00\x00\x00\x00" + out[32:]


def payload_bits(mk: MethodKey, n_bits: int) -> np.ndarray:
    """``n_bits`` pseudorandom message bits (uint8 array of 0/1) for methods that carry a payload.

    Valid for ``gaussian-shading``, ``dwtdct``, ``dwtdctsvd``, ``rivagan`` and ``ringid``. The length
    is part of the derivation label, so 32 bits are not a prefix of 256 bits: a message for one
    configuration never partly matches another.

    Raises:
        InvalidParameterError: ``n_bits`` is not an int in 1..4096.
        KeyMaterialError: ``mk`` was derived for a method without a payload, or is malformed.
    """
    n_bits = check_int("n_bits", n_bits, 1, _MAX_PAYLOAD_BITS)
    material = _material_for(mk, "payload_bits")
    raw = _expand(material, _info(mk, f"payload-bits/{n_bits}"), (n_bits + 7) // 8)
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="big")[:n_bits].copy()


def method_seed(mk: MethodKey, purpose: str) -> int:
    """64-bit seed for any other keyed randomness of a method (e.g. ``purpose="noise-channel"``).

    Different ``purpose`` strings give independent seeds. Valid for every method.

    Raises:
        InvalidParameterError: ``purpose`` is empty or not a str.
        KeyMaterialError: ``mk`` is malformed.
    """
    if not isinstance(purpose, str) or not purpose:
        raise InvalidParameterError(f"purpose must be a non-empty str, got {purpose!r}")
    material = _material_for(mk, "method_seed", restricted=False)
    return struct.unpack(">Q", _expand(material, _info(mk, "seed/" + purpose), 8))[0]
