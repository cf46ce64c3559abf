"""The one rule every name registry of shallowmark follows (methods, attacks): an entry is added
under its ``name``, and a name already taken is refused unless the caller asks to replace it."""

from __future__ import annotations

from shallowmark.errors import InvalidParameterError


def add(registry: dict, spec, spec_type: type, what: str, *, replace: bool = False):
    """Put ``spec`` (a ``spec_type``) into ``registry`` under ``spec.name`` and return it."""
    if not isinstance(spec, spec_type):
        raise InvalidParameterError(f"expected a {spec_type.__name__} for the {what} registry, "
                                    f"got {type(spec).__name__}")
    if spec.name in registry and not replace:
        raise InvalidParameterError(f"{what} {spec.name!r} is already registered; pass replace=True to redefine it")
    registry[spec.name] = spec
    return spec
