"""Watermark methods, one file each, behind one interface (:mod:`.base`).

``load_method(name, backend, **config)`` builds one by its public name — the names used by the
CLI, the proto and the reports.
"""

from __future__ import annotations

import importlib

from shallowmark.core.watermarks.base import Detection, WatermarkMethod
from shallowmark.errors import check_choice
from shallowmark.keys import METHODS

_CLASSES = {
    "shallow-diffuse": ("shallow_diffuse", "ShallowDiffuse"),
    "tree-ring": ("tree_ring", "TreeRing"),
    "ringid": ("ringid", "RingID"),
    "gaussian-shading": ("gaussian_shading", "GaussianShading"),
    "dwtdct": ("invisible", "DwtDct"),
    "dwtdctsvd": ("invisible", "DwtDctSvd"),
    "rivagan": ("invisible", "RivaGAN"),
}
assert set(_CLASSES) == set(METHODS)
DIFFUSION_METHODS = ("shallow-diffuse", "tree-ring", "ringid", "gaussian-shading")


def method_names() -> list[str]:
    return list(_CLASSES)


def load_method(name: str, backend=None, **config) -> WatermarkMethod:
    """The method ``name`` on ``backend``. Config keywords go to the method's config dataclass
    where it has one (``ShallowDiffuseConfig``, ``TreeRingConfig``) or to its constructor."""
    check_choice("method", name, _CLASSES)
    module, cls_name = _CLASSES[name]
    cls = getattr(importlib.import_module(f"shallowmark.core.watermarks.{module}"), cls_name)
    if name == "shallow-diffuse":
        from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuseConfig

        return cls(backend, ShallowDiffuseConfig(**config))
    if name in ("tree-ring", "ringid"):
        from shallowmark.core.watermarks.tree_ring import TreeRingConfig

        return cls(backend, TreeRingConfig(**config))
    return cls(backend, **config)


__all__ = ["DIFFUSION_METHODS", "Detection", "WatermarkMethod", "load_method", "method_names"]
