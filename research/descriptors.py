"""Image descriptors for copy detection: the similarity that the RP and GL scores threshold at 0.6.

A descriptor maps uint8 RGB images (N×H×W×3) to L2-normalised float features (N×D); the similarity
of two images is the cosine of their features (a dot product). A descriptor made of several factors
has the Kronecker product of its unit-norm factors as features, so its cosine is the product of the
factors' cosines. Two descriptors:

- :class:`SSCDDescriptor` — a local SSCD TorchScript file (Pizzi et al., CVPR 2022, e.g.
  ``sscd_disc_mixup.torchscript.pt``), the descriptor of the talk and of Somepalli et al. Images are
  resized to 320×320 (bilinear, antialiased: SSCD's ``skew_320`` preprocessing, which for our square
  images is the same as resizing the small edge), scaled to [0, 1] and ImageNet-normalised.
- :class:`ThumbnailDescriptor` — the stand-in when no SSCD file is given: a layout factor (the
  luminance at 24×24, band-passed, plus an 8×8 average) times a texture factor (a histogram of
  luminance gradient magnitudes). It ignores brightness, contrast and colour changes, JPEG, noise and
  mild blur by construction and tolerates shifts of a few percent of the image; it knows nothing of
  semantics. The RP/GL report calibrates it against the 0.6 threshold (augmented copies vs different
  photos, training crops vs a held-out photo) instead of assuming SSCD's calibration carries over.

:func:`load_descriptor` picks one: SSCD when a path is given, else the stand-in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shallowmark.core.images import rgb_batch
from shallowmark.errors import InvalidImageError, InvalidParameterError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_images(images) -> np.ndarray:
    arr = rgb_batch(images)
    if arr.shape[0] == 0:
        raise InvalidImageError("expected at least one image; got an empty batch")
    if min(arr.shape[1:3]) < 8:
        raise InvalidImageError(f"images must be at least 8×8 pixels; got {arr.shape[2]}×{arr.shape[1]}")
    return arr


def _to_float(arr: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 -> float32 N×3×H×W in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)


class Descriptor:
    """Base class: ``descriptor(images) -> features``; ``name`` and ``description`` go into reports.

    A descriptor may be built from several factors (``parts``), each an L2-normalised vector: its
    feature vector is their Kronecker product, which is again unit-norm, and whose cosine is the
    *product* of the factors' cosines — so two images are similar only when every factor agrees.
    Code that compares many images (a reference set) keeps the factors and multiplies their cosines
    instead of forming the long product vector; the numbers are the same.
    """

    name: str = "descriptor"
    description: str = ""
    batch: int = 64
    work_size: int = 256  # the resolution it needs; a reference set may cut its crops at this size
    factor_names: tuple[str, ...] = ("features",)
    # density of the training-crop grid GL searches (region-side ratio, stride / region side): fine
    # enough for the descriptor's tolerance to shifts and zoom. SSCD tolerates much more than the
    # stand-in, and costs ~10³× more per image, so it gets a coarser grid.
    reference_grid: tuple[float, float] = (1.25, 1 / 4)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Float N×3×H×W in [0, 1] -> the factors, each N×D_k (normalised by :meth:`parts`)."""
        raise NotImplementedError

    @torch.no_grad()
    def parts(self, images) -> list[torch.Tensor]:
        """The L2-normalised factors (each N×D_k, float32) of uint8 RGB images (N×H×W×3 or H×W×3)."""
        arr = _check_images(images)
        chunks = [self.features(_to_float(arr[i:i + self.batch])) for i in range(0, arr.shape[0], self.batch)]
        return [F.normalize(torch.cat([c[k].float() for c in chunks]), dim=1, eps=1e-8) for k in range(len(chunks[0]))]

    def __call__(self, images) -> torch.Tensor:
        """L2-normalised float32 features (N×D) of uint8 RGB images: the Kronecker product of the factors."""
        parts = self.parts(images)
        out = parts[0]
        for f in parts[1:]:
            out = (out.unsqueeze(2) * f.unsqueeze(1)).flatten(1)
        return out

    def similarity(self, a, b) -> torch.Tensor:
        """Cosine similarity of the images of ``a`` and ``b`` pairwise (same length): a vector."""
        return self.factor_similarities(a, b).prod(dim=0)

    def factor_similarities(self, a, b) -> torch.Tensor:
        """Per-factor cosines of the images of ``a`` and ``b`` pairwise: K×N (their product is the similarity)."""
        pa, pb = self.parts(a), self.parts(b)
        if pa[0].shape[0] != pb[0].shape[0]:
            raise InvalidParameterError(f"pairwise similarity needs as many images on both sides; got "
                                        f"{pa[0].shape[0]} and {pb[0].shape[0]}")
        return torch.stack([(fa * fb).sum(dim=1) for fa, fb in zip(pa, pb)])

    def info(self) -> dict:
        return dict(name=self.name, description=self.description)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of N×C×H×W with reflected borders."""
    r = max(1, int(3 * sigma + 0.5))
    k = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-k * k / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _unit(f: torch.Tensor) -> torch.Tensor:
    """Rows with their mean removed, L2-normalised; a row with (almost) no variation becomes zero."""
    f = f - f.mean(dim=1, keepdim=True)
    norm = f.norm(dim=1, keepdim=True)
    return torch.where(norm < 1e-4 * f.shape[1] ** 0.5, torch.zeros_like(f), f / norm.clamp_min(1e-12))


def _luminance(x: torch.Tensor, size: int) -> torch.Tensor:
    lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    return F.interpolate(lum, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class ThumbnailDescriptor(Descriptor):
    """Stand-in copy descriptor: *layout* × *texture*, from the luminance only.

    - layout: the luminance downsampled (bilinear, antialiased) to ``size``×``size``; its band-passed
      version (minus a Gaussian blur of σ = ``sigma`` thumbnail pixels) and an ``low_size``×``low_size``
      area average, each zero-mean and unit-norm, concatenated with weights √(1 − ``low_weight``) and
      √``low_weight``: cosine = 0.7 × correlation of the band-passed thumbnails + 0.3 × that of the
      coarse layouts (defaults);
    - texture: a soft histogram (``texture_bins`` Gaussian bins) of log(1 + 50·|∇L|), the gradient
      magnitude of the luminance at ``texture_size``², L2-normalised: what kind of surface it is
      (smooth, fine grain, sharp edges), whatever the layout.

    The similarity is the product: layout cosine × texture cosine. Why: a plain thumbnail is dominated
    by smooth gradients, and its *maximum* correlation over the ~10⁵ crops of the training grid exceeds
    0.6 for half of the crops of a photo the model never saw — the band-pass removes those chance
    matches. And two models started from the same noise x_T share the noise's spatial pattern even when
    one draws a retina and the other coloured noise (layout correlation ≈ 0.7, measured): the texture
    factor (≈ 0.3 for that pair, ≥ 0.95 for copies with noise or blur added) is what tells them apart.
    A flat image has a zero layout and similarity 0 to everything.
    """

    def __init__(self, size: int = 24, sigma: float = 3.0, low_weight: float = 0.3, low_size: int = 8,
                 texture_size: int = 64, texture_bins: int = 8):
        if not 8 <= int(size) <= 128:
            raise InvalidParameterError(f"thumbnail size must be in [8, 128]; got {size}")
        if not 0.0 <= float(low_weight) < 1.0:
            raise InvalidParameterError(f"low_weight must be in [0, 1); got {low_weight}")
        if not 0.5 <= float(sigma) <= size / 4:
            raise InvalidParameterError(f"sigma must be in [0.5, size/4]; got {sigma}")
        if not 2 <= int(low_size) <= int(size):
            raise InvalidParameterError(f"low_size must be in [2, size]; got {low_size}")
        if not 16 <= int(texture_size) <= 256 or not 2 <= int(texture_bins) <= 64:
            raise InvalidParameterError(f"texture_size must be in [16, 256] and texture_bins in [2, 64]; got "
                                        f"{texture_size}, {texture_bins}")
        self.size, self.sigma, self.low_weight, self.low_size = int(size), float(sigma), float(low_weight), int(low_size)
        self.texture_size, self.texture_bins = int(texture_size), int(texture_bins)
        # 4× the thumbnail (and ≥ the texture size): reducing from there is the same as from 256²
        self.work_size = max(4 * self.size, self.texture_size)
        self.name = f"thumbnail-band-{self.size}"
        self.factor_names = ("layout", "texture")
        self.reference_grid = (1.1, 1 / 16)
        self.description = (
            f"stand-in (no SSCD file given), luminance only: layout × texture. Layout = [√{1 - self.low_weight:g} × "
            f"({self.size}×{self.size} thumbnail − Gaussian blur σ={self.sigma:g} px), √{self.low_weight:g} × "
            f"{self.low_size}×{self.low_size} area average], each part zero-mean and L2-normalised; texture = soft "
            f"{self.texture_bins}-bin histogram of log(1 + 50·|∇L|) at {self.texture_size}², L2-normalised; "
            "similarity = layout cosine × texture cosine (the cosine of their Kronecker product)")

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        t = _luminance(x, self.size)
        band = _unit((t - _gaussian_blur(t, self.sigma)).flatten(1))
        low = _unit(F.adaptive_avg_pool2d(t, self.low_size).flatten(1))
        layout = torch.cat([band * (1 - self.low_weight) ** 0.5, low * self.low_weight ** 0.5], dim=1)
        return [layout, self._texture(x)]

    def _texture(self, x: torch.Tensor) -> torch.Tensor:
        lum = _luminance(x, self.texture_size)
        gx = lum[..., :-1, 1:] - lum[..., :-1, :-1]
        gy = lum[..., 1:, :-1] - lum[..., :-1, :-1]
        g = torch.log1p(50.0 * (gx * gx + gy * gy).sqrt()).flatten(1)  # 0 (flat) … ≈ 3.9 (full-range step)
        centres = torch.linspace(0.0, 3.0, self.texture_bins)
        width = 3.0 / (self.texture_bins - 1)
        return torch.exp(-(g.unsqueeze(-1) - centres) ** 2 / (2 * width * width)).mean(dim=1)


class HighPassDescriptor(Descriptor):
    """Copy descriptor for small aligned grayscale images (Fashion-MNIST's 28×28): the luminance at
    its own size minus a Gaussian blur of σ = ``sigma`` px, zero-mean and unit-norm; similarity = the
    cosine of two such images.

    Why high-pass: Fashion-MNIST's items share large uniform silhouettes, and the plain pixel
    correlation of an image with its nearest *other* training image has median 0.93 (p99 0.99),
    higher than with a copy of itself under mild noise. Removing the silhouette leaves the edges,
    seams and prints that tell two garments apart: median 0.68, p95 0.92 against copies at ≥ 0.92
    (measured on 500 training images against the other 59 999; the report calibrates it again)."""

    def __init__(self, sigma: float = 1.0, size: int = 28):
        if not 0.3 <= float(sigma) <= 4.0:
            raise InvalidParameterError(f"sigma must be in [0.3, 4]; got {sigma}")
        if not 8 <= int(size) <= 256:
            raise InvalidParameterError(f"size must be in [8, 256]; got {size}")
        self.sigma, self.work_size, self.batch = float(sigma), int(size), 4096
        self.name = f"high-pass-{self.work_size}-sigma{self.sigma:g}"
        self.description = (f"luminance at {self.work_size}² minus its Gaussian blur (σ = {self.sigma:g} px), "
                            "zero-mean and L2-normalised; similarity = cosine")

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        lum = _luminance(x, self.work_size)
        return [_unit((lum - _gaussian_blur(lum, self.sigma)).flatten(1))]


def nearest(queries: list[torch.Tensor], reference: list[torch.Tensor], chunk: int = 8192
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Max similarity of each query to the reference images and its index; both given as a
    descriptor's factors (:meth:`Descriptor.parts`): similarity = product of the factors' cosines."""
    n = queries[0].shape[0]
    best = torch.full((n,), -2.0)
    idx = torch.zeros(n, dtype=torch.long)
    for s in range(0, reference[0].shape[0], chunk):
        sim = queries[0] @ reference[0][s:s + chunk].T
        for q, r in zip(queries[1:], reference[1:]):
            sim = sim * (q @ r[s:s + chunk].T)
        v, i = sim.max(dim=1)
        better = v > best
        best = torch.where(better, v, best)
        idx = torch.where(better, i + s, idx)
    return best, idx


class SSCDDescriptor(Descriptor):
    """A local SSCD TorchScript model (``torch.jit.load``), on the CPU unless ``device`` says otherwise."""

    def __init__(self, path: str | Path, device: str = "cpu", size: int = 320, batch: int = 16):
        path = Path(path)
        if not path.is_file():
            raise InvalidParameterError(
                f"SSCD descriptor file {str(path)!r} does not exist; give the path of an SSCD TorchScript model "
                "(e.g. sscd_disc_mixup.torchscript.pt from facebookresearch/sscd-copy-detection), or no path to "
                "use the stand-in thumbnail descriptor")
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:  # TorchScript raises RuntimeError/ValueError subclasses for a bad file
            raise InvalidParameterError(f"{str(path)!r} is not a loadable TorchScript model ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
        self.device, self.size, self.batch = torch.device(device), int(size), int(batch)
        self.path = path
        self.name = f"sscd:{path.name}"
        self.factor_names = ("sscd",)
        self.description = (f"SSCD TorchScript model {path.name}: images resized to {self.size}×{self.size} "
                            "(bilinear, antialiased), ImageNet mean/std normalisation, output L2-normalised")
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = ((x - self._mean) / self._std).to(self.device)
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidParameterError(f"{self.name} must return one descriptor vector per image (N×D); got {shape}")
        return [out.cpu()]

    def info(self) -> dict:
        return dict(name=self.name, description=self.description, path=str(self.path))


def load_descriptor(sscd_path: str | Path | None = None, device: str = "cpu") -> Descriptor:
    """SSCD from a local TorchScript file when ``sscd_path`` is given, else the stand-in thumbnail."""
    if sscd_path:
        return SSCDDescriptor(sscd_path, device=device)
    return ThumbnailDescriptor()


__all__ = ["Descriptor", "SSCDDescriptor", "ThumbnailDescriptor", "load_descriptor"]
