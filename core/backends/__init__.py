"""Diffusion backends behind one interface (:class:`~shallowmark.core.backends.base.Backend`).

``load_backend(name, **options)`` builds one by name; ``backend_names()`` lists them and a loaded
backend describes itself (``Backend.info()``).
"""

from __future__ import annotations

from shallowmark.core.backends.base import Backend, BackendInfo
from shallowmark.errors import check_choice

DEFAULT_BACKEND = "tiny-ldm"

# name -> (module, class), imported when the backend is loaded
_REGISTRY = {
    "tiny-ldm": ("shallowmark.core.backends.tiny_ldm", "TinyLDM"),
    "stable-diffusion": ("shallowmark.core.backends.stable_diffusion", "StableDiffusion"),
    "analytic": ("shallowmark.core.backends.analytic", "AnalyticMoLRG"),
}


def backend_names() -> list[str]:
    return list(_REGISTRY)


def load_backend(name: str = DEFAULT_BACKEND, **options) -> Backend:
    """Build the backend ``name`` (``tiny-ldm``, ``stable-diffusion``, ``analytic``).

    Options go to its constructor, e.g. ``load_backend("stable-diffusion", model="path/or/hub-id",
    device="cuda", dtype=torch.float16)``. An unknown name raises ``UnknownNameError``.
    """
    import importlib

    check_choice("backend", name, _REGISTRY)
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["Backend", "BackendInfo", "DEFAULT_BACKEND", "backend_names", "load_backend"]
