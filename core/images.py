"""Conversions between the public image type (uint8 RGB, H×W×3 numpy) and model tensors
(float NCHW in [-1, 1]).

torch is imported inside the tensor conversions only, so ``grid`` and ``psnr`` serve code that
runs without torch (the auditor's server-mode benchmark)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from shallowmark.errors import InvalidImageError
from shallowmark.imaging import rgb_batch  # noqa: F401  (re-exported: the data path's image check)

if TYPE_CHECKING:  # pragma: no cover
    import torch


def to_tensor(images, size: int | None = None) -> torch.Tensor:
    """uint8 RGB image(s) (H×W×3 or N×H×W×3) -> float32 NCHW in [-1, 1].

    With ``size``, every image must already be ``size``×``size``: resizing is the caller's choice.
    """
    import torch

    arr = rgb_batch(images)
    if size is not None and arr.shape[1:3] != (size, size):
        raise InvalidImageError(f"expected {size}×{size} images; got {arr.shape[2]}×{arr.shape[1]}")
    return torch.tensor(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 N×H×W×3 (rounded, clipped)."""
    import torch

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(images: np.ndarray, cols: int) -> np.ndarray:
    """Tile N×H×W×3 images into one picture, ``cols`` per row (missing cells stay black)."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    out = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def fill_black_borders(image: np.ndarray) -> np.ndarray:
    """A uint8 H×W×3 image with the exactly black regions that touch its edge (a rotation's
    corners, a translation's or a paste's fill) replaced by their nearest other pixel; interior
    black and images without such regions come back unchanged.

    Why: every copy rotated by the same angle gets the same black corners, a structure all of
    them share, and a shared structure gives some keys of a ring statistic more false positives
    than their target and others fewer; nearest-pixel filling removes it without looking at any
    key, so a p-value stays exact (docs/benchmarks/geometric/rotate30)."""
    from scipy import ndimage

    img = np.asarray(image)
    labels, _ = ndimage.label((img == 0).all(-1))
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    bad = np.isin(labels, edge[edge > 0])
    if not bad.any() or bad.all():
        return img
    rows, cols = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
    return img[rows, cols]
