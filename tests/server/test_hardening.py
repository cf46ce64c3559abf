"""Hostile or careless input against a real server (see conftest): raw protobuf garbage, forged page
tokens, huge strings, images that cannot be decoded as they look, file modes of the server's state,
and which addresses a plaintext server may listen on. Each case states the status code (or the
refusal), and that the server still answers afterwards with its ledger unchanged."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import stat
import struct
import zlib

import grpc
import numpy as np
import pytest

from shallowmark._proto.shallowmark.v1 import watermark_pb2 as pb
from shallowmark._proto.shallowmark.v1 import watermark_pb2_grpc as pb_grpc
from shallowmark.errors import InvalidParameterError

TOKEN_A = "token-for-tenant-a"  # as in conftest.py
MD = [("authorization", f"Bearer {TOKEN_A}")]


def _assert_healthy(address: str, *, serving: bool = True) -> None:
    """Health answers (SERVING once the models loaded) and an authenticated call still works."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        want = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        assert status == want
        assert pb_grpc.WatermarkStub(channel).GetInfo(pb.GetInfoRequest(), metadata=MD, timeout=10).tenant == "a"


def _call(server, rpc: str, request, metadata=MD) -> grpc.RpcError:
    """``rpc`` with ``request`` (a message, or raw bytes sent as they are); the error it must end with."""
    with grpc.insecure_channel(server.address) as channel:
        if isinstance(request, bytes):  # no serializers: the bytes go on the wire unchanged
            call = channel.unary_unary(f"/shallowmark.v1.Watermark/{rpc}")
        else:
            call = getattr(pb_grpc.WatermarkStub(channel), rpc)
        with pytest.raises(grpc.RpcError) as e:
            call(request, metadata=metadata, timeout=60)
    return e.value


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


# -- 1. raw protobuf garbage -------------------------------------------------------------------------

# a string field (see protos/shallowmark/v1/watermark.proto) given 3 bytes that are not UTF-8
_NOT_UTF8 = {"Embed": "1a03fffefd",        # EmbedRequest.method = 3
             "Verify": "2203fffefd",       # VerifyRequest.model = 4
             "ListEmbeds": "2203fffefd"}   # ListEmbedsRequest.page_token = 4
_CORRUPT = "0a05ff"                        # field 1, length 5, but one byte follows


@pytest.mark.parametrize("rpc,data", [*_NOT_UTF8.items(), *[(r, _CORRUPT) for r in
                                                            ("Embed", "Verify", "GetInfo", "ListEmbeds")]])
def test_undecodable_request_is_invalid_argument_without_traceback(server, caplog, rpc, data):
    before = server.ledger.count()
    with caplog.at_level(logging.INFO):
        err = _call(server, rpc, bytes.fromhex(data))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert f"not a valid shallowmark.v1.{rpc}Request" in err.details() and "UTF-8" in err.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an ERROR was logged"
    assert any(f"rpc={rpc} " in r.getMessage() and "status=INVALID_ARGUMENT" in r.getMessage()
               for r in caplog.records)  # the usual one log line per call
    assert server.ledger.count() == before
    _assert_healthy(server.address)


def test_undecodable_request_without_token_is_unauthenticated(server):
    err = _call(server, "Embed", bytes.fromhex(_NOT_UTF8["Embed"]), metadata=[])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED   # authentication comes before parsing


# -- 2. page tokens the server never issued ----------------------------------------------------------


def _cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize("raw", [
    "v1:9223372036854775808",   # one past SQLite's signed 64-bit range (was OverflowError -> INTERNAL)
    "v1:" + "9" * 40,
    "v1:-1", "v1:0", "v1:abc", "v1:1.5", "v1: 7", "v1:1_0", "v1:+7", "v1:\uff17",  # the last: a full-width 7
    "v1:", "v2:5", "garbage",
])
def test_forged_page_token_is_invalid_argument(server, raw):
    before = server.ledger.count()
    err = _call(server, "ListEmbeds", pb.ListEmbedsRequest(page_token=_cursor(raw)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "page_token is not one this server issued" in err.details()
    assert server.ledger.count() == before
    _assert_healthy(server.address)


def test_largest_page_token_is_accepted(server, embedded):
    with grpc.insecure_channel(server.address) as channel:
        res = pb_grpc.WatermarkStub(channel).ListEmbeds(
            pb.ListEmbedsRequest(page_token=_cursor("v1:9223372036854775807")), metadata=MD, timeout=30)
    assert embedded.image_sha256 in {e.image_sha256 for e in res.entries}   # every id is below it


# -- 3. huge strings are not echoed whole ------------------------------------------------------------

LONG = 10_000


def _long_cases(keys, embedded):
    mk = keys[0].for_method("shallow-diffuse").to_bytes()
    gen = pb.GenerateSource(seed=1)
    return {  # case -> (rpc, request, metadata, status, what the message still says)
        "model": ("Embed", pb.EmbedRequest(method_key=mk, model="m" * LONG, generate=gen), MD,
                  grpc.StatusCode.INVALID_ARGUMENT, "unknown model 'mmm"),
        "method": ("Embed", pb.EmbedRequest(method_key=mk, method="x" * LONG, generate=gen), MD,
                   grpc.StatusCode.INVALID_ARGUMENT, "unknown method"),
        "non-ASCII model": ("Verify", pb.VerifyRequest(image=embedded.image, method_keys=[mk], model="\u00e9" * LONG),
                            MD, grpc.StatusCode.INVALID_ARGUMENT, "unknown model"),
        "output": ("Embed", pb.EmbedRequest(method_key=mk, image=embedded.image, output="o" * LONG), MD,
                   grpc.StatusCode.INVALID_ARGUMENT, "output must be one of"),
        "key_id": ("ListEmbeds", pb.ListEmbedsRequest(key_id="k" * LONG), MD,
                   grpc.StatusCode.INVALID_ARGUMENT, "malformed key_id"),
        "tenant": ("ListEmbeds", pb.ListEmbedsRequest(tenant="t" * LONG), MD,
                   grpc.StatusCode.PERMISSION_DENIED, "not allowed to read tenant"),
        # metadata beyond gRPC's 8 KiB header limit would never reach the server: 5000 characters
        "request id": ("GetInfo", pb.GetInfoRequest(), MD + [("x-request-id", "r" * 5000)],
                       grpc.StatusCode.INVALID_ARGUMENT, "x-request-id must be 1..64 characters"),
    }


@pytest.mark.parametrize("case", ["model", "method", "non-ASCII model", "output", "key_id", "tenant", "request id"])
def test_huge_strings_are_cut_in_the_error(server, keys, embedded, case):
    rpc, req, md, code, needle = _long_cases(keys, embedded)[case]
    before = server.ledger.count()
    err = _call(server, rpc, req, metadata=md)
    assert err.code() == code, err.details()   # not RESOURCE_EXHAUSTED "Stream removed"
    details = err.details()
    assert needle in details and len(details.encode("utf-8")) < 1024, details
    if case != "request id":   # that message repeats nothing of the value
        assert f"({LONG} characters)" in details
    assert server.ledger.count() == before
    _assert_healthy(server.address)


# -- 4. images that do not decode as they look --------------------------------------------------------


def _palette_png(side: int, plte: bytes | None) -> bytes:
    """A side x side 8-bit palette PNG (colour type 3) using indices 0..7, with ``plte`` as its PLTE
    chunk (None: no PLTE chunk, which the PNG spec requires for this colour type)."""
    rows = b"".join(b"\x00" + bytes(x % 8 for x in range(side)) for _ in range(side))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 3, 0, 0, 0))
            + (_chunk(b"PLTE", plte) if plte is not None else b"")
            + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


@pytest.mark.parametrize("plte,needle", [(None, "without a palette (no PLTE chunk)"),
                                         (bytes(range(12)), "palette index 7 but its palette has only 4 colours")])
@pytest.mark.parametrize("rpc", ["Verify", "Embed"])
def test_palette_png_without_its_colours_is_invalid_argument(server, keys, rpc, plte, needle):
    png = _palette_png(256, plte)
    mk = keys[0].for_method("shallow-diffuse").to_bytes()
    req = (pb.VerifyRequest(image=png, method_keys=[mk]) if rpc == "Verify"
           else pb.EmbedRequest(method_key=mk, image=png))
    before = server.ledger.count()
    err = _call(server, rpc, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert needle in err.details() and "re-save it as an RGB PNG" in err.details()
    assert server.ledger.count() == before
    _assert_healthy(server.address)


def test_palette_png_with_its_palette_is_still_accepted(client_a, keys):
    res = client_a.verify(_palette_png(256, bytes(range(24))), keys[:1])
    assert "palette image converted to RGB" in res.notes


def test_exif_orientation_is_applied_and_said(client_a, keys, embedded):
    from PIL import Image

    upright = embedded.to_array()[:192]                 # 256 wide x 192 high, as a viewer shows it
    stored = np.ascontiguousarray(np.rot90(upright))    # the sensor's pixels: 192 wide x 256 high
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6                                    # orientation 6: turn 90 degrees clockwise to view
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    jpeg = buf.getvalue()

    res = client_a.verify(jpeg, keys[:1])
    assert any("EXIF orientation 6 applied" in n and "read upright as 256x192" in n for n in res.notes), res.notes
    # the model saw the upright image's centre square: 256 wide, so cut at x=32 (the stored one is 192 wide)
    assert any(n.startswith("256x192 image: the model saw its centre 192x192 square (from x=32, y=0)")
               for n in res.notes), res.notes
    assert res.image_sha256 == hashlib.sha256(jpeg).hexdigest()   # the bytes sent, as they were


def test_exif_orientation_upright_pixels(tmp_path):
    """The pixels the server works on are the upright ones (decoded here as the servicer does)."""
    from PIL import Image

    from shallowmark.server.validation import decode_image

    upright = np.zeros((80, 120, 3), np.uint8)
    upright[:20, :30] = 255                             # a white block top-left when viewed
    for orientation, stored in [(6, np.rot90(upright)), (8, np.rot90(upright, -1)), (3, upright[::-1, ::-1])]:
        im = Image.fromarray(np.ascontiguousarray(stored))
        exif = im.getexif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        im.save(buf, format="PNG", exif=exif.tobytes())
        img = decode_image(buf.getvalue(), 10**6)
        assert img.pixels.shape == upright.shape and np.array_equal(img.pixels, upright), orientation
        assert any(f"EXIF orientation {orientation} applied" in n for n in img.notes)


# -- 12. the server's state is private ------------------------------------------------------------------


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_state_folder_and_ledger_are_private(tmp_path, loader, make_config):
    from shallowmark.server.app import ServerApp

    state = tmp_path / "new" / "state"
    old = os.umask(0o022)   # the usual umask, under which SQLite and mkdir made 0644 and 0755
    try:
        app = ServerApp(make_config(state), backend_loader=loader).start(load_models=False)
    finally:
        os.umask(old)
    try:
        _assert_healthy(app.address, serving=False)
        with grpc.insecure_channel(app.address) as channel:
            res = pb_grpc.WatermarkStub(channel).ListEmbeds(pb.ListEmbedsRequest(), metadata=MD, timeout=10)
        assert list(res.entries) == []   # the pre-created empty file is a working ledger
        assert _mode(state) == 0o700
        files = {p.name: _mode(p) for p in state.iterdir()}
        assert {"ledger.sqlite3", "ledger.sqlite3-wal", "attestation_ed25519.pem"} <= set(files)
        assert all(m == 0o600 for m in files.values()), {k: oct(v) for k, v in files.items()}
    finally:
        app.stop(0.5)


def test_existing_open_ledger_is_kept_and_warned_about(tmp_path, loader, make_config, caplog):
    from shallowmark.server.app import ServerApp

    ledger = tmp_path / "ledger.sqlite3"
    ledger.touch()
    ledger.chmod(0o644)     # the operator's choice (or an older server's): left as it is, but said
    with caplog.at_level(logging.WARNING, logger="shallowmark.server"):
        app = ServerApp(make_config(tmp_path), backend_loader=loader).start(load_models=False)
    try:
        assert any("accessible by group/others (mode 644); chmod 600 it" in r.getMessage() for r in caplog.records)
        assert _mode(ledger) == 0o644
        _assert_healthy(app.address, serving=False)
    finally:
        app.stop(0.5)


# -- 15. plaintext only on loopback, unless the config says otherwise -----------------------------------


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("127.255.255.254", True), ("localhost", True), ("::1", True),
    ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("[::]", False), ("10.0.0.5", False), ("128.0.0.1", False),
    ("127.example.com", False), ("", False),
])
def test_loopback_hosts(host, loopback):
    from shallowmark.client import is_loopback_host

    assert is_loopback_host(host) is loopback


def test_config_refuses_plaintext_off_loopback(tmp_path, capsys):
    from shallowmark.cli import main
    from shallowmark.server.config import load_config

    cfg = tmp_path / "server.toml"
    cfg.write_text('host = "0.0.0.0"\nport = 0\nstate_dir = "state"\n[tokens]\n"t" = "a"\n')
    with pytest.raises(InvalidParameterError, match="allow_insecure = true"):
        load_config(cfg)
    with pytest.raises(InvalidParameterError, match="not a loopback address"):
        load_config(tmp_path / "server.toml", host="192.0.2.7")    # a flag override is checked too
    assert main(["serve", "--config", str(cfg)]) == 2               # refused before anything listens
    err = capsys.readouterr().err
    assert "no [tls] is configured" in err and "allow_insecure = true" in err
    assert not (tmp_path / "state").exists()


def test_config_allow_insecure_serves_and_warns(tmp_path, loader, caplog):
    from shallowmark.server.app import ServerApp
    from shallowmark.server.config import load_config

    cfg = tmp_path / "server.toml"
    cfg.write_text('host = "0.0.0.0"\nport = 0\nallow_insecure = true\n[tokens]\n'
                   f'"{TOKEN_A}" = "a"\n')
    with caplog.at_level(logging.WARNING, logger="shallowmark.server"):
        app = ServerApp(load_config(cfg, state_dir=tmp_path / "state"), backend_loader=loader).start(load_models=False)
    try:
        assert any("plaintext on the non-loopback host 0.0.0.0 (allow_insecure = true)" in r.getMessage()
                   for r in caplog.records)
        _assert_healthy(f"127.0.0.1:{app.port}", serving=False)
    finally:
        app.stop(0.5)


def test_config_serves_plaintext_on_any_loopback_address(tmp_path, loader, make_config, caplog):
    from shallowmark.server.app import ServerApp

    with caplog.at_level(logging.WARNING, logger="shallowmark.server"):
        app = ServerApp(make_config(tmp_path, host="127.0.0.2"), backend_loader=loader).start(load_models=False)
    try:
        assert app.address.startswith("127.0.0.2:")
        _assert_healthy(app.address, serving=False)
        assert not [r for r in caplog.records if "plaintext" in r.getMessage()]
    finally:
        app.stop(0.5)


def test_dev_mode_refuses_a_non_loopback_host(tmp_path, capsys):
    from shallowmark.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--state-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "without --config the server listens on loopback only" in err and "'0.0.0.0'" in err
    assert not (tmp_path / "s").exists()
