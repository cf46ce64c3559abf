"""The method registry: every watermark method's name, kind, implementation, key derivations and
the optional packages it needs, in one place.

Keys (which derivations a method's material may feed), the server (which methods it builds and
which it can offer), the benchmark and the CLI all read this table; nothing else lists methods.
The implementation is named as ``"module:Class"`` and imported only when a method is built, so
the light SDK reads the registry without importing torch.

Adding a method is its file (a :class:`~shallowmark.core.watermarks.base.WatermarkMethod`
subclass with a config dataclass) plus one :func:`register_method` call; see
``docs/adding-a-method.md``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from shallowmark import _registry
from shallowmark.errors import InvalidParameterError, MissingDependencyError, check_choice

__all__ = [
    "LATENT", "POST_HOC", "DERIVATIONS", "MethodSpec", "register_method", "unregister_method", "method_spec",
    "method_names", "latent_method_names", "BUILTIN_METHODS",
]

#: Kinds of method. A latent method writes its key into a diffusion latent and verifies by DDIM
#: inversion; a post-hoc method writes into finished pixels and decodes them without the model.
LATENT = "latent"
POST_HOC = "post-hoc"
KINDS = (LATENT, POST_HOC)

#: What a method's key material may be turned into (see :mod:`shallowmark.keys`). Refusing the
#: others stops a caller from, say, reusing ring material as a ChaCha20 key: the same bytes under
#: two algorithms is a classic way to leak a key, and it is always a bug here.
DERIVATIONS = ("ring_seed", "chacha20_key_nonce", "payload_bits")


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry.

    Attributes:
        name: the public name (CLI, proto, reports). Part of the key derivation: renaming a method
            changes every key's material for it.
        implementation: ``"package.module:Class"``, or the class itself (a method defined outside
            the package, e.g. in a test).
        kind: :data:`LATENT` or :data:`POST_HOC`.
        derivations: which of :data:`DERIVATIONS` its key material may feed (``method_seed`` is
            open to every method).
        requires: ``(module, extra)`` pairs: importable modules the method needs beyond the
            ``core`` extra, and the pip extra that provides each.
        summary: one line for listings.
    """

    name: str
    implementation: object
    kind: str
    derivations: frozenset = frozenset()
    requires: tuple = ()
    summary: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not self.name.isascii() or len(self.name) > 64:
            raise InvalidParameterError(f"method name must be a non-empty ASCII str of at most 64 characters; "
                                        f"got {self.name!r}")
        check_choice("method kind", self.kind, KINDS)
        object.__setattr__(self, "derivations", frozenset(self.derivations))
        for d in self.derivations:
            check_choice("key derivation", d, DERIVATIONS)
        if not (isinstance(self.implementation, type) or
                (isinstance(self.implementation, str) and ":" in self.implementation)):
            raise InvalidParameterError(f"implementation must be 'module:Class' or a class; got {self.implementation!r}")

    def load(self) -> type:
        """The implementing class (imports its module on first use)."""
        if isinstance(self.implementation, type):
            return self.implementation
        module, _, attr = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attr)

    def missing(self) -> list[tuple[str, str]]:
        """The ``(module, extra)`` requirements that are not importable here."""
        return [(mod, extra) for mod, extra in self.requires if importlib.util.find_spec(mod) is None]

    @property
    def available(self) -> bool:
        return not self.missing()

    def check_available(self) -> None:
        """Raise :class:`MissingDependencyError` naming the extra when a requirement is missing."""
        gone = self.missing()
        if gone:
            mod, extra = gone[0]
            raise MissingDependencyError(f"the {self.name} method", extra, ImportError(f"no module named {mod!r}"))


_WM = "shallowmark.core.watermarks."
_IW = (("imwatermark", "bench"),)

#: The methods that ship with shallowmark, in their canonical order (reports list them so).
BUILTIN_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("shallow-diffuse", _WM + "shallow_diffuse:ShallowDiffuse", LATENT, {"ring_seed"},
               summary="ring key written into x_t* at t* ~ 0.3T; verify inverts to t* only"),
    MethodSpec("tree-ring", _WM + "tree_ring:TreeRing", LATENT, {"ring_seed"},
               summary="ring key in the low frequencies of x_T"),
    MethodSpec("ringid", _WM + "ringid:RingID", LATENT, {"ring_seed", "payload_bits"},
               summary="Tree-Ring with discrete ring codes, for identification"),
    MethodSpec("gaussian-shading", _WM + "gaussian_shading:GaussianShading", LATENT,
               {"chacha20_key_nonce", "payload_bits"}, summary="encrypted message in the signs of x_T"),
    MethodSpec("dwtdct", _WM + "invisible:DwtDct", POST_HOC, {"payload_bits"}, _IW,
               summary="DWT-DCT bits in the pixels (invisible-watermark)"),
    MethodSpec("dwtdctsvd", _WM + "invisible:DwtDctSvd", POST_HOC, {"payload_bits"}, _IW,
               summary="DWT-DCT-SVD bits in the pixels (invisible-watermark)"),
    MethodSpec("rivagan", _WM + "invisible:RivaGAN", POST_HOC, {"payload_bits"}, _IW + (("onnxruntime", "bench"),),
               summary="RivaGAN's learned 32-bit encoder (invisible-watermark, ONNX)"),
)

_REGISTRY: dict[str, MethodSpec] = {s.name: s for s in BUILTIN_METHODS}


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add ``spec`` to the registry (in this process). A name already registered is refused unless
    ``replace``: a silent redefinition would change which code a key's material feeds."""
    return _registry.add(_REGISTRY, spec, MethodSpec, "method", replace=replace)


def unregister_method(name: str) -> None:
    """Remove a method registered with :func:`register_method` (built-in methods stay)."""
    if name in {s.name for s in BUILTIN_METHODS}:
        raise InvalidParameterError(f"{name!r} is a built-in method and cannot be unregistered")
    _REGISTRY.pop(name, None)


def method_spec(name: str) -> MethodSpec:
    """The entry for ``name``; :class:`~shallowmark.errors.UnknownNameError` lists the valid ones."""
    return _REGISTRY[check_choice("method", name, _REGISTRY)]


def method_names() -> tuple[str, ...]:
    """Every registered method, built-in ones first in their canonical order."""
    return tuple(_REGISTRY)


def latent_method_names() -> tuple[str, ...]:
    return tuple(n for n, s in _REGISTRY.items() if s.kind == LATENT)
