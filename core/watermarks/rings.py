"""Fourier ring keys shared by Shallow Diffuse, Tree-Ring and RingID.

A ring key sets the Fourier coefficients of one latent channel inside a disc of radius ``R`` to
values that depend only on the ring index ``ceil(distance to the centre)`` (0..R), so the key is
rotationally symmetric and survives rotations of the image. Two placements:

- ``centre="nyquist"`` (Shallow Diffuse): the disc is centred on the Nyquist frequency (index
  (H/2, W/2) of the *unshifted* spectrum) — the highest frequencies;
- ``centre="dc"`` (Tree-Ring, RingID): centred on the zero frequency, i.e. (H/2, W/2) of the
  *shifted* spectrum — the lowest frequencies.

Both discs are symmetric under k → −k, and the ring values are real, so the pattern is Hermitian
and the inverse FFT of the injected spectrum is real: nothing is lost to a ``.real``. (The
reference code centres its Nyquist disc at (31, 32), one bin off, and relies on ``.real`` to
symmetrise; we centre it exactly.) FFTs use ``norm="ortho"`` so a N(0, 1) latent has
unit-variance coefficients.

Detection statistic (exact under the null): average ``Re(Y)`` over the bins of each ring
(one bin of each conjugate pair, self-conjugate bins excluded) to get a ring profile ``m``, and
score a key by the cosine between ``m`` and its ring values ``w``. A key's ring values are i.i.d.
Gaussian and independent of any image not watermarked with it, so ``w/‖w‖`` is uniform on the
sphere and ``cos(w, m)`` has the known distribution of one coordinate of a uniform unit vector in
``n`` dimensions, whatever the image: ``P(cos ≥ c) = ½·I_{1−c²}((n−1)/2, ½)`` for c ≥ 0. This
holds for images watermarked with *another* key too, which a per-bin Gaussian test (Tree-Ring's
χ²) gets wrong: ring keys have few degrees of freedom (n = R rings), so two keys' patterns
correlate strongly and a strong ring of key A looks like a weak ring of key B to that test.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from shallowmark.errors import InvalidParameterError
from shallowmark.keys import MethodKey, ring_seed

CENTRES = ("nyquist", "dc")


@dataclass(frozen=True)
class RingGeometry:
    size: int
    radius: int
    centre: str

    def __post_init__(self):
        if self.centre not in CENTRES:
            raise InvalidParameterError(f"ring centre must be one of {CENTRES}; got {self.centre!r}")
        if not 1 <= self.radius < self.size // 2 - 6:
            raise InvalidParameterError(f"ring radius must be in [1, {self.size // 2 - 7}] for {self.size}² "
                                        f"latents; got {self.radius}")


@lru_cache(maxsize=16)
def _geometry_tensors(geom: RingGeometry):
    """Ring index per bin (−1 outside the disc), the scored bins, and the annulus bins for σ."""
    n = geom.size
    idx = torch.arange(n)
    if geom.centre == "nyquist":   # unshifted spectrum, centre (n/2, n/2)
        d = idx - n // 2
    else:                          # unshifted spectrum, centre (0, 0) with wrap-around
        d = torch.where(idx <= n // 2, idx, idx - n)
    dist = torch.sqrt(d[:, None].double() ** 2 + d[None, :].double() ** 2)
    ring = torch.ceil(dist - 1e-9).long()
    ring[dist > geom.radius] = -1
    # one bin of each conjugate pair: the conjugate of (i, j) is (−i, −j) mod n
    flat = torch.arange(n * n).view(n, n)
    conj = flat[(-idx) % n][:, (-idx) % n]
    canonical = flat < conj  # strict: self-conjugate bins drop out
    scored = (ring >= 0) & canonical
    annulus = (dist > geom.radius + 0.5) & (dist <= geom.radius + 5.5) & canonical
    return ring, scored, annulus


def ring_values_from_seed(seed: int, radius: int, strength: float = 1.0) -> torch.Tensor:
    """Gaussian ring values (radius + 1,), as Tree-Ring's ``ring`` pattern draws them."""
    g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    return strength * torch.randn(radius + 1, generator=g, dtype=torch.float64)


def pattern(geom: RingGeometry, values: torch.Tensor) -> torch.Tensor:
    """The (size, size) real spectrum pattern W: ``values[ring index]`` inside the disc, 0 outside."""
    ring, _, _ = _geometry_tensors(geom)
    if values.shape != (geom.radius + 1,):
        raise InvalidParameterError(f"expected {geom.radius + 1} ring values; got {tuple(values.shape)}")
    w = torch.zeros(geom.size, geom.size, dtype=torch.float64)
    inside = ring >= 0
    w[inside] = values.double()[ring[inside]]
    return w


def mask(geom: RingGeometry) -> torch.Tensor:
    ring, _, _ = _geometry_tensors(geom)
    return ring >= 0


def inject(x: torch.Tensor, channel: int, patterns: torch.Tensor, geom: RingGeometry) -> torch.Tensor:
    """Write ring patterns (batch, H, W) into channel ``channel`` of latents x (batch, C, H, W):
    ``x_c <- ifft(fft(x_c)·(1 − M) + W·M)``. Other channels are untouched."""
    m = mask(geom).to(x.device)
    out = x.clone()
    spec = torch.fft.fft2(x[:, channel].double(), norm="ortho")
    spec = torch.where(m, patterns.to(x.device, torch.float64).to(spec.dtype), spec)
    out[:, channel] = torch.fft.ifft2(spec, norm="ortho").real.to(x.dtype)
    return out


def ring_profile(x: torch.Tensor, channel: int, geom: RingGeometry) -> torch.Tensor:
    """Mean of Re(fft) over each ring 1..R of channel ``channel``: (batch, R)."""
    ring, scored, _ = _geometry_tensors(geom)
    spec = torch.fft.fft2(x[:, channel].detach().double().cpu(), norm="ortho").real
    idx = ring[scored] - 1                                      # ring 0 is the self-conjugate centre
    keep = idx >= 0
    sums = torch.zeros(x.shape[0], geom.radius, dtype=torch.float64)
    sums.index_add_(1, idx[keep], spec[:, scored][:, keep])
    counts = torch.bincount(idx[keep], minlength=geom.radius).double()
    return sums / counts


def cosines(x: torch.Tensor, channel: int, values: torch.Tensor, geom: RingGeometry) -> torch.Tensor:
    """cos(ring values of each key, ring profile of each image): (batch, keys). ``values`` is
    (keys, R + 1); the centre value (index 0) is not scored."""
    m = ring_profile(x, channel, geom)
    w = values.double()[:, 1:]
    return (m @ w.T) / (m.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :]).clamp_min(1e-300)


def p_values(cos: torch.Tensor, dims: int) -> np.ndarray:
    """P(cos ≥ c) for the first coordinate of a uniform unit vector in ``dims`` dimensions."""
    from scipy.special import betainc

    c = cos.detach().cpu().numpy().clip(-1.0, 1.0)
    tail = 0.5 * betainc((dims - 1) / 2.0, 0.5, np.clip(1.0 - c * c, 0.0, 1.0))
    return np.where(c >= 0, tail, 1.0 - tail)


class RingKeyed:
    """Mixin for ring-key methods (their ``config`` has ``radius`` and ``strength``, and they set
    ``geom``): key → ring values → spectrum pattern."""

    def ring_values(self, key: MethodKey) -> torch.Tensor:
        return ring_values_from_seed(ring_seed(key), self.config.radius, self.config.strength)

    def _values(self, keys) -> torch.Tensor:
        return torch.stack([self.ring_values(k) for k in keys])

    def _patterns(self, keys) -> torch.Tensor:
        return torch.stack([pattern(self.geom, v) for v in self._values(keys)])
