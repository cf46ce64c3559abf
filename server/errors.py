"""Server-side failures that are not the caller's input being wrong; the servicer maps each to a status
code (see :mod:`shallowmark.server.servicer`)."""

from __future__ import annotations

from shallowmark.errors import ShallowmarkError

__all__ = ["ModelNotReady", "QueueFull", "DeadlineTooShort", "PermissionDenied"]


class ModelNotReady(ShallowmarkError):
    """The model is still loading, or failed to load, or the server is stopping. UNAVAILABLE: retry later."""


class QueueFull(ShallowmarkError):
    """Too many model jobs waiting. RESOURCE_EXHAUSTED: retry with backoff."""


class DeadlineTooShort(ShallowmarkError):
    """The call's deadline leaves less time than the job needs. DEADLINE_EXCEEDED."""


class PermissionDenied(ShallowmarkError):
    """The caller asked for another tenant's data. PERMISSION_DENIED."""
