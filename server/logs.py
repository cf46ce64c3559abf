"""Request ids and structured logs.

Every RPC gets a request id on arrival (:class:`shallowmark.server.metrics.CallObserver`): the
caller's ``x-request-id`` if it is sane (1..64 of ``[A-Za-z0-9._-]``, the rule of
:func:`shallowmark.server.validation.check_request_id`), otherwise a fresh one (32 hex digits). It
is bound to the call's thread for as long as the handler runs (:func:`bind_call`), sent back to
the caller in the trailing metadata as ``x-request-id``, and put on every log record made while the
call runs by :class:`CallContextFilter`, so a log line about the call can be found by its id
without each ``log.info`` passing it.

A sane id is also the call's idempotency key (the ledger records an Embed once per tenant and
request id), so the Watermark service still *refuses* a call whose ``x-request-id`` is not sane
(INVALID_ARGUMENT): making up another id there would record a client's retries as new embeds. The
fresh id it gets meanwhile names the refusal in the log and in the trailer. Health checks and
reflection just use the fresh id.

Two log formats (``ServerConfig.log_format``, applied by :func:`configure_logging`, which
``shallowmark serve`` calls):

- ``text``: ``<time> <LEVEL> <logger>: <message>``, plus `` request_id=<id>`` on a line made during
  a call whose message does not already name it;
- ``json``: one JSON object per line (:class:`JsonFormatter`) with ``time`` (UTC, ISO 8601),
  ``level``, ``logger``, ``message``, and, where known, ``request_id``, ``rpc``, ``tenant``,
  ``status``, ``duration_ms``, the access line's own fields (``method``, ``model``, ``key_id``...)
  and ``exception`` (the traceback).

One access line per finished RPC (:func:`access_log`), at INFO; health checks and reflection at
DEBUG (a load balancer probing every few seconds would otherwise fill the log). Logs never carry
key material, tokens, prompts or image bytes: the fields are ids, names, codes and durations.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping, TextIO

from shallowmark.errors import InvalidParameterError
from shallowmark.server import validation
from shallowmark.server.auth import current_tenant

__all__ = ["LOG_FORMATS", "REQUEST_ID_HEADER", "CallContext", "CallContextFilter", "JsonFormatter", "TextFormatter",
           "access_log", "bind_call", "caller_request_id", "configure_logging", "current_call", "current_request_id",
           "install_filter", "new_request_id"]

#: ``ServerConfig.log_format`` values.
LOG_FORMATS = ("text", "json")

#: The metadata key that carries a call's request id, both ways.
REQUEST_ID_HEADER = "x-request-id"

log = logging.getLogger("shallowmark.server")


@dataclass
class CallContext:
    """What is known of the call being handled on this thread. ``logged``: its access line is out."""

    request_id: str
    rpc: str
    logged: bool = False


_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("shallowmark_call", default=None)


def new_request_id() -> str:
    """A fresh request id: 32 hex digits (128 random bits, so ids never collide in the ledger)."""
    return uuid.uuid4().hex


def caller_request_id(metadata) -> str | None:
    """The caller's ``x-request-id`` (the first one) if it is sane, else ``None``."""
    for k, v in metadata or ():
        if k == REQUEST_ID_HEADER:
            try:
                return validation.check_request_id(v if isinstance(v, str) else v.decode("ascii"))
            except (InvalidParameterError, UnicodeDecodeError):
                return None
    return None


def current_call() -> CallContext | None:
    """The :class:`CallContext` of the call on this thread (``None`` outside a call)."""
    return _call.get()


def current_request_id() -> str | None:
    """The request id of the call on this thread (``None`` outside a call)."""
    call = _call.get()
    return call.request_id if call is not None else None


@contextmanager
def bind_call(call: CallContext) -> Iterator[CallContext]:
    """Make ``call`` the current call on this thread while the block runs."""
    token = _call.set(call)
    try:
        yield call
    finally:
        _call.reset(token)


def access_log(rpc: str, request_id: str, tenant: str | None, status: str, duration_ms: float,
               fields: Mapping[str, Any] | None = None, *, level: int = logging.INFO) -> None:
    """The one access line of a finished RPC: ``rpc=... request_id=... tenant=... status=... ms=...``
    and ``fields`` as ``key=value``; the same values as attributes for :class:`JsonFormatter`."""
    fields = dict(fields or {})
    call = _call.get()
    if call is not None:
        call.logged = True
    if not log.isEnabledFor(level):
        return
    tail = " ".join(f"{k}={v}" for k, v in fields.items())
    log.log(level, "rpc=%s request_id=%s tenant=%s status=%s ms=%.0f%s", rpc, request_id, tenant or "-", status,
            duration_ms, f" {tail}" if tail else "",
            extra={"rpc": rpc, "request_id": request_id, "tenant": tenant, "status": status,
                   "duration_ms": round(duration_ms, 1), "fields": fields})


class CallContextFilter(logging.Filter):
    """Puts ``request_id``, ``rpc`` and ``tenant`` of the current call on every record (``None``
    outside a call); values a record already has (from ``extra``) are kept. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = _call.get()
        if getattr(record, "request_id", None) is None:
            record.request_id = call.request_id if call is not None else None
        if getattr(record, "rpc", None) is None:
            record.rpc = call.rpc if call is not None else None
        if getattr(record, "tenant", None) is None:
            record.tenant = current_tenant()
        return True


_FILTER = CallContextFilter()


def install_filter(logger: logging.Logger | None = None) -> None:
    """Attach the shared :class:`CallContextFilter` to ``logger`` (default ``shallowmark.server``), once.

    A logger's filters see only the records made on that logger, not on its children or on other
    libraries' loggers; :func:`configure_logging` adds it to its handler for those."""
    logger = logger or log
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def _time(record: logging.LogRecord) -> str:
    t = datetime.fromtimestamp(record.created, timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


#: Record attributes written as JSON fields when set, in this order after the four fixed ones.
_CALL_FIELDS = ("request_id", "rpc", "tenant", "status", "duration_ms")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": _time(record), "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        for k in _CALL_FIELDS:
            v = getattr(record, k, None)
            if v is not None:
                out[k] = v
        for k, v in (getattr(record, "fields", None) or {}).items():
            out.setdefault(str(k), v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: a field that JSON has no type for (a Path, an enum) must not lose the line
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message>``, with `` request_id=<id>`` added during a call."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid and f"request_id={rid}" not in record.getMessage():  # the access line names it already
            head, sep, rest = text.partition("\n")  # before a traceback, on the line itself
            text = f"{head} request_id={rid}{sep}{rest}"
        return text


class _Stderr(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is when it writes (as ``logging.lastResort``), not
    the one it was made with: a test that captures stderr must not leave it a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(log_format: str = "text", *, level: int = logging.INFO,
                      stream: TextIO | None = None) -> logging.Handler:
    """Log to ``stream`` (default stderr) in ``log_format`` from the root logger at ``level``.

    Replaces the handler an earlier call installed, and leaves every other handler alone. Returns
    the handler.

    Raises:
        InvalidParameterError: ``log_format`` is not one of :data:`LOG_FORMATS`.
    """
    if log_format not in LOG_FORMATS:
        raise InvalidParameterError(f"log_format must be one of {', '.join(LOG_FORMATS)}; got {log_format!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_shallowmark", False):
            root.removeHandler(h)
            h.close()
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler._shallowmark = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_FILTER)  # records of other loggers (grpc's) made during a call get the id too
    root.addHandler(handler)
    root.setLevel(level)
    install_filter()
    return handler
