"""A passphrase-encrypted file holding a platform's watermark keys.

Typical use::

    ks = Keystore.create("keys.smks", passphrase)      # once; refuses to overwrite
    ks.new_key(label="prod")                           # first key, becomes active
    ...
    ks = Keystore.open("keys.smks", passphrase)
    key = ks.active()                                  # embed with this one
    ks.rotate(label="prod-2026")                       # new active key; old one retired, still verifiable

Every mutating call (``new_key``, ``rotate``, ``import_key``) saves the file before it returns, so
there is no ``save()`` to forget. If the save fails the call raises :class:`KeystoreError`, the file
on disk is the previous version, and the in-memory object is unchanged too.

File format (version 1), a single line of canonical JSON (sorted keys, no spaces)::

    {"cipher": {"name": "aes-256-gcm", "nonce": <b64, 12 bytes>},
     "ciphertext": <b64>,
     "format": "shallowmark-keystore",
     "kdf": {"n": 32768, "name": "scrypt", "p": 1, "r": 8, "salt": <b64, 16 bytes>},
     "version": 1}

The AES key is ``scrypt(passphrase, salt, n, r, p)``. The plaintext is JSON
``{"active": key_id | null, "keys": [{"secret": hex, "created", "label", "retired"}]}``. Everything
except ``ciphertext`` is the *header*; its canonical JSON is the GCM associated data, so changing a
KDF parameter, the salt, the nonce, the format name or the version is detected exactly like a
change to the ciphertext. The file must also be byte-for-byte the canonical serialization, so no
edit anywhere goes unnoticed.

Writes are atomic: a temporary file beside the target (created with ``O_EXCL`` and mode 0600),
fsync, then ``os.replace``. A crash at any point leaves either the old file or the new one.

There is no locking: two processes changing the same keystore at once lose one of the changes
(last writer wins). Keep one writer, e.g. an admin script, and have services only ``open`` it.

Exported keys (:meth:`Keystore.export_key`) use the same container inside an ASCII armor::

    -----BEGIN SHALLOWMARK KEY-----
    <base64 of the container JSON, format "shallowmark-key-export", wrapped at 64 columns>
    -----END SHALLOWMARK KEY-----

encrypted under a separate *export* passphrase, so the armored text can travel by e-mail or a
ticket and be imported into another keystore with :meth:`Keystore.import_key`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import textwrap
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from shallowmark.errors import InvalidParameterError, KeyMaterialError, KeystoreError, UnknownNameError
from shallowmark.keys import WatermarkKey

__all__ = ["Keystore", "KeyInfo", "DEFAULT_SCRYPT_N"]

#: Default scrypt cost: 2**15 with r=8 is 32 MiB and ~0.1 s per unlock on a laptop core.
DEFAULT_SCRYPT_N = 2**15
_SCRYPT_R = 8
_SCRYPT_P = 1
# Bounds applied to parameters read from a file too, so a crafted header cannot ask for gigabytes
# of memory or a trivially weak KDF.
_MIN_SCRYPT_N = 2**10
_MAX_SCRYPT_N = 2**20
_SALT_BYTES = 16
_NONCE_BYTES = 12

_VERSION = 1
_STORE_FORMAT = "shallowmark-keystore"
_EXPORT_FORMAT = "shallowmark-key-export"
_ARMOR_BEGIN = "-----BEGIN SHALLOWMARK KEY-----"
_ARMOR_END = "-----END SHALLOWMARK KEY-----"


@dataclass(frozen=True)
class KeyInfo:
    """What :meth:`Keystore.list` shows about a key: public metadata only, never the secret."""

    key_id: str
    label: str
    created: str
    retired: bool
    active: bool


# ---------------------------------------------------------------------------------------------
# The encrypted container, shared by the keystore file and the export armor.


def _passphrase_bytes(passphrase: str | bytes, what: str = "passphrase") -> bytes:
    if isinstance(passphrase, str):
        # NFC so the same passphrase typed on two systems (composed vs decomposed accents) matches.
        passphrase = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    elif isinstance(passphrase, (bytes, bytearray, memoryview)):
        passphrase = bytes(passphrase)
    else:
        raise InvalidParameterError(f"{what} must be str or bytes, got {type(passphrase).__name__}")
    if not passphrase:
        raise InvalidParameterError(f"{what} must not be empty")
    return passphrase


def _check_scrypt_n(n: Any, source: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < _MIN_SCRYPT_N or n > _MAX_SCRYPT_N or n & (n - 1):
        msg = f"scrypt n must be a power of two in [2**10, 2**20], got {n!r}"
        if source == "file":
            raise KeystoreError(f"keystore header is invalid: {msg}")
        raise InvalidParameterError(msg)
    return n


def _derive_key(passphrase: bytes, kdf: dict[str, Any]) -> bytes:
    salt = base64.b64decode(kdf["salt"])
    return Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(passphrase)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str, length: int | None = None) -> bytes:
    # Require the canonical encoding: base64 ignores some bit flips in its last character, and an
    # ignored flip would be an undetected change to the file.
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise KeystoreError(f"{what} is not valid base64") from None
    if _b64(raw) != text or (length is not None and len(raw) != length):
        raise KeystoreError(f"{what} is malformed")
    return raw


def _new_kdf(scrypt_n: int) -> dict[str, Any]:
    return {"name": "scrypt", "n": scrypt_n, "r": _SCRYPT_R, "p": _SCRYPT_P,
            "salt": _b64(secrets.token_bytes(_SALT_BYTES))}


def _seal(fmt: str, kdf: dict[str, Any], aes_key: bytes, plaintext: bytes) -> bytes:
    """Encrypt ``plaintext`` into the canonical container bytes (fresh random nonce each time)."""
    header = {"format": fmt, "version": _VERSION, "kdf": kdf,
              "cipher": {"name": "aes-256-gcm", "nonce": _b64(secrets.token_bytes(_NONCE_BYTES))}}
    nonce = base64.b64decode(header["cipher"]["nonce"])
    ct = AESGCM(aes_key).encrypt(nonce, plaintext, _canonical(header))
    return _canonical({**header, "ciphertext": _b64(ct)})


def _parse_header(raw: bytes, fmt: str, what: str) -> tuple[dict[str, Any], bytes]:
    """Validate the container's structure; return ``(header, ciphertext)``. No crypto yet."""
    bad = f"{what} is corrupted or not a shallowmark file"
    try:
        doc = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise KeystoreError(f"{bad} (not valid JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise KeystoreError(f"{bad} (expected format {fmt!r})")
    if doc.get("version") != _VERSION:
        raise KeystoreError(f"{what} has version {doc.get('version')!r}; this shallowmark reads version {_VERSION}")
    if set(doc) != {"format", "version", "kdf", "cipher", "ciphertext"}:
        raise KeystoreError(f"{bad} (unexpected fields)")
    if _canonical(doc) != raw:
        raise KeystoreError(f"{bad} (the file was edited)")
    kdf, cipher = doc["kdf"], doc["cipher"]
    if (not isinstance(kdf, dict) or set(kdf) != {"name", "n", "r", "p", "salt"} or kdf["name"] != "scrypt"
            or kdf["r"] != _SCRYPT_R or kdf["p"] != _SCRYPT_P or type(kdf["r"]) is not int
            or type(kdf["p"]) is not int):
        raise KeystoreError(f"{bad} (unsupported key derivation parameters)")
    _check_scrypt_n(kdf["n"], "file")
    _unb64(kdf["salt"], f"{what} salt", _SALT_BYTES)
    if not isinstance(cipher, dict) or set(cipher) != {"name", "nonce"} or cipher["name"] != "aes-256-gcm":
        raise KeystoreError(f"{bad} (unsupported cipher)")
    _unb64(cipher["nonce"], f"{what} nonce", _NONCE_BYTES)
    ciphertext = _unb64(doc["ciphertext"], f"{what} ciphertext")
    header = {k: v for k, v in doc.items() if k != "ciphertext"}
    return header, ciphertext


def _open_container(raw: bytes, fmt: str, passphrase: bytes, what: str) -> tuple[dict[str, Any], bytes, bytes]:
    """Decrypt a container. Returns ``(kdf, aes_key, plaintext)``."""
    header, ciphertext = _parse_header(raw, fmt, what)
    aes_key = _derive_key(passphrase, header["kdf"])
    nonce = base64.b64decode(header["cipher"]["nonce"])
    try:
        plaintext = AESGCM(aes_key).decrypt(nonce, ciphertext, _canonical(header))
    except InvalidTag:
        # GCM cannot tell a wrong passphrase from a modified file; say both.
        raise KeystoreError(f"wrong passphrase or corrupted {what} (authentication failed)") from None
    return header["kdf"], aes_key, plaintext


def _key_to_json(key: WatermarkKey) -> dict[str, Any]:
    return {"secret": key.to_hex(), "created": key.created, "label": key.label, "retired": key.retired}


def _key_from_json(obj: Any, what: str) -> WatermarkKey:
    if not isinstance(obj, dict) or set(obj) != {"secret", "created", "label", "retired"}:
        raise KeystoreError(f"{what} holds a malformed key entry")
    try:
        return WatermarkKey.from_hex(obj["secret"], created=obj["created"], label=obj["label"],
                                     retired=obj["retired"])
    except KeyMaterialError as exc:
        raise KeystoreError(f"{what} holds a malformed key entry: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Atomic write.


def _atomic_write(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    With ``overwrite=False`` the final step is ``os.link``, which fails if ``path`` exists, so two
    ``create`` calls racing cannot clobber each other.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = -1
    try:
        # O_EXCL: never follow or reuse something an attacker planted at the temp name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # the umask may only remove bits; make it exactly 0600
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:
                # Some filesystems (FAT, some network mounts) have no hard links: fall back to a
                # check-then-replace, which is atomic for the file but not against a racing create.
                if path.exists():
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable. Not possible on Windows; harmless to skip there.
    if os.name != "posix":
        return
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------------------------


class Keystore:
    """Watermark keys in a passphrase-encrypted file. Build with :meth:`create` or :meth:`open`.

    At most one key is *active*: the one to embed with. Retired keys stay in the store so images
    watermarked with them still verify. Every mutation saves the file before returning.

    Errors:
        KeystoreError: wrong passphrase, tampered or unreadable file, write failure, no active key.
        InvalidParameterError: empty passphrase, or scrypt parameters out of range.
        UnknownNameError: a ``key_id`` that is not in the store (a ``KeyError``).
    """

    def __init__(self, path: Path, kdf: dict[str, Any], aes_key: bytes,
                 keys: list[WatermarkKey], active_id: str | None) -> None:
        # Private: use create() or open(). We keep the scrypt output, not the passphrase, so saves
        # are cheap and the passphrase itself is not held in memory.
        self._path = path
        self._kdf = kdf
        self._aes_key = aes_key
        self._keys = list(keys)
        self._active_id = active_id

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], passphrase: str | bytes, *,
               scrypt_n: int = DEFAULT_SCRYPT_N) -> "Keystore":
        """Create a new, empty keystore file (mode 0600). Call :meth:`new_key` next.

        ``scrypt_n`` is the scrypt cost (power of two, 2**10..2**20); the default suits production.
        It is stored in the file, so :meth:`open` needs only the passphrase.

        Raises:
            KeystoreError: ``path`` already exists (nothing is overwritten), or it cannot be written.
            InvalidParameterError: empty passphrase or bad ``scrypt_n``.
        """
        path = Path(path)
        secret = _passphrase_bytes(passphrase)
        _check_scrypt_n(scrypt_n, "argument")
        if path.exists():
            raise KeystoreError(f"{path} already exists; open it with Keystore.open or choose another path")
        kdf = _new_kdf(scrypt_n)
        store = cls(path, kdf, _derive_key(secret, kdf), [], None)
        store._write(store._keys, store._active_id, overwrite=False)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], passphrase: str | bytes) -> "Keystore":
        """Open and decrypt an existing keystore. Reads only; never writes.

        Raises:
            KeystoreError: no such file, wrong passphrase, or the file was modified or is corrupted.
            InvalidParameterError: empty passphrase.
        """
        path = Path(path)
        secret = _passphrase_bytes(passphrase)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise KeystoreError(f"no keystore at {path}; create one with Keystore.create") from None
        except OSError as exc:
            raise KeystoreError(f"cannot read keystore {path}: {exc}") from None
        what = f"keystore {path}"
        kdf, aes_key, plaintext = _open_container(raw, _STORE_FORMAT, secret, what)
        try:
            body = json.loads(plaintext)
        except ValueError:
            raise KeystoreError(f"{what} has an unreadable payload") from None
        if not isinstance(body, dict) or set(body) != {"active", "keys"} or not isinstance(body["keys"], list):
            raise KeystoreError(f"{what} has an unreadable payload")
        keys = [_key_from_json(k, what) for k in body["keys"]]
        ids = [k.key_id for k in keys]
        active = body["active"]
        if len(set(ids)) != len(ids) or (active is not None and active not in ids):
            raise KeystoreError(f"{what} has an inconsistent key list")
        return cls(path, kdf, aes_key, keys, active)

    # -- reading -------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The keystore file."""
        return self._path

    def list(self) -> list[KeyInfo]:
        """All keys, oldest first, as public metadata (no secrets)."""
        return [KeyInfo(k.key_id, k.label, k.created, k.retired, k.key_id == self._active_id)
                for k in self._keys]

    def get(self, key_id: str) -> WatermarkKey:
        """The key with this ``key_id`` (active or retired).

        Raises:
            UnknownNameError: no such key in this store; the message lists the ids it has.
        """
        for k in self._keys:
            if k.key_id == key_id:
                return k
        raise UnknownNameError("key_id", key_id, [k.key_id for k in self._keys])

    def active(self) -> WatermarkKey:
        """The key to embed with.

        Raises:
            KeystoreError: the store has no active key yet (call :meth:`new_key`).
        """
        if self._active_id is None:
            raise KeystoreError(f"keystore {self._path} has no active key; call new_key() first")
        return self.get(self._active_id)

    def verification_keys(self) -> list[WatermarkKey]:
        """Every key, active and retired, for detection: an image from any of them should verify."""
        return list(self._keys)

    # -- mutations (each saves before returning) ----------------------------------------------

    def new_key(self, label: str = "") -> WatermarkKey:
        """Generate a key and make it the active one; the previously active key, if any, stays
        usable and is not retired (use :meth:`rotate` to retire it)."""
        key = WatermarkKey.generate(label=label)
        self._commit(self._keys + [key], key.key_id)
        return key

    def rotate(self, label: str = "") -> WatermarkKey:
        """Generate a new active key and retire the previous active one.

        The retired key stays in the store (see :meth:`verification_keys`), so everything it
        watermarked still verifies; it just should not embed any more. With no active key this is
        the same as :meth:`new_key`.
        """
        key = WatermarkKey.generate(label=label)
        keys = [replace(k, retired=True) if k.key_id == self._active_id else k for k in self._keys]
        self._commit(keys + [key], key.key_id)
        return key

    def export_key(self, key_id: str, export_passphrase: str | bytes, *,
                   scrypt_n: int = DEFAULT_SCRYPT_N) -> str:
        """An ASCII-armored copy of one key, encrypted under ``export_passphrase``.

        Use a different passphrase from the keystore's and send it by another channel. The armor
        carries the key's label, creation time and retired flag. Does not modify the store.

        Raises:
            UnknownNameError: no such key.
            InvalidParameterError: empty passphrase or bad ``scrypt_n``.
        """
        key = self.get(key_id)
        secret = _passphrase_bytes(export_passphrase, "export passphrase")
        _check_scrypt_n(scrypt_n, "argument")
        kdf = _new_kdf(scrypt_n)
        blob = _seal(_EXPORT_FORMAT, kdf, _derive_key(secret, kdf), _canonical(_key_to_json(key)))
        body = "\n".join(textwrap.wrap(_b64(blob), 64))
        return f"{_ARMOR_BEGIN}\n{body}\n{_ARMOR_END}\n"

    def import_key(self, armored: str, export_passphrase: str | bytes, *, activate: bool = False) -> WatermarkKey:
        """Add a key from :meth:`export_key` output and save.

        The key keeps its label, creation time and retired flag. With ``activate=True`` it becomes
        the active key (un-retired) and the previously active key is retired, as in :meth:`rotate`.
        Importing a key that is already in the store changes nothing (unless ``activate``) and
        returns the stored key.

        Raises:
            KeystoreError: not an exported key, wrong export passphrase, or tampered text.
            InvalidParameterError: empty passphrase.
        """
        secret = _passphrase_bytes(export_passphrase, "export passphrase")
        what = "exported key"
        if not isinstance(armored, str):
            raise KeystoreError(f"{what} must be the armored text (str)")
        lines = [ln.strip() for ln in armored.strip().splitlines() if ln.strip()]
        if len(lines) < 3 or lines[0] != _ARMOR_BEGIN or lines[-1] != _ARMOR_END:
            raise KeystoreError(f"not an exported shallowmark key (expected {_ARMOR_BEGIN} ... {_ARMOR_END})")
        raw = _unb64("".join(lines[1:-1]), what)
        _, _, plaintext = _open_container(raw, _EXPORT_FORMAT, secret, what)
        try:
            key = _key_from_json(json.loads(plaintext), what)
        except ValueError:
            raise KeystoreError(f"{what} has an unreadable payload") from None

        existing = next((k for k in self._keys if k.key_id == key.key_id), None)
        if existing is not None and not activate:
            return existing
        keys = list(self._keys) if existing is not None else self._keys + [key]
        active_id = self._active_id
        if activate:
            keys = [replace(k, retired=True) if k.key_id == self._active_id and k.key_id != key.key_id
                    else replace(k, retired=False) if k.key_id == key.key_id else k for k in keys]
            active_id = key.key_id
        self._commit(keys, active_id)
        return next(k for k in self._keys if k.key_id == key.key_id)

    # -- internals ------------------------------------------------------------------------------

    def _commit(self, keys: list[WatermarkKey], active_id: str | None) -> None:
        # Write first, then update memory: if the write fails, memory still matches the disk.
        self._write(keys, active_id, overwrite=True)
        self._keys, self._active_id = list(keys), active_id

    def _write(self, keys: list[WatermarkKey], active_id: str | None, *, overwrite: bool) -> None:
        plaintext = _canonical({"active": active_id, "keys": [_key_to_json(k) for k in keys]})
        data = _seal(_STORE_FORMAT, self._kdf, self._aes_key, plaintext)
        try:
            _atomic_write(self._path, data, overwrite=overwrite)
        except FileExistsError:
            raise KeystoreError(f"{self._path} already exists; nothing was overwritten") from None
        except OSError as exc:
            raise KeystoreError(f"could not write keystore {self._path}: {exc}; the previous file is unchanged") from exc

    def __repr__(self) -> str:
        return f"Keystore(path={str(self._path)!r}, keys={len(self._keys)}, active={self._active_id!r})"
