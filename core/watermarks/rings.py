"""Fourier ring keys shared by Shallow Diffuse, Tree-Ring and RingID.

A ring key sets the Fourier coefficients of one latent channel in the rings ``inner..radius``
around a centre frequency to values that depend only on the ring index ``ceil(distance to the
centre)``, so the key is rotationally symmetric. Two placements:

- ``centre="dc"``: rings around the zero frequency, i.e. (H/2, W/2) of the *shifted* spectrum.
  Tree-Ring and RingID fill the whole disc (``inner=0``) of the initial noise x_T; Shallow Diffuse
  uses an annulus (``inner>0``) of mid frequencies at x_t*, where they are still mostly noise;
- ``centre="nyquist"``: rings around the highest frequency (index (H/2, W/2) of the *unshifted*
  spectrum), the Shallow Diffuse reference code's placement for Stable Diffusion's f=8 latents.

Ring values are real (``complex_values=False``, Tree-Ring) or complex (``True``): a complex value
``v`` goes to the bins of the upper half-plane of its ring and ``conj(v)`` to their mirror images,
so the pattern is still Hermitian and the inverse FFT real, and each ring carries two independent
numbers instead of one. More numbers per key means a stronger test at the same energy (see
below). Either way nothing is lost to a ``.real``. (The reference centres its Nyquist disc at
(31, 32), one bin off, and relies on ``.real`` to symmetrise; we centre it exactly.) FFTs use
``norm="ortho"`` so a N(0, 1) latent has unit-variance coefficients.

Detection statistic (exact under the null): average the spectrum over the upper-half-plane bins
of each scored ring (self-conjugate bins excluded) to get a ring profile ``m`` — its real parts,
plus its imaginary parts for complex keys — and score a key by the cosine between ``m`` and its
ring values ``w``. A key's ring values are i.i.d. Gaussian and independent of any image not
watermarked with it, so ``w/‖w‖`` is uniform on the sphere and ``cos(w, m)`` has the known
distribution of one coordinate of a uniform unit vector in ``n = dims`` dimensions, whatever the
image: ``P(cos ≥ c) = ½·I_{1−c²}((n−1)/2, ½)`` for c ≥ 0. This holds for images watermarked with
*another* key too, which a per-bin Gaussian test (Tree-Ring's χ²) gets wrong: ring keys have few
degrees of freedom, so two keys' patterns correlate strongly and a strong ring of key A looks like
a weak ring of key B to that test. With ``n`` dimensions, p ≈ (1 − c²)^((n−1)/2): doubling ``n``
squares the p-value reached at the same cosine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from shallowmark.errors import InvalidParameterError
from shallowmark.keys import FamilyMember, KeyFamily, MethodKey, family_seed, ring_seed

CENTRES = ("nyquist", "dc")
ORIGINS = ("corner", "centre")


@dataclass(frozen=True)
class RingGeometry:
    """Rings ``inner..radius`` (in frequency bins) around ``centre`` of a ``size``² spectrum.

    ``origin``: where the pattern sits in space. A ring pattern is radially symmetric about the
    spatial origin of the FFT, pixel (0, 0), and its energy is concentrated there (for keys on rings
    8-16 of a 64² latent the middle quarter of the area holds a median 0.52 of a centred pattern's
    energy, 0.15 of a corner one's): with "corner" (the FFT's own origin, Tree-Ring's placement) in
    the latent's corners, which a rotation, a zoom or a platform crop is the first to cut away; with
    "centre" the spectrum is taken of the latent rolled by half its side, so the pattern is centred
    on the image, which those attacks keep (docs/reliability/forgery, "Where the pattern sits")."""

    size: int
    radius: int
    centre: str
    inner: int = 0
    complex_values: bool = False
    origin: str = "corner"

    def __post_init__(self):
        if self.centre not in CENTRES:
            raise InvalidParameterError(f"ring centre must be one of {CENTRES}; got {self.centre!r}")
        if self.origin not in ORIGINS:
            raise InvalidParameterError(f"ring origin must be one of {ORIGINS}; got {self.origin!r}")
        if self.origin == "centre" and self.size % 2:
            raise InvalidParameterError(f"a centred ring pattern needs an even latent side; got {self.size}")
        if not 1 <= self.radius < self.size // 2 - 6:
            raise InvalidParameterError(f"ring radius must be in [1, {self.size // 2 - 7}] for {self.size}² "
                                        f"latents; got {self.radius}")
        if not 0 <= self.inner <= self.radius:
            raise InvalidParameterError(f"inner ring radius must be in [0, radius={self.radius}]; got {self.inner}")

    @property
    def n_values(self) -> int:
        """Ring values per key: one per ring ``inner..radius``."""
        return self.radius - self.inner + 1

    @property
    def first_scored(self) -> int:
        # Ring 0 is the lone centre bin, which is its own mirror image: it carries no usable value.
        return max(self.inner, 1)

    @property
    def dims(self) -> int:
        """Degrees of freedom of the detection statistic (``n`` of the p-value)."""
        return (self.radius - self.first_scored + 1) * (2 if self.complex_values else 1)


@lru_cache(maxsize=16)
def _geometry_tensors(geom: RingGeometry):
    """Ring index per bin (−1 outside the rings), the upper-half-plane bins, self-conjugate bins."""
    n = geom.size
    idx = torch.arange(n)
    if geom.centre == "nyquist":   # unshifted spectrum, centre (n/2, n/2)
        d = idx - n // 2
    else:                          # unshifted spectrum, centre (0, 0) with wrap-around
        d = torch.where(idx <= n // 2, idx, idx - n)
    dist = torch.sqrt(d[:, None].double() ** 2 + d[None, :].double() ** 2)
    ring = torch.ceil(dist - 1e-9).long()
    ring[(dist > geom.radius) | (ring < geom.inner)] = -1
    # one bin of each conjugate pair: the conjugate of (i, j) is (−i, −j) mod n; the lower flat
    # index is a half-plane (first rows, then half of row 0), so a complex value's phase has a
    # fixed geometric meaning
    flat = torch.arange(n * n).view(n, n)
    conj = flat[(-idx) % n][:, (-idx) % n]
    canonical = flat < conj  # strict: self-conjugate bins drop out
    return ring, canonical, flat == conj


def _to_origin(plane: torch.Tensor, geom: RingGeometry) -> torch.Tensor:
    """The (…, size, size) plane as the FFT should see it: rolled by half its side for a centred
    pattern (an involution for an even side, so the same call maps back)."""
    if geom.origin == "corner":
        return plane
    half = geom.size // 2
    return torch.roll(plane, (half, half), (-2, -1))


def _spectrum(x: torch.Tensor, channel: int, geom: RingGeometry) -> torch.Tensor:
    return torch.fft.fft2(_to_origin(x[:, channel].double(), geom), norm="ortho")


def _plane(spec: torch.Tensor, geom: RingGeometry) -> torch.Tensor:
    return _to_origin(torch.fft.ifft2(spec, norm="ortho").real, geom)


def ring_values_from_seed(seed: int, radius: int, strength: float = 1.0) -> torch.Tensor:
    """Gaussian ring values (radius + 1,), as Tree-Ring's ``ring`` pattern draws them."""
    g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    return strength * torch.randn(radius + 1, generator=g, dtype=torch.float64)


def key_values_from_seed(seed: int, geom: RingGeometry, strength: float = 1.0) -> torch.Tensor:
    """Gaussian values for rings ``inner..radius``: real (Tree-Ring, equal to
    :func:`ring_values_from_seed`) or complex with i.i.d. N(0, strength²) real and imaginary parts."""
    if not geom.complex_values:
        return ring_values_from_seed(seed, geom.radius, strength)[geom.inner:]
    g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    parts = strength * torch.randn(2, geom.n_values, generator=g, dtype=torch.float64)
    return torch.complex(parts[0], parts[1])


def orthogonal_key_values(seed: int, geom: RingGeometry, count: int, strength: float = 1.0) -> torch.Tensor:
    """``count`` ring-value sets (count, n_values) whose scored vectors (:func:`key_vector`) are
    mutually orthogonal, of the norm a Gaussian key's has on average (strength·√dims): the columns of
    a Haar-random orthogonal matrix drawn from ``seed``. Each one alone is a uniformly random
    direction, as a Gaussian key is, so the p-value stays exact for every one of them; orthogonal,
    an average over images carrying different ones is as far from each as it can be (random
    directions in 18 dimensions correlate with a standard deviation of 1/√18 ≈ 0.24).

    Raises:
        InvalidParameterError: ``count`` is not in [1, dims].
    """
    if not 1 <= count <= geom.dims:
        raise InvalidParameterError(f"at most {geom.dims} orthogonal ring keys fit in {geom.dims} dimensions; got {count}")
    return _orthogonal_key_values(int(seed) % (2 ** 63), geom, int(count), float(strength)).clone()


@lru_cache(maxsize=64)
def _orthogonal_key_values(seed: int, geom: RingGeometry, count: int, strength: float) -> torch.Tensor:
    # cached: embedding and every verification ask for a key's variants again, and each is a QR
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(geom.dims, geom.dims, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]      # the sign fix that makes QR's Q Haar-distributed
    vecs = strength * geom.dims ** 0.5 * q[:, :count].T   # (count, dims)
    nr = geom.radius - geom.first_scored + 1
    scored = torch.complex(vecs[:, :nr], vecs[:, nr:]) if geom.complex_values else vecs
    out = torch.zeros(count, geom.n_values, dtype=scored.dtype)
    out[:, geom.first_scored - geom.inner:] = scored
    return out


def _check_values(geom: RingGeometry, values: torch.Tensor) -> None:
    if values.shape[-1] != geom.n_values:
        raise InvalidParameterError(f"expected {geom.n_values} ring values (rings {geom.inner}..{geom.radius}); "
                                    f"got {tuple(values.shape)}")


def pattern(geom: RingGeometry, values: torch.Tensor) -> torch.Tensor:
    """The (size, size) Hermitian spectrum pattern W: ``values[ring − inner]`` on the upper
    half-plane, its conjugate on the lower, 0 outside the rings. Complex dtype."""
    ring, canonical, selfconj = _geometry_tensors(geom)
    _check_values(geom, values)
    v = values.to(torch.complex128)
    w = torch.zeros(geom.size, geom.size, dtype=torch.complex128)
    inside = ring >= 0
    vals = v[ring[inside] - geom.inner]
    vals = torch.where(canonical[inside], vals, vals.conj())
    w[inside] = torch.where(selfconj[inside], vals.real.to(vals.dtype), vals)
    return w


def mask(geom: RingGeometry) -> torch.Tensor:
    ring, _, _ = _geometry_tensors(geom)
    return ring >= 0


def inject(x: torch.Tensor, channel: int, patterns: torch.Tensor, geom: RingGeometry) -> torch.Tensor:
    """Write ring patterns (batch, H, W) into channel ``channel`` of latents x (batch, C, H, W):
    ``x_c <- ifft(fft(x_c)·(1 − M) + W·M)``. Other channels are untouched."""
    m = mask(geom).to(x.device)
    out = x.clone()
    spec = _spectrum(x, channel, geom)
    spec = torch.where(m, patterns.to(x.device).to(spec.dtype), spec)
    out[:, channel] = _plane(spec, geom).to(x.dtype)
    return out


def set_ring_means(x: torch.Tensor, channel: int, values: torch.Tensor, geom: RingGeometry) -> torch.Tensor:
    """Shift every ring of channel ``channel`` of latents x (batch, C, H, W) so that its mean over
    the upper-half-plane bins becomes the key's value (``values``: (batch, n_values)).

    This is the smallest change (in L2) that gives the latent the key's ring profile — what the
    detector reads — while :func:`inject` also erases the variation inside each ring (the
    latent's own content and noise there). Mirror bins get the conjugate shift, so the result is
    real; a self-conjugate bin gets the real part."""
    ring, canonical, selfconj = (t.to(x.device) for t in _geometry_tensors(geom))
    _check_values(geom, values)
    inside = ring >= 0
    idx = ring[inside] - geom.inner
    can = canonical[inside]
    out = x.clone()
    spec = _spectrum(x, channel, geom)
    bins = spec[:, inside]
    upright = torch.where(can, bins, bins.conj())          # every bin seen from the upper half-plane
    sums = torch.zeros(x.shape[0], geom.n_values, dtype=torch.complex128, device=x.device)
    sums.index_add_(1, idx, upright)
    counts = torch.bincount(idx, minlength=geom.n_values).double()
    shift = (values.to(x.device, torch.complex128) - sums / counts)[:, idx]
    shift = torch.where(can, shift, shift.conj())
    shift = torch.where(selfconj[inside], shift.real.to(shift.dtype), shift)
    spec[:, inside] = bins + shift
    out[:, channel] = _plane(spec, geom).to(x.dtype)
    return out


def _ring_weights(second_moment: torch.Tensor, means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """1 / (standard error of each ring's mean), estimated from the ring's own bins: the variance of
    the bins around their mean (second moment − |mean|², floored at 1 % of the second moment so a
    ring written flat by ``inject`` stays finite) over their number. Shapes broadcast."""
    var = (second_moment - means.abs() ** 2).clamp_min(0.01 * second_moment + 1e-12)
    return torch.sqrt(counts / var)


def ring_profile(x: torch.Tensor, channel: int, geom: RingGeometry, whiten: bool = False) -> torch.Tensor:
    """Per scored ring, the mean of the spectrum over its upper-half-plane bins: real parts
    (batch, rings), then imaginary parts for complex keys (batch, 2·rings).

    ``whiten``: each ring's mean divided by its standard error, estimated from the spread of the
    same ring's bins in the same image. Without it, rings whose bins vary more (inner rings, where
    the image's own content is strong, and rings with fewer bins) dominate the profile of an
    unwatermarked image, so a key whose values happen to sit on those rings fires more often than
    its target FPR (on 100 JPEG-compressed generations one key in 200 fired on 7 % at target 1 %).
    Whitened, an unwatermarked image's profile is close to isotropic for every key; over random
    keys the p-value stays exact either way, because the key is independent of the weights."""
    ring, canonical, _ = _geometry_tensors(geom)
    scored = (ring >= geom.first_scored) & canonical
    idx = ring[scored] - geom.first_scored
    nr = geom.radius - geom.first_scored + 1
    spec = _spectrum(x.detach().cpu(), channel, geom)[:, scored]
    counts = torch.bincount(idx, minlength=nr).double()

    def ring_mean(values):
        sums = torch.zeros(x.shape[0], nr, dtype=values.dtype)
        sums.index_add_(1, idx, values)
        return sums / counts

    means = ring_mean(spec)
    if whiten:
        means = means * _ring_weights(ring_mean(spec.abs() ** 2), means, counts)
    parts = [means.real] + ([means.imag] if geom.complex_values else [])
    return torch.cat(parts, 1)


def key_vector(geom: RingGeometry, values: torch.Tensor) -> torch.Tensor:
    """Ring values (keys, n_values) as the vectors the profile is compared with (keys, dims)."""
    _check_values(geom, values)
    v = values[..., geom.first_scored - geom.inner:]
    if geom.complex_values:
        return torch.cat([v.real, v.imag], -1).double()
    return v.real.double() if v.is_complex() else v.double()


def cosines(x: torch.Tensor, channel: int, values: torch.Tensor, geom: RingGeometry,
            whiten: bool = False) -> torch.Tensor:
    """cos(ring values of each key, ring profile of each image): (batch, keys). ``values`` is
    (keys, n_values); rings below ``first_scored`` are not scored; ``whiten``: see :func:`ring_profile`."""
    m = ring_profile(x, channel, geom, whiten)
    w = key_vector(geom, values)
    return (m @ w.T) / (m.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :]).clamp_min(1e-300)


def shift_profiles(x: torch.Tensor, channel: int, geom: RingGeometry, window: int,
                   whiten: bool = False) -> torch.Tensor:
    """The ring profile (:func:`ring_profile`) of x under every circular shift by up to ``window``
    pixels in each direction: (batch, dims, (2·window+1)²).

    A shift by d multiplies bin k by exp(−2πi k·d/N), which spreads each ring's mean over its
    phases; undoing it is a per-bin phase, so every ring's mean under every shift is one inverse
    FFT of that ring's bins (no model work). An image translated by 10 % of its side moves the
    latent by 6.4 pixels; window 8 covers that with room for a crop's offset. ``whiten``: as in
    :func:`ring_profile`, per shift (a shift keeps each bin's magnitude, so only the mean moves)."""
    ring, canonical, _ = _geometry_tensors(geom)
    n = geom.size
    spec = _spectrum(x.detach().cpu(), channel, geom)
    offsets = torch.cat([torch.arange(0, window + 1), torch.arange(n - window, n)]) if window else torch.zeros(1, dtype=torch.long)
    profiles = []
    for r in range(geom.first_scored, geom.radius + 1):
        sel = ((ring == r) & canonical).to(spec.dtype)
        # ifft2 at d is (1/N²)·Σ_k X(k)·exp(+2πi k·d/N): the ring's sum with the shift by d undone
        count = sel.real.sum()
        mean = (torch.fft.ifft2(spec * sel) * (n * n / count))[:, offsets][:, :, offsets]
        if whiten:
            second = ((spec.abs() ** 2) * sel.real).sum((-2, -1)) / count      # (batch,)
            mean = mean * _ring_weights(second[:, None, None], mean, count)
        profiles.append(mean)
    prof = torch.stack(profiles, 1)                                   # (batch, rings, w, w)
    parts = torch.cat([prof.real, prof.imag], 1) if geom.complex_values else prof.real
    return parts.flatten(2)                                           # (batch, dims, shifts)


#: Cosines computed per matrix product in :func:`max_cosines` (images x keys x hypotheses): 2**24
#: float64 is 128 MB, about 7 000 keys x 2312 hypotheses (8 views x 289 shifts) for one image, where
#: 100 000 keys at once would be 1.8 GB an image.
CHUNK_ELEMENTS = 1 << 24


def max_cosines(profiles: torch.Tensor, geom: RingGeometry, values: torch.Tensor,
                chunk: int | None = None) -> torch.Tensor:
    """max over hypotheses h of cos(key k, profiles[b, :, h]): (batch, keys), for ``profiles``
    (batch, dims, hypotheses) and ring ``values`` (keys, n_values). The keys go through in chunks
    (``chunk`` keys, default sized so that a chunk's cosines over the whole batch fit in
    :data:`CHUNK_ELEMENTS`), so memory stays bounded whatever the numbers of keys and images."""
    m = profiles / profiles.norm(dim=1, keepdim=True).clamp_min(1e-300)
    w = key_vector(geom, values)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, m.shape[0] * m.shape[2]))
    out = torch.empty(m.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(0, w.shape[0], chunk):
        out[:, i:i + chunk] = torch.einsum("bdh,kd->bkh", m, w[i:i + chunk]).amax(dim=2)
    return out


def shifted_cosines(x: torch.Tensor, channel: int, values: torch.Tensor, geom: RingGeometry,
                    window: int, whiten: bool = False) -> torch.Tensor:
    """As :func:`cosines`, maximised over the circular shifts of x by up to ``window`` pixels in each
    direction ((2·window+1)² hypotheses, :func:`shift_profiles`): (batch, keys)."""
    return max_cosines(shift_profiles(x, channel, geom, window, whiten), geom, values)


def family_key_values(seed: int, geom: RingGeometry, count: int, strength: float = 1.0,
                      start: int = 0) -> torch.Tensor:
    """Ring values of a key family's members ``start..start+count-1`` (count, n_values), drawn from
    ``seed`` (:func:`shallowmark.keys.family_seed`) in one vectorised call: i.i.d. N(0, strength²)
    per value (real and imaginary parts for complex keys), as :func:`key_values_from_seed` draws one
    key's, so each member alone is a uniformly random direction and its p-value is exact.

    The stream is pinned: Philox-4x64 raw 64-bit words (numpy's bit generator, whose output is
    stable across versions, unlike its distributions), each pair of words turned into two normals by
    Box–Muller here; member i's values are normals ``i·per .. (i+1)·per - 1`` of the stream (``per``
    values a member), so they do not depend on ``count``, and the generator jumps straight to
    ``start`` (Philox is counter-based): one member costs the same whatever its index."""
    count, start = int(count), int(start)
    if count < 1 or start < 0:
        raise InvalidParameterError(f"a key family has at least one member from index 0; got {count} from {start}")
    # not cached: a server holds no key material past the call (0.05-0.06 s for 100 000 members on 2 cores)
    per = geom.n_values * (2 if geom.complex_values else 1)
    first, last = start * per, (start + count) * per            # normals [first, last)
    p0, p1 = first // 2, (last + 1) // 2                          # the Box-Muller pairs that hold them
    w0 = 2 * p0                                                   # their first raw word
    gen = np.random.Philox(key=int(seed) % (1 << 128))
    gen.advance(w0 // 4)                                          # one counter step is 4 raw words
    raw = gen.random_raw(w0 % 4 + 2 * (p1 - p0))[w0 % 4:].reshape(-1, 2)
    u1 = ((raw[:, 0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53      # (0, 1]
    u2 = (raw[:, 1] >> np.uint64(11)).astype(np.float64) * 2.0 ** -53              # [0, 1)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.stack([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], 1).ravel()
    z = z[first - 2 * p0:first - 2 * p0 + count * per]
    z = torch.from_numpy(float(strength) * z.reshape(count, per))
    if geom.complex_values:
        return torch.complex(z[:, :geom.n_values], z[:, geom.n_values:])
    return z


def p_values(cos: torch.Tensor, dims: int) -> np.ndarray:
    """P(cos ≥ c) for the first coordinate of a uniform unit vector in ``dims`` dimensions."""
    from scipy.special import betainc

    c = cos.detach().cpu().numpy().clip(-1.0, 1.0)
    tail = 0.5 * betainc((dims - 1) / 2.0, 0.5, np.clip(1.0 - c * c, 0.0, 1.0))
    return np.where(c >= 0, tail, 1.0 - tail)


class RingKeyed:
    """Mixin for ring-key methods (their ``config`` has ``strength``, and they set ``geom``):
    key → ring values → spectrum pattern → p-values. Scoring a key costs no model work, so these
    methods also take key families (:class:`~shallowmark.keys.KeyFamily`): every member is one row
    of the score matrix."""

    supports_families = True

    def ring_values(self, key: MethodKey) -> torch.Tensor:
        if isinstance(key, FamilyMember):
            return self.family_values(key, 1, start=key.index)[0]
        return key_values_from_seed(ring_seed(key), self.geom, self.config.strength)

    def family_values(self, key: MethodKey, count: int, start: int = 0) -> torch.Tensor:
        """Ring values of a family's members ``start..start+count-1`` (count, n_values)
        (:func:`family_key_values`)."""
        return family_key_values(family_seed(key), self.geom, count, self.config.strength, start)

    def key_rows(self, key: MethodKey) -> torch.Tensor:
        """The rows one key adds to the score matrix: a family's members, or the key's own values."""
        return self.family_values(key, key.size) if isinstance(key, KeyFamily) else self.ring_values(key)[None]

    def _values(self, keys) -> torch.Tensor:
        return torch.cat([self.key_rows(k) for k in keys])

    def _patterns(self, keys) -> torch.Tensor:
        return torch.stack([pattern(self.geom, v) for v in self._values(keys)])

    def _ring_p_values(self, x: torch.Tensor, keys) -> tuple[torch.Tensor, np.ndarray]:
        """(cosines, p-values) of latents x (batch, C, H, W) against each key's rows (one per key,
        one per member of a family, :class:`~shallowmark.core.watermarks.base.KeyRows`): (batch, rows)."""
        cos = cosines(x, self.config.channel, self._values(keys), self.geom, self.whitened)
        return cos, p_values(cos, self.geom.dims)

    @property
    def whitened(self) -> bool:
        """Whether the profile is whitened (:func:`ring_profile`): a config's ``whiten``, else off
        (Tree-Ring and RingID read x_T, pure noise with the same variance in every ring)."""
        return bool(getattr(self.config, "whiten", False))

    def _score(self, x: torch.Tensor, keys, target_fpr: float) -> list:
        """The ring statistic's verdict for each latent (the protocol's scoring hook)."""
        from shallowmark.core.watermarks.base import KeyRows, rows_verdict

        cos, p = self._ring_p_values(x, keys)
        evals = self.model_evals().verify
        rows = KeyRows.of(keys)
        return [rows_verdict(self.name, p[i], cos[i].numpy(), rows, target_fpr, evals) for i in range(len(cos))]
