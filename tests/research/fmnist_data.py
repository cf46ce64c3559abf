"""A generated stand-in for the Fashion-MNIST files: the tests never need the Debian package.

Each image is a filled rectangle or ellipse of random size and grey level with a random stripe
texture, so that images differ in edges and texture as garments do."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def synthetic_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(9, 19, 2)
        hy, hx = rng.uniform(4, 12, 2)
        if rng.random() < 0.5:
            inside = (np.abs(yy - cy) < hy) & (np.abs(xx - cx) < hx)
        else:
            inside = ((yy - cy) / hy) ** 2 + ((xx - cx) / hx) ** 2 < 1
        period, phase = rng.uniform(2, 7), rng.uniform(0, 2 * np.pi)
        texture = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * rng.uniform(-1, 1) + yy) / period + phase)
        level = rng.uniform(90, 255)
        out[i] = np.where(inside, level * (0.6 + 0.4 * texture), 0).astype(np.uint8)
    return out


def idx_bytes(images: np.ndarray) -> bytes:
    n = len(images)
    return struct.pack(">IIII", 0x00000803, n, 28, 28) + np.ascontiguousarray(images, np.uint8).tobytes()


def write_dataset(folder: Path, n_train: int = 600, n_test: int = 100, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n, seed in (("train-images-idx3-ubyte", n_train, 1), ("t10k-images-idx3-ubyte", n_test, 2)):
        data = idx_bytes(synthetic_images(n, seed))
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return folder
