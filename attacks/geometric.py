"""Geometric attacks: resampling, cropping, rotation, translation, aspect change, zoom, occlusion.

All keep the input's height and width except ``crop_keep`` (the crop itself) and ``aspect`` (the
stretched image); the benchmark passes those on at their new size. Random placement comes only
from ``rng``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def resize(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Resize-restore: scale each side by ``strength`` (0.5 = half size) and back up, both bilinear.

    Pillow's bilinear downscaling filters over the whole footprint (antialiased), like a typical
    image pipeline would. Sides are at least 1 pixel.
    """
    del rng
    h, w = image.shape[:2]
    s = float(strength)
    small = (max(1, round(w * s)), max(1, round(h * s)))
    img = Image.fromarray(image).resize(small, Image.Resampling.BILINEAR)
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8).copy()


def _rect(h: int, w: int, area: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A rectangle of the image's aspect ratio covering about ``area`` of it, placed uniformly by rng.

    Returns (top, left, height, width).
    """
    side = math.sqrt(float(area))
    rh = min(h, max(1, round(h * side)))
    rw = min(w, max(1, round(w * side)))
    top = int(rng.integers(0, h - rh + 1))
    left = int(rng.integers(0, w - rw + 1))
    return top, left, rh, rw


def crop(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Crop-and-scale: keep a crop of fraction ``strength`` of the area and scale it back (bilinear).

    The crop has the image's aspect ratio and is placed uniformly at random by ``rng``
    (1.0 = whole image, unchanged up to resampling).
    """
    h, w = image.shape[:2]
    top, left, rh, rw = _rect(h, w, strength, rng)
    img = Image.fromarray(image[top : top + rh, left : left + rw])
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8).copy()


def _scaled_back(image: np.ndarray, top: int, left: int, rh: int, rw: int) -> np.ndarray:
    h, w = image.shape[:2]
    img = Image.fromarray(np.ascontiguousarray(image[top : top + rh, left : left + rw]))
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8).copy()


def crop_centre(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Centred crop-and-scale: the centred rectangle of fraction ``strength`` of the area (the
    image's aspect ratio), scaled back to the full size (bilinear)."""
    del rng
    h, w = image.shape[:2]
    _, _, rh, rw = _rect(h, w, strength, np.random.default_rng(0))
    return _scaled_back(image, (h - rh) // 2, (w - rw) // 2, rh, rw)


def crop_corner(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Off-centre crop-and-scale: as :func:`crop_centre`, but the rectangle touches one of the four
    corners (chosen by ``rng``), the largest offset a crop of that area can have."""
    h, w = image.shape[:2]
    _, _, rh, rw = _rect(h, w, strength, rng)
    corner = int(rng.integers(0, 4))
    return _scaled_back(image, (h - rh) * (corner // 2), (w - rw) * (corner % 2), rh, rw)


def crop_keep(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Crop without rescale: a rectangle of fraction ``strength`` of the area (the image's aspect
    ratio) placed uniformly by ``rng``, returned at its own, smaller size."""
    top, left, rh, rw = _rect(*image.shape[:2], strength, rng)
    return np.ascontiguousarray(image[top : top + rh, left : left + rw])


def translate(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Shift the content by ``strength`` of the width and of the height (each direction's sign
    drawn by ``rng``); what comes in is black, as in a pasted or re-framed copy."""
    h, w = image.shape[:2]
    dy, dx = round(h * float(strength)), round(w * float(strength))
    sy, sx = (1 if b else -1 for b in rng.integers(0, 2, 2))
    out = np.zeros_like(image)
    src = image[max(0, -sy * dy) : h - max(0, sy * dy), max(0, -sx * dx) : w - max(0, sx * dx)]
    out[max(0, sy * dy) : max(0, sy * dy) + src.shape[0], max(0, sx * dx) : max(0, sx * dx) + src.shape[1]] = src
    return out


def aspect(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Aspect change: the width scaled by ``strength`` and the height kept (bilinear), so the result
    is ``round(strength·W)``×H (0.8: a 256² image comes back 205 wide)."""
    del rng
    h, w = image.shape[:2]
    size = (max(1, round(w * float(strength))), h)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8).copy()


def zoom(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Zoom in by ``strength`` about the centre, same size: the centred 1/strength of each side,
    scaled back up (bilinear); 1.25 keeps 64 % of the area."""
    return crop_centre(image, 1.0 / float(strength) ** 2, rng)


def rotate(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate by ``strength`` degrees counter-clockwise about the centre, same size, black corners."""
    del rng
    img = Image.fromarray(image)
    out = img.rotate(float(strength), resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(0, 0, 0))
    return np.asarray(out, dtype=np.uint8).copy()


def drop(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random drop (occlusion): blacken one rectangle covering fraction ``strength`` of the area.

    The rectangle has the image's aspect ratio and is placed uniformly at random by ``rng``.
    """
    h, w = image.shape[:2]
    top, left, rh, rw = _rect(h, w, strength, rng)
    out = image.copy()
    if strength > 0:
        out[top : top + rh, left : left + rw] = 0
    return out


def flip(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Mirror the image: ``strength`` 0 left-right (horizontal flip), 1 top-bottom (vertical flip)."""
    del rng
    return np.ascontiguousarray(image[:, ::-1] if int(strength) == 0 else image[::-1])
