"""Codec attacks: lossy re-encoding with a real encoder (Pillow's libjpeg)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from shallowmark.errors import InvalidParameterError

from shallowmark.imaging import check_rgb as check_image


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """Encode a uint8 RGB image as JPEG at ``quality`` (1..100) and return the file bytes.

    Uses Pillow's defaults otherwise (4:2:0 chroma subsampling, standard quantisation tables, no
    optimisation), so sizes and decoded pixels are comparable across runs.
    """
    check_image(image)
    if isinstance(quality, bool) or not 1 <= quality <= 100 or quality != int(quality):
        raise InvalidParameterError(f"JPEG quality must be a whole number in [1, 100], got {quality}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def jpeg(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG round trip: encode at quality ``strength`` (1..100, lower = harsher) and decode back."""
    del rng  # deterministic codec
    data = jpeg_bytes(image, int(round(strength)))
    with Image.open(io.BytesIO(data)) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8).copy()
