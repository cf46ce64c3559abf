"""The rank profile of the posterior-mean Jacobian across t, and the automatic t* of Shallow Diffuse.

The talk (LOCO Edit, Shallow Diffuse) rests on one measurement: the numerical rank of
``J_t = ∂f/∂x_t`` (``f`` the posterior-mean predictor) is well below the dimension for a middle band
of t, and Shallow Diffuse injects its key at a t* in that band, where most input directions barely
move the predicted clean image. This module measures that rank ratio on a real model and turns the
curve into a t*; ``ShallowDiffuse(t_star="auto")`` calls :func:`auto_t_star`.

**Exact at a reduced size.** A dense Jacobian of a 4×64×64 latent needs 16,384 VJPs per t (we
measured 60-140 ms per VJP at that size on one CPU thread: 15-40 minutes). tiny-ldm's UNet is fully
convolutional (no attention), so it runs on any latent size its three downsamplings divide, and
:func:`rank_profile` works on a centre crop of real latents (encoded photos, noised by the forward
process): the exact dense Jacobian from batched VJPs and all its singular values. Numerical rank =
#{σ_i > tol·σ_max}. The full-size cross-check (``full_size_check`` in
:mod:`shallowmark.research.jacobian_rank`) measures what stays affordable at the full size. On
tiny-ldm the two agree while t ≤ 0.5T; at larger t the full-size Jacobian is dominated by global
directions a crop cannot hold (docs/analysis/jacobian-rank).

**The rule for t*.** :func:`choose_t_star` takes the earliest t at which the mean rank ratio has
fallen to within ``margin`` of its minimum over the profile, measured on the profile's range:
``ratio(t) ≤ min + margin·(max − min)``. Why the earliest such t and not the minimum itself: the
key should sit where the Jacobian is low rank (little of the injected change survives into the
predicted image), but every step deeper costs a model evaluation per verification and adds DDIM
round-trip error, so once the rank has nearly stopped falling, going deeper buys little.
:func:`auto_t_star` applies it to the rank by the 99 %-energy rule at the full latent size
(:func:`energy_profile`, stochastic Lanczos quadrature) and caches the answer per model.

The analysis behind ``shallowmark analyze jacobian-rank`` (report, figures, cross-checks) is
:mod:`shallowmark.research.jacobian_rank`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from shallowmark.core import ddim
from shallowmark.core.jacobian import DEFAULT_ENERGY, energy_rank, jtj, lanczos_spectrum, vjp
from shallowmark.errors import InvalidParameterError

DEFAULT_TOL = 1e-2          # σ_i counts towards the rank when σ_i > tol·σ_max
DEFAULT_MARGIN = 0.1        # t* = earliest t with ratio ≤ min + margin·(max − min)
DEFAULT_CROP = 16           # latent crop side of the profile (d = C·crop² = 1024 on tiny-ldm)
# 11 points of the 50-step DDIM grid (positions 1, 5, 10, ..., 50), as fractions of T.
DEFAULT_FRACTIONS = tuple(k / 50 for k in (1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50))
DEFAULT_PHOTOS = ("grace_hopper", "astronaut", "chelsea", "coffee")

# What auto_t_star measures on a convolutional model: the rank by the 99 %-energy rule (the papers'
# definition) at the full latent size, by stochastic Lanczos quadrature, at 8 points of t/T. The
# 16×16 crops the profile above uses put tiny-ldm's t* at 0.44T; the full latent puts it at 0.20T
# (docs/analysis/jacobian-energy), because a crop cannot hold the global directions that dominate
# J at larger t. One photo: the full-size estimate costs ~80 s per t on one CPU thread, and its
# bootstrap spread over probes is at most 0.013 of d; the spread across photos is not measured.
AUTO_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
AUTO_PHOTOS = ("grace_hopper",)
AUTO_PROBES = 4             # Lanczos starts per (photo, t)
AUTO_STEPS = 24             # Lanczos steps: each one JVP and one VJP on a batch of the probes


# ------------------------------------------------------------------------------------------------
# The profile
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankProfile:
    """Singular-value spectra of J at a grid of t, for each image.

    ``spectra`` is (images, t, d): σ_i / σ_max in descending order, float64, so the rank ratio at
    any tolerance can be read off afterwards (``ratios(tol)``); ``sigma_max`` is (images, t).
    ``fractions[j] = positions[j] / num_steps`` is the t of column j as a fraction of T on the
    DDIM grid (what ``ShallowDiffuseConfig.t_star`` takes) and ``timesteps[j]`` the training
    timestep the model was evaluated at.
    """

    fractions: tuple[float, ...]
    positions: tuple[int, ...]
    timesteps: tuple[int, ...]
    num_steps: int
    tol: float
    jacobian_shape: tuple[int, int, int]
    images: tuple[str, ...]
    spectra: torch.Tensor
    sigma_max: torch.Tensor
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.spectra.shape[-1])

    def image(self, i: int) -> "RankProfile":
        """The profile of image ``i`` alone."""
        return replace(self, images=self.images[i:i + 1], spectra=self.spectra[i:i + 1],
                       sigma_max=self.sigma_max[i:i + 1])

    def subset(self, fractions: Sequence[float]) -> "RankProfile":
        """The columns of this profile at the grid positions of ``fractions`` (all must be measured)."""
        want = sorted({max(1, min(self.num_steps, round(float(f) * self.num_steps))) for f in fractions})
        missing = [k for k in want if k not in self.positions]
        if missing:
            raise InvalidParameterError(f"the profile has no t at grid positions {missing}")
        j = [self.positions.index(k) for k in want]
        return replace(self, fractions=tuple(self.fractions[i] for i in j), positions=tuple(want),
                       timesteps=tuple(self.timesteps[i] for i in j), spectra=self.spectra[:, j],
                       sigma_max=self.sigma_max[:, j])

    def ratios(self, tol: float | None = None) -> np.ndarray:
        """Rank ratio per (image, t) at ``tol`` (default: the profile's own)."""
        tol = self.tol if tol is None else check_tol(tol)
        return (self.spectra > tol).sum(-1).double().div(self.dim).numpy()

    def mean(self, tol: float | None = None) -> np.ndarray:
        return self.ratios(tol).mean(0)

    def spread(self, tol: float | None = None) -> np.ndarray:
        """Sample standard deviation across images (0 with one image)."""
        r = self.ratios(tol)
        return r.std(0, ddof=1) if r.shape[0] > 1 else np.zeros(r.shape[1])

    def energy_ratios(self, energy: float = DEFAULT_ENERGY) -> np.ndarray:
        """Rank ratio per (image, t) by the energy rule (:func:`~shallowmark.core.jacobian.energy_rank`):
        the smallest k whose top-k σ hold ``energy`` of ‖J‖_F, over d. No tolerance against σ_max."""
        return np.array([[energy_rank(s, energy) / self.dim for s in row] for row in self.spectra])

    def stable_rank_ratio(self) -> np.ndarray:
        """‖J‖_F² / (σ_max² d) per (image, t): a tolerance-free effective rank."""
        return self.spectra.pow(2).sum(-1).div(self.dim).numpy()

    def mean_square_gain(self) -> np.ndarray:
        """Σσ²/d = E‖Ju‖² / E‖u‖² for a random direction u, per (image, t): the share of a random
        change of x_t that reaches the predicted clean image."""
        return (self.spectra.pow(2).mean(-1) * self.sigma_max.pow(2)).numpy()

    def participation_ratio(self) -> np.ndarray:
        """(Σσ²)² / (Σσ⁴ d) per (image, t): a tolerance-free effective rank that needs no σ_max,
        so :func:`full_size_check` can estimate it at the full latent size."""
        s2 = self.spectra.pow(2)
        return (s2.sum(-1).pow(2) / s2.pow(2).sum(-1) / self.dim).numpy()


def check_tol(tol: float) -> float:
    tol = float(tol)
    if not 0.0 < tol < 1.0:
        raise InvalidParameterError(f"tolerance must be in (0, 1); got {tol}")
    return tol


def grid_points(grid: ddim.DDIMGrid, fractions: Sequence[float]) -> list[int]:
    """Sorted distinct grid positions of the requested fractions of T."""
    try:
        fr = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise InvalidParameterError(f"t values must be numbers (fractions of T); got {fractions!r}")
    if not fr:
        raise InvalidParameterError("the t list is empty: give at least one fraction of T in (0, 1]")
    bad = [f for f in fr if not 0.0 < f <= 1.0]
    if bad:
        raise InvalidParameterError(f"t values must be fractions of T in (0, 1]; got {bad}")
    return sorted({grid.position(f) for f in fr})


def _downsampling(backend) -> int:
    """The factor a latent side must be divisible by for the backend's UNet (1 without one)."""
    unet = getattr(backend, "unet", None)
    blocks = getattr(getattr(unet, "config", None), "down_block_types", None)
    return 2 ** (len(blocks) - 1) if blocks else 1


def _check_crop(backend, crop: int | None) -> int | None:
    if crop is None:
        return None
    c, h, w = backend.latent_shape
    if not isinstance(crop, (int, np.integer)) or not 1 <= int(crop) <= min(h, w):
        raise InvalidParameterError(f"crop must be a latent side in [1, {min(h, w)}] (or None for the "
                                    f"full latent); got {crop!r}")
    f = _downsampling(backend)
    if int(crop) % f:
        raise InvalidParameterError(f"crop must be a multiple of {f} for {backend.name}'s UNet "
                                    f"({f}× downsampling); got {crop}")
    return int(crop)


def center_crop_latents(x: torch.Tensor, crop: int | None) -> torch.Tensor:
    """The centre ``crop``×``crop`` window of NCHW latents (all of them with ``crop=None``)."""
    if crop is None:
        return x
    h, w = x.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return x[..., top:top + crop, left:left + crop].contiguous()


def photo_latents(backend, names: Sequence[str] = DEFAULT_PHOTOS) -> torch.Tensor:
    """Latents of bundled photos (centre-cropped to the model's image size, then encoded)."""
    from shallowmark.core import photos
    from shallowmark.core.images import to_tensor

    names = list(names)
    if not names:
        raise InvalidParameterError("no photos: give at least one photo name")
    pool = None
    arrays = []
    for n in names:
        if n == photos.HELDOUT_PHOTO:
            arrays.append(photos.heldout_photo())
            continue
        pool = photos.training_photos() if pool is None else pool
        if n not in pool:
            raise InvalidParameterError(f"unknown photo {n!r}; valid: {', '.join([photos.HELDOUT_PHOTO, *pool])}")
        arrays.append(pool[n])
    imgs = torch.cat([to_tensor(photos.center_crop(a, backend.image_size)) for a in arrays])
    with torch.no_grad():
        return backend.encode(imgs).float()


def dense_jacobian(backend, x_t: torch.Tensor, t: int, chunk: int | None = None, cond=None) -> torch.Tensor:
    """The exact d×d Jacobian of the posterior mean at one ``x_t`` (1, C, H, W), row by row:
    row i is Jᵀe_i, and ``chunk`` rows come from one batched VJP (the batch repeats x_t)."""
    if x_t.dim() != 4 or x_t.shape[0] != 1:
        raise InvalidParameterError(f"dense_jacobian takes one x_t of shape (1, C, H, W); got {tuple(x_t.shape)}")
    d = x_t[0].numel()
    # About 16k latent elements per batch keeps the activations small and the batch efficient.
    chunk = max(1, 16384 // d) if chunk is None else int(chunk)
    eye_rows = []
    for i in range(0, d, chunk):
        n = min(chunk, d - i)
        u = torch.zeros(n, d, dtype=x_t.dtype, device=x_t.device)
        u[torch.arange(n), torch.arange(i, i + n)] = 1.0
        eye_rows.append(vjp(backend, x_t.expand(n, *x_t.shape[1:]), t, u.view(n, *x_t.shape[1:]), cond).flatten(1))
    return torch.cat(eye_rows)


def forward_noise(backend, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (the forward process at training timestep t)."""
    a = float(backend.alphas_cumprod[int(t)])
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise


def rank_profile(backend, x0: torch.Tensor, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 num_steps: int = 50, crop: int | None = DEFAULT_CROP, tol: float = DEFAULT_TOL,
                 seed: int = 0, names: Sequence[str] | None = None,
                 log: Callable[[str], None] | None = None) -> RankProfile:
    """Measure the Jacobian's singular values at each t of ``fractions`` for each clean latent of
    ``x0`` (N, C, H, W), on the centre ``crop``×``crop`` window (``None``: the whole latent).

    Each image gets one noise draw ε (seeded by ``seed`` and its index), reused at every t, so the
    curve across t is not blurred by different noise. Cost: N·len(fractions) dense Jacobians.
    """
    tol = check_tol(tol)
    if not isinstance(x0, torch.Tensor) or x0.dim() != 4:
        raise InvalidParameterError(f"x0 must be a batch of latents (N, C, H, W); got "
                                    f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    if x0.shape[0] == 0:
        raise InvalidParameterError("no images: x0 holds N = 0 latents; give at least one")
    crop = _check_crop(backend, crop)
    grid = ddim.make_grid(backend, num_steps)
    positions = grid_points(grid, fractions)
    names = tuple(names) if names is not None else tuple(f"latent {i}" for i in range(x0.shape[0]))
    if len(names) != x0.shape[0]:
        raise InvalidParameterError(f"{len(names)} names for {x0.shape[0]} latents")
    t0, c0 = time.perf_counter(), time.process_time()
    x0 = x0.to(backend.device, backend.dtype)
    x0c = center_crop_latents(x0, crop)
    spectra, smax = [], []
    for i in range(x0c.shape[0]):
        noise = center_crop_latents(profile_noise(x0.shape[1:], seed, i), crop).to(x0c)
        row_s, row_m = [], []
        for k in positions:
            t = grid.timesteps[k - 1]
            jac = dense_jacobian(backend, forward_noise(backend, x0c[i:i + 1], t, noise[None]), t)
            s = torch.linalg.svdvals(jac.double())
            row_m.append(float(s[0]))
            row_s.append((s / s[0]) if float(s[0]) > 0 else s)
            if log:
                r = float((row_s[-1] > tol).double().mean())
                log(f"  {names[i]}: t/T = {k / grid.num_steps:.2f} (t = {t}): rank ratio {r:.4f} "
                    f"(σ_max {float(s[0]):.3g}) [{time.perf_counter() - t0:.0f} s]")
        spectra.append(torch.stack(row_s))
        smax.append(row_m)
    c, h, w = x0c.shape[1:]
    return RankProfile(
        fractions=tuple(k / grid.num_steps for k in positions), positions=tuple(positions),
        timesteps=tuple(grid.timesteps[k - 1] for k in positions), num_steps=grid.num_steps, tol=tol,
        jacobian_shape=(int(c), int(h), int(w)), images=names, spectra=torch.stack(spectra).cpu(),
        sigma_max=torch.tensor(smax, dtype=torch.float64), seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - c0)


@dataclass(frozen=True)
class EnergyProfile:
    """The rank ratio by the 99 %-energy rule at a grid of t, for each image, at the full latent size,
    from stochastic Lanczos quadrature of JᵀJ (:func:`energy_profile`).

    ``ratios`` and ``ratio_sd`` are (images, t): the energy rank over d, and its bootstrap spread over
    the Lanczos probes; ``mean_square_gain`` is Σσ²/d (Hutchinson's estimate of the share of a random
    change of x_t that reaches the predicted clean image).
    """

    fractions: tuple[float, ...]
    positions: tuple[int, ...]
    timesteps: tuple[int, ...]
    num_steps: int
    energy: float
    probes: int
    steps: int
    jacobian_shape: tuple[int, int, int]
    images: tuple[str, ...]
    ratios: np.ndarray
    ratio_sd: np.ndarray
    mean_square_gain: np.ndarray
    seconds: float = 0.0

    @property
    def dim(self) -> int:
        return int(np.prod(self.jacobian_shape))

    def mean(self) -> np.ndarray:
        return self.ratios.mean(0)


def energy_profile(backend, x0: torch.Tensor, *, fractions: Sequence[float] = AUTO_FRACTIONS, num_steps: int = 50,
                   energy: float = DEFAULT_ENERGY, probes: int = 4, steps: int = 24, seed: int = 0,
                   names: Sequence[str] | None = None, log: Callable[[str], None] | None = None) -> EnergyProfile:
    """The energy-rule rank ratio of J at each t of ``fractions`` for each clean latent of ``x0``
    (N, C, H, W), on the whole latent: ``steps`` Lanczos steps of JᵀJ from ``probes`` Rademacher
    starts per (image, t), each step one JVP and one VJP on a batch of the probes, so no dense
    Jacobian and no crop. Noise as in :func:`rank_profile` (one seeded ε per image, shared by every t).
    """
    energy = float(energy)
    if not 0.0 < energy < 1.0:
        raise InvalidParameterError(f"energy must be in (0, 1); got {energy}")
    if not isinstance(x0, torch.Tensor) or x0.dim() != 4 or x0.shape[0] == 0:
        raise InvalidParameterError(f"x0 must be a non-empty batch of latents (N, C, H, W); got "
                                    f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    grid = ddim.make_grid(backend, num_steps)
    positions = grid_points(grid, fractions)
    names = tuple(names) if names is not None else tuple(f"latent {i}" for i in range(x0.shape[0]))
    if len(names) != x0.shape[0]:
        raise InvalidParameterError(f"{len(names)} names for {x0.shape[0]} latents")
    x0 = x0.to(backend.device, backend.dtype)
    d = x0[0].numel()
    ratio, spread, gain = [], [], []
    t0 = time.perf_counter()
    for i in range(len(x0)):
        noise = profile_noise(x0.shape[1:], seed, i).to(x0)[None]
        r, sd, g = [], [], []
        for k in positions:
            t = grid.timesteps[k - 1]
            x_t = forward_noise(backend, x0[i:i + 1], t, noise)
            est = lanczos_spectrum(jtj(backend, x_t, t), tuple(x_t.shape[1:]), probes=probes, steps=steps,
                                   seed=seed + 17 * i + k, dtype=x_t.dtype)
            r.append(est.energy_rank(energy) / d)
            sd.append(est.energy_rank_spread(energy, seed=seed) / d)
            g.append(est.total_energy() / d)
            if log:
                log(f"  {names[i]}: t/T = {k / grid.num_steps:.2f} (t = {t}): energy rank ratio {r[-1]:.4f} "
                    f"± {sd[-1]:.4f}, Σσ²/d {g[-1]:.4f} [{time.perf_counter() - t0:.0f} s]")
        ratio.append(r)
        spread.append(sd)
        gain.append(g)
    c, h, w = x0.shape[1:]
    return EnergyProfile(
        fractions=tuple(k / grid.num_steps for k in positions), positions=tuple(positions),
        timesteps=tuple(grid.timesteps[k - 1] for k in positions), num_steps=grid.num_steps, energy=energy,
        probes=int(probes), steps=int(steps), jacobian_shape=(int(c), int(h), int(w)), images=names,
        ratios=np.array(ratio), ratio_sd=np.array(spread), mean_square_gain=np.array(gain),
        seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------

def choose_t_star(profile: RankProfile, *, margin: float = DEFAULT_MARGIN, tol: float | None = None) -> float:
    """The earliest t (fraction of T, on the profile's DDIM grid) whose mean rank ratio is within
    ``margin`` of the profile's minimum: ``ratio(t) ≤ min + margin·(max − min)``.

    The mean curve is interpolated linearly between the measured t so the answer can fall on any
    DDIM step between them. A flat profile (max = min) carries no preference and gives its first t.
    """
    margin = float(margin)
    if not 0.0 <= margin < 1.0:
        raise InvalidParameterError(f"margin must be in [0, 1); got {margin}")
    if not profile.positions:
        raise InvalidParameterError("the profile has no t values")
    return t_star_from_curve(profile.positions, profile.mean(tol), profile.num_steps, margin)


def t_star_from_curve(positions: Sequence[int], ratios: Sequence[float], num_steps: int, margin: float) -> float:
    """:func:`choose_t_star`'s rule on any rank curve (``ratios`` at DDIM grid ``positions``), e.g.
    one by the energy rule or from a randomized estimate at the full latent size."""
    pos = np.asarray(positions, dtype=float)
    r = np.asarray(ratios, dtype=float)
    if len(pos) == 0 or len(pos) != len(r):
        raise InvalidParameterError(f"need as many ratios as positions (>= 1); got {len(r)} and {len(pos)}")
    lo, hi = float(r.min()), float(r.max())
    threshold = lo + margin * (hi - lo)
    steps = np.arange(int(pos[0]), int(pos[-1]) + 1)
    curve = np.interp(steps, pos, r)
    # a tiny slack so that the measured minimum itself always qualifies despite rounding
    k = int(steps[np.argmax(curve <= threshold + 1e-12)])
    return k / int(num_steps)


def profile_noise(shape, seed: int, index: int) -> torch.Tensor:
    """The ε of image ``index``: one seeded draw per image, shared by every t and every size (a
    centre crop of the full-size draw, so the crop and the full latent see the same noise)."""
    g = torch.Generator().manual_seed(int(seed) * 1009 + int(index))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# auto t*: a quick profile, cached per model
# ------------------------------------------------------------------------------------------------

AUTO_MAX_DIM = 4096         # non-convolutional models get exact dense Jacobians, up to this d
_AUTO_VERSION = 2           # bump when the recipe changes (invalidates disk caches); 2: energy rule, full size
_auto_memory: dict[str, float] = {}
_auto_lock = threading.Lock()
_fingerprints: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_fingerprint(backend) -> str:
    """SHA-256 over what the noise prediction depends on: the backend's class and name, latent
    shape, ᾱ table, and every weight tensor it holds (all its ``torch.nn.Module`` attributes, and
    the tensors of a plain ``model`` object such as the analytic MoLRG). Computed once per backend
    object; weights changed in place afterwards are not noticed."""
    try:
        return _fingerprints[backend]
    except (KeyError, TypeError):
        pass
    h = hashlib.sha256()
    h.update(f"{type(backend).__module__}.{type(backend).__qualname__}|{backend.name}|"
             f"{tuple(backend.latent_shape)}".encode())

    def add(tag: str, t: torch.Tensor) -> None:
        h.update(f"|{tag}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    add("alphas_cumprod", torch.as_tensor(backend.alphas_cumprod))
    for name, value in sorted(vars(backend).items()):
        if isinstance(value, torch.nn.Module):
            for key, t in value.state_dict().items():
                add(f"{name}.{key}", t)
        elif name == "model" and hasattr(value, "__dataclass_fields__"):
            for key in sorted(value.__dataclass_fields__):
                t = getattr(value, key)
                if isinstance(t, torch.Tensor):
                    add(f"model.{key}", t)
    digest = h.hexdigest()
    try:
        _fingerprints[backend] = digest
    except TypeError:  # not weak-referenceable: just recompute next time
        pass
    return digest


def _convolutional(backend) -> bool:
    return _downsampling(backend) > 1 or getattr(backend, "vae", None) is not None


def _auto_curve(backend, num_steps: int, energy: float, log) -> tuple[list[int], list[float], list[float], float]:
    """(grid positions, fractions, mean energy-rule rank ratio, seconds) of the quick profile of ``backend``."""
    if _convolutional(backend):
        prof = energy_profile(backend, photo_latents(backend, AUTO_PHOTOS), fractions=AUTO_FRACTIONS,
                              num_steps=num_steps, energy=energy, probes=AUTO_PROBES, steps=AUTO_STEPS,
                              names=AUTO_PHOTOS, log=log)
        return list(prof.positions), list(prof.fractions), prof.mean().tolist(), prof.seconds
    d = int(np.prod(backend.latent_shape))
    if d > AUTO_MAX_DIM:
        raise InvalidParameterError(
            f"auto t* needs dense Jacobians: {backend.name} is not a convolutional UNet, so it would be "
            f"profiled whole, and d = {d} > {AUTO_MAX_DIM} is too costly; give t* as a number")
    if not hasattr(backend, "sample_data"):
        raise InvalidParameterError(f"auto t*: no clean data to profile {backend.name} on; give t* as a number")
    names = tuple(f"sample {i}" for i in range(4))
    prof = rank_profile(backend, backend.sample_data(len(names), seed=0), fractions=AUTO_FRACTIONS,
                        num_steps=num_steps, crop=None, names=names, log=log)
    return list(prof.positions), list(prof.fractions), prof.energy_ratios(energy).mean(0).tolist(), prof.seconds


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shallowmark" / "jacobian-rank"


def auto_t_star(backend, *, num_steps: int = 50, energy: float = DEFAULT_ENERGY, margin: float = DEFAULT_MARGIN,
                cache: bool = True, log: Callable[[str], None] | None = None) -> float:
    """t* (a fraction of T on the ``num_steps`` DDIM grid, in (0, 1)) for Shallow Diffuse on
    ``backend``: :func:`t_star_from_curve` (the rule of :func:`choose_t_star`) on the mean rank ratio
    by the ``energy`` rule at t/T = 0.1…0.8. Convolutional UNets are measured at their full latent
    size by :func:`energy_profile` on one bundled photo (about 10 minutes on one CPU thread for
    tiny-ldm); other models (the analytic MoLRG, d ≤ 4096) by exact dense Jacobians at four of
    ``backend.sample_data``. Unconditional: the model is evaluated with ``cond=None``.

    The answer is cached in memory and under ``$XDG_CACHE_HOME/shallowmark/jacobian-rank/``,
    keyed by :func:`model_fingerprint` and the settings, so only the first call per model pays.
    Concurrent first calls wait for one measurement. ``cache=False`` measures afresh and stores nothing.
    """
    energy = float(energy)
    if not 0.0 < energy < 1.0:
        raise InvalidParameterError(f"energy must be in (0, 1); got {energy}")
    margin = float(margin)
    if not 0.0 <= margin < 1.0:
        raise InvalidParameterError(f"margin must be in [0, 1); got {margin}")
    if not 10 <= int(num_steps) <= backend.num_train_timesteps:
        # fewer steps than 10 cannot resolve the 0.1-spaced profile (and t* would round to T)
        raise InvalidParameterError(f"auto t* needs num_steps in [10, {backend.num_train_timesteps}]; got {num_steps}")
    settings = dict(version=_AUTO_VERSION, num_steps=int(num_steps), energy=energy, margin=margin,
                    fractions=list(AUTO_FRACTIONS), photos=list(AUTO_PHOTOS), probes=AUTO_PROBES, steps=AUTO_STEPS)
    key = hashlib.sha256(json.dumps([model_fingerprint(backend), settings], sort_keys=True).encode()).hexdigest()[:32]
    if cache and key in _auto_memory:
        return _auto_memory[key]
    with _auto_lock:
        return _auto_measure(backend, key, settings, int(num_steps), energy, margin, cache, log)


def _auto_measure(backend, key, settings, num_steps, energy, margin, cache, log) -> float:
    path = _cache_dir() / f"{key}.json"
    if cache:
        if key in _auto_memory:  # measured by a concurrent caller while this one waited
            return _auto_memory[key]
        try:
            value = float(json.loads(path.read_text())["t_star"])
            if 0.0 < value < 1.0:
                _auto_memory[key] = value
                return value
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache entry yet, or an unreadable one: measure
    positions, fractions, curve, seconds = _auto_curve(backend, num_steps, energy, log)
    value = t_star_from_curve(positions, curve, num_steps, margin)
    if cache:
        _auto_memory[key] = value
        record = dict(t_star=value, fingerprint=model_fingerprint(backend), settings=settings,
                      backend=backend.name, fractions=fractions,
                      mean_energy_rank_ratio=[round(float(r), 6) for r in curve], seconds=round(seconds, 2))
        try:  # a read-only or full disk only loses the cache
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError:
            pass
    return value
