"""Keystore: encryption, tamper detection, atomic writes, rotation, export/import.

Tests use scrypt n=2**10 (stored in the file header) so each unlock costs milliseconds.
"""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

import shallowmark.keystore as keystore_mod
from shallowmark.errors import InvalidParameterError, KeystoreError, UnknownNameError
from shallowmark.keys import WatermarkKey, ring_seed
from shallowmark.keystore import DEFAULT_SCRYPT_N, KeyInfo, Keystore

N = 2**10
PW = "correct horse battery staple"


@pytest.fixture
def store(tmp_path):
    ks = Keystore.create(tmp_path / "keys.smks", PW, scrypt_n=N)
    ks.new_key(label="first")
    return ks


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_round_trip(tmp_path, store):
    k = store.active()
    again = Keystore.open(tmp_path / "keys.smks", PW)
    assert again.active() == k
    assert again.get(k.key_id).secret == k.secret
    assert again.list() == [KeyInfo(k.key_id, "first", k.created, False, True)]


def test_bytes_passphrase_and_unicode_normalisation(tmp_path):
    ks = Keystore.create(tmp_path / "a", b"\xffbytes", scrypt_n=N)
    ks.new_key()
    Keystore.open(tmp_path / "a", b"\xffbytes")
    # "é" composed vs decomposed is the same passphrase.
    Keystore.create(tmp_path / "b", "caf\u00e9", scrypt_n=N).new_key()
    Keystore.open(tmp_path / "b", "cafe\u0301")


def test_default_cost_is_strong(tmp_path):
    assert DEFAULT_SCRYPT_N >= 2**15
    Keystore.create(tmp_path / "d", PW)  # default n: one unlock, ~0.1 s
    header = json.loads((tmp_path / "d").read_bytes())
    assert header["kdf"]["n"] == DEFAULT_SCRYPT_N and header["version"] == 1


def test_new_store_is_empty(tmp_path):
    ks = Keystore.create(tmp_path / "k", PW, scrypt_n=N)
    assert ks.list() == []
    with pytest.raises(KeystoreError, match="no active key"):
        ks.active()


def test_create_refuses_overwrite(tmp_path, store):
    before = store.path.read_bytes()
    with pytest.raises(KeystoreError, match="already exists"):
        Keystore.create(store.path, "other", scrypt_n=N)
    assert store.path.read_bytes() == before


def test_wrong_passphrase(tmp_path, store):
    before = store.path.read_bytes()
    with pytest.raises(KeystoreError, match="wrong passphrase or corrupted"):
        Keystore.open(store.path, "wrong")
    assert store.path.read_bytes() == before


@pytest.mark.parametrize("bad", ["", b""])
def test_empty_passphrase(tmp_path, bad):
    with pytest.raises(InvalidParameterError):
        Keystore.create(tmp_path / "k", bad, scrypt_n=N)
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("n", [2**9, 2**21, 3000, 0])
def test_scrypt_n_bounds(tmp_path, n):
    with pytest.raises(InvalidParameterError):
        Keystore.create(tmp_path / "k", PW, scrypt_n=n)


def test_missing_file(tmp_path):
    with pytest.raises(KeystoreError, match="no keystore"):
        Keystore.open(tmp_path / "nope", PW)


def test_every_byte_flip_is_detected(store):
    raw = store.path.read_bytes()
    for i in range(len(raw)):
        for mask in (0x01, 0x20):  # 0x20 flips letter case, which hex and JSON-whitespace might ignore
            tampered = bytearray(raw)
            tampered[i] ^= mask
            store.path.write_bytes(bytes(tampered))
            with pytest.raises(KeystoreError):
                Keystore.open(store.path, PW)
    store.path.write_bytes(raw)
    Keystore.open(store.path, PW)


def test_header_edits_are_detected(store):
    raw = store.path.read_bytes()
    doc = json.loads(raw)
    variants = []
    for edit in ("n", "salt", "nonce", "version", "reformat", "truncate"):
        d = json.loads(raw)
        if edit == "n":
            d["kdf"]["n"] = 2**11
        elif edit == "salt":
            d["kdf"]["salt"] = doc["cipher"]["nonce"] + "AAAAAAAA"
        elif edit == "nonce":
            d["cipher"]["nonce"] = doc["kdf"]["salt"][:16]
        elif edit == "version":
            d["version"] = 2
        if edit == "reformat":
            variants.append(json.dumps(d, indent=2).encode())
        elif edit == "truncate":
            variants.append(raw[: len(raw) // 2])
        else:
            variants.append(json.dumps(d, sort_keys=True, separators=(",", ":")).encode())
    for data in variants:
        store.path.write_bytes(data)
        with pytest.raises(KeystoreError):
            Keystore.open(store.path, PW)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_mode_0600(tmp_path):
    old = os.umask(0)  # even a permissive umask must not widen the file
    try:
        ks = Keystore.create(tmp_path / "k", PW, scrypt_n=N)
    finally:
        os.umask(old)
    assert stat.S_IMODE(ks.path.stat().st_mode) == 0o600
    ks.rotate()
    assert stat.S_IMODE(ks.path.stat().st_mode) == 0o600


@pytest.mark.parametrize("fail_at", ["replace", "fsync", "write"])
def test_crash_mid_write_keeps_old_file(tmp_path, store, monkeypatch, fail_at):
    before = store.path.read_bytes()
    old_active = store.active()
    calls = {"n": 0}

    def boom(*args, **kwargs):
        calls["n"] += 1
        raise OSError(28, "simulated crash")

    monkeypatch.setattr(keystore_mod.os, fail_at, boom)
    with pytest.raises(KeystoreError, match="previous file is unchanged"):
        store.rotate(label="second")
    monkeypatch.undo()
    assert calls["n"] >= 1
    assert store.path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    # Memory still matches disk, and the old file opens.
    assert store.active() == old_active and len(store.list()) == 1
    reopened = Keystore.open(store.path, PW)
    assert reopened.active() == old_active and len(reopened.list()) == 1


def test_rotate_keeps_old_verifiable(tmp_path, store):
    first = store.active()
    second = store.rotate(label="second")
    reopened = Keystore.open(store.path, PW)
    assert reopened.active() == second
    old = reopened.get(first.key_id)
    assert old.retired and old.secret == first.secret
    # Same derived material, so images from the old key still verify.
    assert ring_seed(old.for_method("tree-ring")) == ring_seed(first.for_method("tree-ring"))
    info = {i.key_id: i for i in reopened.list()}
    assert info[first.key_id].retired and not info[first.key_id].active
    assert info[second.key_id].active and not info[second.key_id].retired
    assert [k.key_id for k in reopened.verification_keys()] == [first.key_id, second.key_id]
    assert [i.label for i in reopened.list()] == ["first", "second"]


def test_new_key_becomes_active_without_retiring(store):
    first = store.active()
    second = store.new_key("b")
    assert store.active() == second
    assert not store.get(first.key_id).retired


def test_list_has_no_secrets(store):
    store.rotate()
    text = repr(store.list()) + repr(store)
    for k in store.verification_keys():
        assert k.secret.hex() not in text
    assert all(not hasattr(i, "secret") for i in store.list())


def test_get_unknown(store):
    with pytest.raises(UnknownNameError) as exc:
        store.get("sm1_" + "0" * 32)
    assert store.active().key_id in str(exc.value)


def test_file_has_no_plaintext_secret(store):
    raw = store.path.read_bytes()
    assert store.active().to_hex().encode() not in raw
    assert b"first" not in raw  # labels are encrypted too


def test_export_import_round_trip(tmp_path, store):
    key = store.active()
    armored = store.export_key(key.key_id, "export-pw", scrypt_n=N)
    assert armored.startswith("-----BEGIN SHALLOWMARK KEY-----\n")
    assert armored.rstrip().endswith("-----END SHALLOWMARK KEY-----")
    assert key.to_hex() not in armored and all(len(line) <= 64 for line in armored.splitlines())

    other = Keystore.create(tmp_path / "other", "pw2", scrypt_n=N)
    with pytest.raises(KeystoreError, match="wrong passphrase or corrupted"):
        other.import_key(armored, "wrong-export-pw")
    assert other.list() == []

    got = other.import_key(armored, "export-pw")
    assert got == key and got.label == "first"
    with pytest.raises(KeystoreError):
        other.active()  # imported without activate
    assert other.import_key(armored, "export-pw") == key  # idempotent
    assert len(other.list()) == 1

    reopened = Keystore.open(tmp_path / "other", "pw2")
    assert reopened.get(key.key_id).secret == key.secret


def test_import_activate_retires_previous(tmp_path, store):
    exported = store.export_key(store.active().key_id, "e", scrypt_n=N)
    other = Keystore.create(tmp_path / "other", PW, scrypt_n=N)
    mine = other.new_key("mine")
    got = other.import_key(exported, "e", activate=True)
    assert other.active() == got and not got.retired
    assert other.get(mine.key_id).retired


def test_export_tamper_and_garbage(store):
    armored = store.export_key(store.active().key_id, "e", scrypt_n=N)
    lines = armored.splitlines()
    body = list(lines[1])
    body[10] = "A" if body[10] != "A" else "B"
    tampered = "\n".join([lines[0], "".join(body), *lines[2:]])
    for bad in (tampered, "hello", armored.replace("BEGIN", "START"), ""):
        with pytest.raises(KeystoreError):
            store.import_key(bad, "e")
    with pytest.raises(InvalidParameterError):
        store.export_key(store.active().key_id, "", scrypt_n=N)


def test_keystore_file_is_not_an_export(store):
    # A keystore container must not be accepted as an exported key (format field is authenticated).
    import base64
    fake = "-----BEGIN SHALLOWMARK KEY-----\n" + base64.b64encode(store.path.read_bytes()).decode() + \
        "\n-----END SHALLOWMARK KEY-----\n"
    with pytest.raises(KeystoreError):
        store.import_key(fake, PW)


def test_generated_key_roundtrips_through_store(tmp_path):
    ks = Keystore.create(tmp_path / "k", PW, scrypt_n=N)
    k = ks.rotate("only")  # rotate with no active key acts as new_key
    assert isinstance(k, WatermarkKey) and not k.retired
    assert Keystore.open(tmp_path / "k", PW).active() == k
