"""Geometric attacks: resampling, cropping, rotation, occlusion.

All keep the input's height and width, so a detector sees an image of the size it expects.
Random placement comes only from ``rng``.
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
