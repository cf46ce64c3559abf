"""A synchronisation template: find how an image was rotated, scaled, stretched or mirrored, and
undo it before the model sees the image.

Why: Shallow Diffuse's key lives in the Fourier rings of a latent that the autoencoder and the
DDIM inversion produce. A shift of the image shifts that latent (the verifier's shift search
undoes it there), but a rotation, a rescale or an aspect change does not map onto a simple change
of the inverted latent: on 4 generated images a search over radially scaled rings did not recover
an 80 % crop with rescale nor a 5° rotation. So those transforms are estimated and undone in pixel
space, from a pattern that is cheap to find, before the one inversion verification pays for.

The template: ``peaks`` cosines added to the luminance of the image on the model's grid, at
frequencies between ``min_frequency`` and ``max_frequency`` cycles per pixel, spread over the
half-plane away from the axes (where JPEG's 8×8 blocks and the black corners of a rotation put
their own energy), with amplitude ``amplitude`` grey levels each. A linear map ``S`` of the image
(x' = S·x about the centre) moves a frequency f to S⁻ᵀ·f; translation does not move it at all. The
estimator whitens the magnitude spectrum (log spectrum minus its local median, so the image's own
1/f fall-off does not count) and scores every hypothesis ``f' = M·f`` on a grid of rotations,
scales, aspect changes and mirror images by the whitened magnitude at the template's predicted
peaks; ``z`` is the best hypothesis's robust z-score against all of them. Where the template is
found, each peak is then located off the bins and M refitted to them, and once M is undone the
cosines' phases give the translation (a crop's offset) to a fraction of a pixel
(:func:`estimate_shift`), which the magnitudes cannot see.

On by default (``ShallowDiffuseConfig.sync_amplitude``; 0 turns it off). The template is the same for every key (a service constant, ``seed``): where an image's template
points decides only which geometry the latent is read in, never the key test itself, and the key's
ring values are independent of the image, so the p-value stays exact whatever was undone. An
image without the template gets some random "best" hypothesis with a low ``z``, and is then left
as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from shallowmark.errors import InvalidParameterError

__all__ = ["SyncTemplate", "SyncEstimate", "ShiftEstimate", "pattern", "estimate", "estimate_shift", "undo",
           "synchronise"]


@dataclass(frozen=True)
class SyncTemplate:
    """The template and its search. Chosen on tiny-ldm's 256² grid.

    ``amplitude`` 0.8 grey levels per peak is 45 dB PSNR on its own (the key's change is about 40 dB
    against the same-seed image, so together about 39 dB). The band 0.22-0.32 cycles per pixel is
    where tiny-ldm's generations have least energy of their own (per-peak SNR 15-300 against 2-16
    at 0.05-0.2; on 16 generated images the transform of every clean, rotated, cropped, zoomed,
    stretched and crop-plus-JPEG-50 copy was recovered, against 40-80 % with a 0.10-0.20 band),
    and it survives JPEG 50. Photos are busier there: on the 12 bundled photos, clean, 7 of the 12 templates
    reached z 7 (5.0-24).

    ``min_z`` and ``min_peak`` decide whether an estimate is acted upon. On generated images the
    best hypothesis of an image without the template reached z 4.2-8.3 (8.3: a translated image,
    whose black border lights up the spectrum) with its second-weakest predicted peak at most 1.09
    above its neighbourhood; templated generations reached z 8.2-37 and 1.17-4.4 under every
    geometric attack. A wrong estimate acted upon costs nothing in calibration (see above), only a
    lost detection; a right one not acted upon costs the same. JPEG 25 erases the template (z 4-7):
    the image is then read as it is, where the key survives JPEG by itself. On real photos the
    right transform is often the best hypothesis but below these bars: after a 4:5 crop of a
    landscape photo (a rescale by 1.25 on the grid) aero1.jpg's estimate was scale 1.236, rotation
    0.5° at z 4.3, and building.jpg's crop without rescale scale 1.248 at z 7.6 but second-weakest
    peak 0.96 (docs/benchmarks/photos)."""

    peaks: int = 6
    min_frequency: float = 0.22       # cycles per pixel on the model's grid
    max_frequency: float = 0.32
    amplitude: float = 0.8            # grey levels per cosine
    seed: int = 7
    min_z: float = 7.0
    # ... the second-weakest of the K predicted peaks at least this far (log units) above its
    # neighbourhood's median: a chance hypothesis is carried by one or two strong bins, the
    # template by all of them
    min_peak: float = 1.0
    # ... and the margin (in the same robust units) by which it must beat the identity: a weak
    # template can put the best hypothesis a few per cent off on an untouched image, and resampling
    # that image would only hurt
    min_gain: float = 2.0
    # search ranges: the image's scale (1.15: a 75 % crop scaled back; 0.8: zoomed out), its aspect
    # change (width/height of the stretch), any rotation, with and without a mirror image
    min_scale: float = 0.8
    max_scale: float = 1.7
    max_aspect: float = 1.33
    # translation from the cosines' phases (:func:`estimate_shift`), searched within ``max_shift``
    # pixels of the grid (40: a 15 % translation of the 256 grid; a crop to 75 % of the area moves
    # the centre by 17-27 pixels. Larger shifts are left to the verifier's shift search, which
    # reaches 8 latent pixels, 64 here: on weak templates (photos) random phases align anywhere in
    # the box, and at ±64 one did at 62 pixels on a photo turned by 180°); acted upon
    # when the phases agree to ``min_coherence`` (1: all K aligned), the best shift beats every
    # other one (2 pixels or more away) by ``min_margin``, and it is at least ``min_shift`` pixels.
    # Why these bars: the template's own strongest alias within ±64 pixels, (−19.5, −34.25)
    # pixels, aligns its K cosines to 0.947 of the true shift, so an exact estimate wins by 0.053
    # at most. Phase noise of σ radians (coherence ≈ 1 − σ²/2) moves the two sums apart by about
    # 0.13·σ, so at coherence 0.985 (σ 0.17) the true shift still wins by more than 2 standard
    # deviations, and a margin of 0.02 leaves out the closest calls. Coherence alone is no
    # evidence that the template is there (K phases and a 2-D search over 10⁵ shifts align to
    # 0.98-0.998 on photos without it): that comes from the magnitude search (``found``). On a busy
    # photo, untouched, the alias won at coherence 0.979 and margin 0.012, and the wrong shift cost
    # 8 decades of p-value; below the bars the image is left to the shift search, as without it.
    # The same margin decides a half turn (the phases fit −φ better than φ by ``min_margin``).
    max_shift: float = 40.0
    min_coherence: float = 0.985
    min_margin: float = 0.02
    min_shift: float = 0.5

    def validate(self) -> None:
        if self.peaks < 3:
            raise InvalidParameterError(f"the sync template needs at least 3 peaks; got {self.peaks}")
        if not 0.02 <= self.min_frequency < self.max_frequency <= 0.35:
            raise InvalidParameterError(
                f"sync template frequencies must satisfy 0.02 <= min < max <= 0.35 cycles per pixel; got "
                f"{self.min_frequency}..{self.max_frequency}")
        if self.amplitude < 0:
            raise InvalidParameterError(f"sync template amplitude must be >= 0; got {self.amplitude}")
        if not 0 < self.min_scale < 1 < self.max_scale or self.max_aspect < 1:
            raise InvalidParameterError("sync search needs min_scale < 1 < max_scale and max_aspect >= 1")
        if self.max_shift < 0 or not 0 < self.min_coherence <= 1:
            raise InvalidParameterError(f"sync shift search needs max_shift >= 0 and 0 < min_coherence <= 1; got "
                                        f"{self.max_shift}, {self.min_coherence}")


@dataclass(frozen=True)
class SyncEstimate:
    """Where the template was found: ``matrix`` M maps the template's frequencies to the image's
    (f' = M·f); ``rotation`` (degrees, modulo 180: a magnitude spectrum cannot tell θ from θ+180°,
    the verifier's dihedral search can), ``scale``, ``aspect`` and ``mirrored`` describe it; ``z``
    is its robust z-score, ``support`` its second-weakest peak (whitened log magnitude), ``gain`` how far (same units) it beats the identity, ``found`` whether it
    reached ``min_z``; ``undone`` whether the image was resampled (found, and ahead of the identity
    by ``min_gain`` and not itself close to it, or shifted). ``shift`` (dx, dy) is the translation
    of the content, in pixels of the grid, that the cosines' phases show once the linear part is
    undone (:func:`estimate_shift`; (0, 0) where it was not estimated or not acted upon), and
    ``coherence`` how well those phases agree with it."""

    matrix: tuple
    rotation: float
    scale: float
    aspect: float
    mirrored: bool
    z: float
    gain: float
    support: float
    found: bool
    undone: bool = False
    shift: tuple = (0.0, 0.0)
    coherence: float = 0.0
    margin: float = 0.0


@lru_cache(maxsize=8)
def _peaks(template: SyncTemplate) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies (K, 2) as (fx, fy) in cycles per pixel, phases (K,)), fixed by the seed."""
    rng = np.random.default_rng(template.seed)
    k = template.peaks
    # one peak per sector of the half-plane, jittered inside it, so that no rotation by less than
    # a sector maps the template onto itself
    angles = (np.arange(k) + 0.5 + rng.uniform(-0.25, 0.25, k)) * np.pi / k
    radii = rng.permutation(np.linspace(template.min_frequency, template.max_frequency, k))
    phases = rng.uniform(0, 2 * np.pi, k)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1), phases


def pattern(template: SyncTemplate, size: int) -> np.ndarray:
    """The template on a ``size``×``size`` grid, in grey levels (float64, added to R, G and B)."""
    freqs, phases = _peaks(template)
    c = np.arange(size) - (size - 1) / 2
    xs, ys = np.meshgrid(c, c)
    out = np.zeros((size, size))
    for (fx, fy), ph in zip(freqs, phases):
        out += np.cos(2 * np.pi * (fx * xs + fy * ys) + ph)
    return template.amplitude * out


def _whitened_spectrum(gw: np.ndarray) -> np.ndarray:
    """log|FFT| of the windowed luminance (:func:`_windowed`) minus its 9×9 local median,
    fft-shifted, then a 3×3 local maximum so that a hypothesis a bin off still finds its peak."""
    from scipy import ndimage

    spec = np.log(np.abs(np.fft.fftshift(np.fft.fft2(gw))) + 1e-6)
    return ndimage.maximum_filter(spec - ndimage.median_filter(spec, size=9), size=3)


def _matrices(theta, scale, aspect, mirror) -> np.ndarray:
    """f' = R(θ)·diag(±1/sx, 1/sy)·f for each hypothesis: the image stretched by (sx, sy) =
    (scale·√aspect, scale/√aspect), mirrored left-right where ``mirror``, then rotated by θ."""
    sx, sy = scale * np.sqrt(aspect), scale / np.sqrt(aspect)
    c, s = np.cos(theta), np.sin(theta)
    m = np.empty(theta.shape + (2, 2))
    m[..., 0, 0], m[..., 0, 1] = c * mirror / sx, -s / sy
    m[..., 1, 0], m[..., 1, 1] = s * mirror / sx, c / sy
    return m


def _peak_values(spec: np.ndarray, mats: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Whitened magnitude at each hypothesis's predicted peaks (bilinear): (hypotheses, K), or (K,)
    for one matrix."""
    from scipy import ndimage

    h, w = spec.shape
    pred = np.einsum("...ij,kj->...ki", mats, freqs)
    rows, cols = pred[..., 1] * h + h / 2, pred[..., 0] * w + w / 2
    vals = ndimage.map_coordinates(spec, [rows.ravel(), cols.ravel()], order=1, mode="nearest")
    return vals.reshape(rows.shape)


def _scores(spec: np.ndarray, mats: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Mean whitened magnitude at each hypothesis's predicted peaks."""
    return _peak_values(spec, mats, freqs).mean(-1)


def _grid(theta, scale, aspect, mirror):
    t, s, a, m = (v.ravel() for v in np.meshgrid(theta, scale, aspect, mirror, indexing="ij"))
    return t, s, a, m


def estimate(image: np.ndarray, template: SyncTemplate) -> SyncEstimate:
    """Where ``template`` is in a uint8 H×W×3 image on the model's grid: a coarse search over
    rotations (1°), scales (2.5 %), aspect changes and mirror images, refined around the best."""
    gw = _windowed(image)
    spec = _whitened_spectrum(gw)
    freqs = _peaks(template)[0]
    span = np.log(template.max_aspect)
    coarse = _grid(np.deg2rad(np.arange(0.0, 180.0, 1.0)),
                   np.exp(np.arange(np.log(template.min_scale), np.log(template.max_scale), 0.025)),
                   np.exp(np.arange(-span, span + 1e-9, 0.036)), np.array([1.0, -1.0]))
    sc = _scores(spec, _matrices(*coarse), freqs)
    med = np.median(sc)
    mad = 1.4826 * np.median(np.abs(sc - med)) + 1e-12
    i = int(np.argmax(sc))
    fine = _grid(coarse[0][i] + np.deg2rad(np.linspace(-0.75, 0.75, 7)),
                 coarse[1][i] * np.exp(np.linspace(-0.015, 0.015, 7)),
                 coarse[2][i] * np.exp(np.linspace(-0.018, 0.018, 7)), coarse[3][i:i + 1])
    fsc = _scores(spec, _matrices(*fine), freqs)
    j = int(np.argmax(fsc))
    t, s, a, m = (v[j] for v in fine)
    if t > np.pi / 2:   # −M is the same hypothesis for a magnitude spectrum: take the smaller rotation
        t -= np.pi
    best = max(fsc[j], sc[i])
    mat = _matrices(np.array(t), np.array(s), np.array(a), np.array(m))
    peaks = np.sort(_peak_values(spec, mat, freqs))
    z = float((best - med) / mad)
    gain = float((best - _scores(spec, np.eye(2)[None], freqs)[0]) / mad)
    support = float(peaks[1])
    found = z >= template.min_z and support >= template.min_peak
    if found:
        mat = _refine(gw, mat, freqs)
        t, s, a, m = _describe(mat)
    return SyncEstimate(matrix=tuple(map(tuple, mat.tolist())), rotation=float(np.rad2deg(t)),
                        scale=float(s), aspect=float(a), mirrored=bool(m < 0), z=z, gain=gain, support=support,
                        found=found)


def _windowed(image: np.ndarray) -> np.ndarray:
    """The luminance minus its mean, times a Hann window (what the phases and the refined
    frequencies are measured on)."""
    g = np.asarray(image, dtype=np.float64).mean(-1)
    return (g - g.mean()) * np.outer(np.hanning(g.shape[0]), np.hanning(g.shape[1]))


def _dtft(gw: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """Σ g·e^{−2πi(fx·x + fy·y)} about the centre, for every pair of ``fy`` (rows) and ``fx``
    (columns): separable, one matrix product per axis."""
    h, w = gw.shape
    ex = np.exp(-2j * np.pi * np.outer(np.arange(w) - (w - 1) / 2, fx))
    ey = np.exp(-2j * np.pi * np.outer(np.arange(h) - (h - 1) / 2, fy))
    return ey.T @ gw @ ex


def _refine(gw: np.ndarray, mat: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """M refitted to where each predicted peak really is: the hypothesis grid is 0.25° and 0.5 %
    apart, and a magnitude spectrum resolves a peak to a bin (0.8° of rotation at these radii), so
    each peak is looked for off the bins, within 1.5 bins of its prediction at 0.05 of a bin, and
    M is the least-squares fit of f' = M·f to the K peaks found. Why: the phases that give the
    translation (:func:`estimate_shift`) lose their agreement when the linear part is off by a
    few tenths of a degree or per cent across a 256-pixel image."""
    h, w = gw.shape
    d = np.linspace(-1.5, 1.5, 61)
    found = []
    for fx, fy in freqs @ np.asarray(mat).T:
        c = np.abs(_dtft(gw, fx + d / w, fy + d / h))
        r, q = np.unravel_index(int(np.argmax(c)), c.shape)
        found.append((fx + d[q] / w, fy + d[r] / h))
    return np.linalg.lstsq(freqs, np.array(found), rcond=None)[0].T


def _describe(mat: np.ndarray) -> tuple[float, float, float, float]:
    """(θ, scale, aspect, mirror ±1) of M = R(θ)·diag(±1/sx, 1/sy) (:func:`_matrices`), θ in
    (−90°, 90°]: a magnitude spectrum cannot tell θ from θ + 180° (:func:`estimate_shift` can)."""
    mat = np.asarray(mat)
    sy = 1 / np.hypot(mat[0, 1], mat[1, 1])
    sx = 1 / np.hypot(mat[0, 0], mat[1, 0])
    t = np.arctan2(-mat[0, 1], mat[1, 1])
    if t > np.pi / 2:
        t -= np.pi
    elif t <= -np.pi / 2:
        t += np.pi
    return float(t), float(np.sqrt(sx * sy)), float(sx / sy), -1.0 if np.linalg.det(mat) < 0 else 1.0


def _phase_offsets(image: np.ndarray, template: SyncTemplate) -> tuple[np.ndarray, np.ndarray]:
    """(weights (K,), phases (K,)): each template cosine's windowed correlation with the
    luminance, its magnitude and its phase."""
    gw = _windowed(image)
    c = np.array([_dtft(gw, f[:1], f[1:])[0, 0] for f in _peaks(template)[0]])
    return np.abs(c), np.angle(c)


@dataclass(frozen=True)
class ShiftEstimate:
    """What the template's phases show (:func:`estimate_shift`): ``shift`` (dx, dy), the content's
    translation in pixels of the grid; ``coherence`` how well the K phases agree with it (1: all
    aligned); ``margin`` how far it beats the best shift 2 pixels or more away; ``turned``
    whether the phases fit the image turned by 180° better (a magnitude spectrum cannot tell)."""

    shift: tuple = (0.0, 0.0)
    coherence: float = 0.0
    margin: float = 0.0
    turned: bool = False


def estimate_shift(image: np.ndarray, template: SyncTemplate) -> ShiftEstimate:
    """The translation d of the content (J(x) = I(x − d)) of an image whose template is at its own
    frequencies (the linear part already undone), from the K cosines' phases.

    Why: the shift search on x_t* finds a translation only to a whole latent pixel (8 pixels here)
    and pays for (2w+1)² hypotheses; a crop's offset is rarely a whole latent pixel, and half a
    latent pixel off turns a ring of radius r by up to π·r/n in phase. A cosine moved by d changes
    its phase φ_k by −2π f_k·d, so the d that best explains the measured phases ψ_k,
    Σ_k |c_k|·cos(ψ_k − φ_k + 2π f_k·d) maximised over d within ±``max_shift`` on each axis
    (0.25-pixel grid, then refined), gives it to a fraction of a pixel. Turned by 180°, the image
    shows −φ_k instead of φ_k; both are tried, and the half turn is taken where it fits better by
    ``min_margin``. The K frequencies are not commensurate, so other d that align all K at once
    are rare (:attr:`SyncTemplate.min_margin`); one that wins is a wrong shift, which the
    verifier's shift search (around the corrected position) still covers."""
    wts, psi = _phase_offsets(image, template)
    freqs, phases = _peaks(template)
    if template.max_shift <= 0 or wts.sum() <= 0:
        return ShiftEstimate()

    def coherence(off, dx, dy):
        ph = off[:, None] + 2 * np.pi * (np.outer(freqs[:, 0], dx) + np.outer(freqs[:, 1], dy))
        return (wts[:, None] * np.cos(ph)).sum(0) / wts.sum()

    step = 0.25
    axis = np.arange(-template.max_shift, template.max_shift + 1e-9, step)
    dx, dy = (v.ravel() for v in np.meshgrid(axis, axis))
    fits = []
    for turned, off in ((False, psi - phases), (True, psi + phases)):
        sc = coherence(off, dx, dy)
        i = int(np.argmax(sc))
        # the runner-up away from the best peak's main lobe (about 2 pixels wide here)
        fits.append((sc[i], i, turned, off, float(sc[np.hypot(dx - dx[i], dy - dy[i]) > 2.0].max(initial=-1.0))))
    # upright unless the half turn fits clearly better: random phases align almost as well
    upright, half = fits
    _, i, turned, off, runner_up = half if half[0] - upright[0] >= template.min_margin else upright
    fine = np.linspace(-step, step, 11)
    fx, fy = (v.ravel() for v in np.meshgrid(dx[i] + fine, dy[i] + fine))
    fs = coherence(off, fx, fy)
    j = int(np.argmax(fs))
    return ShiftEstimate((float(fx[j]), float(fy[j])), float(fs[j]), float(fs[j]) - runner_up, turned)


def is_identity(est: SyncEstimate) -> bool:
    """Close enough to no transform that resampling would cost more than it corrects (0.6°,
    1.5 % in scale and aspect, no mirror)."""
    return (not est.mirrored and abs(est.rotation) <= 0.6 and abs(np.log(est.scale)) <= 0.015
            and abs(np.log(est.aspect)) <= 0.015)


def undo(image: np.ndarray, est: SyncEstimate) -> np.ndarray:
    """The image with the estimated transform undone (about the centre, then ``est.shift``; one
    bicubic resampling; what falls outside is filled by reflection, which disturbs the latent's
    spectrum less than black borders: on 8 rotated copies the key's p-values were 1-3 orders
    smaller than with black)."""
    from scipy import ndimage

    img = np.asarray(image)
    # f' = M·f means the image was mapped by S = M⁻ᵀ; the output J(x) = I'(S·x) undoes it, and
    # J(x + d) then undoes the shift d that the linearly undone image shows
    s = np.linalg.inv(np.asarray(est.matrix)).T
    rc = np.array([[s[1, 1], s[1, 0]], [s[0, 1], s[0, 0]]])   # (row, col) order
    centre = (np.array(img.shape[:2], dtype=np.float64) - 1) / 2
    offset = centre - rc @ centre + rc @ np.array([est.shift[1], est.shift[0]], dtype=np.float64)
    out = np.stack([ndimage.affine_transform(img[..., ch].astype(np.float64), rc, offset=offset, order=3,
                                             mode="reflect") for ch in range(img.shape[-1])], -1)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def synchronise(images: np.ndarray, template: SyncTemplate) -> tuple[np.ndarray, list[SyncEstimate]]:
    """Each image (uint8 N×H×W×3, on the model's grid) with the template's transform undone where
    it was found: the linear part where it is not the identity, then the translation (and a half
    turn) that the cosines' phases show where they clear the bars (:func:`estimate_shift`), in one
    resampling; and every estimate."""
    from dataclasses import replace

    out, ests = [], []
    for im in np.asarray(images):
        est = estimate(im, template)
        if not est.found:
            out.append(im)
            ests.append(est)
            continue
        linear = est.gain >= template.min_gain and not is_identity(est)
        # what is undone: the linear part where it is acted upon, then the shift its result shows
        applied = est if linear else replace(est, matrix=((1.0, 0.0), (0.0, 1.0)))
        sh = estimate_shift(undo(im, applied) if linear else im, template)
        if sh.turned and sh.coherence >= template.min_coherence:
            # the phases say the linear part is half a turn off: take −M and measure again
            applied = replace(applied, matrix=tuple(tuple(-v for v in row) for row in applied.matrix))
            linear = True
            sh = estimate_shift(undo(im, applied), template)
        moved = (not sh.turned and sh.coherence >= template.min_coherence and sh.margin >= template.min_margin
                 and np.hypot(*sh.shift) >= template.min_shift)
        applied = replace(applied, shift=sh.shift if moved else (0.0, 0.0))
        est = replace(est, coherence=sh.coherence, margin=sh.margin, shift=applied.shift, undone=linear or moved)
        if est.undone:
            im = undo(im, applied)
        out.append(im)
        ests.append(est)
    return np.stack(out), ests
