"""Registry of named attacks, with the reference strengths used by the benchmark.

An attack is a pure function ``attack(image, strength, rng) -> image`` on uint8 RGB arrays of shape
(H, W, 3); it returns a new array of the same shape and dtype and draws randomness only from
``rng``. Call attacks by name through :func:`apply_attack`, which checks the image and strength.

Attacks that need more than an image (the regeneration attack needs a diffusion model) declare the
extra keyword arguments in :attr:`AttackSpec.context` and are registered at run time with
:func:`register`; :func:`apply_attack` then forwards those keywords and refuses calls that lack them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from shallowmark import _registry
from shallowmark.errors import InvalidParameterError, UnknownNameError
from shallowmark.imaging import check_rgb as check_image

from . import codec, geometric, photometric, platform

AttackFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class AttackSpec:
    """A named attack and how to set its strength.

    Attributes:
        name: registry key, e.g. ``"jpeg"``.
        function: ``function(image, strength, rng, **context) -> image``.
        default: the reference strength used when none is given.
        range: inclusive valid strength range ``(lo, hi)``.
        scale: one line describing what the strength means (shown in reports and errors).
        integer: the strength must be a whole number (JPEG quality, kernel sizes).
        check: optional extra check on the strength; raises InvalidParameterError.
        context: names of extra keyword arguments ``function`` needs (e.g. ``("model",)``).
        keeps_size: the result has the input's height and width (False for the platform
            pipelines, which crop or resize; the benchmark passes their results on as they are).
    """

    name: str
    function: AttackFn
    default: float
    range: tuple[float, float]
    scale: str
    integer: bool = False
    check: Optional[Callable[[float], None]] = None
    context: tuple[str, ...] = field(default_factory=tuple)
    keeps_size: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.range
        if not self.name or not isinstance(self.name, str):
            raise InvalidParameterError(f"attack name must be a non-empty string, got {self.name!r}")
        if not lo <= hi:
            raise InvalidParameterError(f"attack {self.name!r}: range {self.range} has lo > hi")
        # The default must itself pass validation, so a spec can never be unusable by default.
        self.validate_strength(self.default)

    def validate_strength(self, strength) -> float:
        """Return ``strength`` as a float if valid for this attack; else raise InvalidParameterError."""
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
            raise InvalidParameterError(
                f"attack {self.name!r}: strength must be a number, got {type(strength).__name__}"
            )
        s = float(strength)
        lo, hi = self.range
        if not math.isfinite(s) or not lo <= s <= hi:
            raise InvalidParameterError(
                f"attack {self.name!r}: strength {strength} outside valid range [{lo:g}, {hi:g}] ({self.scale})"
            )
        if self.integer and s != int(s):
            raise InvalidParameterError(f"attack {self.name!r}: strength must be a whole number, got {strength}")
        if self.check is not None:
            self.check(s)
        return s


_REGISTRY: dict[str, AttackSpec] = {}


def register(spec: AttackSpec, *, replace: bool = False) -> AttackSpec:
    """Add ``spec`` to the registry and return it.

    Raises InvalidParameterError if the name is taken, unless ``replace=True``.
    """
    return _registry.add(_REGISTRY, spec, AttackSpec, "attack", replace=replace)


def unregister(name: str) -> AttackSpec:
    """Remove and return the attack ``name``; UnknownNameError if it is not registered."""
    spec = get_attack(name)
    del _REGISTRY[name]
    return spec


def get_attack(name: str) -> AttackSpec:
    """Return the spec registered as ``name``; UnknownNameError listing valid names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownNameError("attack", name, _REGISTRY) from None


def list_attacks() -> list[str]:
    """Names of all registered attacks, in registration order (``clean`` first)."""
    return list(_REGISTRY)


def _as_rng(rng) -> np.random.Generator:
    if rng is None:
        # A fixed default keeps benchmark runs reproducible when the caller does not care.
        return np.random.default_rng(0)
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise InvalidParameterError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def apply_attack(name: str, image: np.ndarray, strength: float | None = None, rng=None, **context) -> np.ndarray:
    """Apply the attack ``name`` to a uint8 RGB image and return the attacked copy.

    Args:
        name: a registered attack (see :func:`list_attacks`).
        image: uint8 array of shape (H, W, 3); not modified.
        strength: attack strength on the attack's own scale (see ``get_attack(name).scale``);
            ``None`` uses the reference strength ``get_attack(name).default``.
        rng: a ``numpy.random.Generator``, an int seed, or ``None`` for seed 0. Passing the same
            generator state gives the same output.
        **context: extra inputs some attacks need, exactly the names in ``get_attack(name).context``.

    Raises:
        UnknownNameError: ``name`` is not registered.
        InvalidImageError: ``image`` is not uint8 of shape (H, W, 3).
        InvalidParameterError: strength outside the valid range, bad ``rng``, or missing or
            unexpected context.
    """
    spec = get_attack(name)
    check_image(image)
    s = spec.validate_strength(spec.default if strength is None else strength)
    missing = [k for k in spec.context if k not in context]
    extra = [k for k in context if k not in spec.context]
    if missing or extra:
        need = ", ".join(spec.context) or "nothing"
        raise InvalidParameterError(
            f"attack {name!r} needs context: {need}; missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    out = spec.function(image, s, _as_rng(rng), **context)
    # Catch a misbehaving attack (typically one registered at run time) here, not in a metric later.
    ok = isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and (
        out.shape == image.shape or not spec.keeps_size) and min(out.shape[:2]) >= 1
    if not ok:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        want = f"uint8 {image.shape}" if spec.keeps_size else "uint8 (H, W, 3)"
        raise RuntimeError(f"attack {name!r} returned {got}, expected {want}")
    return out


def _register_builtins() -> None:
    specs = [
        AttackSpec("clean", photometric.identity, 0, (0, 0), "no attack; strength unused (0)"),
        AttackSpec("jpeg", codec.jpeg, 25, (1, 100), "JPEG quality; lower is harsher", integer=True),
        AttackSpec("blur", photometric.blur, 4, (0, 64), "Gaussian blur radius in pixels"),
        AttackSpec("noise", photometric.noise, 0.1, (0, 1), "Gaussian noise std on the [0, 1] pixel scale"),
        AttackSpec(
            "jitter", photometric.jitter, 6, (0, 20),
            "brightness jitter b: factor uniform in [max(0, 1-b), 1+b]",
        ),
        AttackSpec("resize", geometric.resize, 0.5, (0.01, 1), "side scale factor before restoring; lower is harsher"),
        AttackSpec("crop", geometric.crop, 0.75, (0.01, 1), "fraction of the area kept, then scaled back"),
        # 15 degrees rather than the 75 of the Tree-Ring paper: a rotation a user might plausibly
        # apply; at 75 the black corners cover a large part of the frame.
        AttackSpec("rotate", geometric.rotate, 15, (-180, 180), "rotation in degrees, counter-clockwise"),
        AttackSpec(
            "median", photometric.median, 7, (1, 31), "median filter kernel size (odd)",
            integer=True, check=photometric.check_median_size,
        ),
        AttackSpec("crop-centre", geometric.crop_centre, 0.75, (0.01, 1),
                   "fraction of the area kept, centred, then scaled back"),
        AttackSpec("crop-corner", geometric.crop_corner, 0.75, (0.01, 1),
                   "fraction of the area kept at a random corner, then scaled back"),
        AttackSpec("crop-keep", geometric.crop_keep, 0.75, (0.01, 1),
                   "fraction of the area kept at a random place, not scaled back", keeps_size=False),
        AttackSpec("translate", geometric.translate, 0.1, (0, 0.5),
                   "shift as a fraction of each side (random signs), black fill"),
        AttackSpec("aspect", geometric.aspect, 0.8, (0.25, 4), "width scale factor, height kept",
                   keeps_size=False),
        AttackSpec("zoom", geometric.zoom, 1.25, (1, 8), "zoom-in factor about the centre, same size"),
        AttackSpec("flip", geometric.flip, 0, (0, 1), "0: mirror left-right, 1: mirror top-bottom", integer=True),
        AttackSpec("drop", geometric.drop, 0.25, (0, 1), "fraction of the area blacked out as one rectangle"),
        AttackSpec("saltpepper", photometric.saltpepper, 0.05, (0, 1), "probability a pixel turns black or white"),
        AttackSpec("platform-1080", platform.resize_long_side_jpeg, 1080, (64, 8192),
                   "long side resized to this many pixels, then JPEG 80", integer=True, keeps_size=False),
        AttackSpec("platform-4x5", platform.crop_4x5_jpeg, 80, (1, 100),
                   "centre crop to 4:5, then JPEG at this quality", integer=True, keeps_size=False),
        AttackSpec("platform-1x1", platform.crop_1x1_resize, 512, (64, 8192),
                   "centre crop to 1:1, then resized to this side in pixels", integer=True, keeps_size=False),
        AttackSpec("crop-jpeg", platform.crop_jpeg, 50, (1, 100),
                   "random 75 %-area crop scaled back, then JPEG at this quality", integer=True),
    ]
    for spec in specs:
        register(spec)


_register_builtins()
