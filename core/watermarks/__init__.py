"""Watermark methods, one file each, behind one interface (:mod:`.base`).

Which methods exist is the registry's business (:mod:`shallowmark.methods`); this module builds
them: ``load_method(name, backend, **config)`` takes the config keywords of the method's config
dataclass (``config_fields(name)`` lists them).
"""

from __future__ import annotations

import dataclasses

from shallowmark.core.watermarks.base import Detection, InversionStop, ModelEvals, WatermarkMethod, invert_shared
from shallowmark.errors import InvalidParameterError
from shallowmark.methods import latent_method_names, method_names, method_spec


def method_class(name: str) -> type:
    """The class registered for ``name`` (UnknownNameError lists the registered methods)."""
    return method_spec(name).load()


def config_fields(name: str) -> tuple[str, ...]:
    """The config keywords ``load_method(name, ...)`` takes."""
    return tuple(f.name for f in dataclasses.fields(method_class(name).config_class))


def load_method(name: str, backend=None, **config) -> WatermarkMethod:
    """The method ``name`` on ``backend``, with ``config`` as keywords of its config dataclass."""
    cls = method_class(name)
    bad = set(config) - set(config_fields(name))
    if bad:
        raise InvalidParameterError(f"{name}: unknown option(s) {sorted(bad)}; valid: {', '.join(config_fields(name))}")
    return cls(backend, cls.config_class(**config))


__all__ = ["Detection", "InversionStop", "ModelEvals", "WatermarkMethod", "config_fields", "invert_shared",
           "latent_method_names", "load_method", "method_class", "method_names"]
