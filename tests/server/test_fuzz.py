"""Property-based fuzzing (hypothesis) of what a caller controls: image bytes, request fields, raw
request bytes. Each target asserts only the documented outcomes (the status table in
``server/servicer.py`` and docs/service.md "Status codes"), never INTERNAL or UNKNOWN, and that the
server is still healthy afterwards.

Targets:

1. ``decode_image``: arbitrary bytes, mutated (flipped / inserted / deleted bytes) small real PNG and
   JPEG files, and truncations of them; in-process. It returns a uint8 H x W x 3 ``DecodedImage`` or
   raises ``InvalidImageError``, nothing else.
2. Verify / Embed / ListEmbeds requests built with the generated stubs, with arbitrary field values
   (strings, bytes for image and key fields, ``target_fpr`` including nan and inf, ``page_size``),
   through ONE real in-process server (module-scoped). The images are garbage or smaller than the
   64 px short side, so no model work runs and each call is cheap.
3. Raw bytes sent to each RPC with identity (de)serializers, with and without a bearer token.

The runs are deterministic (``derandomize=True``, no example database), 2000 cases per target by
default. For a longer run set ``SHALLOWMARK_FUZZ_EXAMPLES`` (e.g. 50000); the run then also writes
``<target>.json`` (cases run and status-code counts) to the folder in ``SHALLOWMARK_FUZZ_REPORT``
(default docs/reliability/fuzz)::

    SHALLOWMARK_FUZZ_EXAMPLES=50000 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:xdist \\
        tests/server/test_fuzz.py
"""

from __future__ import annotations

import collections
import io
import json
import os
import struct
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shallowmark._proto.shallowmark.v1 import watermark_pb2 as pb
from shallowmark._proto.shallowmark.v1 import watermark_pb2_grpc as pb_grpc
from shallowmark.errors import InvalidImageError

TOKEN_A = "token-for-tenant-a"  # as in conftest.py
MD = [("authorization", f"Bearer {TOKEN_A}")]

_LONG = os.environ.get("SHALLOWMARK_FUZZ_EXAMPLES")
EXAMPLES = int(_LONG) if _LONG else 2000
REPORT_DIR = Path(os.environ.get("SHALLOWMARK_FUZZ_REPORT")
                  or Path(__file__).resolve().parents[2] / "docs" / "reliability" / "fuzz")

FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much],
                print_blob=True)

#: the documented answers to a well-formed (or malformed) request; never INTERNAL or UNKNOWN
C = grpc.StatusCode
DOCUMENTED = {C.OK, C.INVALID_ARGUMENT, C.PERMISSION_DENIED, C.RESOURCE_EXHAUSTED, C.UNAVAILABLE,
              C.DEADLINE_EXCEEDED, C.FAILED_PRECONDITION}
RPCS = ("Embed", "Verify", "GetInfo", "ListEmbeds")

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _report(target: str) -> None:
    if not _LONG:
        return
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    counts = COUNTS[target]
    (REPORT_DIR / f"{target}.json").write_text(json.dumps(
        {"target": target, "max_examples": EXAMPLES, "cases": sum(counts.values()),
         "outcomes": dict(sorted(counts.items()))}, indent=2) + "\n")


def _image_bytes(fmt: str, w: int, h: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(w * 31 + h)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_image_bytes("PNG", 8, 8), _image_bytes("JPEG", 8, 8), _image_bytes("PNG", 6, 5, "P"),
         _image_bytes("PNG", 7, 3, "LA"), _image_bytes("JPEG", 9, 4, "L"), _image_bytes("PNG", 12, 10, "RGBA")]


@st.composite
def mutated(draw, seeds=SEEDS):
    """A seed image with a few bytes flipped, inserted or deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(seeds)))
    if draw(st.integers(0, 4)) == 0:  # a truncation
        return bytes(data[:draw(st.integers(0, len(data)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete")))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[i:i + draw(st.integers(1, 8))]
    return bytes(data)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@st.composite
def png_headers(draw):
    """A seed PNG whose IHDR (size, bit depth, colour type, interlace) is rewritten with a correct
    CRC, so the decoder gets past the header checks; PLTE dropped or kept; the pixel data kept."""
    data = draw(st.sampled_from([s for s in SEEDS if s[:4] == b"\x89PNG"]))
    ihdr = struct.pack(">IIBBBBB", draw(st.integers(0, 80)), draw(st.integers(0, 80)),
                       draw(st.sampled_from([0, 1, 2, 4, 8, 16, 3, 255])), draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7])),
                       draw(st.integers(0, 1)), draw(st.integers(0, 1)), draw(st.integers(0, 2)))
    chunks, i = [], 8
    while i + 8 <= len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        chunks.append((data[i + 4:i + 8], data[i + 8:i + 8 + n]))
        i += 12 + n
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    for kind, body in chunks[1:]:
        if kind == b"PLTE" and draw(st.booleans()):
            continue
        out += _chunk(kind, body)
    return out


IMAGES = st.one_of(st.binary(max_size=256), mutated(), st.sampled_from(SEEDS), png_headers())


# -- 1. image decoding (in-process) ------------------------------------------------------------------

@FUZZ
@given(data=IMAGES, max_pixels=st.sampled_from([1, 16, 64, 4096, 1 << 24]))
def test_decode_image_returns_rgb8_or_invalid_image(data, max_pixels):
    from shallowmark.server.validation import DecodedImage, decode_image

    try:
        img = decode_image(data, max_pixels)
    except InvalidImageError as e:
        assert str(e)
        COUNTS["decode_image"]["InvalidImageError"] += 1
        return
    assert isinstance(img, DecodedImage)
    assert img.pixels.dtype == np.uint8 and img.pixels.ndim == 3 and img.pixels.shape[2] == 3
    assert 0 < img.width * img.height <= max_pixels
    COUNTS["decode_image"]["DecodedImage"] += 1


def test_decode_image_report():
    assert sum(COUNTS["decode_image"].values()) >= min(EXAMPLES, 2000) or not COUNTS["decode_image"]
    _report("decode_image")


# -- a real server (one for the whole module) --------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, running_server):
    with running_server(tmp_path_factory.mktemp("fuzz-server")) as app:
        yield app


@pytest.fixture(scope="module")
def channel(fuzz_server):
    with grpc.insecure_channel(fuzz_server.address) as ch:
        yield ch


def _assert_healthy(address: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert pb_grpc.WatermarkStub(ch).GetInfo(pb.GetInfoRequest(), metadata=MD, timeout=10).tenant == "a"


def _code(call, request, metadata=MD) -> grpc.StatusCode:
    try:
        call(request, metadata=metadata, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return C.OK


def _check(target: str, rpc: str, code: grpc.StatusCode, allowed=DOCUMENTED) -> None:
    COUNTS[target][f"{rpc}:{code.name}"] += 1
    assert code in allowed, f"{rpc} answered {code.name}"


# -- 2. request fields through the real server -------------------------------------------------------

def _keys():
    from shallowmark.keys import WatermarkKey

    k = WatermarkKey.from_hex(f"{0xF00D:064x}", label="fuzz")
    return [k.for_method(m).to_bytes() for m in ("shallow-diffuse", "tree-ring", "ringid", "gaussian-shading")]


VALID_KEYS = _keys()
TINY = SEEDS  # all under 64 px: refused by the shape check before any model work
KEY_BYTES = st.one_of(st.binary(max_size=80), st.sampled_from(VALID_KEYS),
                      st.sampled_from(VALID_KEYS).map(lambda b: b[:-1]),
                      st.sampled_from(VALID_KEYS).flatmap(lambda b: mutated([b])))
NAMES = st.one_of(st.text(max_size=40), st.sampled_from(["", "tiny-ldm", "shallow-diffuse", "tree-ring",
                                                         "ringid", "gaussian-shading", "nope"]))
FPR = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-300, 0.01, 0.5, 1.0]))
REQUEST_IMAGES = st.one_of(st.binary(max_size=128), mutated(TINY), st.sampled_from(TINY))  # never >= 64 px


@st.composite
def requests(draw):
    rpc = draw(st.sampled_from(("Verify", "Verify", "Embed", "ListEmbeds")))
    if rpc == "Verify":
        req = pb.VerifyRequest(image=draw(REQUEST_IMAGES), method_keys=draw(st.lists(KEY_BYTES, max_size=4)
                                                                         | st.lists(st.sampled_from(VALID_KEYS), min_size=1, max_size=3)),
                               target_fpr=draw(FPR), model=draw(NAMES), nonce=draw(st.binary(max_size=80)))
    elif rpc == "Embed":
        req = pb.EmbedRequest(method=draw(NAMES), model=draw(NAMES), output=draw(NAMES))
        if draw(st.booleans()):
            req.image = draw(REQUEST_IMAGES)  # an upload: always refused before the model runs
            req.method_key = draw(KEY_BYTES)
        else:
            # generating with a valid key would run the model: only invalid keys here
            req.method_key = draw(st.one_of(st.binary(max_size=80), st.sampled_from(VALID_KEYS).map(lambda b: b[:-1])))
            req.generate.prompt = draw(st.text(max_size=40))
            req.generate.seed = draw(st.integers(0, 2**64 - 1))
    else:
        req = pb.ListEmbedsRequest(tenant=draw(st.sampled_from(["", "a", "b"]) | st.text(max_size=20)),
                                   key_id=draw(st.text(max_size=70)), page_size=draw(st.integers(0, 2**32 - 1)),
                                   page_token=draw(st.text(max_size=80)))
    return rpc, req


@FUZZ
@given(rr=requests())
def test_request_fields_get_documented_codes(fuzz_server, channel, rr):
    rpc, req = rr
    stub = pb_grpc.WatermarkStub(channel)
    _check("requests", rpc, _code(getattr(stub, rpc), req))


def test_requests_server_healthy_and_report(fuzz_server):
    before = fuzz_server.ledger.count()
    _assert_healthy(fuzz_server.address)
    assert fuzz_server.ledger.count() == before == 0  # nothing was embedded
    _report("requests")


# -- 3. raw request bytes ----------------------------------------------------------------------------

@FUZZ
@given(rpc=st.sampled_from(RPCS), data=st.one_of(st.binary(max_size=200), st.sampled_from(VALID_KEYS)),
       token=st.booleans())
def test_raw_request_bytes_get_documented_codes(fuzz_server, channel, rpc, data, token):
    call = channel.unary_unary(f"/shallowmark.v1.Watermark/{rpc}")  # identity (de)serializers
    code = _code(call, data, MD if token else [])
    _check("raw_bytes", rpc, code, DOCUMENTED if token else {C.UNAUTHENTICATED})


def test_raw_bytes_server_healthy_and_report(fuzz_server):
    _assert_healthy(fuzz_server.address)
    _report("raw_bytes")
