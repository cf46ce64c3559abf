"""Metrics and logs against a real server (see conftest): the counters scraped over HTTP move by what
the calls did, under the right labels; request ids come back in the trailing metadata and are on
the log lines; the JSON log parses; metrics are off (no port) unless asked for."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shallowmark._proto.shallowmark.v1 import watermark_pb2 as pb
from shallowmark._proto.shallowmark.v1 import watermark_pb2_grpc as pb_grpc
from shallowmark.errors import InvalidParameterError

TOKEN_A = "token-for-tenant-a"  # as in conftest.py
MD = [("authorization", f"Bearer {TOKEN_A}")]
WM = "shallowmark.v1.Watermark"
HEALTH = "grpc.health.v1.Health"


def scrape(app) -> dict:
    """``{(sample name, frozenset(labels)): value}`` from the server's metrics endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def val(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return val(after, name, **labels) - val(before, name, **labels)


def requests(service=WM, method="Verify", code="OK") -> dict:
    return dict(grpc_service=service, grpc_method=method, grpc_code=code)


@pytest.fixture(scope="module")
def msrv(tmp_path_factory, running_server):
    """A server with metrics on a free port (batching on, the default)."""
    with running_server(tmp_path_factory.mktemp("metrics"), metrics_port=0) as app:
        yield app


@pytest.fixture(scope="module")
def mclient(msrv):
    from shallowmark.client import Client

    with Client(msrv.address, TOKEN_A, timeout=120, retries=0) as c:
        yield c


class _Lines(logging.Handler):
    """Keeps what a formatter makes of each record of the ``shallowmark.server`` logger."""

    def __init__(self, formatter):
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines():
    from shallowmark.server.logs import JsonFormatter

    logger = logging.getLogger("shallowmark.server")
    h, level = _Lines(JsonFormatter()), logger.level
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    yield h
    logger.removeHandler(h)
    logger.setLevel(level)


# -- the counters ----------------------------------------------------------------------------------


def test_calls_move_the_counters_by_what_they_did(msrv, mclient, keys):
    pool = msrv.pool
    method = pool.method(pool.get(""), "shallow-diffuse")
    costs = method.model_evals()
    before = scrape(msrv)
    out = mclient.embed(keys[0], method="shallow-diffuse", seed=11)
    for _ in range(2):  # one after the other: two batches of one
        assert mclient.verify(out.image, keys[0]).detected
    from shallowmark.client import ServerError

    with pytest.raises(ServerError) as e:
        mclient.verify(b"not an image at all", keys[0])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(msrv.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.WatermarkStub(ch).GetInfo(pb.GetInfoRequest(), metadata=[("authorization", "Bearer nope")],
                                              timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    after = scrape(msrv)

    d = lambda name, **lab: delta(before, after, name, **lab)  # noqa: E731
    assert d("shallowmark_rpc_requests_total", **requests(method="Embed")) == 1
    assert d("shallowmark_rpc_requests_total", **requests(method="Verify")) == 2
    assert d("shallowmark_rpc_requests_total", **requests(method="Verify", code="INVALID_ARGUMENT")) == 1
    assert d("shallowmark_rpc_requests_total", **requests(method="GetInfo", code="UNAUTHENTICATED")) == 1
    assert d("shallowmark_rpc_requests_total", **requests(HEALTH, "Check")) == 1
    assert d("shallowmark_rpc_requests_total", **requests(method="GetInfo")) == 0

    # latency: every finished call is in its histogram, the model calls took some time
    verify = dict(grpc_service=WM, grpc_method="Verify")
    assert d("shallowmark_rpc_duration_seconds_count", **verify) == 3
    assert d("shallowmark_rpc_duration_seconds_bucket", le="+Inf", **verify) == 3
    assert d("shallowmark_rpc_duration_seconds_sum", **verify) > 0
    assert d("shallowmark_rpc_duration_seconds_count", grpc_service=WM, grpc_method="Embed") == 1
    buckets = [val(after, "shallowmark_rpc_duration_seconds_bucket", le=le, **verify)
               for le in ("0.005", "0.1", "1.0", "10.0", "120.0", "+Inf")]
    assert buckets == sorted(buckets)

    # the model work: one generate and two verify jobs, each a batch of one
    assert d("shallowmark_batch_size_count") == 3 and d("shallowmark_batch_size_sum") == 3
    assert d("shallowmark_batch_size_bucket", le="1.0") == 3
    assert d("shallowmark_model_evaluations_total", operation="generate", method="shallow-diffuse") == costs.generate
    assert d("shallowmark_model_evaluations_total", operation="verify", method="shallow-diffuse") == 2 * costs.verify
    assert d("shallowmark_ledger_records_total") == 1

    # at rest: nothing queued, admitted or in flight, and no refusals
    for gauge in ("shallowmark_model_queue_depth", "shallowmark_admitted_calls", "shallowmark_open_streams"):
        assert ("%s" % gauge, frozenset()) in after and val(after, gauge) == 0
    assert val(after, "shallowmark_rpc_in_flight", grpc_service=WM, grpc_method="Verify") == 0
    for reason in ("workers", "max_queue", "tenant_rate", "tenant_max_in_flight", "max_streams"):
        assert ("shallowmark_refusals_total", frozenset({"reason": reason}.items())) in after
        assert d("shallowmark_refusals_total", reason=reason) == 0
    assert val(after, "shallowmark_build_info", version=__import__("shallowmark").__version__) == 1
    assert any(name == "process_cpu_seconds_total" for name, _ in after)


def test_a_retried_embed_is_recorded_once(msrv, mclient, keys):
    before = scrape(msrv)
    one = mclient.embed(keys[1], method="shallow-diffuse", seed=3, request_id="metrics-retry-1")
    two = mclient.embed(keys[1], method="shallow-diffuse", seed=3, request_id="metrics-retry-1")
    assert one.image_sha256 == two.image_sha256
    after = scrape(msrv)
    assert delta(before, after, "shallowmark_ledger_records_total") == 1
    assert delta(before, after, "shallowmark_rpc_requests_total", **requests(method="Embed")) == 2


def test_refusals_are_counted_by_reason(tmp_path, loader, make_config):
    from shallowmark.server.app import ServerApp

    cfg = make_config(tmp_path, metrics_port=0, tenant_limits={"a": {"rate": 0.001, "burst": 1}})
    app = ServerApp(cfg, backend_loader=loader).start(load_models=False)  # GetInfo needs no model
    try:
        before = scrape(app)
        with grpc.insecure_channel(app.address) as ch:
            stub = pb_grpc.WatermarkStub(ch)
            stub.GetInfo(pb.GetInfoRequest(), metadata=MD, timeout=10)
            with pytest.raises(grpc.RpcError) as e:
                stub.GetInfo(pb.GetInfoRequest(), metadata=MD, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(e.value.trailing_metadata())
        assert "retry-after-ms" in trailers and len(trailers["x-request-id"]) == 32  # both trailers kept
        after = scrape(app)
        assert delta(before, after, "shallowmark_refusals_total", reason="tenant_rate") == 1
        assert delta(before, after, "shallowmark_refusals_total", reason="workers") == 0
        assert delta(before, after, "shallowmark_rpc_requests_total",
                     **requests(method="GetInfo", code="RESOURCE_EXHAUSTED")) == 1
    finally:
        app.stop(0.5)


def test_each_limit_counts_its_own_refusals(make_config, tmp_path):
    """Admission (workers, tenant max_in_flight), the job queue (max_queue) and the stream limit each
    count what they refuse: what shallowmark_refusals_total reads."""
    from shallowmark.server.admission import Admission
    from shallowmark.server.errors import QueueFull, ServerBusy, TenantBusy
    from shallowmark.server.servicer import ModelPool

    cfg = make_config(tmp_path, workers=1, max_queue=1, tenant_limits={"b": {"max_in_flight": 1}})
    adm = Admission(cfg)
    with adm.admit("a"):
        with pytest.raises(ServerBusy):
            with adm.admit("a"):
                pass
    with adm.admit("b"):
        with pytest.raises(TenantBusy):
            with adm.admit("b"):
                pass
    assert adm.refusals() == {"workers": 1, "tenant_max_in_flight": 1}
    pool = ModelPool(cfg)
    with pool._admitted():
        assert pool.pending == 1
        with pytest.raises(QueueFull):
            with pool._admitted():
                pass
    assert pool.pending == 0 and pool.queue_refusals == 1


def test_metrics_endpoint_serves_metrics_only(msrv):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{msrv.metrics_port}/", timeout=10)
    assert e.value.code == 404 and b"/metrics" in e.value.read()


def test_several_servers_keep_their_numbers_apart(msrv, tmp_path, loader, make_config):
    from shallowmark.server.app import ServerApp

    other = ServerApp(make_config(tmp_path, metrics_port=0), backend_loader=loader).start(load_models=False)
    try:
        assert other.metrics.registry is not msrv.metrics.registry and other.metrics_port != msrv.metrics_port
        before = scrape(msrv)
        with grpc.insecure_channel(other.address) as ch:
            pb_grpc.WatermarkStub(ch).GetInfo(pb.GetInfoRequest(), metadata=MD, timeout=10)
        assert val(scrape(other), "shallowmark_rpc_requests_total", **requests(method="GetInfo")) == 1
        assert delta(before, scrape(msrv), "shallowmark_rpc_requests_total", **requests(method="GetInfo")) == 0
    finally:
        other.stop(0.5)
    with socket.socket() as s:  # the endpoint is closed with the server
        assert s.connect_ex(("127.0.0.1", other.metrics_port)) != 0


def _listening_ports() -> set[int]:
    """TCP ports this process listens on (from /proc: the sockets among its open files)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:  # state LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_metrics_are_off_by_default(tmp_path, loader, make_config):
    from shallowmark.server.app import ServerApp

    before = _listening_ports()
    app = ServerApp(make_config(tmp_path), backend_loader=loader).start(load_models=False)
    try:
        assert app.config.metrics_port is None and app.metrics_port is None and app.metrics_exporter is None
        assert _listening_ports() - before == {app.port}  # the gRPC port, nothing else
        with grpc.insecure_channel(app.address) as ch:  # still counted, for an embedding program to read
            pb_grpc.WatermarkStub(ch).GetInfo(pb.GetInfoRequest(), metadata=MD, timeout=10)
        assert app.metrics.registry.get_sample_value("shallowmark_rpc_requests_total",
                                                     requests(method="GetInfo")) == 1
    finally:
        app.stop(0.5)


def test_metrics_config_fields(tmp_path, make_config):
    from shallowmark.server.config import load_config

    with pytest.raises(InvalidParameterError, match="metrics_port must be an int"):
        make_config(tmp_path, metrics_port=70000)
    with pytest.raises(InvalidParameterError, match="metrics_port must be an int"):
        make_config(tmp_path, metrics_port=True)
    with pytest.raises(InvalidParameterError, match="must differ from port"):
        make_config(tmp_path, port=9464, metrics_port=9464)
    with pytest.raises(InvalidParameterError, match="log_format"):
        make_config(tmp_path, log_format="xml")
    with pytest.raises(InvalidParameterError, match="metrics_host"):
        make_config(tmp_path, metrics_host=" ")
    f = tmp_path / "server.toml"
    f.write_text('metrics_port = 9464\nmetrics_host = "0.0.0.0"\nlog_format = "json"\n')
    cfg = load_config(f)
    assert (cfg.metrics_port, cfg.metrics_host, cfg.log_format) == (9464, "0.0.0.0", "json")
    assert load_config(None).metrics_port is None


def test_metrics_port_in_use_fails_at_construction(tmp_path, loader, make_config):
    from shallowmark.server.app import ServerApp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(InvalidParameterError, match=f"cannot listen for metrics on 127.0.0.1:{taken}"):
            ServerApp(make_config(tmp_path, metrics_port=taken), backend_loader=loader)


def test_serve_maps_the_flags_to_the_config(tmp_path, monkeypatch):
    import shallowmark.server.app as app_module
    from shallowmark.cli import main

    seen = {}
    monkeypatch.setattr(app_module, "serve", lambda cfg, on_ready=None: seen.setdefault("cfg", cfg))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert main(["serve", "--port", "0", "--state-dir", str(tmp_path), "--metrics-port", "0",
                     "--metrics-host", "::1", "--log-format", "json"]) == 0
        ours = [h for h in root.handlers if h not in handlers]
        assert len(ours) == 1 and type(ours[0].formatter).__name__ == "JsonFormatter"
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    cfg = seen["cfg"]
    assert (cfg.metrics_port, cfg.metrics_host, cfg.log_format) == (0, "::1", "json")


# -- request ids -----------------------------------------------------------------------------------


def _trailer(call_or_error) -> str:
    return dict(call_or_error.trailing_metadata())["x-request-id"]


def test_request_id_comes_back(msrv, mclient, keys):
    with grpc.insecure_channel(msrv.address) as ch:
        stub = pb_grpc.WatermarkStub(ch)
        _, call = stub.GetInfo.with_call(pb.GetInfoRequest(), metadata=MD + [("x-request-id", "caller-id.42")],
                                         timeout=10)
        assert _trailer(call) == "caller-id.42"  # the caller's own, echoed
        _, call = stub.GetInfo.with_call(pb.GetInfoRequest(), metadata=MD, timeout=10)
        made = _trailer(call)
        assert len(made) == 32 and int(made, 16) >= 0  # none given: a fresh one
        # the id the response carries is the one sent back
        mk = keys[0].for_method("shallow-diffuse").to_bytes()
        with pytest.raises(grpc.RpcError) as e:
            stub.Verify(pb.VerifyRequest(image=b"garbage", method_keys=[mk]), metadata=MD, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(_trailer(e.value)) == 32
        _, call = health_pb2_grpc.HealthStub(ch).Check.with_call(health_pb2.HealthCheckRequest(), timeout=10)
        assert len(_trailer(call)) == 32
        with pytest.raises(grpc.RpcError) as e:  # refused by the token check: still has its id
            stub.GetInfo(pb.GetInfoRequest(), metadata=[("x-request-id", "no-token-1")], timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and _trailer(e.value) == "no-token-1"
    out = mclient.embed(keys[2], method="shallow-diffuse", seed=21, request_id="embed-id-7")
    assert out.request_id == "embed-id-7"


@pytest.mark.parametrize("bad", ["has space", "r" * 65, "quote\"d", "", "semi;colon"])
def test_insane_request_id_is_replaced(msrv, bad):
    """A health check just gets a fresh id; a Watermark call is refused, as before (the id is the key
    of an Embed's retries in the ledger, so making one up would record retries twice), and the
    refusal carries the fresh id, never the caller's."""
    md = [("x-request-id", bad)]
    with grpc.insecure_channel(msrv.address) as ch:
        _, call = health_pb2_grpc.HealthStub(ch).Check.with_call(health_pb2.HealthCheckRequest(), metadata=md,
                                                                 timeout=10)
        assert _trailer(call) != bad and len(_trailer(call)) == 32
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.WatermarkStub(ch).GetInfo(pb.GetInfoRequest(), metadata=MD + md, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-request-id must be" in e.value.details()
        assert _trailer(e.value) != bad and len(_trailer(e.value)) == 32


# -- logs ------------------------------------------------------------------------------------------


def test_json_log_lines_carry_the_request_id(msrv, json_lines):
    with grpc.insecure_channel(msrv.address) as ch:
        stub = pb_grpc.WatermarkStub(ch)
        stub.GetInfo(pb.GetInfoRequest(), metadata=MD + [("x-request-id", "json-log-1")], timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.ListEmbeds(pb.ListEmbedsRequest(key_id="not a key id"), metadata=MD + [("x-request-id", "json-log-2")],
                            timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.GetInfo(pb.GetInfoRequest(), metadata=[("authorization", "Bearer wrong-token-xyz"),
                                                        ("x-request-id", "json-log-3")], timeout=10)
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), metadata=[("x-request-id", "json-log-4")],
                                             timeout=10)
    objs = [json.loads(line) for line in json_lines.lines]  # every line is one JSON object
    for o in objs:
        assert {"time", "level", "logger", "message"} <= set(o) and o["time"].endswith("Z")
    by_id = {}
    for o in objs:
        by_id.setdefault(o.get("request_id"), []).append(o)
    one = by_id["json-log-1"]
    assert len(one) == 1  # one access line per call
    assert one[0]["level"] == "INFO" and one[0]["rpc"] == "GetInfo" and one[0]["tenant"] == "a"
    assert one[0]["status"] == "OK" and isinstance(one[0]["duration_ms"], (int, float))
    two = by_id["json-log-2"]
    assert [o["status"] for o in two] == ["INVALID_ARGUMENT"] and two[0]["level"] == "INFO"  # bad input: no ERROR
    three = by_id["json-log-3"]
    assert [(o["status"], o["level"], o.get("tenant")) for o in three] == [("UNAUTHENTICATED", "INFO", None)]
    four = by_id["json-log-4"]
    assert [(o["rpc"], o["level"]) for o in four] == [("Check", "DEBUG")]  # probes would fill the log
    assert not [r for r in json_lines.records if r.levelno >= logging.ERROR]
    text = "\n".join(json_lines.lines)
    assert TOKEN_A not in text and "wrong-token-xyz" not in text  # tokens are never logged


def test_log_lines_during_a_call_carry_its_id(tmp_path, loader, make_config, json_lines, monkeypatch):
    """Any line logged while a call runs gets the call's id, rpc and tenant, without passing them."""
    from shallowmark.server import servicer
    from shallowmark.server.app import ServerApp

    original = servicer.WatermarkServicer.GetInfo.__wrapped__

    def noisy(self, request, context, rid, tenant, info):
        logging.getLogger("shallowmark.server").warning("something worth a line")
        return original(self, request, context, rid, tenant, info)

    noisy.__name__ = "GetInfo"
    # before the server is built: it binds the servicer's methods when it registers them
    monkeypatch.setattr(servicer.WatermarkServicer, "GetInfo", servicer._rpc(noisy))
    app = ServerApp(make_config(tmp_path), backend_loader=loader).start(load_models=False)
    try:
        with grpc.insecure_channel(app.address) as ch:
            pb_grpc.WatermarkStub(ch).GetInfo(pb.GetInfoRequest(), metadata=MD + [("x-request-id", "inner-1")],
                                              timeout=10)
    finally:
        app.stop(0.5)
    lines = [o for o in map(json.loads, json_lines.lines) if o.get("request_id") == "inner-1"]
    assert [(o["level"], o["rpc"], o["tenant"]) for o in lines] == [("WARNING", "GetInfo", "a"), ("INFO", "GetInfo", "a")]
    assert lines[0]["message"] == "something worth a line" and lines[1]["status"] == "OK"


def test_filter_puts_the_call_on_records():
    from shallowmark.server.logs import CallContext, JsonFormatter, TextFormatter, bind_call, install_filter

    install_filter()
    logger = logging.getLogger("shallowmark.server")
    h = _Lines(JsonFormatter())
    text = _Lines(TextFormatter())
    logger.addHandler(h)
    logger.addHandler(text)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with bind_call(CallContext(request_id="ctx-1", rpc="Verify")):
            logger.info("inside %s", "a call")
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("with a traceback")
        logger.info("outside")
    finally:
        logger.removeHandler(h)
        logger.removeHandler(text)
        logger.setLevel(level)
    inside, tb, outside = map(json.loads, h.lines)
    assert inside["request_id"] == "ctx-1" and inside["rpc"] == "Verify" and inside["message"] == "inside a call"
    assert tb["request_id"] == "ctx-1" and "ValueError: boom" in tb["exception"] and tb["level"] == "ERROR"
    assert "request_id" not in outside and "rpc" not in outside
    assert text.lines[0].endswith("inside a call request_id=ctx-1")
    assert text.lines[1].splitlines()[0].endswith("with a traceback request_id=ctx-1")
    assert "request_id" not in text.lines[2]


def test_configure_logging_json_to_a_stream():
    from shallowmark.server.logs import configure_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buf = io.StringIO()
    try:
        first = configure_logging("text", stream=io.StringIO())
        h = configure_logging("json", stream=buf)  # replaces the first, leaves the others
        assert first not in root.handlers and h in root.handlers
        assert [x for x in root.handlers if x not in handlers] == [h]
        logging.getLogger("somebody.else").info("a line from another library")
        with pytest.raises(InvalidParameterError, match="log_format"):
            configure_logging("yaml")
    finally:
        for x in list(root.handlers):
            if x not in handlers:
                root.removeHandler(x)
        root.setLevel(level)
    (o,) = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert o["logger"] == "somebody.else" and o["message"] == "a line from another library" and o["level"] == "INFO"


def test_streams_are_counted_when_they_end(msrv):
    """A health Watch (a response stream) is in flight while open and counted when it ends, here
    cancelled by the caller; a reflection call (both ways streaming) is counted OK."""
    import time

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    watch = dict(grpc_service=HEALTH, grpc_method="Watch")
    before = scrape(msrv)
    with grpc.insecure_channel(msrv.address) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        during = scrape(msrv)
        assert val(during, "shallowmark_rpc_in_flight", **watch) == 1 and val(during, "shallowmark_open_streams") == 1
        stream.cancel()
        deadline = time.monotonic() + 10
        while val(scrape(msrv), "shallowmark_rpc_in_flight", **watch) and time.monotonic() < deadline:
            time.sleep(0.05)
        replies = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert WM in [s.name for s in replies[0].list_services_response.service]
    after = scrape(msrv)
    assert val(after, "shallowmark_rpc_in_flight", **watch) == 0
    assert delta(before, after, "shallowmark_rpc_requests_total", **requests(HEALTH, "Watch", "CANCELLED")) == 1
    assert delta(before, after, "shallowmark_rpc_duration_seconds_count", **watch) == 1
    assert delta(before, after, "shallowmark_rpc_requests_total",
                 **requests("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo")) == 1
