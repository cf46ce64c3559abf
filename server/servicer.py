"""The ``shallowmark.v1.Watermark`` servicer and the models it runs on.

:class:`ModelPool` loads the configured backends and their watermark methods, admits model jobs
(a bounded queue, one job at a time per model, a deadline check before each job) and learns how
long a model evaluation takes. :class:`WatermarkServicer` turns requests into jobs.

Errors become status codes in one place (:func:`_rpc`):

============================================================  ===================
InvalidImageError, InvalidParameterError, InvalidShapeError,   INVALID_ARGUMENT
UnknownNameError, KeyMaterialError,
MalformedRequest (bytes that are not the RPC's message)
PermissionDenied (another tenant's data)                       PERMISSION_DENIED
QueueFull, ServerBusy (``workers`` calls in flight),           RESOURCE_EXHAUSTED
TenantRateLimited, TenantBusy (the tenant's tenant_limits)
ModelNotReady (loading / failed to load), LedgerError          UNAVAILABLE
LedgerIntegrityError (the ledger is corrupt; not retried)      DATA_LOSS
DeadlineTooShort (checked before a model job starts)           DEADLINE_EXCEEDED
CallEnded (the caller left before the work started)            CANCELLED or DEADLINE_EXCEEDED
MissingDependencyError (an extra the method needs),            FAILED_PRECONDITION
RecordedConfigUnsupported (a key's recorded configuration)
anything else (a bug; logged with its traceback)               INTERNAL
============================================================  ===================

Every call passes admission control first (:mod:`shallowmark.server.admission`): a call beyond
``workers`` in flight or its tenant's limits, or whose caller already left, is answered before
any decoding or model work.

Every message is kept under :data:`_DETAILS_MAX_BYTES`: the messages cut what they repeat of the
caller's input (:func:`shallowmark.errors.shown`), and :func:`_rpc` cuts whatever is still longer.

The service is registered with :func:`add_to_server`, not the generated
``add_WatermarkServicer_to_server``: its request deserializers turn undecodable bytes into
INVALID_ARGUMENT instead of gRPC's INTERNAL "Exception deserializing request!".

Logs carry the request id, tenant, RPC, method, model, key ids, duration and status; never key
material, tokens, prompts or images. The request id is the one the call observer gave the call
(:mod:`shallowmark.server.logs`); a caller's ``x-request-id`` that is not sane is refused here,
because the ledger keys an Embed's retries on it.

Model work goes through :meth:`ModelPool.run_jobs`: with ``batching`` on (the default),
concurrent Verify calls and Embed-generate calls for the same model and method run as one batched
model call (:mod:`shallowmark.server.batching`); ``ModelPool.stats()`` counts jobs and model calls.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError

import shallowmark
from shallowmark._proto.shallowmark.v1 import watermark_pb2 as pb
from shallowmark._proto.shallowmark.v1 import watermark_pb2_grpc as pb_grpc
from shallowmark.errors import (
    InvalidImageError,
    InvalidParameterError,
    InvalidShapeError,
    KeyMaterialError,
    MissingDependencyError,
    UnknownNameError,
    shown,
)
from shallowmark.imaging import encode_png
from shallowmark.keys import KeyFamily, check_key_id, keys_searched
from shallowmark.server import validation
from shallowmark.server.admission import Admission
from shallowmark.server.attestation import Signer, config_json, config_sha256, verify_payload
from shallowmark.server.auth import current_tenant
from shallowmark.server.batching import (
    BatchJob,
    BatchStats,
    FairLock,
    MicroBatcher,
    check_deadline,
    generate_batch,
    normalise_time_left,
    run_isolated,
    vae_view,
    verify_batch,
)
from shallowmark.server.config import ServerConfig
from shallowmark.server.errors import (
    CallEnded,
    DeadlineTooShort,
    MalformedRequest,
    ModelNotReady,
    PermissionDenied,
    QueueFull,
    RecordedConfigUnsupported,
    ServerBusy,
    TenantBusy,
    TenantRateLimited,
)
from shallowmark.server.ledger import LedgerError, LedgerIntegrityError
from shallowmark.server.logs import access_log, current_request_id

__all__ = ["ModelPool", "WatermarkServicer", "add_to_server", "ModelNotReady", "QueueFull", "DeadlineTooShort",
           "PermissionDenied"]

log = logging.getLogger("shallowmark.server")

#: How often a call waiting for the model lock checks whether its caller is still there.
_POLL_S = 0.05

#: Smallest p-value used for ``KeyVerdict.score = -log10(p)``, so the score stays finite (<= 300).
_P_FLOOR = 1e-300


# -- models ----------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """One backend and the methods built on it. ``lock`` serializes its jobs, batched or not, in the
    order they asked for the model (a :class:`FairLock`: a plain lock let uploads starve)."""

    name: str
    backend: Any
    methods: dict[str, Any]
    available: tuple[str, ...]
    sec_per_eval: float
    lock: FairLock = field(default_factory=FairLock)
    #: methods built under the configurations ledger records name (ModelPool.method_as_embedded)
    recorded: dict[tuple[str, str | None], Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.backend.image_size)


class ModelPool:
    """The server's models: loading, job admission and cost estimates.

    Args:
        config: the server configuration (models, device, method options, max_queue).
        backend_loader: ``f(name, **options) -> backend``; defaults to ``load_backend``.
    """

    def __init__(self, config: ServerConfig, backend_loader: Callable[..., Any] | None = None):
        self.config = config
        self._loader = backend_loader
        self._models: dict[str, LoadedModel] = {}
        self._errors: dict[str, str] = {}
        self._state_lock = threading.Lock()
        self._pending = 0
        self.queue_refusals = 0  # requests refused because max_queue jobs were waiting (for the metrics)
        self._batchers: dict[str, MicroBatcher] = {}
        self._closed = False
        self.batch_stats = BatchStats()

    # -- loading ---------------------------------------------------------------------------------
    def load_all(self) -> None:
        """Load every configured model (blocking). A model that fails stays unavailable with its error logged."""
        for name in self.config.models:
            try:
                self._models[name] = self._load(name)
                log.info("model %s loaded (%.3f s per model evaluation)", name, self._models[name].sec_per_eval)
            except Exception as e:  # noqa: BLE001 - reported through ModelNotReady and the log
                self._errors[name] = f"{type(e).__name__}: {e}"
                log.exception("model %s failed to load", name)

    def _load(self, name: str) -> LoadedModel:
        from shallowmark.core.watermarks import latent_method_names, load_method
        from shallowmark.methods import POST_HOC, method_names, method_spec

        loader = self._loader
        if loader is None:
            from shallowmark.core.backends import load_backend as loader
        options = dict(self.config.model_options.get(name, {}))
        options.setdefault("device", self.config.device)
        backend = vae_view(loader(name, **options), self.config.vae_batch, options["device"])
        # latent methods are built now (they share the backend); post-hoc ones on first use, where
        # the packages they need are installed
        methods = {m: load_method(m, backend, **dict(self.config.method_options.get(m, {})))
                   for m in latent_method_names()}
        available = tuple(latent_method_names()) + tuple(
            m for m in method_names() if method_spec(m).kind == POST_HOC and method_spec(m).available)
        return LoadedModel(name=name, backend=backend, methods=methods, available=available,
                           sec_per_eval=_time_one_eval(backend))

    @property
    def ready(self) -> bool:
        """True when every configured model is loaded."""
        return all(n in self._models for n in self.config.models)

    def status(self) -> list[tuple[str, LoadedModel | None]]:
        return [(n, self._models.get(n)) for n in self.config.models]

    def get(self, name: str) -> LoadedModel:
        """The loaded model ``name`` ("" = the default).

        Raises:
            UnknownNameError: not a model this server serves.
            ModelNotReady: still loading, or failed to load.
        """
        name = name or self.config.default_model
        if name not in self.config.models:
            raise UnknownNameError("model", name, self.config.models)
        lm = self._models.get(name)
        if lm is None:
            if name in self._errors:
                raise ModelNotReady(f"model {name} failed to load on this server; contact its operator")
            raise ModelNotReady(f"model {name} is still loading; retry in a few seconds")
        return lm

    def method(self, lm: LoadedModel, name: str) -> Any:
        """The method ``name`` on ``lm`` (built on first use for the post-hoc methods).

        Raises:
            UnknownNameError: not available on this server (the message lists the available ones).
        """
        if name not in lm.available:
            raise UnknownNameError(f"method on this server (model {lm.name})", name, lm.available)
        m = lm.methods.get(name)
        if m is None:
            from shallowmark.core.watermarks import load_method

            m = load_method(name, lm.backend, **dict(self.config.method_options.get(name, {})))
            lm.methods[name] = m
        return m

    def method_as_embedded(self, lm: LoadedModel, name: str, sha: str | None, config: str | None) -> Any:
        """The method ``name`` on ``lm`` as a ledger record says it embedded: under the configuration
        ``config`` (canonical JSON, :func:`config_json`) with digest ``sha``, or, for a record made
        before configurations were recorded (both None), under the method's
        ``unrecorded_options`` (its defaults then) with this server's options for it on top.
        Built once per configuration and model, and the server's own method when it is that one.

        Raises:
            UnknownNameError: as :meth:`method`.
            RecordedConfigUnsupported: this version cannot build that configuration.
        """
        with self._state_lock:
            m = lm.recorded.get((name, sha))
        if m is not None:
            return m
        current = self.method(lm, name)
        if sha is not None and sha == config_sha256(current.effective_config()):
            m = current
        else:
            from shallowmark.core.watermarks import load_method

            if sha is None:
                options = {**type(current).unrecorded_options, **dict(self.config.method_options.get(name, {}))}
            else:
                # every option as recorded; one a later version added takes its default
                options = json.loads(config)
            try:
                m = load_method(name, lm.backend, **options)
            except InvalidParameterError as e:
                raise RecordedConfigUnsupported(
                    f"this key was embedded with {name} under a configuration ({(sha or 'unrecorded')[:16]}) that "
                    f"this server version cannot build ({e}); verify on a server of the version that embedded "
                    "it") from None
        with self._state_lock:
            return lm.recorded.setdefault((name, sha), m)

    # -- jobs ------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Requests with model jobs waiting or running (what ``max_queue`` bounds)."""
        return self._pending

    @contextmanager
    def _admitted(self):
        """Count one request against ``max_queue`` while it waits or runs."""
        with self._state_lock:
            if self._closed:
                raise ModelNotReady("the server is shutting down; retry on another instance")
            if self._pending >= self.config.max_queue:
                self.queue_refusals += 1
                raise QueueFull(f"the server is busy ({self._pending} model jobs queued); retry with backoff")
            self._pending += 1
        try:
            yield
        finally:
            with self._state_lock:
                self._pending -= 1

    @contextmanager
    def _locked(self, lm: LoadedModel, evals: int, what: str, time_left: Callable[[], float | None],
                alive: Callable[[], bool]):
        """Hold the model's lock for one unbatched job, checking the deadline before and after waiting,
        and dropping the job if its caller leaves while it waits (nobody would read the result)."""
        need = evals * lm.sec_per_eval
        left = time_left()
        check_deadline(left, need, evals, what, lm)
        # In line for the model behind the batches and jobs that asked first (FairLock: FIFO), checking
        # every _POLL_S that the caller is still there; it leaves the line without running otherwise.
        if not lm.lock.acquire(timeout=left, alive=alive, poll_s=_POLL_S):
            if not alive():
                raise CallEnded(f"the caller cancelled this {what} while it waited for the model; dropped",
                                cancelled=True)
            raise DeadlineTooShort(f"the deadline passed while this {what} waited for the model; "
                                   "retry with a longer deadline")
        try:
            if not alive():
                raise CallEnded(f"the caller cancelled this {what} while it waited for the model; dropped",
                                cancelled=True)
            check_deadline(time_left(), evals * lm.sec_per_eval, evals, what, lm)
            t0 = time.monotonic()
            yield
            if evals > 0:
                per = (time.monotonic() - t0) / evals
                lm.sec_per_eval = 0.7 * lm.sec_per_eval + 0.3 * per
        finally:
            lm.lock.release()

    @contextmanager
    def job(self, lm: LoadedModel, evals: int, what: str, time_left: Callable[[], float | None],
            alive: Callable[[], bool] | None = None, key: tuple | None = None):
        """Admit one unbatched model job: queue bound, deadline check, one job at a time per model.

        ``alive()`` (e.g. the RPC context's ``is_active``) says whether the caller still waits; a job
        whose caller left before it started is dropped. ``key`` (operation, method) names the job in
        ``batch_stats``, which counts its evaluations under it.

        Raises:
            QueueFull: ``max_queue`` jobs are already waiting or running.
            DeadlineTooShort: the deadline leaves less than the estimated job time (checked on
                arrival and again when the job would start).
            CallEnded: the caller cancelled while the job waited.
        """
        time_left = normalise_time_left(time_left)
        with self._admitted(), self._locked(lm, evals, what, time_left, alive or _always):
            yield
        self.batch_stats.add(1, key, evals)

    def run_jobs(self, lm: LoadedModel, jobs: list[BatchJob], time_left: Callable[[], float | None],
                 call: Any = None) -> list:
        """Run one request's model jobs (e.g. one per method of a Verify) and return their results.

        With ``config.batching`` the jobs join other requests' jobs of the same key in batches;
        without it they run one after another under the model lock. Either way the request counts
        once against ``max_queue`` and its deadline is checked on arrival and before its work starts.
        ``call`` is the RPC's context (``is_active``, ``add_callback``): when the caller cancels,
        the jobs not started yet are dropped, so abandoned calls cost no model time.

        Raises:
            QueueFull, DeadlineTooShort, ModelNotReady, CallEnded: as for :meth:`job`.
            Exception: the first job's error (from the method), e.g. ``InvalidImageError``.
        """
        alive = call.is_active if call is not None else _always
        time_left = normalise_time_left(time_left)
        evals = sum(j.evals for j in jobs)
        what = jobs[0].what if len(jobs) == 1 else "verify"
        with self._admitted():
            check_deadline(time_left(), evals * lm.sec_per_eval, evals, what, lm)
            if not self.config.batching or self.config.max_batch == 1:
                with self._locked(lm, evals, what, time_left, alive):
                    results = []
                    for j in jobs:
                        results.append(run_isolated(j.run, [j.payload])[0])
                        self.batch_stats.add(1, j.key, j.evals)
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
                return results
            batcher = self._batcher(lm)
            handles = [batcher.submit(j, time_left, alive) for j in jobs]

            def drop() -> None:
                for h in handles:
                    batcher.cancel(h)

            # on cancel, wake this thread and take the jobs out of the queue at once; the callback
            # also runs after a normal end, when the jobs are done and it does nothing
            if call is not None and not call.add_callback(drop):
                drop()  # the call had already ended
            try:
                return [batcher.wait(h) for h in handles]
            finally:
                for h in handles:
                    batcher.cancel(h)

    def _batcher(self, lm: LoadedModel) -> MicroBatcher:
        with self._state_lock:
            b = self._batchers.get(lm.name)
            if b is None:
                b = MicroBatcher(lm, max_batch=self.config.max_batch, max_wait_s=self.config.max_wait_ms / 1000.0,
                                 stats=self.batch_stats)
                self._batchers[lm.name] = b
            return b

    def stats(self) -> dict[str, Any]:
        """Jobs run and model calls made so far (``{"jobs", "batches", "sizes": {size: count}}``)."""
        return self.batch_stats.snapshot()

    def close(self) -> None:
        """Stop the batch dispatchers (after the server stopped); later jobs get UNAVAILABLE."""
        with self._state_lock:
            self._closed = True
            batchers = list(self._batchers.values())
        for b in batchers:
            b.close()


def _always() -> bool:
    return True


def _time_one_eval(backend) -> float:
    """Seconds for one batch-1 denoiser evaluation (a first estimate; jobs refine it)."""
    import torch

    x = torch.zeros((1, *backend.latent_shape), device=backend.device, dtype=backend.dtype)
    cond = backend.encode_prompt([""], 1) if getattr(backend, "conditional", False) else None
    with torch.no_grad():
        backend.eps(x, 500, cond)  # warm-up: first call allocates
        t0 = time.monotonic()
        backend.eps(x, 500, cond)
    return max(time.monotonic() - t0, 1e-4)


# -- the servicer ----------------------------------------------------------------------------------

#: trailer on a RESOURCE_EXHAUSTED that a retry can get past (the server was full, the tenant over
#: a limit): milliseconds to wait, 0 for the client's own backoff (shallowmark.client retries these)
RETRY_AFTER = "retry-after-ms"

_INVALID = (InvalidImageError, InvalidParameterError, InvalidShapeError, UnknownNameError, KeyMaterialError,
            MalformedRequest)

#: Longest status message (UTF-8 bytes). gRPC sends it percent-encoded in the grpc-message trailer,
#: and a trailer beyond the 8 KiB header limit reaches the client as RESOURCE_EXHAUSTED "Stream
#: removed" instead of the error; 1000 bytes stay below that even when every byte is encoded.
_DETAILS_MAX_BYTES = 1000


def _clip(msg: str) -> str:
    """``msg`` cut to :data:`_DETAILS_MAX_BYTES`. The messages already cut what they echo; this is
    for text they quote from elsewhere (Pillow, the database driver)."""
    data = msg.encode("utf-8")
    if len(data) <= _DETAILS_MAX_BYTES:
        return msg
    return data[:_DETAILS_MAX_BYTES - 3].decode("utf-8", "ignore") + "\u2026"


@dataclass(frozen=True)
class _Undecodable:
    """What the request deserializer hands the servicer for bytes that are not the RPC's message.

    Raising in a deserializer would make gRPC answer INTERNAL and log a traceback; this marker lets
    :func:`_rpc` answer INVALID_ARGUMENT through the usual path (status, log line)."""

    message: str  # full name of the expected message type
    reason: str   # protobuf's parse error


def _lenient_deserializer(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except (DecodeError, UnicodeDecodeError) as e:
            # upb says "Error parsing message with type '<name>': <what>"; the name is given apart
            return _Undecodable(message_cls.DESCRIPTOR.full_name, str(e).split("': ", 1)[-1])

    return parse


def add_to_server(servicer: "WatermarkServicer", server: grpc.Server) -> None:
    """Register ``servicer`` on ``server`` as ``add_WatermarkServicer_to_server`` does, with request
    deserializers that hand undecodable bytes to the servicer (see :class:`_Undecodable`)."""
    service = pb.DESCRIPTOR.services_by_name["Watermark"]
    handlers = {}
    for m in service.methods:  # every RPC of the service is unary-unary
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name), request_deserializer=_lenient_deserializer(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _request_id(context) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == "x-request-id":
            return validation.check_request_id(v)
    return current_request_id() or uuid.uuid4().hex  # the id the call observer sends back


def _check_caller_waits(context) -> None:
    """Raise :class:`CallEnded` if the caller cancelled or its deadline passed while this call
    waited for a handler thread: nobody would read the answer, so no work is done for it."""
    left = context.time_remaining()
    if left is not None and left <= 0:
        raise CallEnded("the deadline passed before the server started this call; dropped", cancelled=False)
    if not context.is_active():
        raise CallEnded("the caller cancelled before the server started this call; dropped", cancelled=True)


def _rpc(fn):
    """Run one RPC: request id, tenant, admission, error -> status mapping, one log line."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        t0 = time.monotonic()
        rid, tenant, code, info = current_request_id() or "-", current_tenant(), grpc.StatusCode.OK, {}
        try:
            rid = _request_id(context)
            _check_caller_waits(context)
            # before anything that costs: the request's image is decoded inside fn
            with self.admission.admit(tenant):
                if isinstance(request, _Undecodable):
                    raise MalformedRequest(f"the request bytes are not a valid {request.message} ({request.reason}): "
                                           "send a serialized message whose string fields are UTF-8, built with the "
                                           "stubs generated from protos/shallowmark/v1/watermark.proto")
                return fn(self, request, context, rid, tenant, info)
        except _INVALID as e:
            code, msg = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except PermissionDenied as e:
            code, msg = grpc.StatusCode.PERMISSION_DENIED, str(e)
        except (QueueFull, ServerBusy, TenantRateLimited, TenantBusy) as e:
            code, msg = grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
            # tells a client that this refusal (unlike gRPC's own for an oversized message) passes:
            # retry after this long, or after its own backoff when it is 0
            context.set_trailing_metadata(((RETRY_AFTER, str(round(1000 * getattr(e, "retry_after_s", 0.0)))),))
        except CallEnded as e:
            code = grpc.StatusCode.CANCELLED if e.cancelled else grpc.StatusCode.DEADLINE_EXCEEDED
            msg = str(e)
        except LedgerIntegrityError as e:  # before LedgerError, its base: retrying cannot help
            code, msg = grpc.StatusCode.DATA_LOSS, str(e)
            if self.on_data_loss is not None:
                self.on_data_loss(fn.__name__, rid, e)
        except (ModelNotReady, LedgerError) as e:
            code, msg = grpc.StatusCode.UNAVAILABLE, str(e)
        except DeadlineTooShort as e:
            code, msg = grpc.StatusCode.DEADLINE_EXCEEDED, str(e)
        except (MissingDependencyError, RecordedConfigUnsupported) as e:
            code, msg = grpc.StatusCode.FAILED_PRECONDITION, str(e)
        except Exception:  # noqa: BLE001 - a bug; details stay in the server log
            log.exception("request %s (%s) failed", rid, fn.__name__)
            code, msg = grpc.StatusCode.INTERNAL, f"internal error; quote request id {rid} to the operator"
        finally:
            access_log(fn.__name__, rid, tenant, code.name, 1000 * (time.monotonic() - t0), info)
        context.abort(code, _clip(msg))

    return wrapper


class WatermarkServicer(pb_grpc.WatermarkServicer):
    """Implements ``shallowmark.v1.Watermark`` on a :class:`ModelPool`, a ledger and a :class:`Signer`."""

    def __init__(self, config: ServerConfig, pool: ModelPool, ledger, signer: Signer):
        self.config, self.pool, self.ledger, self.signer = config, pool, ledger, signer
        self.admission = Admission(config)
        #: ``f(rpc, request_id, error)`` for every LedgerIntegrityError a call meets (the app turns
        #: health NOT_SERVING on the first one)
        self.on_data_loss: Callable[[str, str, LedgerIntegrityError], None] | None = None
        # Recent Embed responses by (tenant, request id), so that a retry gets the very image that was
        # recorded. (A batched model call can differ from an unbatched one in the last bit of a few
        # pixels, so recomputing a retry could give another hash than the ledger holds.)
        self._recent: collections.OrderedDict[tuple[str, str], tuple[bytes, pb.EmbedResponse]] = \
            collections.OrderedDict()
        self._recent_lock = threading.Lock()

    _RECENT_MAX = 64

    def _recent_get(self, tenant: str, rid: str, fingerprint: bytes):
        with self._recent_lock:
            hit = self._recent.get((tenant, rid))
            return hit[1] if hit is not None and hit[0] == fingerprint else None

    def _recent_put(self, tenant: str, rid: str, fingerprint: bytes, response) -> None:
        with self._recent_lock:
            self._recent[(tenant, rid)] = (fingerprint, response)
            self._recent.move_to_end((tenant, rid))
            while len(self._recent) > self._RECENT_MAX:
                self._recent.popitem(last=False)

    # -- Embed -----------------------------------------------------------------------------------
    @_rpc
    def Embed(self, request, context, rid, tenant, info):
        mk = validation.parse_method_key(request.method_key, "method_key")
        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
        cached = self._recent_get(tenant or "", rid, fingerprint)
        if cached is not None:  # a retry of an embed that completed: the same image, recorded once
            info.update(method=cached.method, model=cached.model, key_id=cached.key_id, retry="cached")
            return cached
        method_name = request.method or mk.method
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidParameterError("set either 'generate' (prompt and seed) or 'image' (PNG/JPEG bytes)")
        lm = self.pool.get(request.model)
        method = self.pool.method(lm, method_name)
        if method_name != mk.method:
            raise KeyMaterialError(f"method_key was derived for {shown(mk.method)} but the request asks for "
                                   f"{method_name!r}; derive it with key.for_method({method_name!r})")
        info.update(method=method_name, model=lm.name, key_id=mk.key_id, source=source)
        notes: list[str] = []
        if source == "image":
            if not method.supports_embed:
                embeddable = [m for m in lm.available if self.pool.method(lm, m).supports_embed]
                raise InvalidParameterError(f"{method_name} cannot watermark an existing image (its watermark is "
                                            f"built into generation); use 'generate', or one of: "
                                            f"{', '.join(embeddable)}")
            output = validation.check_output_mode(request.output, method)
            img = validation.decode_image(request.image, self.config.max_image_pixels, self.config.max_decode_bytes)
            validation.check_image_shape(img, method)
            if method.output_modes:  # a mode this size cannot have is refused before the model job
                method.resolve_output(output, img.pixels.shape[:2])
            notes += img.notes + validation.grid_notes(img, method, lm.image_size)
            evals = method.model_evals().embed
            with self.pool.job(lm, evals, f"{method_name} embed", context.time_remaining, context.is_active,
                               key=("embed", method_name)):
                out = method.embed([mk], img.pixels[None], **({"output": output} if output else {}))[0]
            if output:
                info["output"] = output
        else:
            if request.output:
                raise InvalidParameterError("'output' applies to an uploaded image ('image'), not to 'generate': a "
                                            "generated image has no original pixels to keep")
            gen = request.generate
            prompts = None
            if gen.prompt:
                if getattr(lm.backend, "conditional", False):
                    prompts = [gen.prompt]
                else:
                    notes.append(f"prompt ignored: {lm.name} is unconditional")
            evals = method.model_evals().generate
            job = BatchJob(key=("generate", method_name, prompts is not None),
                           payload=(mk, int(gen.seed), prompts[0] if prompts else None),
                           run=generate_batch(method), evals=evals, what=f"{method_name} generate")
            out = self.pool.run_jobs(lm, [job], context.time_remaining, context)[0]
        png = encode_png(out)
        sha = hashlib.sha256(png).hexdigest()
        effective = method.effective_config()   # what Verify rebuilds this image's method from
        self.ledger.record(tenant=tenant, key_id=mk.key_id, method=method_name, model=lm.name,
                           image_sha256=sha, request_id=rid, source=source,
                           config_sha256=config_sha256(effective), config=config_json(effective))
        info["image_sha256"] = sha[:16]
        response = pb.EmbedResponse(image=png, key_id=mk.key_id, method=method_name, model=lm.name,
                                    image_sha256=sha, request_id=rid, notes=notes, model_evals=evals)
        self._recent_put(tenant or "", rid, fingerprint, response)
        return response

    # -- Verify ----------------------------------------------------------------------------------
    @_rpc
    def Verify(self, request, context, rid, tenant, info):
        keys = validation.parse_method_keys(list(request.method_keys), self.config.max_keys_per_verify)
        nonce = validation.check_nonce(request.nonce)
        target_fpr = validation.check_target_fpr(request.target_fpr)
        lm = self.pool.get(request.model)
        # Each key is verified under every configuration the ledger says it was embedded with (the
        # server's current one when it has no record, e.g. a key family, whose members are
        # recorded): jobs by (method, configuration), and a key's p-value is its best one times
        # the number of configurations it was tried under (Bonferroni).
        groups: dict[tuple[str, str], list] = {}
        methods: dict[tuple[str, str], Any] = {}
        tried: list[list[tuple[str, str]]] = []
        # a key family's members are recorded, each under its own id, not the family's
        recorded = self.ledger.configs([(k.key_id, k.method) for k in keys if not isinstance(k, KeyFamily)], lm.name)
        digests: dict[int, str] = {}   # per method instance: a request may name thousands of keys

        def digest(m) -> str:
            if id(m) not in digests:
                digests[id(m)] = config_sha256(m.effective_config())
            return digests[id(m)]

        for k in keys:
            mine = []
            for m in self._methods_for_key(lm, k, recorded.get((k.key_id, k.method))):
                g = (k.method, digest(m))
                if g in mine:   # e.g. records from before the configuration was recorded that rebuild to a recorded one
                    continue
                methods.setdefault(g, m)
                groups.setdefault(g, []).append(k)
                mine.append(g)
            tried.append(mine)
        for g, m in methods.items():   # keys a method refuses (a family it cannot search) fail here, not in a batch
            m.check_keys(groups[g])
        n = keys_searched(keys)   # every member of a family counts, in the limit and in the correction
        info.update(model=lm.name, methods=",".join(sorted({g[0] for g in groups})), keys=n)
        img = validation.decode_image(request.image, self.config.max_image_pixels, self.config.max_decode_bytes)
        for m in methods.values():  # every method's limits before any model work
            validation.check_image_shape(img, m)
        # the note is the same for every latent method; post-hoc ones read the pixels as they are
        latent = [m for m in methods.values() if m.inversion is not None]
        notes = img.notes + (validation.grid_notes(img, latent[0], lm.image_size) if latent else [])
        notes += self._config_notes(keys, tried, lm, digest)

        evals = sum(m.model_evals().verify for m in methods.values())
        # latent methods see the image on the model's grid already here, so that requests of any
        # size batch together; post-hoc methods read the pixels as they are
        jobs = [BatchJob(key=("verify", g[0], g[1]),
                         payload=(validation.on_grid(img, methods[g], lm.image_size), group, target_fpr),
                         run=verify_batch(methods[g]), evals=methods[g].model_evals().verify,
                         what=f"{g[0]} verify" if len(groups) == 1 else "verify")
                for g, group in groups.items()]
        detections = dict(zip(groups, self.pool.run_jobs(lm, jobs, context.time_remaining, context)))

        verdicts, best_group = [], []
        for k, mine in zip(keys, tried):
            g = min(mine, key=lambda g: (float(detections[g].per_key_p[k.key_id]), g))
            det = detections[g]
            p = min(1.0, float(det.per_key_p[k.key_id]) * len(mine))
            p_corr = min(1.0, p * n)
            v = dict(key_id=k.key_id, method=k.method, score=-math.log10(max(p, _P_FLOOR)),
                     p_value=p, p_value_corrected=p_corr, detected=p_corr <= target_fpr)
            if isinstance(k, KeyFamily):
                member = int(det.per_key_member[k.key_id])
                v.update(family_size=k.size, member=member, member_key_id=k.member_id(member))
            verdicts.append(v)
            best_group.append(g)
        best = min(range(len(keys)), key=lambda i: (verdicts[i]["p_value"], i))
        detected = any(v["detected"] for v in verdicts)
        best_v = verdicts[best]
        best_id = best_v.get("member_key_id", best_v["key_id"])   # the member's id for a family
        identified = best_id if detected else ""
        identified_member = best_v["member"] if detected and "member" in best_v else None
        best_det = detections[best_group[best]]
        bits = b""
        num_bits = 0
        if best_det.bits is not None and best_det.key_id == best_id:
            arr = np.asarray(best_det.bits, dtype=np.uint8).ravel()
            bits, num_bits = np.packbits(arr, bitorder="big").tobytes(), int(arr.size)
        method_score = float(best_det.score) if best_det.key_id == best_id else float("nan")
        if not math.isfinite(method_score):
            method_score = 0.0
        payload = verify_payload(request_id=rid, image_sha256=img.sha256, model=lm.name, target_fpr=target_fpr,
                                 detected=detected, identified_key_id=identified, method_score=method_score,
                                 bits_packed=bits, num_bits=num_bits, verdicts=verdicts, tenant=tenant or "",
                                 methods=list(groups),
                                 nonce=nonce, identified_member=identified_member)
        data, sig = self.signer.sign(payload)
        info.update(detected=detected, identified=identified or "-")
        return pb.VerifyResponse(
            verdicts=[pb.KeyVerdict(**v) for v in verdicts], detected=detected, identified_key_id=identified,
            identified_member=identified_member,   # None: unset
            bits=bits, num_bits=num_bits, method_score=method_score, target_fpr=target_fpr, model=lm.name,
            image_sha256=img.sha256, request_id=rid, notes=notes, model_evals=evals,
            attestation=pb.Attestation(payload=data, signature=sig, public_key=self.signer.public_key_raw,
                                       payload_format=payload["format"]))

    def _methods_for_key(self, lm, key, recorded) -> list:
        """The method instances ``key`` is verified under: one per configuration of ``recorded``
        (the ledger's ``(config_sha256, config)`` for it on ``lm``), or the server's own when there
        is none."""
        if not recorded:
            return [self.pool.method(lm, key.method)]
        return [self.pool.method_as_embedded(lm, key.method, sha, config) for sha, config in recorded]

    def _config_notes(self, keys, tried, lm, digest) -> list[str]:
        """Say when a key is verified under another configuration than the server's current one
        (``digest(method)``: its configuration's digest)."""
        notes = []
        for k, mine in zip(keys, tried):
            current = digest(self.pool.method(lm, k.method))
            if mine != [(k.method, current)]:
                others = ", ".join(sha[:12] for _, sha in mine)
                notes.append(f"key {k.key_id} verified under the {k.method} configuration(s) it was embedded with "
                             f"({others}; the server's current one is {current[:12]})"
                             + (f", its p-value multiplied by {len(mine)}" if len(mine) > 1 else ""))
        return notes

    # -- GetInfo ---------------------------------------------------------------------------------
    @_rpc
    def GetInfo(self, request, context, rid, tenant, info):
        models, methods, seen = [], [], set()
        for name, lm in self.pool.status():
            if lm is None:
                models.append(pb.ModelInfo(name=name, loaded=False))
                continue
            models.append(pb.ModelInfo(name=name, image_size=lm.image_size,
                                       latent_shape=[int(s) for s in lm.backend.latent_shape],
                                       conditional=bool(getattr(lm.backend, "conditional", False)), loaded=True))
            if name != self.config.default_model:
                continue
            for m in lm.available:
                if m in seen:
                    continue
                seen.add(m)
                obj = self.pool.method(lm, m)  # post-hoc methods are cheap to build (no model)
                costs = obj.model_evals()
                methods.append(pb.MethodInfo(
                    name=m, supports_embed=bool(obj.supports_embed), generate_model_evals=costs.generate,
                    embed_model_evals=costs.embed if obj.supports_embed else 0, verify_model_evals=costs.verify))
        c = self.config
        return pb.GetInfoResponse(
            models=models, methods=methods, default_model=c.default_model,
            limits=pb.Limits(max_image_pixels=c.max_image_pixels, max_message_bytes=c.max_message_bytes,
                             max_batch=c.max_batch, max_keys_per_verify=c.max_keys_per_verify),
            attestation_public_key=self.signer.public_key_raw, server_version=shallowmark.__version__,
            tenant=tenant or "")

    # -- ListEmbeds ------------------------------------------------------------------------------
    @_rpc
    def ListEmbeds(self, request, context, rid, tenant, info):
        if request.tenant and request.tenant != tenant:
            raise PermissionDenied(f"your token is not allowed to read tenant {shown(request.tenant)}'s ledger; "
                                   "leave 'tenant' empty to read your own")
        if request.key_id:
            check_key_id(request.key_id)
        size = request.page_size or 100
        entries, token = self.ledger.list(tenant, key_id=request.key_id or None, page_size=size,
                                          page_token=request.page_token or None)
        out = []
        for e in entries:
            entry = pb.LedgerEntry(tenant=e.tenant, key_id=e.key_id, method=e.method, model=e.model,
                                   image_sha256=e.image_sha256, request_id=e.request_id, source=e.source)
            entry.created_at.FromDatetime(e.created_at)
            out.append(entry)
        info["entries"] = len(out)
        return pb.ListEmbedsResponse(entries=out, next_page_token=token)
