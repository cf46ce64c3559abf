"""Images of any size on a model that works at one resolution.

A diffusion model here sees ``size``×``size`` images (tiny-ldm: 256²). An image of another size
or shape is mapped onto that grid by **squashing**: resized to ``size``×``size`` whatever its
aspect ratio, so every pixel of the image reaches the model and a watermark spread over the whole
grid comes back spread over the whole image. (Centre-cropping would leave the borders unmarked and
unread; padding would spend the grid on padding. The choice is measured in
``docs/benchmarks/sizes``.)

Embedding carries the watermark back to the full resolution as a *change*: the model computes
watermarked minus unwatermarked at its own resolution, only that difference is resized to the
image's size and added to the original pixels (the route TrustMark takes), so the upload keeps
all of its own detail.

Limits (:func:`check_shape`): at least :data:`MIN_SIDE` pixels on the short side and an aspect
ratio of at most :data:`MAX_ASPECT`:1 either way; the pixel count is the caller's (the server's
``max_image_pixels``).
"""

from __future__ import annotations

import numpy as np

from shallowmark.errors import InvalidImageError

__all__ = ["MIN_SIDE", "MAX_ASPECT", "check_shape", "to_grid", "resize_change"]

#: Shortest side accepted, in pixels: below it the model's 256² grid would invent 4× more pixels
#: than the image has.
MIN_SIDE = 64
#: Widest aspect ratio accepted (long side / short side): squashing a 4:1 image onto a square grid
#: already compresses one axis fourfold.
MAX_ASPECT = 4.0


def check_shape(height: int, width: int, min_side: int = MIN_SIDE, max_aspect: float = MAX_ASPECT) -> None:
    """Refuse an image shape the size mapping cannot serve, naming the limit.

    Raises:
        InvalidImageError: short side below ``min_side`` or aspect ratio beyond ``max_aspect``:1.
    """
    h, w = int(height), int(width)
    if min(h, w) < min_side:
        raise InvalidImageError(f"image is {w}x{h}: its short side must be at least {min_side} pixels")
    if max(h, w) > max_aspect * min(h, w):
        raise InvalidImageError(f"image is {w}x{h}, an aspect ratio of {max(h, w) / min(h, w):.2f}:1; at most "
                                f"{max_aspect:g}:1 (or 1:{max_aspect:g}) is accepted. Crop it first")


def to_grid(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 N×H×W×3 images squashed to N×``size``×``size``×3 (Lanczos; unchanged at that size)."""
    from PIL import Image

    images = np.asarray(images)
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize((size, size), Image.LANCZOS))
                     for im in images])


def resize_change(change, height: int, width: int):
    """A change computed on the model's grid (float N×3×size×size tensor, image units) resized to
    ``height``×``width`` (bicubic; antialiased where it shrinks), to be added to the original pixels."""
    import torch.nn.functional as F

    if tuple(change.shape[-2:]) == (height, width):
        return change
    shrink = height < change.shape[-2] or width < change.shape[-1]
    return F.interpolate(change.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=shrink)
