"""Platform pipelines: what social networks and hosting platforms do to every upload. Each may
change the image's size; the benchmark passes the result on as it is.

- ``platform-1080``: resize so the long side is ``strength`` pixels (default 1080; Lanczos, up or
  down), then JPEG quality 80;
- ``platform-4x5``: centre crop to 4:5 (portrait feed format), then JPEG quality ``strength``
  (default 80);
- ``platform-1x1``: centre crop to 1:1, then resize to ``strength``×``strength`` (default 512);
- ``crop-jpeg``: a crop of 75 % of the area at a random place, scaled back, then JPEG at quality
  ``strength`` (default 50): a screenshot or re-framed copy that is re-encoded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from . import codec, geometric

#: JPEG quality of the resize pipeline (the usual platform setting).
PIPELINE_JPEG_QUALITY = 80
#: Fraction of the area the crop of ``crop-jpeg`` keeps.
CROP_JPEG_AREA = 0.75


def _centre_crop(image: np.ndarray, aspect: float) -> np.ndarray:
    """The largest centred region of width/height ``aspect``."""
    h, w = image.shape[:2]
    if w / h > aspect:
        cw, ch = max(1, round(h * aspect)), h
    else:
        cw, ch = w, max(1, round(w / aspect))
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(image[top:top + ch, left:left + cw])


def resize_long_side_jpeg(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    scale = float(strength) / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS), dtype=np.uint8)
    return codec.jpeg(resized, PIPELINE_JPEG_QUALITY, rng)


def crop_4x5_jpeg(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return codec.jpeg(_centre_crop(image, 4 / 5), int(strength), rng)


def crop_1x1_resize(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    del rng
    side = int(strength)
    square = Image.fromarray(_centre_crop(image, 1.0))
    return np.asarray(square.resize((side, side), Image.LANCZOS), dtype=np.uint8).copy()


def crop_jpeg(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return codec.jpeg(geometric.crop(image, CROP_JPEG_AREA, rng), int(strength), rng)
