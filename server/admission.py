"""Admission control: which calls the server takes on, decided on arrival, before any work.

Without it, gRPC queues every call in front of its handler threads: a burst of 200 Verify calls
waited there for up to a minute (145 of them until their deadline passed, and each still ran
afterwards), the model-job bound ``max_queue`` behind that queue never fired, and health checks
waited in the same queue (9 to 11 s under load). So:

- :class:`Admission` counts Watermark calls in flight. A call is admitted at the top of its handler
  (:func:`shallowmark.server.servicer._rpc`), before its image is decoded or a model job queued, if
  its tenant is within its rate (a token bucket) and its ``max_in_flight``, and fewer than
  ``workers`` calls are in flight; otherwise it is refused with RESOURCE_EXHAUSTED. A call whose
  client cancelled or whose deadline passed while it waited for a thread is dropped there too.
- the handler pool has a thread for every admitted call plus :data:`SPARE_THREADS` for health
  checks and refusals and ``max_streams`` for streams (:func:`handler_threads`), so the admission
  check itself never waits behind admitted work.
- :class:`StreamLimitInterceptor` bounds the streams that need no token (reflection, health
  ``Watch``): each holds a handler thread while open, and unbounded they could take the threads
  health checks need. It also ends a stream whose message does not parse with INVALID_ARGUMENT:
  left to gRPC (1.85), such a message aborts the call but leaves its handler thread waiting for
  the next message forever, so a client sending garbage leaked a thread per stream, and
  ``server.stop()`` then waited for those threads without end.
- ``grpc.server(maximum_concurrent_rpcs=...)`` (:func:`max_concurrent_rpcs`) is the backstop: gRPC
  itself answers RESOURCE_EXHAUSTED, without a thread, once that many calls (running or queued for a
  thread) are active, so even a flood of refusals cannot queue without bound.

Every refusal is RESOURCE_EXHAUSTED with a message naming the limit (:class:`ServerBusy`,
:class:`TenantRateLimited`, :class:`TenantBusy`); clients retry with backoff. Each limit counts its
refusals by reason, under the lock that decided them (:meth:`Admission.refusals`,
:attr:`StreamLimitInterceptor.refused`), for the server's metrics.
"""

from __future__ import annotations

import collections
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import grpc

from shallowmark.server.config import ServerConfig, TenantLimits
from shallowmark.server.errors import ServerBusy, TenantBusy, TenantRateLimited

__all__ = ["Admission", "StreamLimitInterceptor", "handler_threads", "max_concurrent_rpcs", "SPARE_THREADS",
           "STREAM_PREFIXES", "REFUSAL_REASONS"]

#: Why a call was refused with RESOURCE_EXHAUSTED, by the setting that refused it (the ``reason``
#: label of ``shallowmark_refusals_total``): ``workers`` calls in flight, ``max_queue`` model jobs,
#: the tenant's ``tenant_limits`` rate or max_in_flight, ``max_streams`` open streams.
REFUSAL_REASONS = ("workers", "max_queue", "tenant_rate", "tenant_max_in_flight", "max_streams")

#: Handler threads beyond the admitted calls and the streams: health checks, refusals and
#: unauthenticated calls run there, each in well under a millisecond.
SPARE_THREADS = 4

#: Calls that may be active at once beyond the handler threads (queued for one) before gRPC refuses
#: new ones itself. Refusals take well under a millisecond each, so a full backlog drains in tens of
#: milliseconds; beyond it a health check can be refused too, which is the right answer in a flood.
BACKLOG = 256

#: Services whose streaming calls :class:`StreamLimitInterceptor` bounds (they need no token).
STREAM_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def handler_threads(config: ServerConfig) -> int:
    """Size of the gRPC handler pool: every admitted call, every stream, and the spare threads."""
    return config.workers + config.max_streams + SPARE_THREADS


def max_concurrent_rpcs(config: ServerConfig) -> int:
    """``maximum_concurrent_rpcs`` for ``grpc.server``: the handler threads plus :data:`BACKLOG`."""
    return handler_threads(config) + BACKLOG


class _Bucket:
    """A token bucket: ``rate`` tokens per second, at most ``size`` held."""

    def __init__(self, rate: float, size: int, now: float):
        self.rate, self.size, self.tokens, self.at = rate, size, float(size), now

    def take(self, now: float) -> float:
        """Take a token and return 0, or return the seconds until one is there (nothing taken)."""
        self.tokens = min(float(self.size), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Admission:
    """Counts Watermark calls in flight, overall and per tenant, and refuses those beyond the limits.

    Args:
        config: ``workers`` (calls in flight at once) and ``tenant_limits``.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self._clock = config, clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._by_tenant: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._refused: collections.Counter[str] = collections.Counter()

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet finished."""
        return self._in_flight

    @contextmanager
    def admit(self, tenant: str | None) -> Iterator[None]:
        """Count one call of ``tenant`` while the block runs, or refuse it.

        The tenant's own limits are checked first, so a tenant over its share is told so rather
        than that the server is busy; a refused call takes no token from its bucket.

        Raises:
            TenantRateLimited: the tenant's bucket is empty (the message says when to retry).
            TenantBusy: the tenant has its ``max_in_flight`` calls in flight.
            ServerBusy: ``workers`` calls are in flight.
        """
        name = tenant or ""
        lim = self.config.limits_for(tenant)
        with self._lock:
            mine = self._by_tenant.get(name, 0)
            if lim is not None and lim.max_in_flight and mine >= lim.max_in_flight:
                self._refused["tenant_max_in_flight"] += 1
                raise TenantBusy(f"tenant {name!r} already has {mine} calls in flight, its limit (tenant_limits "
                                 f"max_in_flight = {lim.max_in_flight}); wait for one to finish, or ask the "
                                 "operator for a higher limit")
            if self._in_flight >= self.config.workers:
                self._refused["workers"] += 1
                raise ServerBusy(f"the server is busy: {self._in_flight} calls in flight, its limit (workers = "
                                 f"{self.config.workers}); retry with backoff or on another replica")
            if lim is not None and lim.rate:
                self._take(name, lim)
            self._in_flight += 1
            self._by_tenant[name] = mine + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                left = self._by_tenant[name] - 1
                if left:
                    self._by_tenant[name] = left
                else:
                    del self._by_tenant[name]

    def refusals(self) -> dict[str, int]:
        """Calls refused so far, by reason (``workers``, ``tenant_rate``, ``tenant_max_in_flight``)."""
        with self._lock:
            return dict(self._refused)

    def _take(self, name: str, lim: TenantLimits) -> None:
        now = self._clock()
        bucket = self._buckets.get(name)
        if bucket is None or bucket.rate != lim.rate or bucket.size != lim.bucket:
            bucket = self._buckets[name] = _Bucket(lim.rate, lim.bucket, now)
        wait = bucket.take(now)
        if wait:
            self._refused["tenant_rate"] += 1
            raise TenantRateLimited(f"tenant {name!r} is over its rate limit (tenant_limits rate = {lim.rate:g} "
                                    f"requests/s, burst = {lim.bucket}); retry in {max(wait, 0.001):.3f} s",
                                    retry_after_s=max(wait, 0.001))


class _Garbage:
    """What the lenient deserializer hands on for bytes that are not the stream's message."""

    def __init__(self, reason: str):
        self.reason = reason


def _lenient(deserializer):
    def parse(data: bytes):
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, UnicodeDecodeError: the client's bytes
            return _Garbage(str(e).split("': ", 1)[-1] or type(e).__name__)

    return parse


def _checked(requests, context, method: str):
    """The request stream, ending the call with INVALID_ARGUMENT at the first unparsable message."""
    for r in requests:
        if isinstance(r, _Garbage):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"a message on this stream is not a valid request of {method} ({r.reason}); "
                          "send messages built with the service's generated stubs")
        yield r


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """Refuse a streaming call of :data:`STREAM_PREFIXES` with RESOURCE_EXHAUSTED once ``limit``
    such streams are open (each holds a handler thread while open), and end one with
    INVALID_ARGUMENT at its first unparsable message (see the module docstring)."""

    def __init__(self, limit: int, prefixes: tuple[str, ...] = STREAM_PREFIXES):
        self.limit, self._prefixes = int(limit), prefixes
        self._lock = threading.Lock()
        self._open = 0
        #: streams refused so far because ``limit`` were open
        self.refused = 0

    @property
    def open_streams(self) -> int:
        return self._open

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(self._prefixes) or \
                not (handler.request_streaming or handler.response_streaming):
            return handler
        kind = "stream_stream" if handler.request_streaming and handler.response_streaming else \
            "stream_unary" if handler.request_streaming else "unary_stream"
        behavior = getattr(handler, kind)
        limiter = self

        def bounded(request_or_iterator, context):
            with limiter._lock:
                full = limiter._open >= limiter.limit
                if full:
                    limiter.refused += 1
                else:
                    limiter._open += 1
            if full:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{limiter.limit} reflection / health Watch streams are already open on this server, "
                              "its limit (max_streams); close one, or use health Check instead of Watch")
            held = [True]

            def release():  # once, whichever of the call's end and an error comes first
                with limiter._lock:
                    if held[0]:
                        held[0] = False
                        limiter._open -= 1

            # a response stream is a generator that gRPC drains after this returns: count the stream
            # until the call ends, not until this function returns
            context.add_callback(release)
            if handler.request_streaming:
                request_or_iterator = _checked(request_or_iterator, context, method)
            try:
                result = behavior(request_or_iterator, context)
            except BaseException:
                release()
                raise
            if kind == "stream_unary":
                release()
            return result

        return getattr(grpc, f"{kind}_rpc_method_handler")(
            bounded, request_deserializer=_lenient(handler.request_deserializer) if handler.request_streaming
            else handler.request_deserializer, response_serializer=handler.response_serializer)
