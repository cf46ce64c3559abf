"""Build, start and stop the gRPC server.

Lifecycle of :class:`ServerApp`:

1. construction opens the ledger and the attestation key and binds the port (``port=0`` picks a
   free one; read it back from ``app.port``);
2. :meth:`ServerApp.start` starts serving at once with health ``NOT_SERVING`` and loads the models
   in a background thread; calls that need a model answer UNAVAILABLE until it is loaded; then
   health turns ``SERVING``;
3. :meth:`ServerApp.stop` (SIGTERM/SIGINT under :func:`serve`) turns health ``NOT_SERVING`` (for
   ``Watch`` streams), refuses new calls with UNAVAILABLE (health checks included, so readiness
   probes fail and load balancers stop sending), lets in-flight calls finish for ``grace_s``
   seconds, then cancels the rest, and returns within :data:`STOP_SLACK_S` after that whatever
   is still open (a stream whose handler does not end on cancellation must not hold SIGTERM up).

Admission control (:mod:`shallowmark.server.admission`): at most ``workers`` Watermark calls in
flight, each on its own handler thread; the pool has ``max_streams`` and a few spare threads more,
so health checks and refusals never wait behind model work, and ``maximum_concurrent_rpcs`` makes
gRPC itself refuse (RESOURCE_EXHAUSTED) what would otherwise queue without bound.

Health (``grpc.health.v1.Health``, service names ``""`` and ``shallowmark.v1.Watermark``) and
reflection need no token. The first call that meets a corrupt ledger (``LedgerIntegrityError``, answered
DATA_LOSS) turns health ``NOT_SERVING`` for good, logged once at ERROR: a load balancer then stops sending
here, while the calls that reach this server still get DATA_LOSS (not UNAVAILABLE, which clients retry)
until the operator restores the ledger and restarts it. ``grpc.max_receive_message_length`` and ``max_send_message_length``
are set to ``max_message_bytes``.

Observability (:mod:`shallowmark.server.metrics`, :mod:`shallowmark.server.logs`): every call gets a
request id and is counted and timed by the first interceptor; with ``metrics_port`` set, the
server's own registry is served as ``GET /metrics`` on that port, bound at construction like the
gRPC port (``metrics_port=0`` picks a free one: ``app.metrics_port``), closed by :meth:`stop`.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shallowmark._proto.shallowmark.v1 import watermark_pb2 as pb
from shallowmark.errors import InvalidParameterError
from shallowmark.server.admission import StreamLimitInterceptor, handler_threads, max_concurrent_rpcs
from shallowmark.server.attestation import Signer
from shallowmark.server.auth import BearerAuthInterceptor
from shallowmark.server.config import ServerConfig
from shallowmark.server.ledger import open_ledger
from shallowmark.server.logs import install_filter
from shallowmark.server.metrics import Metrics, MetricsExporter
from shallowmark.server.servicer import ModelPool, WatermarkServicer, add_to_server

__all__ = ["ServerApp", "serve", "SERVICE_NAME"]

log = logging.getLogger("shallowmark.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Watermark"].full_name  # "shallowmark.v1.Watermark"


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidParameterError(f"cannot read the TLS {what} {path}: {e}") from None


class ServerApp:
    """One shallowmark gRPC server.

    Args:
        config: the :class:`ServerConfig`.
        backend_loader: ``f(name, **options) -> backend`` (tests inject one; default ``load_backend``).
        signer: the attestation signer (default: loaded or created at ``config.resolved_attestation_key()``).

    Raises:
        InvalidParameterError: unreadable TLS files, or the address cannot be bound.
        LedgerError, KeystoreError: the ledger or the attestation key cannot be opened.
        LedgerIntegrityError: the ledger is corrupt, or holds fewer or other records than were
            acknowledged (see :mod:`shallowmark.server.ledger`); the server is not started on it.
    """

    def __init__(self, config: ServerConfig, *, backend_loader: Callable[..., Any] | None = None,
                 signer: Signer | None = None):
        self.config = config
        self.ledger = open_ledger(config.resolved_ledger_url(), head_file=config.resolved_ledger_head_file())
        self.signer = signer or Signer.load_or_create(config.resolved_attestation_key())
        self.pool = ModelPool(config, backend_loader)
        self.health = health.HealthServicer()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # two servers must not silently share a port
        ]
        self.streams = StreamLimitInterceptor(config.max_streams)
        install_filter()
        self.metrics = Metrics(config)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=handler_threads(config), thread_name_prefix="rpc"),
            # the observer first: it must see (count, log) the calls the token check refuses
            interceptors=[self.metrics.interceptor, BearerAuthInterceptor(config.token_digests()), self.streams],
            options=options, maximum_concurrent_rpcs=max_concurrent_rpcs(config))
        self.servicer = WatermarkServicer(config, self.pool, self.metrics.counting(self.ledger), self.signer)
        self.metrics.watch(pool=self.pool, admission=self.servicer.admission, streams=self.streams)
        self.servicer.on_data_loss = self._ledger_corrupt
        add_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server)
        try:
            if config.tls is None:
                self.port = self.server.add_insecure_port(config.address)
            else:
                ca = _read(config.tls.client_ca, "client CA")
                creds = grpc.ssl_server_credentials(
                    [(_read(config.tls.key, "key"), _read(config.tls.cert, "certificate"))],
                    root_certificates=ca, require_client_auth=ca is not None)
                self.port = self.server.add_secure_port(config.address, creds)
        except RuntimeError as e:
            raise InvalidParameterError(f"cannot listen on {config.address}: {e}") from None
        if not self.port:
            raise InvalidParameterError(f"cannot listen on {config.address} (in use, or not a local address)")
        self.metrics_exporter = (None if config.metrics_port is None else
                                 MetricsExporter(self.metrics.registry, config.metrics_host, config.metrics_port))
        self._loader_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        # the model loader's SERVING and a corrupt ledger's NOT_SERVING may race; the fault must win
        self._health_lock = threading.Lock()
        self.ledger_fault: str | None = None

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    @property
    def address(self) -> str:
        """``host:port`` actually bound (useful with ``port=0``)."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        """The metrics port actually bound (useful with ``metrics_port=0``); ``None`` when metrics are off."""
        return self.metrics_exporter.port if self.metrics_exporter is not None else None

    def start(self, *, load_models: bool = True) -> "ServerApp":
        """Start serving (health NOT_SERVING); load the models in the background unless told not to."""
        self.server.start()
        log.info("listening on %s (%s)", self.address, "TLS" if self.config.tls else "plaintext")
        if self.metrics_exporter is not None:
            self.metrics_exporter.start()
            log.info("metrics on %s", self.metrics_exporter.url)
        if self.config.plaintext_off_loopback:
            log.warning("serving plaintext on the non-loopback host %s (allow_insecure = true): tokens, keys and "
                        "images are unencrypted on the network unless a TLS proxy sits in front", self.config.host)
        if load_models:
            self._loader_thread = threading.Thread(target=self.load_models, name="model-loader", daemon=True)
            self._loader_thread.start()
        return self

    def load_models(self) -> bool:
        """Load every model (blocking); health turns SERVING if all loaded. Returns that."""
        self.pool.load_all()
        with self._health_lock:
            ready = self.pool.ready and not self._stopped.is_set() and self.ledger_fault is None
            if ready:
                self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if ready:
            log.info("ready: serving %s", ", ".join(self.config.models))
        return self.pool.ready

    def _ledger_corrupt(self, rpc: str, request_id: str, error: Exception) -> None:
        """The servicer's ``on_data_loss``: NOT_SERVING and one ERROR line on the first, nothing after."""
        with self._health_lock:
            if self.ledger_fault is not None:
                return
            self.ledger_fault = str(error)
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.error("the ledger failed its integrity check at run time (%s, request %s): %s. Health is now NOT_SERVING "
                  "so that load balancers stop sending here; the calls that still come are answered DATA_LOSS. "
                  "Restore the ledger from a backup and restart the server", rpc, request_id, error)

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        """Block until the background model load finishes; True if every model loaded."""
        if self._loader_thread is not None:
            self._loader_thread.join(timeout)
        return self.pool.ready

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse new calls, wait up to ``grace`` s (default ``grace_s``)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.config.grace_s if grace is None else grace
        log.info("stopping: draining in-flight calls for up to %.0f s", grace)
        # gRPC cancels what is left after grace, but its event waits for every handler thread to
        # return; one that ignores the cancellation (seen with a reflection stream fed garbage)
        # would hold the drain forever. The threads are the pool's; the process can exit past them.
        if not self.server.stop(grace).wait(grace + STOP_SLACK_S):
            log.warning("stopped with calls still open %.0f s after the grace period; not waiting for them",
                        STOP_SLACK_S)
        self.pool.close()
        if self.metrics_exporter is not None:
            self.metrics_exporter.stop()
        self.ledger.close()
        log.info("stopped")

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()


#: Longest wait after the grace period for the calls gRPC cancelled to end (see ServerApp.stop).
STOP_SLACK_S = 5.0

#: Longest wait at exit for a model load that was still running when the server stopped.
_LOADER_JOIN_S = 300.0


def serve(config: ServerConfig, *, on_ready: Callable[[ServerApp], None] | None = None) -> None:
    """Run a server in the foreground until SIGTERM or SIGINT, then drain for ``grace_s`` seconds.

    Must be called from the main thread (it installs the signal handlers).
    """
    app = ServerApp(config)
    drain: list[threading.Thread] = []

    def _terminate(signum, frame):
        log.info("received %s", signal.Signals(signum).name)
        if not drain:  # a second signal does not start a second drain
            drain.append(threading.Thread(target=app.stop, name="drain"))
            drain[0].start()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    app.start()
    if on_ready is not None:
        on_ready(app)
    app.wait()
    for t in drain:
        t.join()
    # A stop while the models still load: let the loader finish before the interpreter exits. It is
    # a daemon thread inside torch's native code, and killing it there at shutdown aborts the process
    # (seen as SIGABRT instead of exit 0 when SIGTERM came during loading on a busy machine).
    loader = app._loader_thread
    if loader is not None and loader.is_alive():
        log.info("waiting for the model loader to finish before exiting")
        loader.join(_LOADER_JOIN_S)
