"""Images of any size on a model that works at one resolution.

A diffusion model here sees ``size``×``size`` images (tiny-ldm: 256²). An image of another size
or shape is mapped onto that grid by its **centre square**: the largest centred square, resized to
``size``×``size``. Embedding carries the watermark back to the full resolution as a *change*: the
model computes watermarked minus unwatermarked on its grid, only that difference is resized to the
centre square and added to the original pixels there (the route TrustMark takes), so the upload
keeps all of its own detail; the borders outside the square are left as they were.

Chosen by measurement against squashing the whole image onto the grid and reflect-padding it to a
square (``shallowmark bench-sizes``, docs/benchmarks/sizes, with the default synchronisation
template): on the held-out photo at 300×800, 512×384, 1024×768 and 1920×1080 the centre square
kept PSNR 39.2-41.6 dB against the original (squash 36.0-37.1, pad 36.7-37.6) and was detected
clean, after a resize to a 1080 px long side with JPEG 80 and after a crop to 1:1 with p < 1e-10
at every size, and after a crop to 4:5 with JPEG 80 with p 2e-11 to 9e-5 (the template undoes the
rescale that crop implies); squash lost the 1:1 crop (p 0.015-1) and pad was weaker everywhere.

Limits (:func:`check_shape`): at least :data:`MIN_SIDE` pixels on the short side and an aspect
ratio of at most :data:`MAX_ASPECT`:1 either way; the pixel count is the caller's (the server's
``max_image_pixels``).
"""

from __future__ import annotations

import numpy as np

from shallowmark.errors import InvalidImageError

__all__ = ["MIN_SIDE", "MAX_ASPECT", "check_shape", "centre_square", "to_grid", "carry_change"]

#: Shortest side accepted, in pixels: below it the model's 256² grid would invent 4× more pixels
#: than the image has.
MIN_SIDE = 64
#: Widest aspect ratio accepted (long side / short side): at 4:1 the centre square that carries the
#: watermark is already only a quarter of the image.
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


def centre_square(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the largest centred square of a ``height``×``width`` image."""
    side = min(int(height), int(width))
    return (int(height) - side) // 2, (int(width) - side) // 2, side


def to_grid(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 N×H×W×3 images' centre squares, resized to N×``size``×``size``×3 (Lanczos; unchanged at
    that size)."""
    from PIL import Image

    images = np.asarray(images)
    if images.shape[1:3] == (size, size):
        return images
    top, left, side = centre_square(*images.shape[1:3])
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im[top:top + side, left:left + side]))
                                .resize((size, size), Image.LANCZOS)) for im in images])


def carry_change(change, height: int, width: int):
    """A change computed on the model's grid (float N×3×size×size tensor, image units) carried to a
    ``height``×``width`` image: resized to its centre square (bicubic; antialiased where it
    shrinks) and zero outside, to be added to the original pixels."""
    import torch
    import torch.nn.functional as F

    if tuple(change.shape[-2:]) == (height, width):
        return change
    top, left, side = centre_square(height, width)
    inner = F.interpolate(change.float(), size=(side, side), mode="bicubic", align_corners=False,
                          antialias=side < change.shape[-1])
    out = torch.zeros(change.shape[0], change.shape[1], int(height), int(width), dtype=inner.dtype)
    out[:, :, top:top + side, left:left + side] = inner
    return out
