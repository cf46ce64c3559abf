"""Prometheus metrics of one server, and the interceptor that observes every call.

Each :class:`~shallowmark.server.app.ServerApp` has its own :class:`Metrics` (its own
``CollectorRegistry``, not prometheus_client's global one, so several servers in one process keep
their numbers apart). Counting is always on; with ``metrics_port`` set the registry is also served
as ``GET /metrics`` over HTTP on its own port (:class:`MetricsExporter`).

Where each number comes from (one place per concern):

- :class:`CallObserver`, the outermost gRPC interceptor, sees every call the server hands to a
  handler (Watermark RPCs, health, reflection; refused by the token check or not): it gives the call
  its request id (see :mod:`shallowmark.server.logs`), counts it by method and status code, times
  it from its arrival (a wait for a handler thread included) to its end, and keeps the in-flight
  gauge. Two kinds of call never reach it: an unknown method (gRPC answers UNIMPLEMENTED) and a call
  gRPC itself refuses beyond ``maximum_concurrent_rpcs`` (RESOURCE_EXHAUSTED "Concurrent RPC limit
  exceeded"; see :mod:`shallowmark.server.admission`).
- the rest is read when scraped from what the server counts anyway (:class:`_StateCollector`):
  requests with model jobs queued or running (``ModelPool.pending``), calls admitted (``Admission.in_flight``), open streams,
  batch sizes and model evaluations (:class:`~shallowmark.server.batching.BatchStats`), refusals by
  the limit that refused them (``Admission.refusals``, ``ModelPool.queue_refusals``,
  ``StreamLimitInterceptor.refused``).
- ledger records appended are counted on the ledger the servicer writes to (:meth:`Metrics.counting`).

No metric has a tenant, key, request id or image label: the label values are the server's own
method names, status codes and settings, so the set of series stays small and says nothing about
callers. The metric names and labels are listed in docs/service.md ("Metrics and logs").
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

import shallowmark
from shallowmark._proto.shallowmark.v1 import watermark_pb2 as pb
from shallowmark.errors import InvalidParameterError
from shallowmark.server.admission import REFUSAL_REASONS, STREAM_PREFIXES
from shallowmark.server.config import ServerConfig
from shallowmark.server.logs import (
    REQUEST_ID_HEADER,
    CallContext,
    access_log,
    bind_call,
    caller_request_id,
    new_request_id,
)

__all__ = ["Metrics", "CallObserver", "MetricsExporter", "RPC_BUCKETS", "METRICS_PATH"]

#: Buckets of ``shallowmark_rpc_duration_seconds``: a health check or refusal (well under 5 ms) to a
#: Stable Diffusion embed on a CPU (a minute or two).
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

#: The one path the metrics endpoint serves.
METRICS_PATH = "/metrics"

_WATERMARK = pb.DESCRIPTOR.services_by_name["Watermark"]


def _batch_buckets(max_batch: int) -> list[int]:
    """Upper bounds for the batch-size histogram: every size up to 16 (sizes are small integers and
    known exactly), powers of two beyond, and ``max_batch`` itself."""
    if max_batch <= 16:
        return list(range(1, max_batch + 1))
    out = list(range(1, 17))
    b = 32
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class _StateCollector:
    """Reads, when scraped, what the pool, admission and stream limiter count (see the module docstring)."""

    def __init__(self, config: ServerConfig):
        self._buckets = _batch_buckets(config.max_batch)
        self.pool: Any = None
        self.admission: Any = None
        self.streams: Any = None

    def describe(self) -> Iterable:
        # the registry learns the names from this (for duplicate checks and ?name[]= queries)
        return list(self.collect())

    def collect(self) -> Iterable:
        pool, admission, streams = self.pool, self.admission, self.streams
        yield GaugeMetricFamily("shallowmark_model_queue_depth",
                                "Requests whose model jobs wait or run (bounded by max_queue).",
                                value=pool.pending if pool is not None else 0)
        yield GaugeMetricFamily("shallowmark_admitted_calls",
                                "Watermark calls admitted and not yet finished (bounded by workers).",
                                value=admission.in_flight if admission is not None else 0)
        yield GaugeMetricFamily("shallowmark_open_streams",
                                "Reflection and health Watch streams open (bounded by max_streams).",
                                value=streams.open_streams if streams is not None else 0)

        refused = dict.fromkeys(REFUSAL_REASONS, 0)
        if admission is not None:
            refused.update(admission.refusals())
        if pool is not None:
            refused["max_queue"] = pool.queue_refusals
        if streams is not None:
            refused["max_streams"] = streams.refused
        fam = CounterMetricFamily("shallowmark_refusals",
                                  "Calls refused with RESOURCE_EXHAUSTED, by the setting that refused them.",
                                  labels=["reason"])
        for reason, n in refused.items():
            fam.add_metric([reason], n)
        yield fam

        stats = pool.batch_stats if pool is not None else None
        sizes = stats.snapshot()["sizes"] if stats is not None else {}
        buckets = [(str(float(le)), sum(n for s, n in sizes.items() if s <= le)) for le in self._buckets]
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily("shallowmark_batch_size",
                                    "Jobs per model call (micro-batch size; 1 for every unbatched job).",
                                    buckets=buckets, sum_value=sum(s * n for s, n in sizes.items()))

        fam = CounterMetricFamily("shallowmark_model_evaluations",
                                  "Model (denoiser) evaluations spent on jobs, per image, by operation and "
                                  "watermark method.", labels=["operation", "method"])
        for (operation, method), n in sorted((stats.evals_snapshot() if stats is not None else {}).items()):
            fam.add_metric([operation, method], n)
        yield fam


class Metrics:
    """One server's registry and metrics.

    Args:
        config: the server's configuration (``max_batch`` sets the batch-size buckets).

    Attributes:
        registry: the ``CollectorRegistry`` to scrape (``prometheus_client.generate_latest(registry)``).
        interceptor: the :class:`CallObserver` to put first among the gRPC server's interceptors.
    """

    def __init__(self, config: ServerConfig):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("shallowmark_rpc_requests", "Finished RPCs by gRPC service, method and status code.",
                                ["grpc_service", "grpc_method", "grpc_code"], registry=r)
        self.duration = Histogram("shallowmark_rpc_duration_seconds",
                                  "RPC latency from arrival (waiting for a handler thread included) to its end.",
                                  ["grpc_service", "grpc_method"], buckets=RPC_BUCKETS, registry=r)
        self.in_flight = Gauge("shallowmark_rpc_in_flight", "RPCs being handled now.",
                               ["grpc_service", "grpc_method"], registry=r)
        self.ledger_records = Counter("shallowmark_ledger_records",
                                      "Embeds appended to the ledger by this process (retries recorded once).",
                                      registry=r)
        Gauge("shallowmark_build_info", "The server's version (always 1).", ["version"],
              registry=r).labels(shallowmark.__version__).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._state = _StateCollector(config)
        r.register(self._state)
        # Series of every Watermark RPC exist from the start at 0, so rates and alerts have a base.
        for m in _WATERMARK.methods:
            self.duration.labels(_WATERMARK.full_name, m.name)
            self.in_flight.labels(_WATERMARK.full_name, m.name)
            self.requests.labels(_WATERMARK.full_name, m.name, grpc.StatusCode.OK.name)
        self.interceptor = CallObserver(self)

    def watch(self, *, pool: Any = None, admission: Any = None, streams: Any = None) -> None:
        """Report the state of these (a ``ModelPool``, an ``Admission``, a ``StreamLimitInterceptor``)."""
        if pool is not None:
            self._state.pool = pool
        if admission is not None:
            self._state.admission = admission
        if streams is not None:
            self._state.streams = streams

    def counting(self, ledger: Any) -> Any:
        """``ledger`` as the servicer should see it: the same object, its appended records counted."""
        return _CountedLedger(ledger, self.ledger_records)


class _CountedLedger:
    """A ledger whose ``record`` counts what it appends; everything else is the ledger's own."""

    def __init__(self, ledger: Any, counter: Counter):
        self._ledger, self._counter = ledger, counter

    def record(self, *args: Any, **kwargs: Any) -> bool:
        appended = self._ledger.record(*args, **kwargs)
        if appended:  # False: a retry of an embed already recorded
            self._counter.inc()
        return appended

    def __getattr__(self, name: str) -> Any:
        if name in ("_ledger", "_counter"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._ledger, name)


# -- the call observer ------------------------------------------------------------------------------


def _ended_code(context, raised: bool) -> grpc.StatusCode:
    """The status a call ends with, as the handler left it: an abort's code, else OK after a return or
    UNKNOWN after an exception (what gRPC sends then), or CANCELLED if the caller is gone."""
    code = context.code()
    if code is not None:
        return code
    if not context.is_active():
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK


def _tag(context, rid: str) -> None:
    """Add ``x-request-id`` to the trailing metadata, keeping what the handler set (retry-after-ms)."""
    md = tuple(context.trailing_metadata() or ())
    if not any(k == REQUEST_ID_HEADER for k, _ in md):
        context.set_trailing_metadata(md + ((REQUEST_ID_HEADER, rid),))


class CallObserver(grpc.ServerInterceptor):
    """Request id, metrics and (for calls the servicer does not log) the access line of every call.

    Put it first among the server's interceptors, so it sees the calls the token check refuses.
    Health checks and reflection are logged at DEBUG, everything else at INFO; a call the
    Watermark servicer handled has its access line from the servicer already (with the method,
    model and key fields), so this logs only the others (UNAUTHENTICATED ones above all).
    """

    def __init__(self, metrics: Metrics, quiet_prefixes: tuple[str, ...] = STREAM_PREFIXES):
        self._m = metrics
        self._quiet = quiet_prefixes
        self._series: dict[tuple[str, str], tuple[Any, Any]] = {}

    def _children(self, service: str, method: str) -> tuple[Any, Any]:
        s = self._series.get((service, method))
        if s is None:  # only registered methods get here, so this stays as small as the services
            s = self._series[(service, method)] = (self._m.duration.labels(service, method),
                                                   self._m.in_flight.labels(service, method))
        return s

    def intercept_service(self, continuation, handler_call_details):
        # This runs on gRPC's polling thread, once per call, before a handler thread is free: the
        # arrival time is taken here, the rest waits for the handler.
        arrived = time.monotonic()
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        path = handler_call_details.method or ""
        service, _, method = path.lstrip("/").rpartition("/")
        rid = caller_request_id(handler_call_details.invocation_metadata) or new_request_id()
        duration, in_flight = self._children(service, method)
        level = logging.DEBUG if path.startswith(self._quiet) else logging.INFO
        requests = self._m.requests
        streaming_out = handler.response_streaming
        kind = ("stream_stream" if handler.request_streaming else "unary_stream") if streaming_out else \
            ("stream_unary" if handler.request_streaming else "unary_unary")
        behavior = getattr(handler, kind)

        def observed(request_or_iterator, context):
            call = CallContext(request_id=rid, rpc=method)
            lock, done = threading.Lock(), [False]

            def finish(code: grpc.StatusCode) -> None:
                with lock:  # once, whichever of the handler's end and the call's end comes first
                    if done[0]:
                        return
                    done[0] = True
                elapsed = time.monotonic() - arrived
                _tag(context, rid)
                in_flight.dec()
                duration.observe(elapsed)
                requests.labels(service, method, code.name).inc()
                if not call.logged:
                    access_log(method, rid, None, code.name, 1000 * elapsed, level=level)

            in_flight.inc()
            _tag(context, rid)
            with bind_call(call):
                try:
                    result = behavior(request_or_iterator, context)
                except BaseException:
                    finish(_ended_code(context, raised=True))
                    raise
                if not streaming_out:
                    finish(_ended_code(context, raised=False))
                    return result
            # a response stream runs after this returns, as gRPC drains it; a stream it drops
            # unstarted never runs its body, so the call's end counts it too
            if not context.add_callback(lambda: finish(context.code() or grpc.StatusCode.CANCELLED)):
                finish(context.code() or grpc.StatusCode.CANCELLED)  # the call had already ended
            return _observed_stream(result, context, finish)

        return getattr(grpc, f"{kind}_rpc_method_handler")(
            observed, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _observed_stream(responses, context, finish: Callable[[grpc.StatusCode], None]):
    try:
        yield from responses
    except GeneratorExit:  # gRPC stopped reading: the caller cancelled
        finish(grpc.StatusCode.CANCELLED)
        raise
    except BaseException:
        finish(_ended_code(context, raised=True))
        raise
    finish(_ended_code(context, raised=False))


# -- the HTTP endpoint ------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    #: a client that connects and sends nothing frees its thread after this many seconds
    timeout = 10

    def log_message(self, format, *args):  # noqa: A002 - wsgiref's signature
        """No line per scrape on stderr."""


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host up in DNS (socket.getfqdn), which can stall the
        # server's start on a machine without working DNS; the name only fills SERVER_NAME.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()


def _only_metrics(app: Callable) -> Callable:
    def route(environ, start_response):
        if environ.get("PATH_INFO") == METRICS_PATH:
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found: the metrics are at {METRICS_PATH}\n".encode()]

    return route


class MetricsExporter:
    """``GET /metrics`` of ``registry`` over plain HTTP on ``host:port``.

    The socket is bound here (``port=0`` picks a free port; read it back from :attr:`port`), so a
    port in use fails at construction like the gRPC port does; :meth:`start` serves it on a daemon
    thread, :meth:`stop` closes it.

    Raises:
        InvalidParameterError: the address cannot be bound.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            family = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server_class = type("_MetricsServer", (_Server,), {"address_family": family})
            self._httpd = make_server(bare, port, _only_metrics(make_wsgi_app(registry)), server_class=server_class,
                                      handler_class=_QuietHandler)
        except OSError as e:
            raise InvalidParameterError(f"cannot listen for metrics on {host}:{port}: {e}") from None
        self.host = bare
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self._httpd.server_port)

    @property
    def url(self) -> str:
        """``http://host:port/metrics`` (a wildcard host shown as loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}{METRICS_PATH}"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name="metrics-http", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (also when never started)."""
        if self._thread is not None:
            self._httpd.shutdown()  # returns once serve_forever has; it never returns unstarted
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()
