"""Errors raised by shallowmark. One class per kind of failure, all under :class:`ShallowmarkError`.

Each message names what was wrong and what the valid choices are, so a caller can fix the input
without reading the source.
"""

from __future__ import annotations


class ShallowmarkError(Exception):
    """Base class of every error shallowmark raises on purpose."""


class InvalidParameterError(ShallowmarkError, ValueError):
    """A parameter is out of range or of the wrong kind (t* outside (0, 1), a negative strength...)."""


class InvalidImageError(ShallowmarkError, ValueError):
    """An image cannot be used: undecodable, too small, too large, wrong shape or dtype, NaN."""


class InvalidShapeError(ShallowmarkError, ValueError):
    """A latent or tensor has a shape the model or method does not accept."""


class UnknownNameError(ShallowmarkError, KeyError):
    """A name (backend, method, attack, descriptor...) is not registered. The message lists valid ones."""

    def __init__(self, kind: str, name: str, valid):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {shown(name)}; valid choices: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would otherwise print the repr with quotes
        return self.args[0]


class KeyMaterialError(ShallowmarkError, ValueError):
    """A key is malformed, too short, or was derived for another method."""


class KeystoreError(ShallowmarkError):
    """The keystore file cannot be read or written (wrong passphrase, tampered, bad format)."""


class MissingDependencyError(ShallowmarkError, ImportError):
    """An optional extra is needed for this feature. The message names the pip extra to install."""

    def __init__(self, feature: str, extra: str, cause: Exception | None = None):
        msg = f"{feature} needs the '{extra}' extra: pip install 'shallowmark[{extra}]'"
        if cause is not None:
            msg += f" ({cause})"
        super().__init__(msg)


#: Most characters of a caller's value that an error message repeats (see :func:`shown`).
SHOWN_MAX = 64


def shown(value: object, limit: int = SHOWN_MAX) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters plus an ellipsis and the
    value's length when longer.

    Messages repeat what the caller sent so that it can be found and fixed, but a server sends its
    message in a gRPC trailer, and a 10 000-character model name pushed that past gRPC's 8 KiB
    header limit (the client then saw RESOURCE_EXHAUSTED "Stream removed" instead of the error).
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = ""
    if isinstance(value, (str, bytes)):
        size = f" ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    return f"{text[:limit]}\u2026{size}"


def check_choice(kind: str, name: str, valid) -> str:
    """Return ``name`` if it is in ``valid``; otherwise raise :class:`UnknownNameError` listing them."""
    if name not in valid:
        raise UnknownNameError(kind, name, valid)
    return name


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer (not a bool) in ``lo..hi`` (either bound may be
    None); otherwise raise :class:`InvalidParameterError` naming the range."""
    import numbers

    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok:
        value = int(value)
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        if lo is not None and hi is not None:
            want = f"exactly {lo}" if lo == hi else f"an integer in {lo}..{hi}"
        elif lo is not None:
            want = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        else:
            want = "an integer" if hi is None else f"an integer <= {hi}"
        raise InvalidParameterError(f"{name} must be {want}; got {value!r}")
    return value
