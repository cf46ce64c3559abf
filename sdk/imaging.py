"""The public image type and its one encoder: uint8 RGB numpy arrays, H×W×3 (or N×H×W×3 batches).

Every part of shallowmark (SDK, server, attacks, benchmark, demo) checks and encodes images here,
so a check says the same thing and a PNG is written the same way everywhere. numpy and Pillow
only: the light SDK imports it.
"""

from __future__ import annotations

import io

import numpy as np

from shallowmark.errors import InvalidImageError

__all__ = ["check_rgb", "rgb_batch", "encode_png", "decode_rgb"]


def _check_dtype(arr: np.ndarray, what: str) -> None:
    if arr.dtype != np.uint8:
        # Float images are the usual mistake (a [0, 1] tensor converted without scaling); say so.
        raise InvalidImageError(
            f"{what} must have dtype uint8 with values 0..255, got dtype {arr.dtype}; "
            "convert with np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) if it is on [0, 1]")


def check_rgb(image, what: str = "image") -> np.ndarray:
    """Return ``image`` if it is a non-empty uint8 RGB array of shape (H, W, 3); else raise
    :class:`InvalidImageError` saying what was expected and how to convert."""
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"{what} must be a numpy uint8 array of shape (H, W, 3), got {type(image).__name__}")
    _check_dtype(image, what)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidImageError(f"{what} must be RGB with shape (H, W, 3), got shape {image.shape}; "
                                "stack a grayscale image to 3 channels or drop an alpha channel first")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidImageError(f"{what} is empty: shape {image.shape}")
    return image


def rgb_batch(images, what: str = "images") -> np.ndarray:
    """uint8 RGB image(s) (H×W×3 or N×H×W×3) as an N×H×W×3 array; anything else raises
    :class:`InvalidImageError` saying what was expected."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InvalidImageError(f"expected RGB image(s) of shape (H, W, 3) or (N, H, W, 3); got {arr.shape}")
    _check_dtype(arr, what)
    return arr


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of one uint8 RGB image (lossless; what the service returns and the cache stores)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(check_rgb(pixels, "image to encode")), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """uint8 RGB pixels of encoded image bytes (PNG, JPEG...), converted to RGB.

    This is the plain decoder for trusted bytes (a server's own response, a cache); the server
    decodes untrusted uploads with its own bounded, format-checked decoder."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidImageError(f"cannot decode the image bytes: {e}") from None
