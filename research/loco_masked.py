"""``shallowmark analyze loco-masked``: LOCO edit with its mask and its null-space projection, and
the five properties claimed for it, measured on the final image on two models.

Method (:func:`~shallowmark.research.loco_edit.masked_direction`): at x_t (DDIM inversion of the
image to t), the top right singular vector v_Ω of the masked Jacobian ``P_Ω ∂x̂0/∂x_t`` moves the
prediction x̂0 most inside the region Ω; it is projected onto the null space of the top r' right
singular vectors V_c of the complement's Jacobian ``P_Ωᶜ ∂x̂0/∂x_t``, ``v = (I − V_c V_cᵀ) v_Ω``
renormalised, so that to first order the step moves x̂0 outside Ω as little as J allows. The edit
is ``x_t + λ v``, DDIM-denoised to 0 and decoded.

Models, one code path (the project's backend interface):

- the generalizing **Fashion-MNIST** model (:func:`~shallowmark.research.regimes.generalizing_model`)
  through :class:`~shallowmark.research.fmnist_backend.FmnistBackend`: pixel space, no autoencoder,
  the latent is the 28×28 image (one latent cell per pixel);
- **tiny-ldm**: a 4×64×64 latent for 256×256 images, so each latent cell is a 4×4 pixel block and
  Ω acts on the cells that are at least half inside the pixel mask
  (:func:`~shallowmark.research.loco_edit.mask_cells`).

Properties, each measured on the decoded final images (edit against the base, the same pipeline
with λ = 0), for the source image A whose directions are computed, other images B, C, … and A at
another t:

- **change outside the mask**: PSNR and SSIM of the region outside Ω, with and without the
  projection, against a random direction of the same length, and as r' grows;
- **locality**: the share of the change energy inside Ω (chance: Ω's area);
- **homogeneity and transferability**: A's direction applied to the other images and to A at
  another t: its locality there and the cosine of its change map with the change it makes on A,
  and (with each target's own masked direction) how close A's direction is to the target's own;
- **linearity**: the change's coordinate along its own axis against λ (several λ of both signs), a
  linear fit's R², the ±λ symmetry and the 2λ-vs-λ doubling error;
- **composability**: for two disjoint masks, ‖Δ(v₁ + v₂) − Δ(v₁) − Δ(v₂)‖ / (‖Δ(v₁)‖ + ‖Δ(v₂)‖).

What these models cannot show: the paper's claims are semantic (an edit changes a face's eyes,
hair or expression, the same attribute on every face). Neither a 28×28 garment model nor a model
of eleven photos has such attributes, so nothing here tests them; the numbers are geometric.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from shallowmark.core import ddim
from shallowmark.core import jacobian as jac
from shallowmark.core.images import psnr
from shallowmark.errors import InvalidParameterError, check_int
from shallowmark.reports import markdown_table, write_report
from shallowmark.research import fmnist
from shallowmark.research.loco_edit import (
    _denoise_all,
    _figure,
    _generated_image,
    _round,
    _save_quantized,
    check_lambda,
    check_masked_args,
    check_t,
    decode_levels,
    image_to_xt,
    masked_direction,
    rect_mask,
)
from shallowmark.research.regimes import RegimesConfig, generalizing_model, to_rgb

NAME = "loco-masked"
#: SSIM's window (scikit-image's 7×7 uniform window, as :func:`shallowmark.attacks.ssim`).
SSIM_WIN = 7
#: The dense Jacobian (exact complement energy) is taken when the latent has at most this many entries.
DENSE_MAX = 1024


@dataclass(frozen=True)
class PartConfig:
    """One model's run. ``masks`` are two disjoint rectangles (top, left, height, width) in image
    pixels: the first is the edited region, the second its partner for composability. ``lam`` is λ
    as a fraction of ‖x_t‖ (of each target's own x_t); the linearity sweep uses ``multiples`` of it.
    ``null_sweep`` lists prefixes r' of the ``null_rank`` complement vectors tried on the source
    image. ``images`` counts the source and the others; ``own_directions`` also computes each other
    target's own masked direction (to compare A's with it)."""

    masks: tuple
    images: int = 3
    t: float = 0.5
    t_other: float = 0.7
    num_steps: int = 50
    rank: int = 2
    null_rank: int = 8
    null_sweep: tuple = (0, 2, 4, 8)
    iters: int = 4
    lam: float = 0.05
    multiples: tuple = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
    own_directions: bool = True

    def check(self, image_size: int) -> None:
        for t in (self.t, self.t_other):
            check_t(t)
        if self.t == self.t_other:
            raise InvalidParameterError(f"t_other must differ from t (transfer to another t); both are {self.t}")
        check_int("images", self.images, 2)
        check_int("num_steps", self.num_steps, 2)
        check_int("rank", self.rank, 1)
        check_int("null_rank", self.null_rank, 1)
        check_int("iters", self.iters, 1)
        sweep = [check_int("null_sweep entries", r, 0, self.null_rank) for r in self.null_sweep]
        if len(sweep) < 2 or sweep != sorted(set(sweep)) or sweep[0] != 0 or sweep[-1] != self.null_rank:
            raise InvalidParameterError(f"null_sweep must be increasing integers from 0 (no projection) to null_rank "
                                        f"({self.null_rank}); got {self.null_sweep}")
        lam = check_lambda(self.lam)
        if lam <= 0:
            raise InvalidParameterError(f"lam must be > 0 (the sweep gives the signs); got {self.lam}")
        m = [check_lambda(v) for v in self.multiples]
        if 1.0 not in m or any(v == 0 for v in m) or not any(v < 0 for v in m) or len(set(m)) != len(m):
            raise InvalidParameterError("multiples must be distinct, non-zero, hold 1 and at least one negative value; "
                                        f"got {self.multiples}")
        if len(self.masks) != 2:
            raise InvalidParameterError(f"give two masks (the edited region and its partner); got {len(self.masks)}")
        a, b = (rect_mask(image_size, r) for r in self.masks)
        if (a & b).any():
            raise InvalidParameterError(f"the two masks must be disjoint; {self.masks} overlap")


#: Fashion-MNIST (28×28): the upper and the lower part of the garment, two rows apart.
FMNIST_MASKS = ((3, 6, 10, 16), (15, 6, 10, 16))
#: tiny-ldm's image size (its masks are checked against it before the model is loaded).
LDM_SIZE = 256
#: tiny-ldm (256×256, 4×4 pixels a cell): the face and the ribbons of the held-out photo, on multiples of 4.
LDM_MASKS = ((56, 80, 80, 96), (176, 148, 64, 96))


@dataclass(frozen=True)
class LocoMaskedConfig:
    """Everything the analysis depends on (all of it goes into report.json). A part set to None is
    skipped (``quick`` skips tiny-ldm, whose JVPs cost about a second each)."""

    fmnist: Optional[PartConfig] = PartConfig(FMNIST_MASKS, images=8, rank=4, null_rank=128,
                                              null_sweep=(0, 2, 8, 32, 64, 128), iters=10, lam=0.1)
    ldm: Optional[PartConfig] = PartConfig(LDM_MASKS, images=4, rank=2, null_rank=16, null_sweep=(0, 4, 8, 16),
                                           iters=3, lam=0.05)
    regimes: RegimesConfig = field(default_factory=RegimesConfig)
    seed: int = 0

    @classmethod
    def quick(cls, regimes: RegimesConfig | None = None, **kw) -> "LocoMaskedConfig":
        """The Fashion-MNIST part only, on the quick (seconds-trained) model, small sizes."""
        base = dict(fmnist=PartConfig(FMNIST_MASKS, images=2, rank=2, null_rank=4, null_sweep=(0, 4), iters=2,
                                      num_steps=10, lam=0.1, multiples=(-1.0, 1.0, 2.0)),
                    ldm=None, regimes=regimes or RegimesConfig.quick())
        base.update(kw)
        return cls(**base)

    def check(self) -> None:
        if self.fmnist is None and self.ldm is None:
            raise InvalidParameterError("nothing to run: both parts are None")
        if self.fmnist is not None:
            self.fmnist.check(fmnist.SIDE)
            self.regimes.check()
        if self.ldm is not None:
            self.ldm.check(LDM_SIZE)


# ----------------------------------------------------------------------------------------------
# Measurements on decoded images (float grey levels 0..255, H×W×3)
# ----------------------------------------------------------------------------------------------

def ssim_outside(edited: np.ndarray, base: np.ndarray, region: np.ndarray, win: int = SSIM_WIN) -> float:
    """Mean SSIM over the pixels whose whole ``win``×``win`` window lies outside ``region`` and
    inside the image (scikit-image's SSIM map, data range 255, channels averaged); NaN if none."""
    from scipy.ndimage import binary_dilation
    from skimage.metrics import structural_similarity

    a, b = (np.round(np.asarray(v, dtype=np.float64)).astype(np.uint8) for v in (edited, base))
    _, smap = structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=win, full=True)
    keep = ~binary_dilation(region, structure=np.ones((win, win), dtype=bool))
    pad = win // 2
    keep[:pad], keep[-pad:], keep[:, :pad], keep[:, -pad:] = False, False, False, False
    return float(smap.mean(-1)[keep].mean()) if keep.any() else float("nan")


def region_stats(edited: np.ndarray, base: np.ndarray, region: np.ndarray) -> dict:
    """Locality, RMS change inside and outside Ω (grey levels), PSNR and SSIM of the outside."""
    d = np.asarray(edited, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    e = (d ** 2).sum(-1)
    total = e.sum()
    out_psnr = psnr(np.round(edited[~region]), np.round(base[~region]))
    return dict(locality=float(e[region].sum() / total) if total > 0 else float("nan"),
                rms_in=float(np.sqrt(e[region].mean() / d.shape[-1])),
                rms_out=float(np.sqrt(e[~region].mean() / d.shape[-1])),
                psnr_out=out_psnr, ssim_out=ssim_outside(edited, base, region))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a), np.ravel(b)
    n = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / n) if n > 0 else float("nan")


def composability(d12: np.ndarray, d1: np.ndarray, d2: np.ndarray) -> float:
    """‖Δ₁₂ − Δ₁ − Δ₂‖ / (‖Δ₁‖ + ‖Δ₂‖): 0 when the two edits add exactly."""
    den = np.linalg.norm(d1) + np.linalg.norm(d2)
    return float(np.linalg.norm(d12 - d1 - d2) / den) if den > 0 else float("nan")


def linearity(lams: Sequence[float], deltas: Sequence[np.ndarray]) -> dict:
    """How the change Δ(λ) of the final image follows λ. The axis e is the unit vector of
    Δ(λ_max) − Δ(λ_min); c(λ) = ⟨Δ(λ), e⟩ / √n (n entries: the RMS change along e, grey levels) is
    fitted by a line (λ = 0, Δ = 0 included) and its R² reported; ``norm`` is ‖Δ‖ / √n (the RMS
    change); ``off_axis`` = ‖Δ − c e‖ / ‖Δ‖ per non-zero λ; ``symmetry`` = ‖Δ(λ) + Δ(−λ)‖ / (‖Δ(λ)‖ + ‖Δ(−λ)‖)
    for each ±λ pair (0 if antisymmetric); ``doubling`` = ‖Δ(2λ) − 2Δ(λ)‖ / ‖2Δ(λ)‖ for each λ whose
    double is in the sweep (0 if linear)."""
    lam = [0.0, *map(float, lams)]
    dl = [np.zeros_like(deltas[0]), *deltas]
    by = dict(zip(lam, dl))
    axis = by[max(lam)] - by[min(lam)]
    axis = axis / np.linalg.norm(axis)
    rn = math.sqrt(axis.size)
    c = np.array([float(np.ravel(d) @ np.ravel(axis)) for d in dl])
    x = np.array(lam)
    slope, icept = np.polyfit(x, c, 1)
    ss_res, ss_tot = float(((c - slope * x - icept) ** 2).sum()), float(((c - c.mean()) ** 2).sum())
    order = np.argsort(x)
    off = {f"{v:g}": float(np.linalg.norm(d - ci * axis) / np.linalg.norm(d))
           for v, d, ci in sorted(zip(lam, dl, c), key=lambda z: z[0]) if v != 0}
    sym = {f"{v:g}": float(np.linalg.norm(by[v] + by[-v]) / (np.linalg.norm(by[v]) + np.linalg.norm(by[-v])))
           for v in sorted(lam) if v > 0 and -v in by}
    dbl = {f"{v:g}": float(np.linalg.norm(by[2 * v] - 2 * by[v]) / np.linalg.norm(2 * by[v]))
           for v in sorted(lam) if v != 0 and 2 * v in by}
    return dict(lambdas=[float(x[i]) for i in order], coordinate=[float(c[i] / rn) for i in order],
                norm=[float(np.linalg.norm(dl[i]) / rn) for i in order], off_axis=off,
                slope=float(slope / rn), intercept=float(icept / rn),
                r2=1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"), symmetry=sym, doubling=dbl)


def first_order_leakage(backend, x_t: torch.Tensor, timestep: int, cells: np.ndarray,
                        directions: dict[str, torch.Tensor]) -> dict:
    """‖P_Ωᶜ J v‖ / ‖P_Ω J v‖ for each direction v: how much, to first order, the step moves x̂0
    outside Ω against inside (one JVP each)."""
    m = torch.as_tensor(cells, dtype=x_t.dtype)[None, None]
    out = {}
    for name, v in directions.items():
        jv = jac.jvp(backend, x_t, timestep, v[None])
        out[name] = float((jv * (1 - m)).norm() / (jv * m).norm())
    return out


def complement_energy(backend, x_t: torch.Tensor, timestep: int, cells: np.ndarray, sigmas: torch.Tensor,
                      ranks: Sequence[int], probes: int = 8, seed: int = 0) -> dict:
    """The share of ‖P_Ωᶜ J‖_F² that its top r' singular values hold, for each r'. Exact from the
    dense Jacobian for latents of at most :data:`DENSE_MAX` entries; otherwise Σ_{i≤r'} σ_i² of the
    computed ``sigmas`` (Ritz values) over Hutchinson's estimate E‖P_Ωᶜ J z‖² of the total, z
    Gaussian (``probes`` JVPs in one batch)."""
    keep = np.broadcast_to(~cells, x_t.shape[1:])
    if x_t[0].numel() <= DENSE_MAX:
        j = jac.full_jacobian(backend, x_t, timestep)
        s2 = torch.linalg.svdvals(j[torch.from_numpy(keep.reshape(-1).copy())]).double() ** 2
        return dict(method="exact (dense Jacobian)", total=float(s2.sum()),
                    share={str(r): float(s2[:r].sum() / s2.sum()) for r in ranks})
    z = torch.randn((probes, *x_t.shape[1:]), generator=torch.Generator().manual_seed(int(seed)), dtype=x_t.dtype)
    jz = jac.jvp(backend, x_t.expand(probes, *x_t.shape[1:]), timestep, z)
    per = (jz * torch.from_numpy(keep.copy()).to(jz.dtype)).flatten(1).pow(2).sum(1).double()
    s2 = sigmas.double() ** 2
    total = float(per.mean())
    return dict(method=f"Ritz values over Hutchinson's estimate of the total ({probes} Gaussian probes)", total=total,
                total_rel_se=float(per.std() / per.mean() / math.sqrt(probes)),
                share={str(r): float(s2[:r].sum() / total) for r in ranks})


# ----------------------------------------------------------------------------------------------
# One model's part
# ----------------------------------------------------------------------------------------------

def _unit_random(shape, seed: int) -> torch.Tensor:
    r = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
    return r / r.norm()


def run_part(backend, images: dict[str, np.ndarray], part: PartConfig, seed: int,
             log: Callable[[str], None] = lambda m: None) -> dict:
    """Every property on one model. ``images`` (name -> uint8 RGB at the model's size): the first
    is the source A whose directions are computed. Returns ``figures`` (numbers) and ``pictures``."""
    part.check(backend.image_size)
    if len(images) < 2:
        raise InvalidParameterError("give the source image and at least one other")
    masks = [rect_mask(backend.image_size, r) for r in part.masks]
    for mk in masks:
        check_masked_args(backend, mk, part.rank, part.null_rank, part.iters)
    seconds: dict[str, float] = {}
    grid = ddim.make_grid(backend, part.num_steps)
    names = list(images)
    src = names[0]
    tic = time.perf_counter()
    targets = {n: dict(image=n, kind="source" if n == src else "image", t=part.t, pos=grid.position(part.t))
               for n in names}
    targets[f"{src}@{part.t_other:g}T"] = dict(image=src, kind="t_other", t=part.t_other,
                                               pos=grid.position(part.t_other))
    for tg in targets.values():
        tg["x"] = image_to_xt(backend, images[tg["image"]], grid, tg["pos"])
    seconds["inversion"] = time.perf_counter() - tic

    tic = time.perf_counter()
    pos = targets[src]["pos"]
    dirs = [masked_direction(backend, targets[src]["x"], grid, pos, mk, rank=part.rank, null_rank=part.null_rank,
                             iters=part.iters, seed=seed + 10 * i) for i, mk in enumerate(masks)]
    region = dirs[0].region
    union = dirs[0].region | dirs[1].region
    log(f"  directions: σ(P_Ω J) = {[round(float(s), 3) for s in dirs[0].masked.subspace.singular_values]}, "
        f"σ(P_Ωᶜ J) top {part.null_rank} = {float(dirs[0].complement.subspace.singular_values[0]):.3f} … "
        f"{float(dirs[0].complement.subspace.singular_values[-1]):.3f}, kept {dirs[0].kept:.3f}")
    own = {}
    if part.own_directions:
        for name, tg in targets.items():
            if name != src:
                own[name] = masked_direction(backend, tg["x"], grid, tg["pos"], masks[0], rank=part.rank, null_rank=0,
                                             iters=part.iters, seed=seed).raw
    seconds["directions"] = time.perf_counter() - tic

    p1, p2, raw1, raw2 = dirs[0].vector, dirs[1].vector, dirs[0].raw, dirs[1].raw
    rand = _unit_random(raw1.shape, seed + 3)
    common = {"raw1": raw1, "p1": p1, "random": rand, "p2": p2, "raw2": raw2, "p1+p2": p1 + p2,
              "raw1+raw2": raw1 + raw2}
    common.update({f"p1×{m:g}": m * p1 for m in part.multiples if m != 1.0})
    sweep = {}
    for r in part.null_sweep:
        if r not in (0, part.null_rank):
            sweep[f"p1 r'={r}"] = dirs[0].projected(r)[0]

    tic = time.perf_counter()
    results, pictures = {}, {}
    for name, tg in targets.items():
        x = tg["x"]
        lam = part.lam * float(x.norm())
        steps = dict(common, **(sweep if name == src else {}), **({"own1": own[name]} if name in own else {}))
        labels = ["base", *steps]
        starts = torch.cat([x, *(x + lam * v[None].to(x.dtype) for v in steps.values())])
        z0 = _denoise_all(backend, starts, grid, tg["pos"])
        lv = decode_levels(backend, z0)
        base = lv[0]
        delta = {lab: lv[i] - base for i, lab in enumerate(labels) if i}
        dz = (z0 - z0[:1]).double().cpu().numpy()
        stats = {lab: region_stats(lv[i], base, region) for i, lab in enumerate(labels) if i and lab in
                 ("raw1", "p1", "random", "own1", *sweep)}
        lin_lams = [m * part.lam for m in part.multiples]
        lin_labels = ["p1" if m == 1.0 else f"p1×{m:g}" for m in part.multiples]
        lin = linearity(lin_lams, [delta[lab] for lab in lin_labels])
        lin_z = linearity(lin_lams, [dz[labels.index(lab)] for lab in lin_labels])
        results[name] = dict(
            image=tg["image"], kind=tg["kind"], t=tg["t"], position=tg["pos"], timestep=grid.timesteps[tg["pos"] - 1],
            xt_norm=float(x.norm()), lam_latent=lam, area=float(region.mean()),
            stats=stats,
            locality_union_p1_plus_p2=region_stats(lv[labels.index("p1+p2")], base, union)["locality"],
            area_union=float(union.mean()),
            composability=dict(projected=composability(delta["p1+p2"], delta["p1"], delta["p2"]),
                               unprojected=composability(delta["raw1+raw2"], delta["raw1"], delta["raw2"]),
                               projected_latent=composability(*(dz[labels.index(k)] for k in ("p1+p2", "p1", "p2")))),
            linearity=lin,
            linearity_latent={k: lin_z[k] for k in ("r2", "symmetry", "doubling", "off_axis")})
        if name != src:
            ref = pictures[src]["delta"]["p1"]
            r_ = results[name]
            r_["transfer"] = dict(cos_change_with_source=_cos(delta["p1"], ref),
                                  size_ratio=float(np.linalg.norm(delta["p1"]) / np.linalg.norm(ref)))
            if name in own:
                r_["transfer"].update(
                    own_overlap=abs(float((raw1.flatten() * own[name].flatten()).sum())),
                    own_change_cos=abs(_cos(delta["raw1"], delta["own1"])))
        pictures[name] = dict(input=images[tg["image"]], base=base, delta=delta,
                              edit=dict(raw1=lv[labels.index("raw1")], p1=lv[labels.index("p1")],
                                        p12=lv[labels.index("p1+p2")]))
        log(f"  {name}: locality raw {stats['raw1']['locality']:.3f} / projected {stats['p1']['locality']:.3f} "
            f"(area {region.mean():.3f}); PSNR outside {stats['raw1']['psnr_out']:.2f} / {stats['p1']['psnr_out']:.2f} dB; "
            f"R² {lin['r2']:.4f}; composability {results[name]['composability']['projected']:.3f}")
    seconds["edits"] = time.perf_counter() - tic

    tic = time.perf_counter()
    x_src, t_src = targets[src]["x"], grid.timesteps[pos - 1]
    leak = first_order_leakage(backend, x_src, t_src, dirs[0].cells,
                               {"raw1": raw1, "p1": p1, **sweep, "random": rand})
    energy = complement_energy(backend, x_src, t_src, dirs[0].cells, dirs[0].complement.subspace.singular_values,
                               part.null_sweep, seed=seed + 4)
    seconds["checks"] = time.perf_counter() - tic
    d0 = dirs[0]
    figures = dict(
        source=src, images=names, targets=list(targets), masks=[list(r) for r in part.masks],
        cells_in_mask=[int(d.cells.sum()) for d in dirs], cells_total=int(d0.cells.size),
        pixels_per_cell=backend.image_size // d0.cells.shape[0],
        masked_singular_values=[d.masked.subspace.singular_values.tolist() for d in dirs],
        masked_ritz_residuals=[d.masked.residuals.tolist() for d in dirs],
        complement_singular_values=[d.complement.subspace.singular_values.tolist() for d in dirs],
        complement_ritz_residuals=[d.complement.residuals.tolist() for d in dirs],
        kept=[d.kept for d in dirs],
        kept_by_null_rank={str(r): d0.projected(r)[1] for r in part.null_sweep},
        first_order_leakage=leak, complement_energy=energy,
        cos_raw1_raw2=abs(float((raw1.flatten() * raw2.flatten()).sum())),
        chance_abs_cos_latent=math.sqrt(2 / (math.pi * raw1.numel())),
        results=results, seconds={k: round(v, 1) for k, v in seconds.items()})
    return dict(figures=_rounded(figures), pictures=pictures, regions=[d.region for d in dirs])


def _rounded(obj):
    """Floats rounded for the report (NaN/inf -> None, as JSON has neither)."""
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _round(obj, 5)
    return obj


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def plot_part(title: str, part: dict, path: Path) -> None:
    """Rows: the targets. Columns: input, base, edit without and with the projection, their |Δ|
    with Ω outlined, Δ(v₁ + v₂) and Δ(v₁) + Δ(v₂) (the two masks outlined)."""
    pics, regions = part["pictures"], part["regions"]
    cols = ["input", "base (λ = 0)", "edit v_Ω", "edit projected", "|Δ| v_Ω", "|Δ| projected",
            "Δ(v₁ + v₂)", "Δ(v₁) + Δ(v₂)"]
    rows = list(pics)
    fig = _figure(1.35 * len(cols), 1.45 * len(rows) + 0.5, dpi=130)
    for i, name in enumerate(rows):
        p = pics[name]
        d = p["delta"]
        mags = [np.sqrt((d[k] ** 2).sum(-1)) for k in ("raw1", "p1")]
        vmax = max(float(m.max()) for m in mags) or 1.0
        comp = [d["p1+p2"], d["p1"] + d["p2"]]
        cmax = max(float(np.abs(c).max()) for c in comp) or 1.0
        cells = [(p["input"], None), (p["base"], None), (p["edit"]["raw1"], None), (p["edit"]["p1"], None),
                 (mags[0], ("mag", vmax)), (mags[1], ("mag", vmax)), (comp[0].mean(-1), ("div", cmax)),
                 (comp[1].mean(-1), ("div", cmax))]
        for c, (img, kind) in enumerate(cells):
            ax = fig.add_subplot(len(rows), len(cols), i * len(cols) + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if kind is None:
                ax.imshow(np.clip(np.round(img), 0, 255).astype(np.uint8))
            elif kind[0] == "mag":
                ax.imshow(img, cmap="inferno", vmin=0, vmax=kind[1])
            else:
                ax.imshow(img, cmap="coolwarm", vmin=-kind[1], vmax=kind[1])
            if c >= 4:
                for r_, colour in zip(regions if c >= 6 else regions[:1], ("cyan", "lime")):
                    ax.contour(r_.astype(float), levels=[0.5], colors=colour, linewidths=0.6)
            if i == 0:
                ax.set_title(cols[c], fontsize=6)
            if c == 0:
                ax.set_ylabel(name, fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save_quantized(fig, path)


def plot_properties(parts: dict, path: Path) -> None:
    """Per model: PSNR outside Ω per target (v_Ω, projected, random, own); on the source, RMS change
    inside/outside against r'; the linearity sweep (coordinate along the change axis against λ)."""
    fig = _figure(11.0, 3.1 * len(parts))
    for row, (label, f) in enumerate(parts.items()):
        res = f["results"]
        ax = fig.add_subplot(len(parts), 3, 3 * row + 1)
        kinds = [("raw1", "v_Ω"), ("p1", "projected"), ("random", "random")]
        names = list(res)
        w = 0.8 / len(kinds)
        for j, (k, lab) in enumerate(kinds):
            vals = [res[n]["stats"][k]["psnr_out"] for n in names]
            ax.bar(np.arange(len(names)) + j * w, [v if v is not None else np.nan for v in vals], w, label=lab)
        finite = [res[n]["stats"][k]["psnr_out"] for n in names for k, _ in kinds]
        finite = [v for v in finite if v is not None]
        if finite:
            ax.set_ylim(min(finite) - 3, max(finite) + 2)
        ax.set_xticks(np.arange(len(names)) + w, names, rotation=20, fontsize=6)
        ax.set_ylabel("PSNR outside Ω (dB)")
        ax.set_title(f"{label}: change outside the mask", fontsize=8)
        ax.legend(fontsize=6)

        ax = fig.add_subplot(len(parts), 3, 3 * row + 2)
        src = res[f["source"]]["stats"]
        rs = sorted(int(k) for k in f["kept_by_null_rank"])
        null_rank = max(rs)
        key = lambda r: "raw1" if r == 0 else ("p1" if r == null_rank else f"p1 r'={r}")  # noqa: E731
        ax.plot(rs, [src[key(r)]["rms_in"] for r in rs], "o-", label="RMS inside Ω")
        ax.plot(rs, [src[key(r)]["rms_out"] for r in rs], "s-", label="RMS outside Ω")
        ax.set_xlabel("r' (complement directions projected out)")
        ax.set_ylabel("grey levels")
        ax.set_title(f"{label}: source image, by r'", fontsize=8)
        ax.legend(fontsize=6)

        ax = fig.add_subplot(len(parts), 3, 3 * row + 3)
        for n in names:
            lin = res[n]["linearity"]
            ax.plot(lin["lambdas"], lin["coordinate"], "o-", ms=3, label=f"{n} (R² {lin['r2']:.3f})")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("λ / ‖x_t‖")
        ax.set_ylabel("⟨Δ, axis⟩ / √n (RMS grey levels)")
        ax.set_title(f"{label}: linearity of the final change", fontsize=8)
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------

def _fmnist_part(cfg: LocoMaskedConfig, log) -> tuple:
    from shallowmark.research.fmnist_backend import FmnistBackend

    model, _ = generalizing_model(cfg.regimes, log)
    test = fmnist.load_fashion_mnist("test", cfg.regimes.data_dir)
    if len(test) < cfg.fmnist.images:
        raise InvalidParameterError(f"{cfg.fmnist.images} images asked for, the test split holds {len(test)}")
    pick = np.random.default_rng(cfg.seed).choice(len(test), cfg.fmnist.images, replace=False)
    images = {f"test{int(i)}": im for i, im in zip(pick, to_rgb(test[pick]))}
    source = (f"held-out Fashion-MNIST test images (indices {', '.join(str(int(i)) for i in pick)}, drawn with "
              f"seed {cfg.seed}); the model: the larger regimes model trained on {model.n_train} training images "
              f"({model.parameters} parameters, final loss {model.final_loss:.4f})")
    return FmnistBackend(model.net), images, source


def _ldm_part(cfg: LocoMaskedConfig, log) -> tuple:
    from shallowmark.core.backends import load_backend
    from shallowmark.core.photos import HELDOUT_PHOTO, center_crop, heldout_photo

    backend = load_backend("tiny-ldm")
    images = {HELDOUT_PHOTO: center_crop(heldout_photo(), backend.image_size)}
    for s in range(cfg.ldm.images - 1):
        images[f"sample-seed{cfg.seed + s}"] = _generated_image(backend, cfg.seed + s, cfg.ldm.num_steps)
    source = (f"matplotlib's {HELDOUT_PHOTO}.jpg (held out of tiny-ldm's training), centre-cropped to "
              f"{backend.image_size}; the others are tiny-ldm samples (DDIM {cfg.ldm.num_steps} steps from x_T of "
              f"seeds {cfg.seed}…{cfg.seed + cfg.ldm.images - 2})")
    return backend, images, source


PARTS = {"fmnist": ("Fashion-MNIST model", _fmnist_part), "ldm": ("tiny-ldm", _ldm_part)}


def run_loco_masked_analysis(out_dir, config: LocoMaskedConfig | None = None, *, command: str | None = None,
                             log: Optional[Callable[[str], None]] = None) -> dict:
    """Masked LOCO and its five properties on each model of ``config``; writes report.json,
    report.md and the figures to ``out_dir``. Returns the report."""
    cfg = config or LocoMaskedConfig()
    cfg.check()
    log = log or (lambda m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    parts, figures, sources, timings = {}, {}, {}, {}
    for key, (label, loader) in PARTS.items():
        part = getattr(cfg, key)
        if part is None:
            continue
        log(f"{label}:")
        tic = time.perf_counter()
        backend, images, sources[key] = loader(cfg, log)
        timings[f"{key}_load"] = round(time.perf_counter() - tic, 1)
        tic = time.perf_counter()
        r = run_part(backend, images, part, cfg.seed, log)
        timings[key] = round(time.perf_counter() - tic, 1)
        parts[key] = r["figures"]
        figures[f"edits_{key}"] = f"edits_{key}.png"
        plot_part(f"masked LOCO, {label}: t = {part.t:g}T (last row {part.t_other:g}T), λ = {part.lam:g}·‖x_t‖, "
                  f"r' = {part.null_rank}; Ω cyan, partner mask green", r, out / figures[f"edits_{key}"])
    figures["properties"] = "properties.png"
    plot_properties({PARTS[k][0]: f for k, f in parts.items()}, out / figures["properties"])
    timings["total"] = round(time.perf_counter() - t_all, 1)
    report = dict(
        analysis=NAME, command=command or f"shallowmark analyze {NAME} --out {out}",
        config=_config_dict(cfg), sources=sources, parts=parts, figures=figures, seconds=timings,
        environment=dict(torch=torch.__version__, threads=torch.get_num_threads(),
                         omp_num_threads=os.environ.get("OMP_NUM_THREADS"), python=platform.python_version()),
        cannot_test=CANNOT_TEST)
    write_report(out, report, _markdown(report) + "\n", allow_nan=False)
    return report


def _config_dict(cfg: LocoMaskedConfig) -> dict:
    d = asdict(replace(cfg, regimes=None))
    d["regimes"] = asdict(cfg.regimes) if cfg.fmnist is not None else None
    return d


CANNOT_TEST = ("The paper's claims are semantic: a direction found on one face changes the same attribute "
               "(eyes, hair, expression) on other faces, and two directions change two attributes. A 28×28 "
               "garment model and a model of eleven photos have no such attributes and no labels for them, so "
               "these measurements are geometric only (where the change lands, how it scales and adds, whether "
               "the same latent direction moves the same pixels); whether an edit is 'the same edit' in meaning "
               "is not tested here.")


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

def _f(v, nd: int = 3) -> str:
    return "∞/–" if v is None else f"{v:.{nd}f}"


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _summary(label: str, f: dict, part: dict) -> list[str]:
    """Bullet points computed from the figures (nothing typed in by hand)."""
    res, src = f["results"], f["source"]
    others = [n for n in res if n != src]
    st = lambda n, k, m: res[n]["stats"][k][m]  # noqa: E731
    lines = [f"- **{label}**, source {src}, Ω = {tuple(part['masks'][0])} ({res[src]['area']:.3f} of the image), "
             f"λ = {part['lam']:g}·‖x_t‖, r' = {part['null_rank']}:"]
    rows = [(k, lab) for k, lab in (("raw1", "v_Ω (no projection)"), ("p1", "projected"), ("random", "random"))]
    lines.append("  - change outside Ω (mean over the targets): " + "; ".join(
        f"{lab} PSNR {_f(_mean(st(n, k, 'psnr_out') for n in res), 2)} dB, SSIM {_f(_mean(st(n, k, 'ssim_out') for n in res), 4)}, "
        f"RMS out/in {_f(_mean(st(n, k, 'rms_out') for n in res), 2)}/{_f(_mean(st(n, k, 'rms_in') for n in res), 2)}"
        for k, lab in rows) + ".")
    leak = f["first_order_leakage"]
    lines.append(f"  - first order (x̂0 at x_t, source): ‖P_Ωᶜ J v‖/‖P_Ω J v‖ = {leak['raw1']:.3f} for v_Ω, "
                 f"{leak['p1']:.3f} projected, {leak['random']:.3f} random; the projection kept "
                 f"{f['kept'][0]:.3f} of v_Ω.")
    lines.append("  - locality (share of the change inside Ω, mean over targets): "
                 f"v_Ω {_f(_mean(st(n, 'raw1', 'locality') for n in res))}, projected "
                 f"{_f(_mean(st(n, 'p1', 'locality') for n in res))}, random {_f(_mean(st(n, 'random', 'locality') for n in res))}; "
                 f"chance {res[src]['area']:.3f}.")
    if others:
        tr = [res[n]["transfer"] for n in others]
        line = ("  - transfer of A's projected direction (" + ", ".join(others) + "): locality "
                + ", ".join(_f(st(n, 'p1', 'locality')) for n in others)
                + f" (on A {_f(st(src, 'p1', 'locality'))}); cosine of the change map with A's "
                + ", ".join(_f(t['cos_change_with_source']) for t in tr)
                + "; size against A's " + ", ".join(_f(t['size_ratio'], 2) for t in tr))
        if "own_overlap" in tr[0]:
            line += ("; |cos| of A's v_Ω with the target's own " + ", ".join(_f(t['own_overlap']) for t in tr)
                     + f" (chance {f['chance_abs_cos_latent']:.3f}), of their changes "
                     + ", ".join(_f(t['own_change_cos']) for t in tr))
        lines.append(line + ".")
    lin = lambda n, k, w="linearity": list(res[n][w][k].values())  # noqa: E731
    r2 = _span([res[n]["linearity"]["r2"] for n in res], 4)
    asym = _span([v for n in res for v in lin(n, "symmetry")])
    asym_z = _span([v for n in res for v in lin(n, "symmetry", "linearity_latent")])
    dbl = _span([v for n in res for v in lin(n, "doubling")])
    lines.append(f"  - linearity: R² of the change's coordinate against λ {r2}; ±λ asymmetry {asym} on the image, "
                 f"{asym_z} on the final latent; doubling error {dbl} (0 = linear; range over the targets and λ).")
    lines.append("  - composability ‖Δ(v₁+v₂) − Δ(v₁) − Δ(v₂)‖ / (‖Δ(v₁)‖ + ‖Δ(v₂)‖): projected "
                 + _span([res[n]["composability"]["projected"] for n in res]) + ", without projection "
                 + _span([res[n]["composability"]["unprojected"] for n in res]) + f" (over the {len(res)} targets).")
    return lines


def _span(vals, nd: int = 3) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return "–"
    lo, hi = min(v), max(v)
    return f"{lo:.{nd}f}" if lo == hi else f"{lo:.{nd}f}–{hi:.{nd}f}"


def _reading(label: str, f: dict, part: dict) -> list[str]:
    """What the figures say, in sentences built from them (the words follow the signs)."""
    res, src = f["results"], f["source"]
    others = [n for n in res if n != src]
    st = res[src]["stats"]
    gain = st["p1"]["psnr_out"] - st["raw1"]["psnr_out"] if None not in (st["p1"]["psnr_out"], st["raw1"]["psnr_out"]) else None
    share = f["complement_energy"]["share"][str(part["null_rank"])]
    def moved(names):
        return [res[n]["stats"]["p1"]["psnr_out"] - res[n]["stats"]["raw1"]["psnr_out"] for n in names
                if None not in (res[n]["stats"]["p1"]["psnr_out"], res[n]["stats"]["raw1"]["psnr_out"])]

    imgs = [n for n in others if res[n]["kind"] == "image"]
    at_other = [n for n in others if res[n]["kind"] == "t_other"]
    tr, at_t = [res[n]["transfer"] for n in imgs], [res[n]["transfer"] for n in at_other]
    m_img = moved(imgs)
    every = ("it helps on every one of them" if m_img and min(m_img) > 0 else
             "it does not help on all of them (it removes the source's complement directions, not theirs)")
    lines = [f"- {label}: on the source image the projection {'raised' if gain and gain > 0 else 'did not raise'} the "
             f"PSNR outside Ω by {_f(gain, 2)} dB (first-order leakage {f['first_order_leakage']['raw1']:.3f} → "
             f"{f['first_order_leakage']['p1']:.3f}); its r' = {part['null_rank']} directions hold {share:.3f} of the "
             "complement Jacobian's energy, which bounds what it can remove. Carried unchanged to the other images, "
             f"the projected direction changed their outside PSNR by {_span(m_img, 2)} dB against A's unprojected "
             f"v_Ω (positive: less change outside): {every}; on A at {part['t_other']:g}T, "
             f"{_span(moved(at_other), 2)} dB."]
    if tr:
        lines.append(f"  Across images, A's v_Ω and each image's own v_Ω have |cos| {_span(t.get('own_overlap') for t in tr)} "
                     f"(chance {f['chance_abs_cos_latent']:.3f}) and A's direction moves the other images' pixels with "
                     f"cos {_span(t['cos_change_with_source'] for t in tr)} to its change on A; at "
                     f"{part['t_other']:g}T on A the same direction gives cos "
                     f"{_span(t['cos_change_with_source'] for t in at_t)} and |cos| to the direction found there "
                     f"{_span(t.get('own_overlap') for t in at_t)}.")
    r2 = [res[n]["linearity"]["r2"] for n in res]
    asym = [v for n in res for v in res[n]["linearity"]["symmetry"].values()]
    asym_z = [v for n in res for v in res[n]["linearity_latent"]["symmetry"].values()]
    comp = [res[n]["composability"]["projected"] for n in res]
    comp_z = [res[n]["composability"]["projected_latent"] for n in res]
    where = ("most of it appears in decoding the final latent (the clip to [−1, 1], and for a latent model the "
             "decoder)" if np.median(asym_z) < 0.5 * np.median(asym) else
             "the DDIM path from x_t to the final latent is itself this far from linear at these λ")
    lines.append(f"  Linearity: R² {_span(r2)} of the change's coordinate along its axis, but a ±λ asymmetry of "
                 f"{_span(asym)} on the image against {_span(asym_z)} on the final latent: the edit is not odd in λ, "
                 f"and {where}. R² alone overstates linearity. Composability error {_span(comp)} on the image, "
                 f"{_span(comp_z)} on the final latent.")
    return lines


def _part_section(key: str, label: str, rep: dict) -> list[str]:
    f, part = rep["parts"][key], rep["config"][key]
    res, src = f["results"], f["source"]
    lines = [f"## {label}", "", f"Images: {rep['sources'][key]}.", "",
             f"Masks (top, left, height, width) in pixels: Ω = {tuple(part['masks'][0])}, partner {tuple(part['masks'][1])}; "
             f"{f['pixels_per_cell']}×{f['pixels_per_cell']} pixels per latent cell, so Ω holds "
             f"{f['cells_in_mask'][0]} and the partner {f['cells_in_mask'][1]} of {f['cells_total']} cells (all "
             "channels). Grid: "
             f"{part['num_steps']} DDIM steps; t = {part['t']:g}T and {part['t_other']:g}T. Directions: top {part['rank']} "
             f"of P_Ω J, top {part['null_rank']} of P_Ωᶜ J, {part['iters']} subspace iterations each. Time: "
             + ", ".join(f"{k} {v} s" for k, v in f["seconds"].items()) + ".", "",
             f"![edits]({rep['figures'][f'edits_{key}']})", "",
             f"σ of P_Ω J (Ω, partner): {', '.join(f'{v:.3f}' for v in f['masked_singular_values'][0])}; "
             f"{', '.join(f'{v:.3f}' for v in f['masked_singular_values'][1])} (Ritz residuals "
             f"{', '.join(f'{v:.2g}' for v in f['masked_ritz_residuals'][0])}). σ of P_Ωᶜ J: "
             f"{', '.join(f'{v:.3f}' for v in f['complement_singular_values'][0])} (residuals "
             f"{', '.join(f'{v:.2g}' for v in f['complement_ritz_residuals'][0])}). |cos(v₁, v₂)| = "
             f"{f['cos_raw1_raw2']:.3f}.", ""]
    lines += ["### Change outside the mask and locality", "",
              *markdown_table(["target", "direction", "locality", "RMS in", "RMS out", "PSNR out (dB)", "SSIM out"],
                              ([n, k, _f(s["locality"]), _f(s["rms_in"], 2), _f(s["rms_out"], 2), _f(s["psnr_out"], 2),
                                _f(s["ssim_out"], 4)] for n in res for k, s in res[n]["stats"].items())), "",
              f"Chance locality (Ω's area): {res[src]['area']:.3f}. r' sweep on the source (rows `p1 r'=…`; "
              f"r' = 0 is v_Ω, r' = {part['null_rank']} is `p1`): share of v_Ω kept "
              + ", ".join(f"r'={k}: {v:.3f}" for k, v in f["kept_by_null_rank"].items())
              + "; first-order leakage ‖P_Ωᶜ J v‖/‖P_Ω J v‖ "
              + ", ".join(f"{k}: {v:.3f}" for k, v in f["first_order_leakage"].items()) + "."]
    ce = f["complement_energy"]
    lines += ["", f"Share of ‖P_Ωᶜ J‖_F² (total {ce['total']:.1f}"
              + (f" ± {100 * ce['total_rel_se']:.1f} %" if "total_rel_se" in ce else "")
              + f"; {ce['method']}) in its top r' singular values: "
              + ", ".join(f"r'={k}: {v:.3f}" for k, v in ce["share"].items()) + "."]
    lines += ["", "### Homogeneity and transferability", "",
              *markdown_table(["target", "locality of A's direction", "cos(Δ, Δ on A)", "‖Δ‖ / ‖Δ on A‖",
                               "|cos(v_Ω of A, own v_Ω)|", "|cos(Δ(v_Ω of A), Δ(own v_Ω))|"],
                              ([n, _f(r["stats"]["p1"]["locality"]), _f(r["transfer"]["cos_change_with_source"]),
                                _f(r["transfer"]["size_ratio"], 2), _f(r["transfer"].get("own_overlap")),
                                _f(r["transfer"].get("own_change_cos"))] for n, r in res.items() if n != src)), "",
              f"Chance |cos| of two random latent directions: {f['chance_abs_cos_latent']:.3f}.", "",
              "### Linearity", "",
              *markdown_table(["target", "on", "R²", "slope (RMS grey levels per unit λ/‖x_t‖)",
                               "off-axis share (by λ/‖x_t‖)", "±λ asymmetry", "doubling error"],
                              ([n, on, f"{r[w]['r2']:.4f}", f"{r['linearity']['slope']:.1f}" if on == "image" else "",
                                ", ".join(f"{k}: {v:.2f}" for k, v in r[w]["off_axis"].items()),
                                ", ".join(f"{k}: {v:.3f}" for k, v in r[w]["symmetry"].items()),
                                ", ".join(f"{k}: {v:.3f}" for k, v in r[w]["doubling"].items())]
                               for n, r in res.items()
                               for on, w in (("image", "linearity"), ("latent x_0", "linearity_latent")))), "",
              "`latent x_0`: the same measures on the final latent before decoding (and before the decoder's "
              "clipping to [−1, 1]).", "",
              "### Composability", "",
              *markdown_table(["target", "projected", "v_Ω (no projection)", "projected, on the latent x_0",
                               "locality of Δ(v₁+v₂) in Ω ∪ Ω₂"],
                              ([n, _f(r["composability"]["projected"]), _f(r["composability"]["unprojected"]),
                                _f(r["composability"]["projected_latent"]),
                                f"{_f(r['locality_union_p1_plus_p2'])} (area {r['area_union']:.3f})"]
                               for n, r in res.items())), ""]
    return lines


def _markdown(rep: dict) -> str:
    lines = ["# LOCO edit with mask and null-space projection: five properties", "",
             f"Reproduce: `{rep['command']}` (torch {rep['environment']['torch']}, {rep['environment']['threads']} "
             f"thread(s){', OMP_NUM_THREADS=' + rep['environment']['omp_num_threads'] if rep['environment']['omp_num_threads'] else ''}). "
             f"Total {rep['seconds']['total']} s ("
             + ", ".join(f"{k} {v} s" for k, v in rep["seconds"].items() if k != "total")
             + "). Every number is also in `report.json`.", "",
             "Method: invert the image to x_t by DDIM; v_Ω = top right singular vector of the masked Jacobian "
             "P_Ω ∂x̂0/∂x_t; V_c = top r' right singular vectors of the complement's P_Ωᶜ ∂x̂0/∂x_t (both by "
             "subspace iteration on JVP/VJP products); edit along v = (I − V_c V_cᵀ) v_Ω / ‖·‖: x_t + λ v, DDIM to 0, "
             "decode. λ is a fraction of each target's ‖x_t‖. The mask is given in pixels and acts on the latent "
             "cells at least half inside it; measurements use those cells' pixels.", "",
             "Summary (read off the numbers below):", ""]
    for key, f in rep["parts"].items():
        lines += _summary(PARTS[key][0], f, rep["config"][key])
    lines += ["", "Reading:", ""]
    for key, f in rep["parts"].items():
        lines += _reading(PARTS[key][0], f, rep["config"][key])
    lines += ["", f"**Not tested here.** {rep['cannot_test']}", "",
              "Definitions: Δ = edit − base on the decoded image (float grey levels 0–255, all channels); locality = "
              "Σ_Ω ‖Δ‖² / Σ ‖Δ‖²; RMS in/out = root-mean-square Δ inside/outside Ω; PSNR/SSIM out = of the edit "
              "against the base on the pixels outside Ω (SSIM over the pixels whose 7×7 window lies wholly outside "
              "Ω; PSNR shows ∞/– when they are identical); `random` = a random unit direction at the same λ; "
              "`own1` = the target's own v_Ω (no projection) next to A's `raw1`; cos(Δ, Δ on A) = cosine of the "
              "signed change maps of A's projected direction on the target and on A; composability = "
              "‖Δ(v₁+v₂) − Δ(v₁) − Δ(v₂)‖ / (‖Δ(v₁)‖ + ‖Δ(v₂)‖); linearity: the change's coordinate along the axis "
              "Δ(λ_max) − Δ(λ_min), fitted by a line over λ (λ = 0 included); doubling error = "
              "‖Δ(2λ) − 2Δ(λ)‖ / ‖2Δ(λ)‖; ±λ asymmetry = ‖Δ(λ) + Δ(−λ)‖ / (‖Δ(λ)‖ + ‖Δ(−λ)‖).", ""]
    for key in rep["parts"]:
        lines += _part_section(key, PARTS[key][0], rep)
    lines += [f"Figures: {', '.join(f'`{v}`' for v in rep['figures'].values())}."]
    return "\n".join(lines)
