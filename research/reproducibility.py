"""Reproducibility (RP) and generalization (GL) scores of diffusion models (Zhang et al., ICML 2024).

- **RP** between two models: the probability that, started from the same initial noise x_T and
  sampled with the same deterministic DDIM sampler, they give images whose descriptor similarity is
  above 0.6: ``RP = P(sim(x₁, x₂) > 0.6)``.
- **GL** of a model: ``GL = 1 − P(max_i sim(x, y_i) > 0.6)`` over its samples x and the training set
  {y_i}: the share of samples that are *not* copies of a training image.

The similarity is a copy-detection descriptor (:mod:`shallowmark.research.descriptors`): SSCD from a
local TorchScript file when given, else the documented thumbnail stand-in. Every result carries the
descriptor's name.

**The training set of tiny-ldm** is not a list of images but random rescaled crops of eleven
photos (``shallowmark.core.photos``): a square region of side r, log-uniform between
max(192, 0.2·short side) and the short side, anywhere in the photo, resized to 256², flipped half of
the time. The reference set {y_i} used here is a dense grid over exactly that family:
:func:`build_reference_set` cuts every photo at geometrically spaced region sides (ratio
``scale_ratio``) at a stride of ``stride`` × the region side, with and without a horizontal flip.
The report checks that the grid is dense enough: random training crops drawn off the grid by the
training code's own sampler must score as copies (max similarity > 0.6), and crops of the held-out
photo must not.

:func:`run_reproducibility_analysis` measures all of it for the shipped ``tiny-ldm`` and the
variants trained for this comparison, and writes ``report.json``, ``report.md`` and PNG figures.
"""

from __future__ import annotations

import io
import json
import math
import platform
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from shallowmark.research.descriptors import Descriptor, load_descriptor, nearest
from shallowmark.research.threads import single_thread
from shallowmark.errors import InvalidParameterError
from shallowmark.reports import markdown_table

THRESHOLD = 0.6  # SSCD's copy threshold, used by the talk for both scores
TRAIN_SIZE = 256  # tiny-ldm's image size; training crops are resized to it


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (sensible at 0 and n, unlike p ± z·se)."""
    if n <= 0:
        raise InvalidParameterError(f"a proportion needs n >= 1 trials; got {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # at 0 and n the interval touches the boundary exactly (rounding would leave 1e-16 gaps)
    return (0.0 if successes == 0 else lo), (1.0 if successes == n else hi)


@dataclass(frozen=True)
class Score:
    """A probability estimated from ``n`` similarities, with its 95 % Wilson interval."""

    kind: str                  # "RP" or "GL"
    score: float
    ci95: tuple[float, float]
    n: int
    threshold: float
    descriptor: str
    similarities: tuple[float, ...]  # RP: per same-noise pair; GL: per sample, max over the training set
    # RP with a multi-factor descriptor: each factor's cosine per pair (diagnostic; the product is the similarity)
    factors: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def to_dict(self, with_values: bool = True) -> dict:
        d = dict(kind=self.kind, score=round(self.score, 4), ci95=[round(v, 4) for v in self.ci95], n=self.n,
                 threshold=self.threshold, descriptor=self.descriptor,
                 similarity_median=round(float(np.median(self.similarities)), 4),
                 similarity_mean=round(float(np.mean(self.similarities)), 4))
        if len(self.factors) > 1:
            d["factors"] = {k: dict(median=round(float(np.median(v)), 4),
                                    above=round(float(np.mean(np.asarray(v) > self.threshold)), 4))
                            for k, v in self.factors.items()}
        if with_values:
            d["similarities"] = [round(float(s), 4) for s in self.similarities]
        return d


def _check_threshold(threshold: float) -> float:
    if not -1.0 < float(threshold) < 1.0:
        raise InvalidParameterError(f"similarity threshold must be in (-1, 1); got {threshold}")
    return float(threshold)


def _check_count(n: int, what: str) -> int:
    if int(n) < 1:
        raise InvalidParameterError(f"{what} must be at least 1; got {n}")
    return int(n)


def rp_score(images_a, images_b, descriptor: Descriptor, threshold: float = THRESHOLD) -> Score:
    """RP from paired samples: ``images_a[i]`` and ``images_b[i]`` came from the same noise (uint8 N×H×W×3)."""
    threshold = _check_threshold(threshold)
    a, b = np.asarray(images_a), np.asarray(images_b)
    if a.ndim != 4 or b.ndim != 4:
        raise InvalidParameterError(f"RP needs two batches of images (N×H×W×3); got shapes {a.shape} and {b.shape}")
    _check_count(a.shape[0], "the number of same-noise pairs N")
    if a.shape[0] != b.shape[0]:
        raise InvalidParameterError(f"RP pairs images by noise: both sides need N images; got {a.shape[0]} "
                                    f"and {b.shape[0]}")
    per_factor = descriptor.factor_similarities(a, b)
    sims = per_factor.prod(dim=0).tolist()
    hits = sum(s > threshold for s in sims)
    factors = {name: tuple(v.tolist()) for name, v in zip(descriptor.factor_names, per_factor)}
    return Score("RP", hits / len(sims), wilson_interval(hits, len(sims)), len(sims), threshold,
                 descriptor.name, tuple(sims), factors)


def gl_score(images, reference: "ReferenceSet", descriptor: Descriptor, threshold: float = THRESHOLD
             ) -> tuple[Score, list[int]]:
    """GL of samples (uint8 N×H×W×3) against a reference set built with the same descriptor.

    Returns the score and, per sample, the index of its most similar reference crop."""
    threshold = _check_threshold(threshold)
    if reference.descriptor != descriptor.name:
        raise InvalidParameterError(f"the reference set was described with {reference.descriptor!r}, "
                                    f"not {descriptor.name!r}: rebuild it with the same descriptor")
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise InvalidParameterError(f"GL needs a batch of images (N×H×W×3); got shape {arr.shape}")
    _check_count(arr.shape[0], "the number of samples N")
    parts = descriptor.parts(arr)
    best, idx = reference.nearest(parts)
    sims = best.tolist()
    copies = sum(s > threshold for s in sims)
    # each factor's cosine with the nearest crop (diagnostic: which factor decides)
    factors = {name: tuple((q * r[idx]).sum(dim=1).tolist())
               for name, q, r in zip(descriptor.factor_names, parts, reference.parts)}
    return (Score("GL", 1.0 - copies / len(sims), wilson_interval(len(sims) - copies, len(sims)), len(sims),
                  threshold, descriptor.name, tuple(sims), factors), idx.tolist())


# ----------------------------------------------------------------------------------------------
# The training set as a reference grid
# ----------------------------------------------------------------------------------------------

def training_region_sides(short_side: int, scale_ratio: float, size: int = TRAIN_SIZE) -> list[int]:
    """Region sides of the reference grid for a photo: geometric from the smallest training region
    (max(0.75·size, 0.2·short side), as the training sampler draws them) up to the short side."""
    if not scale_ratio > 1.0:
        raise InvalidParameterError(f"scale_ratio must be > 1; got {scale_ratio}")
    lo = min(max(size * 0.75, short_side * 0.2), short_side)
    k = max(1, math.ceil(math.log(short_side / lo) / math.log(scale_ratio)) + 1) if short_side > lo else 1
    if k == 1:
        return [int(short_side)]
    return sorted({int(round(lo * (short_side / lo) ** (i / (k - 1)))) for i in range(k)})


def _offsets(extent: int, window: int, stride: float) -> list[int]:
    """Window offsets from 0 to ``extent − window`` at about ``stride``, the last flush with the end."""
    last = extent - window
    if last <= 0:
        return [0]
    n = max(1, math.ceil(last / stride))
    return sorted({int(round(last * i / n)) for i in range(n + 1)})


@dataclass
class ReferenceSet:
    """Descriptor factors of a grid of training crops. ``labels[i]`` = (photo, region, top, left, flipped)."""

    parts: list[torch.Tensor]  # the descriptor's L2-normalised factors, each M×D_k
    labels: list[tuple[str, int, int, int, bool]]
    descriptor: str
    scale_ratio: float
    stride: float
    crop_size: int
    seconds: float = 0.0
    per_photo: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def nearest(self, parts: list[torch.Tensor], chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """Max similarity to the set and its index, per query; ``parts`` = the descriptor's factors of
        the queries (similarity = product of the factors' cosines = cosine of the full features)."""
        return nearest(parts, self.parts, chunk)

    def summary(self) -> dict:
        return dict(crops=len(self), descriptor=self.descriptor, scale_ratio=self.scale_ratio,
                    stride_fraction_of_region=self.stride, crop_size_px=self.crop_size, flips=True,
                    per_photo=self.per_photo, seconds=round(self.seconds, 1))


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR, reducing_gap=None))


def reference_crop(photos: dict[str, np.ndarray], label, size: int = TRAIN_SIZE) -> np.ndarray:
    """The training crop a reference label names, at ``size``² (for figures)."""
    name, region, top, left, flipped = label
    crop = _resize(photos[name][top:top + region, left:left + region], size, size)
    return crop[:, ::-1].copy() if flipped else crop


def build_reference_set(descriptor: Descriptor, photos: dict[str, np.ndarray] | None = None, *,
                        scale_ratio: float = 1.1, stride: float = 1 / 16, crop_size: int | None = None,
                        chunk: int = 512) -> ReferenceSet:
    """Describe a dense grid of training crops of ``photos`` (default: tiny-ldm's eleven).

    For every region side (see :func:`training_region_sides`) the photo is resized once so that the
    region becomes ``crop_size`` pixels, and windows are cut from it every ``stride`` × region side
    (flush with the far edges), each also mirrored. ``crop_size`` defaults to the descriptor's
    ``work_size`` (the resolution it reduces images to anyway), capped at 256.
    """
    if not 0.0 < float(stride) <= 1.0:
        raise InvalidParameterError(f"stride must be a fraction of the region side in (0, 1]; got {stride}")
    if photos is None:
        from shallowmark.core.photos import training_photos

        photos = training_photos()
    if not photos:
        raise InvalidParameterError("the reference set needs at least one photo")
    size = int(crop_size or min(TRAIN_SIZE, getattr(descriptor, "work_size", TRAIN_SIZE)))
    t0 = time.perf_counter()
    feats, labels, per_photo = [], [], {}
    pending: list[np.ndarray] = []
    pending_labels: list[tuple] = []

    def flush():
        if pending:
            feats.append(descriptor.parts(np.stack(pending)))
            labels.extend(pending_labels)
            pending.clear()
            pending_labels.clear()

    for name in sorted(photos):
        im = np.asarray(photos[name])
        h, w = im.shape[:2]
        count = 0
        for region in training_region_sides(min(h, w), scale_ratio):
            f = size / region
            rh, rw = max(size, round(h * f)), max(size, round(w * f))
            scaled = _resize(im, rw, rh)
            step = stride * size
            for top in _offsets(rh, size, step):
                for left in _offsets(rw, size, step):
                    win = scaled[top:top + size, left:left + size]
                    # labels in source-photo pixels, so a figure can cut the crop at full resolution
                    src = (name, region, min(h - region, round(top / f)), min(w - region, round(left / f)))
                    for flipped in (False, True):
                        pending.append(win[:, ::-1] if flipped else win)
                        pending_labels.append((*src, flipped))
                        count += 1
                    if len(pending) >= chunk:
                        flush()
        per_photo[name] = count
    flush()
    parts = [torch.cat([f[k] for f in feats]) for k in range(len(feats[0]))]
    return ReferenceSet(parts, labels, descriptor.name, float(scale_ratio), float(stride), size,
                        time.perf_counter() - t0, per_photo)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(backend, seeds: Sequence[int], steps: int = 50, batch: int = 8) -> np.ndarray:
    """Deterministic DDIM samples (uint8 N×H×W×3): noise ``seeds[i]`` gives image i on any model."""
    from shallowmark.core import ddim
    from shallowmark.core.images import to_uint8

    seeds = list(seeds)
    _check_count(len(seeds), "the number of noises N")
    grid = ddim.make_grid(backend, steps)
    out = []
    for s in range(0, len(seeds), batch):
        x_t = backend.randn_latents(seeds[s:s + batch])
        out.append(to_uint8(backend.decode(ddim.denoise(backend, x_t, grid, grid.num_steps))))
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# Calibration of the descriptor against the 0.6 threshold
# ----------------------------------------------------------------------------------------------

def _random_crops(photos: dict[str, np.ndarray], n: int, rng: np.random.Generator, size: int = TRAIN_SIZE):
    """``n`` square crops spread over the photos (round robin), at training scales, with their boxes."""
    names = sorted(photos)
    crops, boxes = [], []
    for i in range(n):
        name = names[i % len(names)]
        im = photos[name]
        h, w = im.shape[:2]
        short = min(h, w)
        lo = min(max(size * 0.75, short * 0.2), short)
        region = int(round(math.exp(rng.uniform(math.log(lo), math.log(short)))))
        top, left = int(rng.integers(0, h - region + 1)), int(rng.integers(0, w - region + 1))
        crops.append(_resize(im[top:top + region, left:left + region], size, size))
        boxes.append((name, top, left, region))
    return np.stack(crops), boxes


def _shift_crop(x: np.ndarray, frac: float) -> np.ndarray:
    """Drop ``frac`` of the side at the top-left and scale back up: a shift plus a small zoom."""
    d = int(round(x.shape[0] * frac))
    return _resize(np.ascontiguousarray(x[d:, d:]), x.shape[1], x.shape[0])


def _centre_crop(x: np.ndarray, keep: float) -> np.ndarray:
    s = int(round(x.shape[0] * keep))
    o = (x.shape[0] - s) // 2
    return _resize(np.ascontiguousarray(x[o:o + s, o:o + s]), x.shape[1], x.shape[0])


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _blur(x: np.ndarray, radius: float) -> np.ndarray:
    from PIL import Image, ImageFilter

    return np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius)))


def _colour(x: np.ndarray) -> np.ndarray:
    """Channel gains (1.15, 1, 0.9), contrast ×1.2, brightness +10: a warm, punchier copy."""
    y = x.astype(np.float32) * np.array([1.15, 1.0, 0.9], dtype=np.float32)
    y = (y - y.mean()) * 1.2 + y.mean() + 10
    return np.clip(y, 0, 255).astype(np.uint8)


def _noise(x: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise of ``sigma`` grey levels (a fixed pattern: the copy is deterministic)."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, x.shape)
    return np.clip(x + noise, 0, 255).astype(np.uint8)


AUGMENTATIONS = {
    "shift 3%": lambda x: _shift_crop(x, 0.03),
    "shift 6%": lambda x: _shift_crop(x, 0.0625),
    "centre crop 90%": lambda x: _centre_crop(x, 0.9),
    "JPEG q50": lambda x: _jpeg(x, 50),
    "blur r2": lambda x: _blur(x, 2.0),
    "colour/contrast": _colour,
    "noise σ8": lambda x: _noise(x, 8.0),
    "shift 3% + colour + JPEG q60": lambda x: _jpeg(_colour(_shift_crop(x, 0.03)), 60),
}


def _rate(values, threshold: float) -> float:
    v = np.asarray(values)
    return float((v > threshold).mean()) if v.size else float("nan")


def _dist(values, threshold: float) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return dict(n=int(v.size), above=_rate(v, threshold), min=round(float(v.min()), 4),
                p05=round(float(np.quantile(v, 0.05)), 4), median=round(float(np.median(v)), 4),
                p95=round(float(np.quantile(v, 0.95)), 4), max=round(float(v.max()), 4))


def calibrate_descriptor(descriptor: Descriptor, photos: dict[str, np.ndarray], n: int = 220,
                         negatives: int = 4000, seed: int = 0, threshold: float = THRESHOLD) -> dict:
    """How the descriptor separates copies from different images at ``threshold``.

    Positives: ``n`` random crops of ``photos`` at training scales vs each augmented copy
    (:data:`AUGMENTATIONS`). Negatives: ``negatives`` random pairs of crops of *different* photos,
    and all pairs of non-overlapping crops of the *same* photo. Returns the distributions."""
    _check_count(n, "the number of calibration crops")
    rng = np.random.default_rng(seed)
    crops, boxes = _random_crops(photos, n, rng)
    base = descriptor(crops)
    pos = {}
    for name, aug in AUGMENTATIONS.items():
        pos[name] = (base * descriptor(np.stack([aug(x) for x in crops]))).sum(1).tolist()
    sim = base @ base.T
    pairs_other, pairs_same = [], []
    for i in range(n):
        for j in range(i + 1, n):
            (a, ta, la, ra), (b, tb, lb, rb) = boxes[i], boxes[j]
            if a != b:
                pairs_other.append((i, j))
            elif ta + ra <= tb or tb + rb <= ta or la + ra <= lb or lb + rb <= la:
                pairs_same.append((i, j))
    if len(pairs_other) > negatives:
        pick = rng.choice(len(pairs_other), negatives, replace=False)
        pairs_other = [pairs_other[k] for k in pick]
    neg = [float(sim[i, j]) for i, j in pairs_other]
    same = [float(sim[i, j]) for i, j in pairs_same]
    return dict(
        photos=sorted(photos), crops=n, threshold=threshold,
        positives={k: _dist(v, threshold) for k, v in pos.items()},
        positives_all=_dist([s for v in pos.values() for s in v], threshold),
        different_photos=_dist(neg, threshold),
        same_photo_disjoint=_dist(same, threshold) if same else None,
        values=dict(positives_all=[round(s, 4) for v in pos.values() for s in v],
                    different_photos=[round(s, 4) for s in neg], same_photo_disjoint=[round(s, 4) for s in same]),
    )


def training_crops(photos: dict[str, np.ndarray], n: int, seed: int, colour: float = 0.3) -> np.ndarray:
    """``n`` crops drawn by the training code's own sampler (random scale, position, flip, and the colour
    augmentation at the strength the denoiser's latents got), uint8 at 256²."""
    from shallowmark.core.images import to_uint8
    from shallowmark.research.train_default import CropSampler

    sampler = CropSampler(photos, torch.device("cpu"), torch.Generator().manual_seed(seed))
    return to_uint8(sampler.sample(n, TRAIN_SIZE, colour=colour))


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------

ASSETS = Path(str(resources.files("shallowmark.core.assets")))


@dataclass(frozen=True)
class ModelSpec:
    """A tiny-ldm folder to compare; ``label`` names it in the report."""

    label: str
    path: Path
    about: str


def default_models() -> list[ModelSpec]:
    """The shipped tiny-ldm and the variants trained for this comparison (those present)."""
    specs = [ModelSpec("shipped", ASSETS / "tiny-ldm", "the embedded tiny-ldm (seed 0; H200, 3522 steps × batch 128)")]
    for folder, label in (("tiny-ldm-b", "variant-b"), ("tiny-ldm-c", "control-c")):
        p = ASSETS / folder
        if (p / "unet").is_dir():
            specs.append(ModelSpec(label, p, _variant_about(p)))
    return specs


def _variant_about(path: Path) -> str:
    log_path = path / "training_log.json"
    if not log_path.exists():
        return path.name
    rec = json.loads(log_path.read_text())
    c = rec.get("config", {})
    return (f"seed {c.get('seed')}; {rec.get('device_name')}, {rec.get('unet_steps')} steps × batch "
            f"{c.get('unet_batch')} (pool {c.get('pool')} crops), autoencoder reused")


def _settings(quick: bool) -> dict:
    if quick:
        return dict(n=3, steps=10, batch=3, scale_ratio=1.35, stride=1 / 4, calib_n=24, calib_neg=200,
                    train_crops=6, heldout_crops=6, vae_crops=0, pairs_shown=3, max_models=2)
    return dict(n=32, steps=50, batch=8, calib_n=220, calib_neg=4000,
                train_crops=96, heldout_crops=48, vae_crops=16, pairs_shown=6, max_models=3)


def model_spec(folder: str | Path) -> ModelSpec:
    """A tiny-ldm folder (``unet/``, ``scheduler/``, ``vae/``) to compare, labelled by its name."""
    path = Path(folder)
    if not (path / "unet").is_dir() or not (path / "scheduler").is_dir():
        raise InvalidParameterError(f"{str(path)!r} is not a tiny-ldm folder (it needs unet/ and scheduler/, as "
                                    "`shallowmark train-default --out` writes them)")
    return ModelSpec(path.name, path, _variant_about(path))


def run_reproducibility_analysis(out_dir, quick: bool = False, *, seed: int = 0, sscd: str | None = None,
                                 models: Sequence[ModelSpec] | None = None, extra_models: Sequence[str | Path] = (),
                                 n: int | None = None, steps: int | None = None, command: str | None = None) -> dict:
    """Measure RP between every pair of models and GL of each; write report.json, report.md, PNGs.

    Models: ``models`` if given, else the shipped tiny-ldm and the variants in the assets folder, plus
    the tiny-ldm folders in ``extra_models``. ``sscd``: path of a local SSCD TorchScript file (default:
    the thumbnail stand-in). ``n``: noises per model (default 32, quick 3); ``steps``: DDIM steps
    (default 50, quick 10). Noise i is seed ``10_000·(seed+1) + i`` for every model. Returns the
    report (the content of report.json).
    """
    from shallowmark.core.backends import load_backend
    from shallowmark.core.photos import heldout_photo, training_photos

    cfg = _settings(bool(quick))
    if n is not None:
        cfg["n"] = _check_count(n, "the number of noises N")
    if steps is not None:
        cfg["steps"] = _check_count(steps, "the number of DDIM steps")
    descriptor = load_descriptor(sscd)  # fails early on a missing SSCD file
    specs = list(models) if models is not None else default_models()[:cfg["max_models"]]
    specs += [model_spec(m) for m in extra_models]
    if not specs:
        raise InvalidParameterError("the analysis needs at least one model")
    if len({s.label for s in specs}) != len(specs):
        raise InvalidParameterError(f"model labels must be unique; got {[s.label for s in specs]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = (f"shallowmark analyze reproducibility --out {out}" + (" --quick" if quick else "")
                   + (f" --seed {seed}" if seed else "") + (f" --sscd {sscd}" if sscd else "")
                   + (f" --models {','.join(str(m) for m in extra_models)}" if extra_models else ""))
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    with single_thread():
        photos = training_photos()
        held = heldout_photo()

        t = time.perf_counter()
        calib = calibrate_descriptor(descriptor, {**photos, "grace_hopper (held out)": held}, cfg["calib_n"],
                                     cfg["calib_neg"], seed)
        timings["calibration"] = time.perf_counter() - t

        t = time.perf_counter()
        ratio, stride = (cfg["scale_ratio"], cfg["stride"]) if quick else descriptor.reference_grid
        ref = build_reference_set(descriptor, photos, scale_ratio=ratio, stride=stride)
        timings["reference_set"] = time.perf_counter() - t

        # GL's known answers: crops the training sampler draws (off the grid) are copies; crops of the
        # held-out photo are not.
        t = time.perf_counter()
        train_gl, _ = gl_score(training_crops(photos, cfg["train_crops"], seed + 1), ref, descriptor)
        held_crops, _ = _random_crops({"grace_hopper": held}, cfg["heldout_crops"], np.random.default_rng(seed + 2))
        held_gl, _ = gl_score(held_crops, ref, descriptor)
        timings["gl_checks"] = time.perf_counter() - t

        seeds = [10_000 * (seed + 1) + i for i in range(cfg["n"])]
        samples, backends, gens = {}, {}, {}
        for spec in specs:
            t = time.perf_counter()
            backend = load_backend("tiny-ldm", path=spec.path)
            samples[spec.label] = generate(backend, seeds, cfg["steps"], cfg["batch"])
            gens[spec.label] = time.perf_counter() - t
            backends[spec.label] = backend
        timings["generation"] = sum(gens.values())

        vae_gl = None
        if cfg["vae_crops"]:
            # what a model that reproduced training crops exactly would output: crops through the autoencoder
            t = time.perf_counter()
            from shallowmark.core.images import to_tensor, to_uint8

            b0 = backends[specs[0].label]
            crops = training_crops(photos, cfg["vae_crops"], seed + 3)
            with torch.no_grad():
                rt = to_uint8(b0.decode(b0.encode(to_tensor(crops))))
            vae_gl, _ = gl_score(rt, ref, descriptor)
            timings["autoencoder_check"] = time.perf_counter() - t

        t = time.perf_counter()
        gl, nearest = {}, {}
        for spec in specs:
            gl[spec.label], nearest[spec.label] = gl_score(samples[spec.label], ref, descriptor)
        rp = {}
        labels = [s.label for s in specs]
        for i, a in enumerate(labels):
            for b in labels[i:]:
                rp[f"{a} vs {b}"] = rp_score(samples[a], samples[b], descriptor)
        # chance level: the same comparison with *different* noises (sample i vs sample i+1 of the other model)
        chance = {}
        if cfg["n"] >= 2:
            for i, a in enumerate(labels):
                for b in labels[i:]:
                    chance[f"{a} vs {b}"] = rp_score(samples[a], np.roll(samples[b], 1, axis=0), descriptor)
        timings["scores"] = time.perf_counter() - t

        figures = dict(pairs="same_noise_pairs.png", histograms="similarity_histograms.png",
                       calibration="descriptor_calibration.png")
        _plot_pairs(samples, rp, gl, nearest, ref, photos, labels, cfg["pairs_shown"], out / figures["pairs"])
        _plot_histograms(rp, chance, gl, train_gl, held_gl, labels, out / figures["histograms"])
        _plot_calibration(calib, out / figures["calibration"])
    timings["total"] = time.perf_counter() - t_all

    nearest_photos = {lab: _count([ref.labels[k][0] for k in nearest[lab]]) for lab in labels}
    report = dict(
        analysis="reproducibility", quick=bool(quick), seed=seed, command=command,
        python_api=(f"shallowmark.research.reproducibility.run_reproducibility_analysis({str(out)!r}, quick={bool(quick)}, "
                    f"seed={seed}" + (f", sscd={sscd!r}" if sscd else "")
                    + (f", extra_models={[str(m) for m in extra_models]!r}" if extra_models else "") + ")"),
        torch_version=torch.__version__, machine=f"{platform.machine()} CPU, 1 thread",
        threshold=THRESHOLD, descriptor=descriptor.info(),
        sampler=dict(kind="DDIM (eta 0)", steps=cfg["steps"], noises=cfg["n"], noise_seeds=[seeds[0], seeds[-1]]),
        models=[dict(label=s.label, path=_rel(s.path), about=s.about) for s in specs],
        calibration={k: v for k, v in calib.items() if k != "values"},
        reference_set=ref.summary(),
        gl_checks=dict(training_crops=train_gl.to_dict(), heldout_crops=held_gl.to_dict(),
                       training_crops_through_autoencoder=vae_gl.to_dict() if vae_gl else None),
        rp={k: v.to_dict() for k, v in rp.items()},
        rp_chance_different_noise={k: v.to_dict() for k, v in chance.items()},
        gl={k: v.to_dict() for k, v in gl.items()},
        gl_nearest_photo=nearest_photos,
        gl_nearest_crop={lab: [list(ref.labels[k]) for k in nearest[lab]] for lab in labels},  # photo, side, top, left, flip
        figures=figures,
        timings_s={**{k: round(v, 1) for k, v in timings.items()},
                   "generation_per_model": {k: round(v, 1) for k, v in gens.items()}},
    )
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report


def _count(items) -> dict:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ASSETS.parent.parent.resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def _figure(w: float, h: float, dpi: int = 100):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    return Figure(figsize=(w, h), dpi=dpi)


def _plot_pairs(samples, rp, gl, nearest, ref, photos, labels, shown, path: Path) -> None:
    """Rows: noises. Columns: each model's sample, and the nearest training crop of each sample."""
    n = min(shown, next(iter(samples.values())).shape[0])
    cols = 2 * len(labels)
    fig = _figure(1.75 * cols, 1.9 * n + 0.4, dpi=72)  # photos compress badly: keep the PNG small
    for r in range(n):
        for c, lab in enumerate(labels):
            ax = fig.add_subplot(n, cols, r * cols + c + 1)
            ax.imshow(samples[lab][r])
            ax.set_xticks([]), ax.set_yticks([])
            title = lab
            if c > 0:
                title += f"\nsim to {labels[0]} {rp[f'{labels[0]} vs {lab}'].similarities[r]:.2f}"
            ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(f"noise {r}", fontsize=7)
            ax2 = fig.add_subplot(n, cols, r * cols + len(labels) + c + 1)
            label = ref.labels[nearest[lab][r]]
            ax2.imshow(reference_crop(photos, label, 128))
            ax2.set_xticks([]), ax2.set_yticks([])
            ax2.set_title(f"nearest train crop of {lab}\n{label[0][:14]} sim {gl[lab].similarities[r]:.2f}", fontsize=6)
    fig.suptitle("Same noise x_T, one row per noise: each model's sample (left),\n"
                 "and the nearest crop of the training grid to each sample (right)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path)


def _plot_histograms(rp, chance, gl, train_gl, held_gl, labels, path: Path) -> None:
    fig = _figure(11.0, 4.0)
    bins = np.linspace(-0.4, 1.0, 36)
    ax = fig.add_subplot(1, 2, 1)
    for key, sc in rp.items():
        a, b = key.split(" vs ")
        if a == b:
            continue  # a model against itself is exactly 1
        ax.hist(sc.similarities, bins=bins, alpha=0.55, label=f"same noise: {key} (RP {sc.score:.2f})")
    for key, sc in chance.items():
        ax.hist(sc.similarities, bins=bins, histtype="step", lw=1.3, label=f"different noise: {key}")
    ax.axvline(THRESHOLD, color="k", ls="--", lw=1)
    ax.set_xlabel(f"similarity ({next(iter(rp.values())).descriptor})")
    ax.set_ylabel("pairs")
    ax.set_title("RP: similarity of samples from two models", fontsize=9)
    ax.legend(fontsize=6)
    ax = fig.add_subplot(1, 2, 2)
    for lab in labels:
        ax.hist(gl[lab].similarities, bins=bins, alpha=0.55, label=f"{lab} samples (GL {gl[lab].score:.2f})")
    ax.hist(train_gl.similarities, bins=bins, histtype="step", lw=1.3, color="k",
            label=f"training-sampler crops (GL {train_gl.score:.2f})")
    ax.hist(held_gl.similarities, bins=bins, histtype="step", lw=1.3, color="tab:red",
            label=f"held-out photo crops (GL {held_gl.score:.2f})")
    ax.axvline(THRESHOLD, color="k", ls="--", lw=1)
    ax.set_xlabel("max similarity to the training grid")
    ax.set_title("GL: nearest training crop", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def _plot_calibration(calib: dict, path: Path) -> None:
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    bins = np.linspace(-1.0, 1.0, 51)
    v = calib["values"]
    ax.hist(v["different_photos"], bins=bins, alpha=0.6, density=True,
            label=f"different photos (>{THRESHOLD}: {calib['different_photos']['above']:.1%})")
    if v["same_photo_disjoint"]:
        ax.hist(v["same_photo_disjoint"], bins=bins, alpha=0.5, density=True,
                label=f"same photo, disjoint crops (>{THRESHOLD}: {calib['same_photo_disjoint']['above']:.1%})")
    ax.hist(v["positives_all"], bins=bins, alpha=0.6, density=True,
            label=f"augmented copies (>{THRESHOLD}: {calib['positives_all']['above']:.1%})")
    ax.axvline(THRESHOLD, color="k", ls="--", lw=1)
    ax.set_xlabel("similarity")
    ax.set_ylabel("density")
    ax.set_title("Descriptor calibration at the 0.6 threshold", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _markdown(rep: dict) -> str:
    d, cal, ref, chk = rep["descriptor"], rep["calibration"], rep["reference_set"], rep["gl_checks"]
    smp = rep["sampler"]
    lines = [
        "# Reproducibility (RP) and generalization (GL) scores",
        "",
        f"Reproduce: `{rep['command']}` (seed {rep['seed']}, torch {rep['torch_version']}, {rep['machine']}). "
        f"Total time {rep['timings_s']['total']} s. All numbers are also in `report.json`.",
        "",
        f"**Descriptor: `{d['name']}`** — {d['description']}.",
        "",
        f"- RP between two models = P(sim(x₁, x₂) > {rep['threshold']}) over {smp['noises']} initial noises x_T, each "
        f"sampled by both models with {smp['kind']}, {smp['steps']} steps (noise seeds {smp['noise_seeds'][0]}–"
        f"{smp['noise_seeds'][1]}).",
        f"- GL of a model = 1 − P(max_i sim(x, y_i) > {rep['threshold']}) over its samples x and the training set {{y_i}}.",
        "- Intervals are 95 % Wilson intervals of the binomial proportion.",
        "",
        "## Models",
        "",
        *markdown_table(["label", "folder", "what"],
                        ([m["label"], f"`{m['path']}`", m["about"]] for m in rep["models"])),
        "", "## RP: same noise, two models", "",
    ]

    def rp_row(key, r):
        ch = rep["rp_chance_different_noise"].get(key)
        ch_s = f"{ch['score']:.3f} (median sim {ch['similarity_median']:.2f})" if ch else "—"
        fac = "; ".join(f"{k} {v['above']:.2f}, {v['median']:.2f}" for k, v in r.get("factors", {}).items()) or "—"
        return [key, f"**{r['score']:.3f}**", f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]",
                f"{r['similarity_median']:.3f}", fac, ch_s]
    lines += markdown_table(["pair", "RP", "95 % CI", "median sim", "per factor: P(cos > 0.6), median",
                             "chance level (different noises)"], (rp_row(key, r) for key, r in rep["rp"].items()))
    lines += ["", "The chance level pairs sample i of one model with sample i+1 of the other: how often two "
              "unrelated samples already look like copies (high when a model keeps producing the same few photos).",
              "The per-factor columns (stand-in only) show each factor of the similarity on its own: the layout "
              "factor alone is a plain thumbnail correlation, which also picks up the spatial pattern of the "
              "shared x_T.",
              "", "## GL: copies of the training set", "",
              # hand-built: the check rows below end in an empty cell ("| |"), which markdown_table writes "|  |"
              "| samples | GL | 95 % CI | median max-sim | per factor at the nearest crop: median | nearest photos |",
              "|---|---|---|---|---|---|"]

    def factor_medians(g):
        return "; ".join(f"{k} {v['median']:.2f}" for k, v in g.get("factors", {}).items()) or "—"
    for key, g in rep["gl"].items():
        near = ", ".join(f"{k} {v}" for k, v in list(rep["gl_nearest_photo"][key].items())[:4])
        lines.append(f"| {key} | **{g['score']:.3f}** | [{g['ci95'][0]:.2f}, {g['ci95'][1]:.2f}] | "
                     f"{g['similarity_median']:.3f} | {factor_medians(g)} | {near} |")
    for name, key in (("training-sampler crops (known answer: copies, GL ≈ 0)", "training_crops"),
                      ("training crops through the autoencoder (a perfect memorizer's output)",
                       "training_crops_through_autoencoder"),
                      ("held-out photo crops (known answer: not copies, GL ≈ 1)", "heldout_crops")):
        g = chk.get(key)
        if g:
            lines.append(f"| {name} | {g['score']:.3f} | [{g['ci95'][0]:.2f}, {g['ci95'][1]:.2f}] | "
                         f"{g['similarity_median']:.3f} | {factor_medians(g)} | |")
    lines += ["", f"Training set = a grid of {ref['crops']} crops over the eleven training photos: region sides "
              f"geometric with ratio {ref['scale_ratio']} from the smallest training region (max(192, 0.2 × short "
              f"side)) to the short side, windows every {ref['stride_fraction_of_region']:.3f} × region side, each "
              f"with and without a horizontal flip, cut at {ref['crop_size_px']}² (built in {ref['seconds']} s). "
              "Crops per photo: " + ", ".join(f"{k} {v}" for k, v in ref["per_photo"].items()) + ".",
              "", "## Descriptor calibration at 0.6", "",
              f"{cal['crops']} random crops at training scales, round robin over {len(cal['photos'])} photos "
              "(the eleven training photos and the held-out one), each compared with augmented copies of itself "
              "(positives) and with crops of other photos (negatives).", ""]

    def row(name, s):
        return [name, s["n"], _pct(s["above"]), *(f"{s[q]:.3f}" for q in ("min", "p05", "median", "p95", "max"))]
    rows = [row(f"copy: {k}", s) for k, s in cal["positives"].items()]
    rows += [row("**all copies**", cal["positives_all"]), row("**different photos**", cal["different_photos"])]
    if cal["same_photo_disjoint"]:
        rows.append(row("same photo, non-overlapping crops", cal["same_photo_disjoint"]))
    lines += markdown_table(["pairs", "n", "> 0.6", "min", "5 %", "median", "95 %", "max"], rows)
    lines += ["", "## Reading the numbers", "",
              "- `X vs X` rows are a known answer: DDIM is deterministic, so a model started twice from the same "
              "noise gives the same image (RP = 1).",
              "- The training-sampler rows are the GL known answers: crops drawn by the training code are copies "
              "(GL ≈ 0 expected), crops of the held-out photo are not (GL ≈ 1). Together they check that the "
              "reference grid is dense enough and the descriptor strict enough.",
              "- With the stand-in descriptor the scores are not numerically comparable with SSCD-based scores "
              "in the literature; the calibration table is what anchors its 0.6. Give `--sscd FILE` to use SSCD."]
    f = rep["figures"]
    lines += ["", "## Figures", "",
              f"![same-noise pairs]({f['pairs']})", "", f"![similarity histograms]({f['histograms']})", "",
              f"![calibration]({f['calibration']})", "",
              "## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in rep["timings_s"].items()
                                                if not isinstance(v, dict)), ""]
    return "\n".join(lines)


__all__ = ["AUGMENTATIONS", "ModelSpec", "model_spec", "ReferenceSet", "Score", "THRESHOLD", "build_reference_set",
           "calibrate_descriptor", "default_models", "generate", "gl_score", "reference_crop", "rp_score",
           "run_reproducibility_analysis", "training_crops", "training_region_sides", "wilson_interval"]
