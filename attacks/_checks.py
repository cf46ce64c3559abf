"""Input checks shared by the attacks and the fidelity metrics."""

from __future__ import annotations

import numpy as np

from shallowmark.errors import InvalidImageError


def check_image(image, what: str = "image") -> np.ndarray:
    """Return ``image`` if it is a uint8 RGB array of shape (H, W, 3); else raise InvalidImageError."""
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(
            f"{what} must be a numpy uint8 array of shape (H, W, 3), got {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        # Float images are the usual mistake (a [0, 1] tensor converted without scaling); say so.
        raise InvalidImageError(
            f"{what} must have dtype uint8 with values 0..255, got dtype {image.dtype}; "
            "convert with np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) if it is on [0, 1]"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidImageError(
            f"{what} must be RGB with shape (H, W, 3), got shape {image.shape}; "
            "stack a grayscale image to 3 channels or drop an alpha channel first"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidImageError(f"{what} is empty: shape {image.shape}")
    return image
