"""Failures only the server meets (its own state, a call it cannot serve as sent); the servicer maps
each to a status code (see :mod:`shallowmark.server.servicer`). Wrong values inside a well-formed
request raise the errors of :mod:`shallowmark.errors` instead."""

from __future__ import annotations

from shallowmark.errors import ShallowmarkError

__all__ = ["ModelNotReady", "QueueFull", "DeadlineTooShort", "PermissionDenied", "MalformedRequest"]


class ModelNotReady(ShallowmarkError):
    """The model is still loading, or failed to load, or the server is stopping. UNAVAILABLE: retry later."""


class QueueFull(ShallowmarkError):
    """Too many model jobs waiting. RESOURCE_EXHAUSTED: retry with backoff."""


class DeadlineTooShort(ShallowmarkError):
    """The call's deadline leaves less time than the job needs. DEADLINE_EXCEEDED."""


class PermissionDenied(ShallowmarkError):
    """The caller asked for another tenant's data. PERMISSION_DENIED."""


class MalformedRequest(ShallowmarkError):
    """The request bytes do not parse as the RPC's protobuf message (corrupt wire data, or a string
    field holding bytes that are not UTF-8). INVALID_ARGUMENT: build it with the generated stubs."""
