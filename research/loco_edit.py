"""LOCO edit: edit an image along the top singular vectors of the posterior-mean Jacobian.

At one noisy latent x_t (DDIM inversion of the image to a fraction t of T), the Jacobian
``J = ∂x̂0/∂x_t`` of the posterior mean is low rank. Its top right singular vectors v_i are the
directions of x_t that move the prediction x̂0 most, and ``J v_i = σ_i u_i``: a step ``x_t + λ v_i``
moves x̂0 by about ``λ σ_i u_i``. Denoising the edited x_t to 0 with DDIM gives the edited image.

Units: v_i and u_i are unit vectors in latent space (d = C·H·W), so λ is a latent distance. We
quote λ as a fraction of ``‖x_t‖`` (≈ √d for a noisy latent), which reads the same for any model.

Locality: the region u_i highlights is the smallest set of latent cells that holds ``mass`` (by
default 50 %) of ``Σ_c u_i²``, mapped to image pixels by the autoencoder's downsampling factor
(each latent cell covers an f×f pixel block). The locality of an edit is the fraction of the pixel
change energy ``Σ_rgb (edit − base)²`` that falls inside that region; a change spread evenly over
the image would score the region's area fraction (the chance level).

Masked LOCO (the method proper): for a region Ω of the image, :func:`masked_direction` takes the top
right singular vector v_Ω of the masked Jacobian ``P_Ω J`` and projects it onto the null space of
the top r' right singular vectors of the complement's ``P_Ωᶜ J``, so the step moves x̂0 inside Ω
and, to first order, as little as possible outside. :class:`MaskedMean` is the adapter that lets
the Jacobian tools see ``P_Ω J``; masks are given in pixels and act on latent cells
(:func:`mask_cells`). Any backend works the same way: tiny-ldm's 4×64×64 latent (4×4 pixels a
cell) and the Fashion-MNIST pixel model (:class:`~shallowmark.research.fmnist_backend.FmnistBackend`,
one cell a pixel). ``shallowmark analyze loco-masked`` (:mod:`shallowmark.research.loco_masked`)
measures its properties.

:func:`loco_edit_image` is the one-image path behind ``shallowmark edit``;
:func:`run_loco_edit_analysis` writes the report behind ``shallowmark analyze loco-edit``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from shallowmark.core import ddim
from shallowmark.core import jacobian as jac
from shallowmark.core.images import to_tensor
from shallowmark.errors import InvalidImageError, InvalidParameterError, check_int
from shallowmark.reports import markdown_table

DEFAULT_T = 0.5
DEFAULT_RANK = 8
DEFAULT_ITERS = 10
DEFAULT_MASS = 0.5
DEFAULT_LAMBDA = 0.05  # fraction of ‖x_t‖
DEFAULT_LAMBDAS = (-0.1, -0.05, 0.05, 0.1)  # fractions of ‖x_t‖; the analysis adds λ = 0 (the base)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------

def check_t(t: float) -> float:
    """t as a fraction of T, strictly inside (0, 1): at 0 there is no noise, at T no image left."""
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"t must be a number in (0, 1) (a fraction of T); got {t!r}")
    if not 0.0 < t < 1.0:
        raise InvalidParameterError(f"t must be a fraction of T in (0, 1); got {t}")
    return t


def check_lambda(lam: float) -> float:
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"λ must be a finite number (a fraction of ‖x_t‖); got {lam!r}")
    if not math.isfinite(lam):
        raise InvalidParameterError(f"λ must be finite; got {lam}")
    return lam


def check_mass(mass: float) -> float:
    mass = float(mass)
    if not 0.0 < mass < 1.0:
        raise InvalidParameterError(f"the region's mass fraction must be in (0, 1); got {mass}")
    return mass


def check_index(index: int, rank: int) -> int:
    if int(rank) != rank or rank < 1:
        raise InvalidParameterError(f"rank (number of singular vectors to compute) must be an integer >= 1; got {rank}")
    if int(index) != index or index < 0:
        raise InvalidParameterError(f"singular-vector index must be an integer >= 0; got {index}")
    if index >= rank:
        raise InvalidParameterError(f"singular-vector index {index} >= computed rank {rank}: "
                                    f"compute at least {int(index) + 1} singular vectors (--rank)")
    return int(index)


def read_image(path, size: int | None = None) -> np.ndarray:
    """An image file as uint8 RGB. With ``size``, other sizes are resized on the short side and
    centre-cropped to ``size``×``size`` (:func:`prepare_image`)."""
    arr = _open_image(path, "RGB", "image")
    return arr if size is None else prepare_image(arr, size)


def _open_image(path, mode: str, what: str) -> np.ndarray:
    """The file at ``path`` decoded and converted to PIL ``mode``, or InvalidImageError naming ``what``."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InvalidImageError(f"cannot read {what} {str(p)!r}: no such file")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidImageError(f"cannot read {what} {str(p)!r}: not a decodable image ({e})")


def prepare_image(image: np.ndarray, size: int = 256) -> np.ndarray:
    """uint8 RGB H×W×3 at any size -> ``size``×``size`` (short-side resize and centre crop)."""
    from shallowmark.core.photos import center_crop

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InvalidImageError(f"expected a uint8 RGB image (H, W, 3); got {arr.dtype} {arr.shape}")
    if min(arr.shape[:2]) < 8:
        raise InvalidImageError(f"image too small to edit: {arr.shape[1]}×{arr.shape[0]}")
    return arr if arr.shape[:2] == (size, size) else center_crop(arr, size)


# ----------------------------------------------------------------------------------------------
# Directions and edits (latent level: works for every backend, the analytic one included)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocoDirections:
    """The top singular triplets of J at one x_t. ``subspace.vectors`` are the v_i, ``subspace.left``
    the u_i (both (k, C, H, W), unit norm), ``subspace.singular_values`` the σ_i (descending).
    ``residuals[i] = ‖Jᵀu_i − σ_i v_i‖ / σ_i`` says how well the subspace iteration converged."""

    x_t: torch.Tensor
    position: int
    timestep: int
    subspace: jac.Subspace
    residuals: torch.Tensor


def loco_directions(backend, x_t: torch.Tensor, grid: ddim.DDIMGrid, position: int, rank: int = DEFAULT_RANK,
                    iters: int = DEFAULT_ITERS, seed: int = 0, cond=None) -> LocoDirections:
    """Top-``rank`` singular triplets of ∂x̂0/∂x_t at grid ``position`` (subspace iteration)."""
    if not 1 <= int(position) <= grid.num_steps:
        raise InvalidParameterError(f"grid position must be in [1, {grid.num_steps}]; got {position}")
    timestep = grid.timesteps[int(position) - 1]
    sub = jac.top_subspace(backend, x_t, timestep, rank=rank, iters=iters, cond=cond, seed=seed)
    # One more batch of VJPs: the residual of Jᵀu_i = σ_i v_i (zero for exact singular pairs).
    jtu = torch.cat([jac.vjp(backend, x_t, timestep, sub.left[i:i + 1], cond) for i in range(rank)])
    sig = sub.singular_values.clamp_min(torch.finfo(sub.singular_values.dtype).tiny)
    res = (jtu - sub.singular_values.view(-1, 1, 1, 1) * sub.vectors).flatten(1).norm(dim=1) / sig
    return LocoDirections(x_t, int(position), int(timestep), sub, res)


def edit_latents(backend, x_t: torch.Tensor, grid: ddim.DDIMGrid, position: int, direction: torch.Tensor,
                 lambdas: Sequence[float], cond=None, batch: int = 8) -> torch.Tensor:
    """DDIM-denoise ``x_t + λ · direction`` to x_0 for each λ (absolute latent units): (n, C, H, W)."""
    lam = torch.tensor([check_lambda(v) for v in lambdas], dtype=x_t.dtype, device=x_t.device)
    if direction.shape[-3:] != x_t.shape[-3:]:
        raise InvalidParameterError(f"direction shape {tuple(direction.shape)} does not match x_t {tuple(x_t.shape)}")
    starts = x_t + lam.view(-1, 1, 1, 1) * direction.reshape(1, *x_t.shape[1:]).to(x_t.dtype)
    return _denoise_all(backend, starts, grid, position, cond, batch)


def _denoise_all(backend, starts: torch.Tensor, grid: ddim.DDIMGrid, position: int, cond=None,
                 batch: int = 8) -> torch.Tensor:
    return torch.cat([ddim.denoise(backend, starts[i:i + batch], grid, position, 0, cond)
                      for i in range(0, starts.shape[0], batch)])


# ----------------------------------------------------------------------------------------------
# Locality
# ----------------------------------------------------------------------------------------------

def heat_map(u) -> np.ndarray:
    """Channel-summed energy ``Σ_c u²`` of one latent vector (C, H, W) -> (H, W)."""
    a = u.detach().double().cpu().numpy() if isinstance(u, torch.Tensor) else np.asarray(u, dtype=np.float64)
    if a.ndim != 3:
        raise InvalidParameterError(f"a latent direction has shape (C, H, W); got {a.shape}")
    return (a ** 2).sum(0)


def highlight_region(heat: np.ndarray, mass: float = DEFAULT_MASS) -> np.ndarray:
    """The smallest set of cells holding ``mass`` of the total heat (largest cells first): bool (H, W)."""
    mass = check_mass(mass)
    h = np.asarray(heat, dtype=np.float64)
    if h.ndim != 2 or not np.isfinite(h).all() or (h < 0).any():
        raise InvalidParameterError("a heat map must be a finite, non-negative 2-D array")
    total = h.sum()
    if total <= 0:
        raise InvalidParameterError("the heat map is all zero: no region to highlight")
    flat = h.ravel()
    order = np.argsort(-flat, kind="stable")  # largest first; ties in reading order
    cum = np.cumsum(flat[order]) / total
    n = int(np.searchsorted(cum, mass - 1e-12)) + 1  # first prefix that reaches the mass
    mask = np.zeros(flat.shape, dtype=bool)
    mask[order[:n]] = True
    return mask.reshape(h.shape)


def upsample_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upsampling by an integer factor: a latent cell covers an f×f pixel block."""
    h, w = mask.shape
    if size % h or size % w:
        raise InvalidParameterError(f"image size {size} is not a multiple of the map's {h}×{w}")
    return np.kron(mask, np.ones((size // h, size // w), dtype=bool)).astype(bool)


def change_energy(edited, base) -> np.ndarray:
    """Per-pixel change energy ``Σ_rgb (edited − base)²`` of two H×W×3 images -> (H, W)."""
    a, b = np.asarray(edited, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise InvalidParameterError(f"images must both be H×W×C; got {a.shape} and {b.shape}")
    return ((a - b) ** 2).sum(-1)


def locality(change: np.ndarray, region: np.ndarray) -> float:
    """Fraction of the change energy inside ``region`` (bool, same shape). NaN when nothing changed."""
    c, r = np.asarray(change, dtype=np.float64), np.asarray(region, dtype=bool)
    if c.shape != r.shape:
        raise InvalidParameterError(f"change map {c.shape} and region {r.shape} differ in shape")
    total = c.sum()
    return float("nan") if total <= 0 else float(c[r].sum() / total)


def region_for(u, image_size: int, mass: float = DEFAULT_MASS) -> np.ndarray:
    """The image-pixel region that u (C, h, w) highlights."""
    return upsample_mask(highlight_region(heat_map(u), mass), image_size)


# ----------------------------------------------------------------------------------------------
# Masked LOCO: a region Ω to edit, the masked Jacobian and the null space of the complement's
# ----------------------------------------------------------------------------------------------
#
# The mask Ω is given in image pixels (a rectangle or a mask image) and acts on latent cells: a
# backend whose latent is h×w for an S×S image gives each cell an f×f pixel block (f = S / h; 8 for
# Stable Diffusion, 4 for tiny-ldm, 1 for the Fashion-MNIST pixel model, whose latent is the image).
# A cell belongs to Ω when at least half of its block does, in every latent channel; the pixels of
# those cells (:func:`mask_cells` then :func:`upsample_mask`) are the region the method controls,
# and the region every measurement uses. A rectangle on multiples of f maps exactly.

def rect_mask(size: int, rect: Sequence[int]) -> np.ndarray:
    """A bool (size, size) pixel mask, True inside ``rect = (top, left, height, width)`` (pixels)."""
    return rect_mask_of((size, size), rect)


def rect_mask_of(hw: Sequence[int], rect: Sequence[int]) -> np.ndarray:
    """A bool (H, W) pixel mask, True inside ``rect = (top, left, height, width)`` (pixels)."""
    h_img, w_img = (int(v) for v in hw)
    try:
        top, left, height, width = (int(v) for v in rect)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"a rectangle is (top, left, height, width) in pixels; got {rect!r}")
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > h_img or left + width > w_img:
        raise InvalidParameterError(f"rectangle (top={top}, left={left}, height={height}, width={width}) is empty "
                                    f"or leaves the {w_img}×{h_img} image")
    m = np.zeros((h_img, w_img), dtype=bool)
    m[top:top + height, left:left + width] = True
    return m


def mask_from_image(mask) -> np.ndarray:
    """A pixel mask from a bool array, a grey (H, W) or RGB (H, W, 3) uint8 image (pixels brighter
    than 127, channels averaged, are in Ω) or the path of such an image file."""
    a = _open_image(mask, "L", "mask") if isinstance(mask, (str, Path)) else np.asarray(mask)
    if a.dtype == bool and a.ndim == 2:
        return a.copy()
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise InvalidParameterError(f"a mask is a bool (H, W) array or a uint8 grey/RGB image; got {a.dtype} {a.shape}")
    return (a if a.ndim == 2 else a.mean(-1)) > 127


def mask_cells(mask: np.ndarray, latent_hw: Sequence[int]) -> np.ndarray:
    """The latent cells (bool (h, w)) of a pixel mask (bool (S, S), S a multiple of h and w): a cell
    is in Ω when at least half of its pixel block is. Refuses a mask that leaves no cell inside or
    none outside (then there is nothing to edit, or nothing to keep)."""
    m = np.asarray(mask)
    h, w = (int(v) for v in latent_hw)
    if m.dtype != bool or m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise InvalidParameterError(f"a pixel mask is a square bool array; got {m.dtype} {m.shape}")
    size = m.shape[0]
    if size % h or size % w:
        raise InvalidParameterError(f"a {size}×{size} mask does not map onto a {h}×{w} latent "
                                    "(the image size must be a multiple of the latent size)")
    if not m.any():
        raise InvalidParameterError("the mask is empty: no region to edit")
    if m.all():
        raise InvalidParameterError("the mask covers the whole image: no region left to keep unchanged")
    fy, fx = size // h, size // w
    cells = m.reshape(h, fy, w, fx).mean(axis=(1, 3)) >= 0.5
    if not cells.any():
        raise InvalidParameterError(f"the mask covers no latent cell: each cell is a {fy}×{fx} pixel block and "
                                    "needs at least half of it inside the mask")
    if cells.all():
        raise InvalidParameterError("the mask covers every latent cell: no region left to keep unchanged")
    return cells


class MaskedMean:
    """A backend seen through an output mask m (0/1, broadcast over the latent): its posterior
    mean is m ⊙ x̂0, so the Jacobian tools of :mod:`shallowmark.core.jacobian` (JVP, VJP, subspace
    iteration) see ``P_Ω J``, the masked Jacobian. Everything else is the wrapped backend's.

    It works through ``eps``: with ε' = m ⊙ ε + (1 − m) ⊙ x_t / √(1−ᾱ_t), Tweedie's formula
    (x_t − √(1−ᾱ_t) ε') / √ᾱ_t is m ⊙ x̂0 (outside the mask the x_t terms cancel, to float rounding)."""

    def __init__(self, backend, mask: torch.Tensor):
        self.backend = backend
        self.mask = mask

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def eps(self, x_t: torch.Tensor, t, cond=None) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=torch.long).flatten()
        a = self.backend.alphas_cumprod[tt].to(x_t.dtype).view(-1, 1, 1, 1)
        m = self.mask.to(x_t.dtype)
        return m * self.backend.eps(x_t, t, cond).to(x_t.dtype) + (1 - m) * x_t / (1 - a).sqrt()


def null_project(v: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(I − V Vᵀ) v`` renormalised, with V the orthonormal rows ``vectors`` (r, *shape); returns it
    and ``‖(I − V Vᵀ) v‖ / ‖v‖`` (the share of v the projection kept). r = 0 returns v unchanged."""
    if vectors.shape[0] == 0:
        return v / v.norm(), 1.0
    p = jac.nullspace_project(v[None], vectors)[0]
    kept = float(p.norm() / v.norm())
    if not kept > 1e-6:
        raise InvalidParameterError("the direction lies in the complement's top subspace: the projection leaves "
                                    "nothing of it (use a smaller null_rank)")
    return p / p.norm(), kept


@dataclass(frozen=True)
class MaskedDirection:
    """One masked LOCO direction at one x_t.

    ``vector``: the edit direction, (I − V_c V_cᵀ) v_Ω renormalised (unit, latent shape); ``raw``:
    v_Ω itself, the ``index``-th right singular vector of P_Ω J; ``kept``: ‖(I − V_c V_cᵀ) v_Ω‖.
    ``masked`` and ``complement`` hold the singular triplets of P_Ω J and P_Ωᶜ J (``complement`` is
    None with ``null_rank = 0``: no projection, ``vector`` is ``raw``). ``cells`` is Ω on the latent
    grid, ``region`` its pixels (what the measurements use)."""

    vector: torch.Tensor
    raw: torch.Tensor
    kept: float
    index: int
    masked: LocoDirections
    complement: LocoDirections | None
    cells: np.ndarray
    region: np.ndarray

    def projected(self, null_rank: int) -> tuple[torch.Tensor, float]:
        """v_Ω projected onto the null space of the top ``null_rank`` complement vectors only
        (a prefix of those computed: subspace iteration sorts them by σ)."""
        have = 0 if self.complement is None else self.complement.subspace.vectors.shape[0]
        check_int("null_rank (at most the complement directions computed)", null_rank, 0, have)
        vecs = self.raw.new_zeros((0, *self.raw.shape)) if null_rank == 0 else \
            self.complement.subspace.vectors[:int(null_rank)]
        return null_project(self.raw, vecs)


def check_masked_args(backend, mask, rank: int, null_rank: int, iters: int, index: int = 0) -> np.ndarray:
    """Every input check of :func:`masked_direction`, before any model call; returns Ω's cells."""
    check_index(index, rank)
    check_int("null_rank (complement directions projected out)", null_rank, 0, int(np.prod(backend.latent_shape)) - 1)
    check_int("iters", iters, 1)
    m = np.asarray(mask)
    if m.shape != (backend.image_size, backend.image_size):
        raise InvalidParameterError(f"the mask has shape {m.shape}; the model's images are "
                                    f"{backend.image_size}×{backend.image_size}")
    return mask_cells(m, backend.latent_shape[1:])


def masked_direction(backend, x_t: torch.Tensor, grid: ddim.DDIMGrid, position: int, mask: np.ndarray, *,
                     rank: int = 4, null_rank: int = 8, iters: int = DEFAULT_ITERS, index: int = 0,
                     seed: int = 0, cond=None) -> MaskedDirection:
    """The LOCO edit direction for the pixel region ``mask`` (bool, image size) at grid ``position``:
    v_Ω, the ``index``-th of the top ``rank`` right singular vectors of P_Ω J, projected onto the null
    space of the top ``null_rank`` right singular vectors of P_Ωᶜ J (both by subspace iteration)."""
    cells = check_masked_args(backend, mask, rank, null_rank, iters, index)
    m = torch.as_tensor(cells, dtype=x_t.dtype, device=x_t.device)[None, None]
    masked = loco_directions(MaskedMean(backend, m), x_t, grid, position, rank, iters, seed, cond)
    raw = masked.subspace.vectors[index]
    comp = None
    if null_rank:
        comp = loco_directions(MaskedMean(backend, 1 - m), x_t, grid, position, int(null_rank), iters, seed + 1, cond)
        vector, kept = null_project(raw, comp.subspace.vectors)
    else:
        vector, kept = raw, 1.0
    return MaskedDirection(vector, raw, kept, int(index), masked, comp, cells,
                           upsample_mask(cells, backend.image_size))


# ----------------------------------------------------------------------------------------------
# One image (shallowmark edit)
# ----------------------------------------------------------------------------------------------

def image_to_xt(backend, image: np.ndarray, grid: ddim.DDIMGrid, position: int) -> torch.Tensor:
    """Encode a uint8 image and DDIM-invert its latent up to grid ``position``."""
    with torch.no_grad():
        z = backend.encode(to_tensor(image, backend.image_size).to(backend.device, backend.dtype))
        return ddim.invert(backend, z, grid, 0, int(position))


def _decode_u8(backend, latents: torch.Tensor) -> np.ndarray:
    return np.round(decode_levels(backend, latents)).astype(np.uint8)


def decode_levels(backend, latents: torch.Tensor) -> np.ndarray:
    """Decoded images as float64 grey levels in [0, 255] (N, H, W, 3), not yet rounded to uint8."""
    with torch.no_grad():
        return np.concatenate([((backend.decode(latents[i:i + 8]).float().cpu().clamp(-1, 1) + 1) * 127.5)
                               .permute(0, 2, 3, 1).double().numpy() for i in range(0, latents.shape[0], 8)])


def prepare_mask(mask, image_hw: Sequence[int], size: int) -> np.ndarray:
    """A pixel mask (anything :func:`mask_from_image` takes) on the model's ``size``² grid. A mask
    of the uploaded image's own size (``image_hw``) goes through the same resize and centre crop as
    the image (:func:`prepare_image`), so it marks the same pixels; one already ``size``² is kept."""
    m = mask_from_image(mask)
    if m.shape == (size, size):
        return m
    if m.shape != tuple(int(v) for v in image_hw):
        raise InvalidParameterError(f"the mask is {m.shape[1]}×{m.shape[0]}; it must be the image's own size "
                                    f"({image_hw[1]}×{image_hw[0]}) or the model's ({size}×{size})")
    grey = np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=-1)
    return prepare_image(grey, size).mean(-1) > 127


@dataclass(frozen=True)
class EditResult:
    """One LOCO edit. ``image`` the edited uint8 picture, ``base`` the same pipeline with λ = 0.
    ``lam`` in units of ‖x_t‖, ``lam_latent`` the latent distance it is.

    Unmasked: ``locality`` is the share of the change inside the region u_i highlights (holding
    ``mass`` of |u_i|²), ``area_fraction`` that region's share of the image. Masked (``masked``):
    the region is the mask's latent cells in pixels, ``sigma`` is v_Ω's singular value of P_Ω J,
    ``kept`` the share of v_Ω the null-space projection kept (1.0 with ``null_rank`` 0), and
    ``psnr_out`` / ``ssim_out`` compare the edit with the base outside the mask only."""

    image: np.ndarray
    base: np.ndarray
    index: int
    t: float
    timestep: int
    lam: float
    lam_latent: float
    sigma: float
    locality: float
    area_fraction: float
    mass: float
    change_rms: float  # grey levels, over all pixels and channels
    masked: bool = False
    null_rank: int = 0
    kept: float = 1.0
    psnr_out: float | None = None
    ssim_out: float | None = None

    def summary(self) -> str:
        i = self.index
        if self.masked:
            return (f"masked LOCO edit along v_{i} of the masked Jacobian (σ = {self.sigma:.3g}), projected off the "
                    f"top {self.null_rank} directions of the outside's (kept {100 * self.kept:.0f}% of it), at "
                    f"t = {self.t:g}T, λ = {self.lam:g}·‖x_t‖ = {self.lam_latent:.3g}: "
                    f"{100 * self.locality:.1f}% of the pixel change lies in the mask, which covers "
                    f"{100 * self.area_fraction:.1f}% of the image (chance); outside it PSNR "
                    f"{self.psnr_out:.1f} dB, SSIM {self.ssim_out:.3f}; RMS change {self.change_rms:.2f} grey levels")
        return (f"LOCO edit along v_{i} (σ = {self.sigma:.3g}) at t = {self.t:g}T, λ = {self.lam:g}·‖x_t‖ "
                f"= {self.lam_latent:.3g}: {100 * self.locality:.1f}% of the pixel change lies in the region holding "
                f"{100 * self.mass:.0f}% of |u_{i}|², which covers {100 * self.area_fraction:.1f}% of the image "
                f"(chance); RMS change {self.change_rms:.2f} grey levels")


def loco_edit_image(backend, image: np.ndarray, *, t: float = DEFAULT_T, index: int = 0,
                    lam: float = DEFAULT_LAMBDA, rank: int = DEFAULT_RANK, iters: int = DEFAULT_ITERS,
                    num_steps: int = 50, mass: float = DEFAULT_MASS, seed: int = 0,
                    mask=None, null_rank: int = 8) -> EditResult:
    """Edit ``image`` (uint8 RGB; resized/cropped to the model's size) along v_index at t·T by
    ``lam``·‖x_t‖ and measure the edit's locality. With ``mask`` (a pixel mask of the image's own
    size or the model's: see :func:`prepare_mask`), the masked LOCO direction
    (:func:`masked_direction`, projected off the outside's top ``null_rank`` directions) and the
    change outside the mask. Inputs are checked before any model call."""
    t, lam, mass = check_t(t), check_lambda(lam), check_mass(mass)
    index = check_index(index, rank)
    if int(iters) != iters or iters < 1:
        raise InvalidParameterError(f"iters must be an integer >= 1; got {iters}")
    hw = np.asarray(image).shape[:2]
    image = prepare_image(image, backend.image_size)
    if mask is not None:
        mask = prepare_mask(mask, hw, backend.image_size)
        check_masked_args(backend, mask, rank, null_rank, iters, index)
    grid = ddim.make_grid(backend, num_steps)
    k = grid.position(t)
    x_t = image_to_xt(backend, image, grid, k)
    lam_latent = lam * float(x_t.norm())
    if mask is None:
        dirs = loco_directions(backend, x_t, grid, k, rank=rank, iters=iters, seed=seed)
        z = edit_latents(backend, x_t, grid, k, dirs.subspace.vectors[index], [0.0, lam_latent])
        base, edited = _decode_u8(backend, z)
        region = region_for(dirs.subspace.left[index], base.shape[0], mass)
        change = change_energy(edited, base)
        return EditResult(edited, base, index, t, dirs.timestep, lam, lam_latent,
                          float(dirs.subspace.singular_values[index]), locality(change, region), float(region.mean()),
                          mass, float(np.sqrt(change.mean() / 3)))
    # loco_masked builds on this module; its measures are imported here, where they are needed
    from shallowmark.research.loco_masked import region_stats

    d = masked_direction(backend, x_t, grid, k, mask, rank=rank, null_rank=null_rank, iters=iters, index=index,
                         seed=seed)
    base, edited = _decode_u8(backend, edit_latents(backend, x_t, grid, k, d.vector, [0.0, lam_latent]))
    stats = region_stats(edited.astype(np.float64), base.astype(np.float64), d.region)
    change = change_energy(edited, base)
    return EditResult(edited, base, index, t, d.masked.timestep, lam, lam_latent,
                      float(d.masked.subspace.singular_values[index]), stats["locality"], float(d.region.mean()),
                      mass, float(np.sqrt(change.mean() / 3)), masked=True, null_rank=int(null_rank),
                      kept=float(d.kept), psnr_out=stats["psnr_out"], ssim_out=stats["ssim_out"])


@dataclass(frozen=True)
class LocoAnalysisConfig:
    """Sizes of one run. ``lambdas`` are fractions of ‖x_t‖ (λ = 0 is added as the base column)."""

    t: float = DEFAULT_T
    rank: int = DEFAULT_RANK
    iters: int = DEFAULT_ITERS
    num_steps: int = 50
    mass: float = DEFAULT_MASS
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    generated_sample: bool = True    # also edit a tiny-ldm sample, not only the held-out photo
    random_controls: int = 4         # random unit directions edited with the largest λ, as a control
    t_sweep: tuple[float, ...] = (0.3, 0.7)  # other t (held-out photo only; the largest λ only)
    sweep_rank: int = 4                       # singular vectors per t in the sweep (cost)

    @staticmethod
    def quick() -> "LocoAnalysisConfig":
        return LocoAnalysisConfig(rank=2, iters=2, num_steps=10, lambdas=(-0.1, 0.1), generated_sample=False,
                                  random_controls=1, t_sweep=())


def _largest(lambdas: Sequence[float]) -> float:
    """The λ of largest magnitude, the positive one on a tie: the control and sweep use it."""
    return max(lambdas, key=lambda v: (abs(v), v))


def _round(x, nd: int = 4):
    if isinstance(x, (list, tuple)):
        return [_round(v, nd) for v in x]
    x = float(x)
    return None if not math.isfinite(x) else round(x, nd)  # JSON has no NaN: "no change" is null


def _analyse_image(backend, grid, image: np.ndarray, cfg: LocoAnalysisConfig, t: float, lambdas: Sequence[float],
                   rank: int, seed: int, controls: int, log) -> dict:
    """Directions, edits and locality for one image at one t. Returns figures and the pictures."""
    k = grid.position(t)
    x_t = image_to_xt(backend, image, grid, k)
    t0 = time.perf_counter()
    dirs = loco_directions(backend, x_t, grid, k, rank=rank, iters=cfg.iters, seed=seed)
    t_sub = time.perf_counter() - t0
    sub = dirs.subspace
    xt_norm = float(x_t.norm())
    lam_abs = [v * xt_norm for v in lambdas]
    n_lam = len(lam_abs)
    log(f"  t = {t:g}T (timestep {dirs.timestep}): σ = {[round(float(s), 3) for s in sub.singular_values]} "
        f"in {t_sub:.1f} s")

    t0 = time.perf_counter()
    lam = torch.tensor(lam_abs, dtype=x_t.dtype)
    # Control: random unit directions at the largest |λ|, scored against every u_i region.
    j_big = list(lambdas).index(_largest(lambdas))
    g = torch.Generator().manual_seed(seed + 1)
    rand = torch.randn((controls, *x_t.shape[1:]), generator=g, dtype=x_t.dtype)
    rand = rand / rand.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    # Every start in one list, so DDIM runs full batches: base, then row i = v_i × λ, then controls.
    edits_start = (x_t + lam.view(1, -1, 1, 1, 1) * sub.vectors[:, None]).reshape(-1, *x_t.shape[1:])
    starts = torch.cat([x_t, edits_start, x_t + lam_abs[j_big] * rand])
    pictures = _decode_u8(backend, _denoise_all(backend, starts, grid, k))
    base = pictures[0]
    edits = pictures[1:1 + rank * n_lam].reshape(rank, n_lam, *base.shape)
    ctrl_imgs = pictures[1 + rank * n_lam:]
    # x̂0 before and after each edit: is the step still in the linear regime Δx̂0 ≈ λ σ_i u_i?
    with torch.no_grad():
        x0_hat = jac.posterior_mean(backend, x_t, dirs.timestep)
        moved = torch.cat([jac.posterior_mean(backend, edits_start[i:i + 8], dirs.timestep)
                           for i in range(0, edits_start.shape[0], 8)])
    d = (moved - x0_hat).flatten(1).view(rank, n_lam, -1)
    pred = lam.view(1, -1, 1) * (sub.singular_values.view(-1, 1) * sub.left.flatten(1))[:, None, :]
    lin_ratio = (d.norm(dim=-1) / pred.norm(dim=-1)).tolist()
    lin_cos = torch.nn.functional.cosine_similarity(d, pred, dim=-1).tolist()

    regions, areas, loc, rms = [], [], [], []
    for i in range(rank):
        region = region_for(sub.left[i], base.shape[0], cfg.mass)
        regions.append(region)
        areas.append(float(region.mean()))
        changes = [change_energy(im, base) for im in edits[i]]
        loc.append([locality(c, region) for c in changes])
        rms.append([float(np.sqrt(c.mean() / 3)) for c in changes])
    # Cross-locality at the largest |λ|: edit i's change inside region j. Diagonal >> off-diagonal
    # means each edit stays in its own u_i region, not in one common salient area.
    cross = [[locality(change_energy(edits[i][j_big], base), regions[j]) for j in range(rank)]
             for i in range(rank)]
    ctrl_rms, ctrl_loc = [], []
    for im in ctrl_imgs:
        ch = change_energy(im, base)
        ctrl_rms.append(float(np.sqrt(ch.mean() / 3)))
        ctrl_loc.append(float(np.mean([locality(ch, r) for r in regions])))
    t_edit = time.perf_counter() - t0

    loc_a = np.array(loc, dtype=np.float64)
    area_a = np.array(areas)
    cross_a = np.array(cross)
    off = cross_a[~np.eye(rank, dtype=bool)]
    from shallowmark.core.images import psnr

    figures = dict(
        t=t, position=k, timestep=dirs.timestep, xt_norm=_round(xt_norm, 3),
        lambdas=list(lambdas), lambdas_latent=_round(lam_abs, 3),
        base_psnr_vs_input_db=_round(psnr(base, image), 2),
        singular_values=_round(sub.singular_values.tolist()),
        ritz_residuals=_round(dirs.residuals.tolist(), 5),
        cos_u_v=_round((sub.vectors.flatten(1) * sub.left.flatten(1)).sum(1).abs().tolist()),
        region_area=_round(areas),
        locality=[_round(r) for r in loc],
        change_rms=[_round(r, 2) for r in rms],
        x0hat_change_over_linear=[_round(r, 3) for r in lin_ratio],
        x0hat_change_cos_linear=[_round(r, 3) for r in lin_cos],
        mean_locality=_round(np.nanmean(loc_a)),
        mean_area=_round(area_a.mean()),
        mean_lift=_round(np.nanmean(loc_a / area_a[:, None]), 2),
        locality_by_lambda=_round(np.nanmean(loc_a, axis=0).tolist()),
        cross_locality_lambda=lambdas[j_big],
        cross_locality=[_round(r, 3) for r in cross],
        cross_diagonal_mean=_round(np.mean(np.diag(cross_a))),
        cross_off_diagonal_mean=_round(off.mean()) if off.size else None,
        random_control=dict(count=controls, lam=lambdas[j_big], change_rms=_round(ctrl_rms, 2),
                            mean_locality_in_u_regions=_round(ctrl_loc),
                            v_edit_change_rms_same_lambda=_round([r[j_big] for r in rms], 2)),
        seconds=dict(subspace=round(t_sub, 1), edits=round(t_edit, 1)),
    )
    return dict(figures=figures, pictures=dict(base=base, edits=edits, left=sub.left.detach().cpu(), regions=regions))


def _generated_image(backend, seed: int, num_steps: int) -> np.ndarray:
    grid = ddim.make_grid(backend, num_steps)
    with torch.no_grad():
        z = ddim.denoise(backend, backend.randn_latents([seed]), grid, grid.num_steps, 0)
    return _decode_u8(backend, z)[0]


def _figure(w: float, h: float, dpi: int = 110):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    return Figure(figsize=(w, h), dpi=dpi)


def plot_edit_grid(name: str, figures: dict, pictures: dict, mass: float, path: Path) -> None:
    """Rows = singular index i; columns = λ (with the λ = 0 base in the middle) and the u_i heat map
    over the base image with the highlighted region outlined."""
    lambdas = figures["lambdas"]
    neg = [j for j, v in enumerate(lambdas) if v < 0]
    pos = [j for j, v in enumerate(lambdas) if v >= 0]
    cols = len(lambdas) + 2
    rows = len(pictures["edits"])
    fig = _figure(1.55 * cols, 1.55 * rows + 0.6, dpi=130)
    base = pictures["base"]
    for i in range(rows):
        cells = [("edit", j) for j in neg] + [("base", None)] + [("edit", j) for j in pos] + [("heat", None)]
        for c, (kind, j) in enumerate(cells):
            ax = fig.add_subplot(rows, cols, i * cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            head = ""
            if kind == "edit":
                ax.imshow(pictures["edits"][i][j])
                head = f"λ = {lambdas[j]:+g}·‖x_t‖\n"
                title = f"locality {figures['locality'][i][j]:.2f}"
            elif kind == "base":
                ax.imshow(base)
                head, title = "λ = 0\n", "base"
            else:
                # |u_i| over the grey base image; opacity follows |u_i| so quiet areas stay readable.
                import matplotlib

                mag = np.sqrt(heat_map(pictures["left"][i]))
                mag = mag / mag.max()
                rgba = matplotlib.colormaps["inferno"](mag)
                rgba[..., 3] = np.clip(1.5 * mag, 0, 1)
                size = base.shape[0]
                ax.imshow(base.mean(-1), cmap="gray", vmin=0, vmax=255)
                ax.imshow(rgba, extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest")
                ax.contour(pictures["regions"][i].astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
                head = "|u_i| and region\n"
                title = f"area {figures['region_area'][i]:.3f}"
            ax.set_title((head if i == 0 else "") + title, fontsize=6, pad=2)
            if c == 0:
                ax.set_ylabel(f"i={i}\nσ={figures['singular_values'][i]:.2f}", fontsize=7)
    fig.suptitle(f"LOCO edit, {name}: x_t + λ v_i at t = {figures['t']:g}T, DDIM to 0 "
                 f"(region: {mass:.0%} of |u_i|², cyan)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    _save_quantized(fig, path)


def _save_quantized(fig, path: Path) -> None:
    """A 256-colour PNG: a grid of photos is ~3× smaller than 24-bit and looks the same at this scale."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(256).save(path, optimize=True)


def plot_locality(results: dict, path: Path) -> None:
    """Mean locality over λ per i, next to the region's area (chance), for each image."""
    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot()
    width = 0.8 / (2 * len(results))
    for n, (name, f) in enumerate(results.items()):
        loc = np.nanmean(np.array(f["locality"], dtype=float), axis=1)
        idx = np.arange(len(loc))
        ax.bar(idx + (2 * n) * width, loc, width, label=f"{name}: locality")
        ax.bar(idx + (2 * n + 1) * width, f["region_area"], width, label=f"{name}: area (chance)", alpha=0.6)
    n_bars = 2 * len(results)
    ax.set_xticks(np.arange(len(loc)) + (n_bars - 1) * width / 2, [str(i) for i in range(len(loc))])
    ax.set_xlabel("singular index i")
    ax.set_ylabel("fraction of the pixel change")
    ax.set_ylim(0, 1)
    ax.set_title("share of each edit's pixel change inside its u_i region (mean over λ) vs chance", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def run_loco_edit_analysis(out_dir, quick: bool = False, *, seed: int = 0, command: str | None = None,
                           config: LocoAnalysisConfig | None = None, backend=None,
                           log: Callable[[str], None] = lambda m: None) -> dict:
    """LOCO edits of the held-out photo (and, at default size, a generated tiny-ldm sample) with
    their locality; writes ``report.json``, ``report.md`` and PNGs into ``out_dir``. Returns the report."""
    from shallowmark.core.backends import load_backend
    from shallowmark.core.photos import HELDOUT_PHOTO, center_crop, heldout_photo

    cfg = config or (LocoAnalysisConfig.quick() if quick else LocoAnalysisConfig())
    check_t(cfg.t)
    check_mass(cfg.mass)
    for v in cfg.lambdas:
        check_lambda(v)
    for v in cfg.t_sweep:
        check_t(v)
    if not cfg.lambdas or any(v == 0 for v in cfg.lambdas):
        raise InvalidParameterError("lambdas must be non-empty and non-zero (λ = 0 is the base, added for you)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = f"shallowmark analyze loco-edit --out {out}" + (" --quick" if quick else "")
    t_start = time.perf_counter()
    backend = backend or load_backend("tiny-ldm")
    grid = ddim.make_grid(backend, cfg.num_steps)

    images = {HELDOUT_PHOTO: center_crop(heldout_photo(), backend.image_size)}
    sources = {HELDOUT_PHOTO: "matplotlib's grace_hopper.jpg (held out of tiny-ldm's training), "
                              f"short side resized to {backend.image_size} and centre-cropped"}
    if cfg.generated_sample:
        images[f"sample-seed{seed}"] = _generated_image(backend, seed, cfg.num_steps)
        sources[f"sample-seed{seed}"] = f"a tiny-ldm sample: DDIM ({cfg.num_steps} steps) from x_T of seed {seed}"

    results, figures_png = {}, {}
    for name, image in images.items():
        log(f"{name}:")
        r = _analyse_image(backend, grid, image, cfg, cfg.t, cfg.lambdas, cfg.rank, seed, cfg.random_controls, log)
        results[name] = r["figures"]
        figures_png[name] = f"edits_{name}.png"
        plot_edit_grid(name, r["figures"], r["pictures"], cfg.mass, out / figures_png[name])
    figures_png["locality"] = "locality.png"
    plot_locality(results, out / figures_png["locality"])

    sweep = {}
    if cfg.t_sweep:
        r_sw = min(cfg.sweep_rank, cfg.rank)
        lam_big = _largest(cfg.lambdas)
        main = results[HELDOUT_PHOTO]
        j = main["lambdas"].index(lam_big)
        # The main run at t already has these edits: take its first r_sw rows instead of recomputing.
        rows = dict(singular_values=main["singular_values"][:r_sw], ritz_residuals=main["ritz_residuals"][:r_sw],
                    region_area=main["region_area"][:r_sw], locality=[r[j] for r in main["locality"][:r_sw]],
                    change_rms=[r[j] for r in main["change_rms"][:r_sw]])
        sweep[f"{cfg.t:g}"] = dict(timestep=main["timestep"], seconds=None, **rows)
        for t in cfg.t_sweep:
            log(f"{HELDOUT_PHOTO}, t sweep:")
            f = _analyse_image(backend, grid, images[HELDOUT_PHOTO], cfg, t, [lam_big], r_sw, seed, 0,
                               log)["figures"]
            sweep[f"{t:g}"] = dict(timestep=f["timestep"], seconds=f["seconds"],
                                   singular_values=f["singular_values"], ritz_residuals=f["ritz_residuals"],
                                   region_area=f["region_area"], locality=[r[0] for r in f["locality"]],
                                   change_rms=[r[0] for r in f["change_rms"]])
        for s_ in sweep.values():
            loc, area = np.array(s_["locality"], dtype=float), np.array(s_["region_area"])
            s_.update(mean_locality=_round(np.nanmean(loc)), mean_area=_round(area.mean()),
                      mean_lift=_round(np.nanmean(loc / area), 2), mean_change_rms=_round(np.mean(s_["change_rms"]), 2))
        sweep = dict(lam=lam_big, rank=r_sw, by_t=dict(sorted(sweep.items(), key=lambda kv: float(kv[0]))))

    report = dict(
        analysis="loco-edit", quick=bool(quick), seed=seed, command=command,
        python_api=f"shallowmark.research.loco_edit.run_loco_edit_analysis({str(out)!r}, quick={bool(quick)}, seed={seed})",
        torch_version=torch.__version__, torch_threads=torch.get_num_threads(), backend=backend.name,
        config=dict(asdict(cfg), lambdas=list(cfg.lambdas), t_sweep=list(cfg.t_sweep)),
        definitions={
            "λ": "quoted as a fraction of ‖x_t‖ (v_i is a unit vector in the C·H·W latent space)",
            "region": f"the smallest set of latent cells holding {cfg.mass:.0%} of Σ_c u_i² (largest cells first), "
                      "each cell the f×f pixel block it decodes to",
            "locality": "Σ_(pixels in region) Σ_rgb (edit − base)² / Σ_(all pixels) Σ_rgb (edit − base)²",
            "chance": "the region's area fraction (what a change spread evenly over the image would score); "
                      "lift = locality / chance",
            "base": "the same pipeline with λ = 0 (inversion to t, DDIM back to 0, decode)",
            "RMS": "root-mean-square pixel change edit − base, grey levels 0–255, over all pixels and channels",
            "Ritz residual": "‖Jᵀu_i − σ_i v_i‖ / σ_i (0 for an exact singular pair)",
            "|cos(u_i, v_i)|": "the exact posterior mean has a symmetric J (√ᾱ/(1−ᾱ) · Cov[x0 | x_t]), so "
                               "u_i = v_i; this says how close the trained model is to that",
            "first-order check": "‖x̂0(x_t + λv_i) − x̂0(x_t)‖ / (|λ| σ_i), and its cosine with λ u_i "
                                 "(both 1 while the step stays in the linear regime)",
        },
        images=sources, results=results, t_sweep=sweep, figures=figures_png,
        seconds_total=round(time.perf_counter() - t_start, 1),
    )
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report


def _fmt(v, nd=3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def _summary(rep: dict) -> list[str]:
    """Bullet points read off the measured figures (nothing here is typed in by hand)."""
    out = []
    for name, f in rep["results"].items():
        rc = f["random_control"]
        line = (f"- {name}: an edit along v_i puts {_fmt(f['mean_locality'], 2)} of its pixel change inside the "
                f"region u_i highlights, a region covering {_fmt(f['mean_area'], 3)} of the image: "
                f"{f['mean_lift']}× chance (mean over i and λ). Inside the region of another u_j it puts "
                f"{_fmt(f['cross_off_diagonal_mean'], 2)} (own region {_fmt(f['cross_diagonal_mean'], 2)}, "
                f"λ = {f['cross_locality_lambda']:+g}·‖x_t‖).")
        if rc["count"]:
            v_rms = float(np.mean(rc["v_edit_change_rms_same_lambda"]))
            r_rms = float(np.mean(rc["change_rms"]))
            line += (f" A random unit direction at the same λ changes the image {v_rms / r_rms:.1f}× less "
                     f"(RMS {r_rms:.2f} vs {v_rms:.2f} grey levels): J's energy sits in a few directions.")
        out.append(line)
    if rep["t_sweep"]:
        by_t = rep["t_sweep"]["by_t"]
        out.append(f"- t sweep (λ = {rep['t_sweep']['lam']:+g}·‖x_t‖, top {rep['t_sweep']['rank']}): lift over "
                   "chance "
                   + ", ".join(f"{t}T: {s['mean_lift']}×" for t, s in by_t.items()) + "; RMS change "
                   + ", ".join(f"{t}T: {s['mean_change_rms']:.1f}" for t, s in by_t.items()) + " grey levels.")
    return out


def _md_image(rep: dict, name: str, f: dict) -> list[str]:
    """One image's section: the edits, their table, locality, the first-order and random checks."""
    lam = f["lambdas"]
    lines = [
        f"## {name}",
        "",
        f"Source: {rep['images'][name]}. t = {f['t']:g}T is grid position {f['position']}, training timestep "
        f"{f['timestep']}; ‖x_t‖ = {f['xt_norm']}, so "
        f"λ ∈ {{{', '.join(f'{v:+g}' for v in lam)}}}·‖x_t‖ = "
        f"{{{', '.join(f'{v:+.2f}' for v in f['lambdas_latent'])}}} in latent units. Base (λ = 0) vs input: "
        f"{f['base_psnr_vs_input_db']} dB PSNR (inversion round trip). Subspace iteration "
        f"{f['seconds']['subspace']} s, edits {f['seconds']['edits']} s.",
        "",
        f"![edits]({rep['figures'][name]})",
        "",
        *markdown_table(
            ["i", "σ_i", "Ritz residual", "\\|cos(u_i, v_i)\\|", "region area",
             *(f"loc. λ={v:+g}" for v in lam), *(f"RMS λ={v:+g}" for v in lam)],
            ([i, f"{f['singular_values'][i]:.3f}", f"{f['ritz_residuals'][i]:.2g}", f"{f['cos_u_v'][i]:.3f}",
              f"{f['region_area'][i]:.3f}", *(_fmt(v) for v in f["locality"][i]),
              *(_fmt(v, 2) for v in f["change_rms"][i])] for i in range(len(f["singular_values"])))),
    ]
    rc = f["random_control"]
    lines += [
        "",
        f"Mean locality {_fmt(f['mean_locality'])} against a mean region area (chance) of "
        f"{_fmt(f['mean_area'])}: on average {f['mean_lift']}× chance. By λ: "
        + ", ".join(f"{v:+g} → {_fmt(x)}" for v, x in zip(lam, f["locality_by_lambda"])) + ".",
        "",
        f"First-order check, ‖Δx̂0‖ / (|λ| σ_i) per i and λ (1 = linear): "
        + "; ".join(", ".join(_fmt(v, 2) for v in r) for r in f["x0hat_change_over_linear"])
        + ". Cosine of Δx̂0 with λ u_i: "
        + "; ".join(", ".join(_fmt(v, 2) for v in r) for r in f["x0hat_change_cos_linear"]) + ".",
        "",
        f"Cross-locality at λ = {f['cross_locality_lambda']:+g}·‖x_t‖ (share of edit i's change inside "
        f"region j): diagonal mean {_fmt(f['cross_diagonal_mean'])}, off-diagonal mean "
        f"{_fmt(f['cross_off_diagonal_mean'])}.",
        "",
    ]
    if rc["count"]:
        lines += [
            f"Control: {rc['count']} random unit directions at λ = {rc['lam']:+g}·‖x_t‖ change the image by "
            f"RMS {', '.join(_fmt(v, 2) for v in rc['change_rms'])} grey levels (v_i edits at the same λ: "
            f"{', '.join(_fmt(v, 2) for v in rc['v_edit_change_rms_same_lambda'])}); their change falls inside "
            f"the u_i regions at a mean share of {', '.join(_fmt(v) for v in rc['mean_locality_in_u_regions'])}.",
            "",
        ]
    return lines


def _markdown(rep: dict) -> str:
    cfg = rep["config"]
    lines = [
        "# LOCO edit" + (" (quick)" if rep["quick"] else ""),
        "",
        f"Reproduce: `{rep['command']}` (seed {rep['seed']}, backend {rep['backend']}, torch {rep['torch_version']}, "
        f"{rep['torch_threads']} thread(s)). Total time {rep['seconds_total']} s. All numbers are also in "
        "`report.json`.",
        "",
        "Method: encode the image, DDIM-invert it to x_t at "
        f"t = {cfg['t']:g}T ({cfg['num_steps']}-step grid), compute the top {cfg['rank']} singular triplets "
        f"(σ_i, u_i, v_i) of J = ∂x̂0/∂x_t by subspace iteration ({cfg['iters']} iterations of JᵀJ, JVP/VJP, "
        "then a Rayleigh–Ritz step), move x_t to x_t + λ v_i and DDIM-denoise to 0, decode.",
        "",
        "Summary:",
        "",
        *_summary(rep),
        "",
        "Definitions:",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in rep["definitions"].items()]
    lines += [
        "",
        f"Why t = {cfg['t']:g}T: the middle of the window [0.2T, 0.7T] in which J is low rank, so the top "
        "singular vectors carry most of J; "
        + ("the t sweep at the end measures how σ_i, the region size, locality and the size of the change move "
           "with t." if rep["t_sweep"] else "this run has no t sweep (the default run has one)."),
        "",
    ]
    for name, f in rep["results"].items():
        lines += _md_image(rep, name, f)
    if rep["t_sweep"]:
        sw = rep["t_sweep"]
        lines += [
            "## t sweep (held-out photo)",
            "",
            f"Same pipeline at other t, top {sw['rank']} singular vectors, λ = {sw['lam']:+g}·‖x_t‖ only "
            f"(the row t = {cfg['t']:g} is the first {sw['rank']} rows of the run above).",
            "",
            *markdown_table(
                ["t", "timestep", "σ_1 … σ_r", "Ritz residuals", "mean region area", "mean locality", "mean lift",
                 "mean RMS change"],
                ([t, s["timestep"], ", ".join(f"{v:.2f}" for v in s["singular_values"]),
                  ", ".join(f"{v:.2g}" for v in s["ritz_residuals"]), _fmt(s["mean_area"]), _fmt(s["mean_locality"]),
                  s["mean_lift"], f"{s['mean_change_rms']:.2f}"] for t, s in sw["by_t"].items())),
            "",
        ]
    lines += [f"Figures: {', '.join(f'`{v}`' for v in rep['figures'].values())}.", ""]
    return "\n".join(lines)
