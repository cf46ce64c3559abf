"""Admission control, decode cost, per-tenant limits and shutdown, against real gRPC servers.

The servers run tiny-ldm (the session's backend, see conftest); the Verify model work of
shallow-diffuse is replaced by a gate (:class:`_Gate`) that holds each model call until the test
opens it and counts the calls, so "the server is full" and "this request never ran" are exact.
Each case states the status code."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest

from shallowmark._proto.shallowmark.v1 import watermark_pb2 as pb
from shallowmark._proto.shallowmark.v1 import watermark_pb2_grpc as pb_grpc

TOKEN_A = "token-for-tenant-a"  # as in conftest.py
TOKEN_B = "token-for-tenant-b"


def _md(token=TOKEN_A):
    return [("authorization", f"Bearer {token}")]


class _Gate:
    """Stands in for shallow-diffuse's Verify model work: each call blocks until :meth:`open`,
    then returns "not detected". ``calls`` counts the images that reached the model."""

    def __init__(self, app):
        from shallowmark.core.watermarks.base import Detection

        self.method = app.pool.method(app.pool.get("tiny-ldm"), "shallow-diffuse")
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0
        self._lock = threading.Lock()

        def none_detected(n, keys, fpr):
            return [Detection(method="shallow-diffuse", score=0.0, p_value=1.0, p_value_corrected=1.0,
                              detected=False, target_fpr=fpr, key_id=keys[0].key_id,
                              per_key_p={k.key_id: 1.0 for k in keys}) for _ in range(n)]

        def hold(n):
            with self._lock:
                self.calls += n
            self.entered.release()
            assert self.opened.wait(30), "the test never opened the gate"

        def detect(images, keys, target_fpr=0.01, *a, **kw):
            hold(len(images))
            return none_detected(len(images), keys, target_fpr)

        def invert(images, prompts=None):
            hold(len(images))
            return np.zeros((len(images), 1))

        def score(latents, keys, target_fpr=0.01):
            return none_detected(len(latents), keys, target_fpr)

        self.method.detect, self.method.invert, self.method.score = detect, invert, score

    def wait_entered(self, n=1, timeout=20.0):
        for _ in range(n):
            assert self.entered.acquire(timeout=timeout), "a model call never started"

    def open(self):
        self.opened.set()


def _start(tmp_path, loader, make_config, **kw):
    from shallowmark.server.app import ServerApp

    app = ServerApp(make_config(tmp_path, **kw), backend_loader=loader).start()
    assert app.wait_until_ready(120)
    return app


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image():
    # small: the model work is the gate's, and 200 copies cross the loopback in one test
    return _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _verify_req(keys, image, n_keys=1):
    return pb.VerifyRequest(image=image, method_keys=[k.for_method("shallow-diffuse").to_bytes()
                                                      for k in keys[:n_keys]])


def _health(address, timeout=5.0):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        t0 = time.monotonic()
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        return status, time.monotonic() - t0


# -- 5. admission control ------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_a_full_server_refuses_at_once_answers_health_and_drops_abandoned_calls(
        tmp_path, loader, make_config, keys, image, batching):
    """Two workers, both held in the model: (a) a third Verify gets RESOURCE_EXHAUSTED in < 100 ms,
    (b) health answers in < 1 s, (c) queued calls whose caller cancelled or whose deadline passed
    never reach the model, and the server is whole again afterwards."""
    from grpc_health.v1 import health_pb2

    # 3 admitted: two hold the model (one batch of 1 each, or one at a time), one queues behind
    app = _start(tmp_path, loader, make_config, workers=3, max_batch=1 if not batching else 2,
                 batching=batching, max_wait_ms=0.0)
    gate = _Gate(app)
    channel = grpc.insecure_channel(app.address)
    stub = pb_grpc.WatermarkStub(channel)
    try:
        holder = stub.Verify.future(_verify_req(keys, image), metadata=_md(), timeout=60)
        gate.wait_entered()  # the model is busy with the holder
        # queued behind it: one whose deadline will pass, one its caller cancels
        expiring = stub.Verify.future(_verify_req(keys, image), metadata=_md(), timeout=1.0)
        cancelled = stub.Verify.future(_verify_req(keys, image), metadata=_md(), timeout=60)
        deadline = time.monotonic() + 10
        while app.servicer.admission.in_flight < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.servicer.admission.in_flight == 3

        # (a) full: refused at once, before the request is decoded
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.Verify(_verify_req(keys, image), metadata=_md(), timeout=30)
        took = time.monotonic() - t0
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "workers = 3" in e.value.details() and "retry" in e.value.details()
        assert took < 0.1, f"refusal took {took * 1000:.0f} ms"

        # (b) health does not wait behind the model work
        status, took = _health(app.address)
        assert status == health_pb2.HealthCheckResponse.SERVING and took < 1.0, took

        # (c) the abandoned calls end without reaching the model
        cancelled.cancel()
        with pytest.raises(grpc.RpcError) as e:
            expiring.result(timeout=10)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while app.servicer.admission.in_flight > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.servicer.admission.in_flight == 1, "the abandoned calls still hold their slots"
        gate.open()
        assert not holder.result(timeout=30).detected
        time.sleep(0.2)  # a wrongly kept job would run now
        assert gate.calls == 1, f"{gate.calls - 1} abandoned call(s) ran their model job"

        # slots were given back: a call goes through again
        assert not stub.Verify(_verify_req(keys, image), metadata=_md(), timeout=30).detected
        assert gate.calls == 2 and app.servicer.admission.in_flight == 0
    finally:
        gate.open()
        channel.close()
        app.stop(1.0)


def test_two_hundred_calls_at_once_are_answered_quickly(tmp_path, loader, make_config, keys, image):
    """The reported burst: 200 Verify calls at once on a server with 4 workers held in the model.
    The 196 beyond the workers are refused with RESOURCE_EXHAUSTED within a second (none waits for a
    deadline), health answers meanwhile, and only the admitted calls reach the model."""
    from grpc_health.v1 import health_pb2

    app = _start(tmp_path, loader, make_config, workers=4, batching=False)
    gate = _Gate(app)
    channel = grpc.insecure_channel(app.address)
    stub = pb_grpc.WatermarkStub(channel)
    req = _verify_req(keys, image)
    try:
        t0 = time.monotonic()
        futures = [stub.Verify.future(req, metadata=_md(), timeout=60) for _ in range(200)]
        while sum(f.done() for f in futures) < 196 and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        took = time.monotonic() - t0
        status, health_s = _health(app.address)
        refused = [f for f in futures if f.done()]
        assert len(refused) == 196, f"{len(refused)} answered in {took:.1f} s"
        assert took < 5, f"the refusals took {took:.1f} s"
        assert {f.exception().code() for f in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert status == health_pb2.HealthCheckResponse.SERVING and health_s < 1.0, health_s
        gate.wait_entered()
        gate.open()
        admitted = [f for f in futures if f not in refused]
        assert all(not f.result(timeout=30).detected for f in admitted) and gate.calls == 4
    finally:
        gate.open()
        channel.close()
        app.stop(1.0)


def test_a_call_that_waited_past_its_deadline_is_not_started():
    """At the top of each call: a caller that already left gets no work done for it."""
    from shallowmark.server.errors import CallEnded
    from shallowmark.server.servicer import _check_caller_waits

    class Ctx:
        def __init__(self, left, active):
            self.left, self.active = left, active

        def time_remaining(self):
            return self.left

        def is_active(self):
            return self.active

    with pytest.raises(CallEnded, match="deadline passed") as e:
        _check_caller_waits(Ctx(-0.1, False))
    assert not e.value.cancelled
    with pytest.raises(CallEnded, match="cancelled") as e:
        _check_caller_waits(Ctx(5.0, False))
    assert e.value.cancelled
    _check_caller_waits(Ctx(None, True))


def test_open_streams_are_bounded_and_do_not_starve_health(tmp_path, loader, make_config):
    """Reflection streams hold a thread each: beyond max_streams they get RESOURCE_EXHAUSTED, and
    health still answers with the streams open."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    app = _start(tmp_path, loader, make_config, max_streams=2)
    channel = grpc.insecure_channel(app.address)
    stop = threading.Event()

    def idle():  # a stream that sends one request and then stays open
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        stop.wait(30)

    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        streams = [stub.ServerReflectionInfo(idle(), timeout=30) for _ in range(2)]
        for s in streams:
            next(s)  # open and answered
        with pytest.raises(grpc.RpcError) as e:
            next(stub.ServerReflectionInfo(idle(), timeout=30))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams" in e.value.details()
        status, took = _health(app.address)
        assert status == health_pb2.HealthCheckResponse.SERVING and took < 1.0
    finally:
        stop.set()
        channel.close()
        app.stop(1.0)


# -- 6. decode cost --------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _blank_png(w: int, h: int, depth: int, colour_type: int, samples: int) -> bytes:
    """A PNG of zeros: a few KB however large it declares itself."""
    row = b"\0" * (1 + w * samples * depth // 8)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(row * h, 9))
            + _chunk(b"IEND", b""))


def test_decoded_bytes_count_samples_and_their_width():
    from shallowmark.errors import InvalidImageError
    from shallowmark.server.validation import decode_image

    gray8, gray16 = _blank_png(512, 512, 8, 0, 1), _blank_png(512, 512, 16, 0, 1)
    limit = 512 * 512 * 2 - 1  # below a 16-bit gray image of 512 x 512, above an 8-bit one
    assert decode_image(gray8, 10**6, limit).width == 512
    with pytest.raises(InvalidImageError, match=r"512x512 16-bit gray, 524288 bytes once decoded.*"
                                                r"limit of 524287 decoded bytes \(max_decode_bytes\)"):
        decode_image(gray16, 10**6, limit)
    with pytest.raises(InvalidImageError, match="16-bit RGBA"):
        decode_image(_blank_png(256, 256, 16, 6, 4), 10**6, 256 * 256 * 8 - 1)
    jpeg = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(jpeg, "JPEG")
    with pytest.raises(InvalidImageError, match="64x64 8-bit, 3 channels, 12288 bytes"):
        decode_image(jpeg.getvalue(), 10**6, 64 * 64 * 3 - 1)
    # 16-bit gray is reduced in its own type (no int64 copy) and still reads right
    rows = b"".join(b"\0" + b"\xab\xcd" * 64 for _ in range(64))
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 16, 0, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))
    assert (decode_image(png, 10**6).pixels == 0xAB).all()


def test_a_small_file_declaring_a_huge_16_bit_image_is_refused_before_decoding(server, keys):
    """A 100 KB PNG declaring 4096 x 4096 16-bit RGB (96 MiB decoded) within max_image_pixels:
    INVALID_ARGUMENT naming max_decode_bytes, answered from the header."""
    bomb = _blank_png(4096, 4096, 16, 2, 3)
    assert len(bomb) < 200_000
    with grpc.insecure_channel(server.address) as ch:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.WatermarkStub(ch).Verify(_verify_req(keys, bomb), metadata=_md(), timeout=30)
        took = time.monotonic() - t0
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "max_decode_bytes" in e.value.details() and "16-bit RGB" in e.value.details()
    assert took < 0.5, f"{took:.2f} s: the image was decoded"


# -- 8. per-tenant limits --------------------------------------------------------------------------


def test_tenant_rate_limit_is_a_token_bucket():
    from shallowmark.server.admission import Admission
    from shallowmark.server.config import ServerConfig
    from shallowmark.server.errors import TenantRateLimited

    now = [100.0]
    cfg = ServerConfig(tokens={"t-a": "a", "t-b": "b"}, tenant_limits={"*": {"rate": 2.0, "burst": 3}})
    adm = Admission(cfg, clock=lambda: now[0])
    for _ in range(3):  # the burst
        with adm.admit("a"):
            pass
    with pytest.raises(TenantRateLimited, match=r"tenant 'a' is over its rate limit \(tenant_limits rate = 2 "
                                                r"requests/s, burst = 3\); retry in 0.500 s"):
        with adm.admit("a"):
            pass
    with adm.admit("b"):  # every tenant has its own bucket
        pass
    now[0] += 0.5  # one token back
    with adm.admit("a"):
        pass
    with pytest.raises(TenantRateLimited):
        with adm.admit("a"):
            pass
    assert adm.in_flight == 0


def test_tenant_limits_through_the_server(tmp_path, loader, make_config, keys, image):
    """Tenant a: 1 call in flight and 2 requests/s (burst 2); tenant b only the default.
    Both refusals are RESOURCE_EXHAUSTED naming the limit; the other tenant is not affected."""
    app = _start(tmp_path, loader, make_config, workers=4, batching=False,
                 tenant_limits={"a": {"rate": 2.0, "burst": 2, "max_in_flight": 1}, "*": {"max_in_flight": 3}})
    gate = _Gate(app)
    channel = grpc.insecure_channel(app.address)
    stub = pb_grpc.WatermarkStub(channel)
    try:
        held = stub.Verify.future(_verify_req(keys, image), metadata=_md(), timeout=60)
        gate.wait_entered()
        with pytest.raises(grpc.RpcError) as e:
            stub.GetInfo(pb.GetInfoRequest(), metadata=_md(), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'a' already has 1 calls in flight" in e.value.details()
        assert "max_in_flight = 1" in e.value.details()
        assert stub.GetInfo(pb.GetInfoRequest(), metadata=_md(TOKEN_B), timeout=10).tenant == "b"
        gate.open()
        held.result(timeout=30)
        # the bucket: 2 tokens, both spent (the held Verify and the refused GetInfo took none)
        assert stub.GetInfo(pb.GetInfoRequest(), metadata=_md(), timeout=10).tenant == "a"
        with pytest.raises(grpc.RpcError) as e:
            for _ in range(2):
                stub.GetInfo(pb.GetInfoRequest(), metadata=_md(), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'a' is over its rate limit (tenant_limits rate = 2 requests/s, burst = 2)" in e.value.details()
    finally:
        gate.open()
        channel.close()
        app.stop(1.0)


def test_tenant_limits_config_is_checked(tmp_path):
    from shallowmark.errors import InvalidParameterError
    from shallowmark.server.config import ServerConfig, TenantLimits, load_config

    tokens = {"t-a": "a"}
    for bad, needle in ((dict(tenant_limits={"nobody": {"rate": 1}}), "no token in [tokens] maps to"),
                        (dict(tenant_limits={"a": {"rps": 1}}), "unknown key(s) in tenant_limits for 'a': rps"),
                        (dict(tenant_limits={"a": {"rate": -1}}), "rate must be a number"),
                        (dict(tenant_limits={"a": {"burst": 5}}), "burst needs a rate"),
                        (dict(tenant_limits={"a": {"max_in_flight": 1.5}}), "max_in_flight"),
                        (dict(tenant_limits={"a": 3}), "must be a table"),
                        (dict(max_decode_bytes=0), "max_decode_bytes"),
                        (dict(max_streams=0), "max_streams")):
        with pytest.raises(InvalidParameterError) as e:
            ServerConfig(tokens=tokens, **bad)
        assert needle in str(e.value), str(e.value)
    f = tmp_path / "s.toml"
    f.write_text('[tokens]\n"t-a" = "a"\n[tenant_limits."*"]\nrate = 5.5\n[tenant_limits.a]\nmax_in_flight = 2\n')
    cfg = load_config(f)
    assert cfg.limits_for("a") == TenantLimits(max_in_flight=2)
    assert cfg.limits_for("b") == TenantLimits(rate=5.5) and cfg.limits_for("b").bucket == 6
    assert ServerConfig().limits_for("a") is None


# -- 7. shutdown ---------------------------------------------------------------------------------------


def test_garbage_on_a_reflection_stream_ends_it_and_stop_returns_in_time(tmp_path, loader, make_config):
    """Unauthenticated garbage on a reflection stream: INVALID_ARGUMENT at once, its thread and
    stream slot given back (gRPC alone left the thread waiting forever, and stop() with it). A
    second stream is left open: stop(grace) returns within grace + 5 s and ends it."""
    from grpc_reflection.v1alpha import reflection_pb2

    app = _start(tmp_path, loader, make_config, max_streams=2)
    channel = grpc.insecure_channel(app.address)
    stop = threading.Event()
    path = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

    def garbage():
        yield b"\x0a\x05\xff"  # field 1, length 5, one byte follows: not a ServerReflectionRequest
        stop.wait(30)

    def idle():
        yield reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        stop.wait(30)

    try:
        for _ in range(3):  # more than max_streams: each garbage stream gave its slot back
            with pytest.raises(grpc.RpcError) as e:
                list(channel.stream_stream(path)(garbage(), timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert "not a valid request" in e.value.details()
        deadline = time.monotonic() + 5
        while app.streams.open_streams and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.streams.open_streams == 0
        left_open = channel.stream_stream(path)(idle(), timeout=60)
        next(left_open)
        t0 = time.monotonic()
        app.stop(1.0)
        took = time.monotonic() - t0
        assert took < 1.0 + 5.0, f"stop took {took:.1f} s"
        with pytest.raises(grpc.RpcError):
            for _ in left_open:
                pass
    finally:
        stop.set()
        channel.close()
        app.stop(0)


def test_stop_does_not_wait_forever_for_calls_that_never_end(tmp_path, loader, make_config, monkeypatch):
    """If gRPC's shutdown never completes (a handler that ignores cancellation), stop() still
    returns STOP_SLACK_S after the grace period and closes the ledger."""
    import shallowmark.server.app as app_mod

    app = app_mod.ServerApp(make_config(tmp_path), backend_loader=loader).start(load_models=False)
    real_stop = app.server.stop
    monkeypatch.setattr(app_mod, "STOP_SLACK_S", 0.2)
    monkeypatch.setattr(app.server, "stop", lambda grace: (real_stop(grace), threading.Event())[1])
    t0 = time.monotonic()
    app.stop(0.1)
    assert time.monotonic() - t0 < 2.0


def test_the_client_retries_a_refusal_the_server_marks_as_passing(tmp_path, loader, make_config):
    """A tenant over its rate limit gets RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailer; the
    SDK client waits at least that long and retries (same request id), and with retries=0 it
    raises. gRPC's own RESOURCE_EXHAUSTED for an oversized message has no trailer and is not retried."""
    from shallowmark.client import Client, ServerError

    app = _start(tmp_path, loader, make_config, workers=4, batching=False,
                 tenant_limits={"a": {"rate": 2.0, "burst": 1}})
    try:
        channel = grpc.insecure_channel(app.address)
        stub = pb_grpc.WatermarkStub(channel)
        stub.GetInfo(pb.GetInfoRequest(), metadata=_md(), timeout=10)       # the one token
        with pytest.raises(grpc.RpcError) as e:
            stub.GetInfo(pb.GetInfoRequest(), metadata=_md(), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_ms = int(dict(e.value.trailing_metadata())["retry-after-ms"])
        assert 1 <= wait_ms <= 500
        channel.close()
        time.sleep(0.6)                                # a token again (2 per second, burst 1)
        with Client(app.address, TOKEN_A, timeout=30, retries=0) as c:
            c.info()
            with pytest.raises(ServerError) as err:
                c.info()
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        time.sleep(0.6)
        with Client(app.address, TOKEN_A, timeout=30, retries=3, backoff=0.01) as c:
            t0 = time.monotonic()
            assert c.info().tenant == "a" and c.info().tenant == "a"      # the second waits for a token
            assert time.monotonic() - t0 >= 0.3
    finally:
        app.stop(1.0)


def test_a_refusal_without_the_trailer_is_not_retried():
    """gRPC's own RESOURCE_EXHAUSTED (a message over the size limit) carries no retry-after-ms."""
    from shallowmark.client import _retry_after

    class Refused(grpc.RpcError):
        def __init__(self, trailers):
            self._t = trailers

        def trailing_metadata(self):
            return self._t

    assert _retry_after(Refused(())) is None
    assert _retry_after(Refused((("retry-after-ms", "250"),))) == 0.25
    assert _retry_after(Refused((("retry-after-ms", "soon"),))) is None
