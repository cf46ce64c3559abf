"""Pixel-value attacks: filtering, additive noise, impulse noise, brightness jitter.

Each function has the attack signature ``(image, strength, rng) -> image`` on uint8 RGB arrays and
does not modify its input. Random draws come only from ``rng``, so a seeded generator reproduces
the output exactly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from shallowmark.errors import InvalidParameterError


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8).copy()


def identity(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """No attack (the ``clean`` baseline). Returns a copy so callers may mutate the result."""
    del strength, rng
    return image.copy()


def blur(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur with radius ``strength`` pixels (Pillow's GaussianBlur; 0 = no-op)."""
    del rng
    return _arr(_pil(image).filter(ImageFilter.GaussianBlur(radius=float(strength))))


def check_median_size(strength: float) -> None:
    """Raise InvalidParameterError unless ``strength`` is an odd integer kernel size."""
    k = float(strength)
    if k != int(k) or int(k) % 2 == 0:
        raise InvalidParameterError(f"median kernel size must be an odd integer (3, 5, 7...), got {strength}")


def median(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Median filter over a ``strength`` x ``strength`` window per channel (odd size; 1 = no-op)."""
    del rng
    check_median_size(strength)
    k = int(strength)
    if k == 1:
        return image.copy()
    return _arr(_pil(image).filter(ImageFilter.MedianFilter(size=k)))


def noise(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise with standard deviation ``strength`` on the [0, 1] pixel scale.

    Independent per pixel and channel. Computed in float and clipped to [0, 1] before rounding, so
    bright pixels saturate at 255 instead of wrapping round to dark values as uint8 arithmetic would.
    """
    x = image.astype(np.float64) / 255.0
    x += rng.normal(0.0, float(strength), size=image.shape)
    np.clip(x, 0.0, 1.0, out=x)
    return np.rint(x * 255.0).astype(np.uint8)


def saltpepper(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise: each pixel, with probability ``strength``, becomes white or black (50/50).

    Whole pixels are hit (all three channels), as with a dead or stuck sensor pixel.
    """
    h, w = image.shape[:2]
    # Draw both fields regardless of strength so the rng is consumed the same way at every strength.
    hit = rng.random((h, w)) < float(strength)
    salt = rng.random((h, w)) < 0.5
    out = image.copy()
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness change, as torchvision's ``ColorJitter(brightness=strength)``.

    A factor is drawn uniformly from ``[max(0, 1 - strength), 1 + strength]`` and the image is
    blended with black by that factor (Pillow's ImageEnhance.Brightness): 0 gives a black image,
    1 the original, above 1 a brighter image clipped at 255.
    """
    b = float(strength)
    factor = rng.uniform(max(0.0, 1.0 - b), 1.0 + b)
    return _arr(ImageEnhance.Brightness(_pil(image)).enhance(factor))
