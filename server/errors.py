"""Failures only the server meets (its own state, a call it cannot serve as sent); the servicer maps
each to a status code (see :mod:`shallowmark.server.servicer`). Wrong values inside a well-formed
request raise the errors of :mod:`shallowmark.errors` instead."""

from __future__ import annotations

from shallowmark.errors import ShallowmarkError

__all__ = ["ModelNotReady", "QueueFull", "ServerBusy", "TenantRateLimited", "TenantBusy", "CallEnded",
           "DeadlineTooShort", "PermissionDenied", "MalformedRequest"]


class ModelNotReady(ShallowmarkError):
    """The model is still loading, or failed to load, or the server is stopping. UNAVAILABLE: retry later."""


class QueueFull(ShallowmarkError):
    """Too many model jobs waiting. RESOURCE_EXHAUSTED: retry with backoff."""


class ServerBusy(ShallowmarkError):
    """``workers`` calls are already in flight; this one was refused on arrival, before any work.
    RESOURCE_EXHAUSTED: retry with backoff, or on another replica."""


class TenantRateLimited(ShallowmarkError):
    """The tenant's token bucket (``tenant_limits`` rate and burst) is empty. RESOURCE_EXHAUSTED:
    retry after the time the message gives (``retry_after_s``, also sent as the ``retry-after-ms``
    trailer)."""

    def __init__(self, message: str, retry_after_s: float = 0.0):
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)


class TenantBusy(ShallowmarkError):
    """The tenant already has its ``tenant_limits`` max_in_flight calls in flight. RESOURCE_EXHAUSTED:
    wait for one of them to finish."""


class CallEnded(ShallowmarkError):
    """The caller cancelled, or its deadline passed, before the work started; the work is dropped.
    CANCELLED or DEADLINE_EXCEEDED (``code`` says which); the caller has gone, so nobody reads it."""

    def __init__(self, message: str, *, cancelled: bool):
        super().__init__(message)
        self.cancelled = cancelled


class DeadlineTooShort(ShallowmarkError):
    """The call's deadline leaves less time than the job needs. DEADLINE_EXCEEDED."""


class PermissionDenied(ShallowmarkError):
    """The caller asked for another tenant's data. PERMISSION_DENIED."""


class RecordedConfigUnsupported(ShallowmarkError):
    """A key was embedded under a method configuration (the ledger records it) that this server
    version cannot build: an option it no longer has, or a value it refuses. FAILED_PRECONDITION:
    verify on a server of the version that embedded it."""


class MalformedRequest(ShallowmarkError):
    """The request bytes do not parse as the RPC's protobuf message (corrupt wire data, or a string
    field holding bytes that are not UTF-8). INVALID_ARGUMENT: build it with the generated stubs."""
