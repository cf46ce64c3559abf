"""The linear baseline every learned autoencoder must beat: PCA over non-overlapping 4×4×3 patches.

Keeping 4 of the 48 components is the same 12× compression as an f=4, 4-channel latent, so its
PSNR on the held-out photo is the floor the model card reports beside the trained autoencoder's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PatchPCA:
    mean: np.ndarray        # (48,)
    components: np.ndarray  # (k, 48), orthonormal rows
    patch: int = 4

    def encode(self, image: np.ndarray) -> np.ndarray:
        return (_patches(image, self.patch) - self.mean) @ self.components.T

    def decode(self, codes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return _unpatch(codes @ self.components + self.mean, shape, self.patch)

    def reconstruct(self, image: np.ndarray) -> np.ndarray:
        out = self.decode(self.encode(image), image.shape[:2])
        return np.clip(np.round(out), 0, 255).astype(np.uint8)


def fit_patch_pca(images: list[np.ndarray], components: int = 4, patch: int = 4) -> PatchPCA:
    data = np.concatenate([_patches(im, patch) for im in images])
    mean = data.mean(0)
    _, _, vt = np.linalg.svd(data - mean, full_matrices=False)
    return PatchPCA(mean, vt[:components], patch)


def _patches(image: np.ndarray, p: int) -> np.ndarray:
    h, w = (image.shape[0] // p) * p, (image.shape[1] // p) * p
    x = image[:h, :w].astype(np.float64).reshape(h // p, p, w // p, p, 3)
    return x.transpose(0, 2, 1, 3, 4).reshape(-1, p * p * 3)


def _unpatch(rows: np.ndarray, shape: tuple[int, int], p: int) -> np.ndarray:
    h, w = (shape[0] // p) * p, (shape[1] // p) * p
    return rows.reshape(h // p, w // p, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, 3)
