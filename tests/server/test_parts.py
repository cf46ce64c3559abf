"""Server parts without a running server: image validation, config, attestation key file, auth (the
ledger has its own file, test_ledger.py)."""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib

import numpy as np
import pytest

from shallowmark.errors import InvalidImageError, InvalidParameterError, KeyMaterialError
from shallowmark.server import validation


def _encode(arr, fmt="PNG", mode=None):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_raw(w, h, depth, color, rows: bytes):
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


RGB = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


# -- validation ------------------------------------------------------------------------------------


def test_rgb_png_decodes_unchanged():
    img = validation.decode_image(_encode(RGB), 10**6)
    assert img.format == "PNG" and img.notes == [] and np.array_equal(img.pixels, RGB)


@pytest.mark.parametrize("mode,note", [("L", "grayscale"), ("RGBA", "alpha dropped"), ("P", "palette"),
                                       ("LA", "alpha dropped")])
def test_other_modes_become_rgb_with_a_note(mode, note):
    from PIL import Image

    data = io.BytesIO()
    Image.fromarray(RGB).convert(mode).save(data, format="PNG")
    img = validation.decode_image(data.getvalue(), 10**6)
    assert img.pixels.shape == (32, 32, 3) and img.pixels.dtype == np.uint8
    assert any(note in n for n in img.notes), img.notes


def test_16_bit_grayscale_is_scaled_to_8_bit():
    gray16 = np.full((8, 8), 0xABCD, dtype=">u2")
    rows = b"".join(b"\x00" + r.tobytes() for r in gray16)
    img = validation.decode_image(_png_raw(8, 8, 16, 0, rows), 10**6)
    assert (img.pixels == 0xAB).all() and any("16-bit" in n for n in img.notes)


def test_16_bit_rgb_is_reduced_with_a_note():
    rgb16 = np.full((4, 4 * 3), 40000, dtype=">u2")
    rows = b"".join(b"\x00" + r.tobytes() for r in rgb16)
    img = validation.decode_image(_png_raw(4, 4, 16, 2, rows), 10**6)
    assert (img.pixels == 40000 >> 8).all() and any("16-bit" in n for n in img.notes)


def test_jpeg_is_accepted():
    assert validation.decode_image(_encode(RGB, "JPEG"), 10**6).format == "JPEG"


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"GIF89a" + b"\0" * 100, "not a PNG or JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 10, "not a PNG or JPEG"),
])
def test_undecodable(data, needle):
    with pytest.raises(InvalidImageError, match=needle):
        validation.decode_image(data, 10**6)


def test_gif_is_refused_even_if_pillow_could_read_it():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(RGB).save(buf, format="GIF")
    with pytest.raises(InvalidImageError, match="PNG or JPEG"):
        validation.decode_image(buf.getvalue(), 10**6)


def test_truncated_png():
    data = _encode(RGB)
    with pytest.raises(InvalidImageError, match="truncated"):
        validation.decode_image(data[: len(data) - 40], 10**6)


def test_pixel_limit_checked_from_the_header():
    with pytest.raises(InvalidImageError, match="33x32 = 1056 pixels"):
        validation.decode_image(_encode(np.zeros((32, 33, 3), np.uint8)), 1000)
    bomb = _png_raw(20000, 20000, 8, 2, b"\0" * 10)  # 400 MP declared, a few bytes of data
    with pytest.raises(InvalidImageError, match="too large|pixels"):
        validation.decode_image(bomb, 4096 * 4096)


def test_shape_check_names_the_limit_and_the_size():
    from types import SimpleNamespace

    img = validation.decode_image(_encode(RGB), 10**6)
    latent = SimpleNamespace(name="shallow-diffuse", min_image_size=1)
    with pytest.raises(InvalidImageError, match="shallow-diffuse: image is 32x32: its short side must be at least 64"):
        validation.check_image_shape(img, latent)
    wide = validation.decode_image(_encode(np.zeros((64, 257, 3), np.uint8)), 10**6)
    with pytest.raises(InvalidImageError, match="4.02:1; at most 4:1"):
        validation.check_image_shape(wide, latent)
    ok = validation.decode_image(_encode(np.zeros((64, 256, 3), np.uint8)), 10**6)
    assert validation.check_image_shape(ok, latent) is ok          # exactly 4:1 is accepted
    posthoc = SimpleNamespace(name="dwtdct", min_image_size=256)   # a post-hoc method's own minimum
    with pytest.raises(InvalidImageError, match="dwtdct: image is 256x64: its short side must be at least 256"):
        validation.check_image_shape(ok, posthoc)


def test_key_and_parameter_checks():
    from shallowmark.keys import WatermarkKey

    from dataclasses import replace

    mk = WatermarkKey.generate().for_method("tree-ring")
    # the server names a key by the commitment to its material, whatever id the request carried
    assert validation.parse_method_keys([mk.to_bytes()], 4) == [replace(mk, key_id=mk.commitment)]
    assert validation.parse_method_keys([replace(mk, key_id="sm1_" + "0" * 32).to_bytes()], 4)[0].key_id == mk.commitment
    with pytest.raises(InvalidParameterError, match="repeats"):
        validation.parse_method_keys([mk.to_bytes()] * 2, 4)
    with pytest.raises(InvalidParameterError, match="limit of 1"):
        validation.parse_method_keys([mk.to_bytes()] * 2, 1)
    with pytest.raises(KeyMaterialError, match="method_keys\\[0\\]"):
        validation.parse_method_keys([b"SMK1"], 4)
    assert validation.check_target_fpr(0) == 0.01
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(InvalidParameterError):
            validation.check_target_fpr(bad)
    with pytest.raises(InvalidParameterError):
        validation.check_request_id("has space")


# -- config ----------------------------------------------------------------------------------------


def test_config_from_toml_with_relative_paths(tmp_path):
    from shallowmark.server.config import load_config, token_digest

    (tmp_path / "server.toml").write_text(f'''
host = "0.0.0.0"
port = 6000
models = ["tiny-ldm"]
ledger_url = "ledger.sqlite3"
attestation_key = "keys/att.pem"
[tls]
cert = "tls/srv.crt"
key = "tls/srv.key"
[tokens]
"plain-token" = "acme"
"{token_digest('hashed-token')}" = "globex"
[methods.shallow-diffuse]
num_steps = 20
''')
    cfg = load_config(tmp_path / "server.toml", port=7000)
    assert cfg.port == 7000 and cfg.host == "0.0.0.0"
    assert cfg.tls.cert == tmp_path / "tls/srv.crt" and cfg.tls.client_ca is None
    assert cfg.resolved_ledger_url() == f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    assert cfg.resolved_attestation_key() == tmp_path / "keys/att.pem"
    assert cfg.method_options == {"shallow-diffuse": {"num_steps": 20}}
    assert set(cfg.token_digests().values()) == {"acme", "globex"}


def test_config_errors(tmp_path):
    from shallowmark.server.config import ServerConfig, load_config

    (tmp_path / "bad.toml").write_text("prot = 1\n")
    with pytest.raises(InvalidParameterError, match="unknown key.*prot"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "worse.toml").write_text("port = \n")
    with pytest.raises(InvalidParameterError, match="not valid TOML"):
        load_config(tmp_path / "worse.toml")
    with pytest.raises(InvalidParameterError, match="max_batch"):
        ServerConfig(max_batch=0)
    with pytest.raises(InvalidParameterError, match="port"):
        ServerConfig(port=70000)
    # a method option the server could not apply is refused with the config, not when the model
    # loads in the background (which would leave the server never ready)
    (tmp_path / "opt.toml").write_text("[methods.shallow-diffuse]\nkey_variant = 16\n")
    with pytest.raises(InvalidParameterError, match=r"method_options.shallow-diffuse: unknown option\(s\) "
                                                    r"\['key_variant'\]; valid: .*key_variants"):
        load_config(tmp_path / "opt.toml")
    with pytest.raises(InvalidParameterError, match="'rivagan' takes no options here"):
        ServerConfig(method_options={"rivagan": {"num_bits": 32}})
    with pytest.raises(InvalidParameterError, match="must be a table of options"):
        ServerConfig(method_options={"shallow-diffuse": 16})


# -- attestation key and auth ----------------------------------------------------------------------


def test_attestation_key_is_created_0600_and_reused(tmp_path):
    from shallowmark.server.attestation import Signer

    path = tmp_path / "state" / "att.pem"
    a = Signer.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Signer.load_or_create(path).public_key_raw == a.public_key_raw
    path.write_text("not a key")
    from shallowmark.errors import KeystoreError

    with pytest.raises(KeystoreError, match="cannot load"):
        Signer.load_or_create(path)


def test_token_lookup():
    from shallowmark.server.auth import BearerAuthInterceptor
    from shallowmark.server.config import ServerConfig, token_digest

    cfg = ServerConfig(tokens={"t1": "a", token_digest("t2"): "b"})
    auth = BearerAuthInterceptor(cfg.token_digests())
    assert auth.tenant_for("t1") == "a" and auth.tenant_for("t2") == "b"
    assert auth.tenant_for("t3") is None and auth.tenant_for(token_digest("t2")) is None


def test_job_queue_bound_and_deadline_check():
    import threading

    from shallowmark.server.config import ServerConfig
    from shallowmark.server.servicer import DeadlineTooShort, LoadedModel, ModelPool, QueueFull

    pool = ModelPool(ServerConfig(max_queue=1))
    lm = LoadedModel(name="m", backend=None, methods={}, available=(), sec_per_eval=0.1)
    inside, release = threading.Event(), threading.Event()

    def hold():
        with pool.job(lm, 1, "test", lambda: None):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(10)
    with pytest.raises(QueueFull, match="busy"):
        with pool.job(lm, 1, "test", lambda: None):
            pass
    release.set()
    t.join()
    lm.sec_per_eval = 0.1  # the held job taught the pool a slow rate; reset it
    with pytest.raises(DeadlineTooShort, match="needs about 5.00 s"):
        with pool.job(lm, 50, "verify", lambda: 1.0):
            pass
    with pool.job(lm, 5, "verify", lambda: 1.0):  # 0.5 s needed, 1 s left: runs
        pass
