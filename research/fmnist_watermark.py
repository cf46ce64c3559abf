"""``shallowmark analyze fmnist-watermark``: Shallow Diffuse in pixel space on the generalizing
Fashion-MNIST model, so that the method is seen on a model that generalizes and not only on
tiny-ldm, which can only memorize its eleven photos.

The model is :func:`~shallowmark.research.regimes.generalizing_model` (the larger MLP of
``analyze regimes`` trained on its largest N), reached through
:class:`~shallowmark.research.fmnist_backend.FmnistBackend`: no autoencoder, the latent is the
28×28 grey image itself. For every run (a t* and a key strength):

- **generation** (the server scenario): from the shared seeds' x_T, DDIM to x_t*, the ring key
  written into x_t* (:meth:`ShallowDiffuse.inject <shallowmark.core.watermarks.shallow_diffuse.ShallowDiffuse.inject>`),
  then DDIM to 0 on the watermarked path and on the untouched one: the same-seed unwatermarked
  twin, which is plain DDIM sampling from the same noise;
- **fidelity**: PSNR and SSIM of each watermarked image against its twin
  (:func:`shallowmark.attacks.psnr` / :func:`~shallowmark.attacks.ssim`), and how much of the
  injected change reaches the image (‖x0_wm − x0‖ / ‖x_t*,wm − x_t*‖);
- **detection**: the method's own verification (DDIM inversion 0 → t*, the ring statistic's exact
  p-value) on the watermarked images, on their twins and on held-out real Fashion-MNIST test
  images (images the model never saw), clean and under pixel attacks applied to the grey image;
  ROC (AUC, TPR at 1 % FPR) against each negative set and against both, and the share of each
  negative set the verdict flags at the target FPR (its calibration).

The posterior-mean Jacobian at x_t* is taken exactly (784×784) at a few seeds, to say how much of
the injected change lies in its top singular subspace (the "range" that the low-rank argument says
the change should avoid).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from shallowmark.core import ddim
from shallowmark.core.images import grid as tile, to_uint8
from shallowmark.core.jacobian import DEFAULT_ENERGY, energy_rank
from shallowmark.core.watermarks import rings
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
from shallowmark.errors import InvalidParameterError, ShallowmarkError, check_int
from shallowmark.reports import markdown_table, pyplot, save_figure, write_report
from shallowmark.research import fmnist
from shallowmark.research.fmnist_backend import FmnistBackend
from shallowmark.research.jacobian_energy import dense_fmnist_jacobian
from shallowmark.research.regimes import RegimesConfig, _proportion, generalizing_model, to_rgb

METHOD = ShallowDiffuse.name
#: Seeds of run ``seed`` are ``seed·SEED_STRIDE + i``: runs with different ``--seed`` share none.
SEED_STRIDE = 1_000_000


@dataclass(frozen=True)
class FmnistWatermarkConfig:
    """Everything the analysis depends on (all of it goes into report.json).

    Attributes:
        regimes: where the model comes from (its largest N and larger variant; data and cache folders).
        samples: watermarked generations, one per seed; their same-seed twins are the generated negatives.
        real_negatives: held-out Fashion-MNIST test images, the real negatives.
        t_stars: injection steps as fractions of T; the first is the main one.
        strengths: key strengths (std of the ring values, ortho-FFT units); the first is the main one.
            Runs: every strength at the main t*, and every t* at the main strength.
        num_steps: DDIM steps from T to 0.
        radius, inner_radius: the key's rings (frequency bins of the 28² spectrum).
        attacks: ``name`` or ``name:strength`` of registered attacks that keep the image size
            (:mod:`shallowmark.attacks`), applied to the grey image.
        jacobian_images: seeds at which the exact Jacobian at x_t* is taken per t* (0: none).
        figure_samples: seeds shown in the sample grid.
        target_fpr: the verdict's target false-positive rate.
        batch: images per network call.
        seed: the generation seeds, the choice of real test images and the attacks' randomness.
    """

    regimes: RegimesConfig = field(default_factory=RegimesConfig)
    samples: int = 500
    real_negatives: int = 500
    t_stars: tuple = (0.3, 0.1, 0.5)
    strengths: tuple = (0.8, 0.4, 0.2, 0.1)
    num_steps: int = 50
    radius: int = 7
    inner_radius: int = 3
    attacks: tuple = ("clean", "noise:0.05", "noise:0.1", "blur:0.5", "blur:1", "jpeg:50", "jitter:0.3")
    jacobian_images: int = 4
    figure_samples: int = 8
    target_fpr: float = 0.01
    batch: int = 500
    seed: int = 0

    @classmethod
    def quick(cls, regimes: RegimesConfig | None = None, **kw) -> "FmnistWatermarkConfig":
        """A tiny model (``RegimesConfig.quick``), 16 seeds, one t* and strength, three attacks:
        seconds, for the tests."""
        base = dict(regimes=regimes or RegimesConfig.quick(), samples=16, real_negatives=16, t_stars=(0.3,),
                    strengths=(0.8,), num_steps=20, attacks=("clean", "noise:0.05", "jpeg:50"),
                    jacobian_images=1, figure_samples=4)
        base.update(kw)
        return cls(**base)

    def check(self) -> None:
        """Raise InvalidParameterError (or UnknownNameError for an attack) on a bad value."""
        from shallowmark.attacks.bench_config import parse_attack
        from shallowmark.attacks.registry import get_attack

        if not isinstance(self.regimes, RegimesConfig):
            raise InvalidParameterError(f"regimes must be a RegimesConfig; got {type(self.regimes).__name__}")
        self.regimes.check()
        check_int("samples", self.samples, 2)
        check_int("real_negatives", self.real_negatives, 2)
        check_int("num_steps", self.num_steps, 2, fmnist.T)
        check_int("jacobian_images", self.jacobian_images, 0, self.samples)
        check_int("figure_samples", self.figure_samples, 1, self.samples)
        check_int("batch", self.batch, 1)
        check_int("seed", self.seed, 0)
        for name, values in (("t_stars", self.t_stars), ("strengths", self.strengths)):
            if not isinstance(values, tuple) or not values or len(set(values)) != len(values) or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
                raise InvalidParameterError(f"{name} must be a non-empty tuple of distinct numbers; got {values!r}")
        if not isinstance(self.target_fpr, (int, float)) or not 0 < self.target_fpr < 1:
            raise InvalidParameterError(f"target_fpr must be in (0, 1); got {self.target_fpr!r}")
        if not isinstance(self.attacks, tuple) or not self.attacks:
            raise InvalidParameterError(f"attacks must be a non-empty tuple; got {self.attacks!r}")
        labels = []
        for a in self.attacks:
            setting = parse_attack(a)
            spec = get_attack(setting.name)
            if not spec.keeps_size or spec.context:
                raise InvalidParameterError(f"attack {setting.name!r} changes the image size or needs a model; "
                                            "this analysis takes attacks on the 28×28 image only")
            spec.validate_strength(setting.value)
            labels.append(attack_label(setting))
        if len(set(labels)) != len(labels):
            raise InvalidParameterError(f"attacks must be distinct; got {self.attacks!r}")
        positions = set()
        for t, s in self.runs():
            self.method_config(t, s).validate((1, fmnist.SIDE, fmnist.SIDE))
            positions.add(ddim.DDIMGrid(tuple(range(self.num_steps)), torch.zeros(1)).position(t))
        if len(positions) != len(self.t_stars):
            raise InvalidParameterError(f"t_stars {self.t_stars!r} fall on fewer distinct steps of the "
                                        f"{self.num_steps}-step DDIM grid")

    def runs(self) -> list[tuple[float, float]]:
        """(t*, strength) of every run: the main one first, the strengths at the main t*, then the
        other t* at the main strength."""
        t0, s0 = self.t_stars[0], self.strengths[0]
        return [(t0, s) for s in self.strengths] + [(t, s0) for t in self.t_stars[1:]]

    def method_config(self, t_star: float, strength: float) -> ShallowDiffuseConfig:
        """Shallow Diffuse's configuration for one run; every option not set here is the project
        default (see :data:`PIXEL_SPACE_CHANGES` for what is changed and why)."""
        return ShallowDiffuseConfig(t_star=float(t_star), num_steps=self.num_steps, channel=0, radius=self.radius,
                                    inner_radius=self.inner_radius, strength=float(strength), **PIXEL_SPACE_CHANGES)


#: Options of :class:`ShallowDiffuseConfig` that differ from the defaults here, besides the rings
#: and strength: what cannot apply on a 28×28 single-channel latent, or what is off because no
#: attack of this analysis needs it (each search costs its factor in every p-value, the key
#: variants too: this analysis is about t*, not forgery, so one pattern at the FFT's corner, the
#: paper's, as its committed report ran).
PIXEL_SPACE_CHANGES = dict(sync_amplitude=0.0, sync_shift=False, shift_window=0, geometric_search="none",
                           fill_borders=False, key_variants=1, ring_origin="corner")

WHY = {
    "channel": "the only channel (the default 3 is tiny-ldm's fourth latent channel)",
    "radius": "the largest ring a 28² spectrum allows (rings.RingGeometry: radius < size/2 − 6)",
    "inner_radius": "rings 3..7 are 0.11-0.25 cycles per pixel, the band of the default rings 8..16 on "
                    "tiny-ldm's 64² latent (0.125-0.25); see the ring spectrum table",
    "sync_amplitude": "the synchronisation template was chosen on tiny-ldm's 256² grid; on 28² its band "
                      "(0.22-0.32 cycles per pixel, bins 6-9) overlaps the key's rings, and no geometric attack "
                      "is run here",
    "sync_shift": "follows from no template",
    "shift_window": "no translation or crop is run; the default 8 exceeds the 28² limit (7), and the search "
                    "would cost ×2·(2w+1)² in every p-value",
    "geometric_search": "no flip or rotation is run; the dihedral search would cost ×8 in every p-value",
    "fill_borders": "Fashion-MNIST's background is black to the edge: filling exactly black edge regions "
                    "with their nearest pixel would paint the garment over the background",
    "key_variants": "one pattern, the paper's: this analysis is about t*, not forgery by averaging, and the "
                    "search over variants would cost its factor in every p-value",
    "ring_origin": "the paper's placement at the FFT's corner, as this analysis first ran; no crop, zoom or "
                   "rotation is run, which is what centring is for",
}


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------

def ring_spectrum(images: np.ndarray, radius: int, alpha_bar: float) -> list[dict]:
    """Per ring r = 0..radius of the centred 28² spectrum (ortho FFT; ``images`` (n, 28, 28) uint8): its
    bins, the images' mean
    power P(r) per bin, and at ᾱ = ``alpha_bar`` the signal power ᾱ·P(r) of x_t against the noise
    power 1 − ᾱ."""
    x = fmnist.to_tensor(images).double()[:, 0]
    power = (torch.fft.fft2(x, norm="ortho").abs() ** 2).mean(0)
    n = fmnist.SIDE
    d = torch.arange(n)
    d = torch.where(d <= n // 2, d, d - n)
    ring = torch.ceil(torch.sqrt(d[:, None].double() ** 2 + d[None, :].double() ** 2) - 1e-9).long()
    out = []
    for r in range(radius + 1):
        p = float(power[ring == r].mean())
        out.append(dict(ring=r, bins=int((ring == r).sum()), cycles_per_pixel=round(r / n, 3), power=round(p, 4),
                        signal_at_t_star=round(alpha_bar * p, 4), noise_at_t_star=round(1 - alpha_bar, 4)))
    return out


def attack_label(setting) -> str:
    """``name:strength`` with the strength always written (``clean`` alone)."""
    return setting.name if setting.name == "clean" else f"{setting.name}:{setting.value:g}"


def grey_attack(setting, images: np.ndarray, seeds, kind: str) -> np.ndarray:
    """``setting`` applied to grey images given as RGB (N×28×28×3), each with its own generator
    (the benchmark's :func:`~shallowmark.attacks.bench_grid.apply_setting`), then read back as grey
    from the first channel: the attack's strength is what the grey image gets (noise drawn per
    channel and averaged would be √3 weaker)."""
    from shallowmark.attacks.bench_grid import apply_setting

    attacked = apply_setting(setting, list(images), list(seeds), kind, METHOD)
    return np.stack([np.repeat(a[..., :1], 3, axis=-1) for a in attacked])


def generate_pair(method: ShallowDiffuse, key, x_star: torch.Tensor) -> dict:
    """From x_t*: the watermarked latent (the key injected, then DDIM to 0) and the twin (DDIM to 0
    from the same x_t*), with the injected change. What ``method.generate`` does, keeping the twin
    and the change (the tests check that the images agree)."""
    with torch.no_grad():
        x_wm = method.inject(x_star, [key] * len(x_star))
        z = ddim.denoise(method.backend, torch.cat([x_wm, x_star]), method.grid, method.k_star, 0)
    z_wm, z_ref = z.chunk(2)
    return dict(z_wm=z_wm, z_ref=z_ref, injected=x_wm - x_star)


def _images(backend, z: torch.Tensor) -> np.ndarray:
    return to_uint8(backend.decode(z))


def fidelity(wm: np.ndarray, ref: np.ndarray) -> dict:
    """PSNR and SSIM of each watermarked image against its twin (the project's metrics), summarised."""
    from shallowmark.attacks import psnr, ssim

    p = np.array([psnr(a, b) for a, b in zip(wm, ref)])
    s = np.array([ssim(a, b) for a, b in zip(wm, ref)])
    finite = p[np.isfinite(p)]
    return dict(psnr_mean=round(float(finite.mean()), 2) if finite.size else float("inf"),
                psnr_median=round(float(np.median(p)), 2), psnr_p5=round(float(np.percentile(p, 5)), 2),
                ssim_mean=round(float(s.mean()), 4), ssim_p5=round(float(np.percentile(s, 5)), 4),
                identical=int((~np.isfinite(p)).sum()), psnr=p, ssim=s)


def jacobian_context(backend: FmnistBackend, x_star: torch.Tensor, injected: torch.Tensor, timestep: int,
                     energy: float = DEFAULT_ENERGY) -> dict:
    """At each x_t* (rows of ``x_star``): the exact Jacobian J of x̂0, its energy rank k (share of the
    784 dimensions), and how much of the injected change lies in J's top-k right singular subspace
    (a random direction's share is k/784) and how strongly J passes it (‖Jδ‖/‖δ‖ against the root
    mean square gain ‖J‖_F/√784 of a random direction)."""
    rows = []
    d = fmnist.DIM
    for i in range(len(x_star)):
        jac = dense_fmnist_jacobian(backend.denoiser, x_star[i:i + 1], timestep + 1).double()
        _, s, vh = torch.linalg.svd(jac)
        k = energy_rank(s, energy)
        delta = injected[i].flatten().double()
        share = float((vh[:k] @ delta).norm() ** 2 / delta.norm() ** 2)
        gain = float((jac @ delta).norm() / delta.norm())
        rows.append(dict(rank_ratio=k / d, share_in_top=share, gain=gain, rms_gain=float(s.norm() / d ** 0.5),
                         sigma_max=float(s[0])))
    mean = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
    return dict(images=len(rows), energy=energy, **mean)


def _scores(method: ShallowDiffuse, inverted: torch.Tensor, key, target_fpr: float) -> dict:
    dets = method.score(inverted, [key], target_fpr)
    return dict(score=np.array([d.score for d in dets]), p=np.array([d.p_value_corrected for d in dets]),
                detected=np.array([d.detected for d in dets]))


def detection_row(pos: dict, negatives: dict) -> dict:
    """ROC of the positives against each negative set and all of them, each set's flagged share at
    the target (the verdict's calibration) and the positives' verdict TPR."""
    from shallowmark.attacks import roc_metrics

    out = dict(median_log10_p=round(float(np.median(np.log10(np.clip(pos["p"], 1e-300, 1)))), 2),
               tpr_at_target=_proportion(int(pos["detected"].sum()), len(pos["detected"])))
    every = dict(negatives, both=dict(score=np.concatenate([n["score"] for n in negatives.values()])))
    for name, neg in every.items():
        roc = roc_metrics(pos["score"], neg["score"]).to_dict()
        out[name] = dict(auc=round(roc["auc"], 4), tpr_at_1pct_fpr=round(roc["tpr_at_1pct_fpr"], 4),
                         tpr_at_01pct_fpr=round(roc["tpr_at_01pct_fpr"], 4), n_neg=roc["n_neg"])
        if "detected" in neg:
            out[name]["flagged_at_target"] = _proportion(int(neg["detected"].sum()), len(neg["detected"]))
    return out


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------

def run_fmnist_watermark_analysis(out_dir, config: FmnistWatermarkConfig | None = None, *,
                                  command: str | None = None,
                                  log: Optional[Callable[[str], None]] = None) -> dict:
    """Every run's fidelity and detection, the Jacobian context; writes report.json, report.md
    and the figures to ``out_dir``. Returns the report."""
    from shallowmark.attacks.bench_config import bench_keys, parse_attack

    t_all, load = time.perf_counter(), os.getloadavg()[0]
    cfg = config or FmnistWatermarkConfig()
    cfg.check()
    log = log or (lambda m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, train = generalizing_model(cfg.regimes, log)
    timings = dict(model=round(time.perf_counter() - t_all, 1))
    backend = FmnistBackend(model.net, batch=cfg.batch)
    key = bench_keys(1, METHOD)[0]
    seeds = [cfg.seed * SEED_STRIDE + i for i in range(cfg.samples)]
    test = fmnist.load_fashion_mnist("test", cfg.regimes.data_dir)
    if len(test) < cfg.real_negatives:
        raise ShallowmarkError(f"real_negatives = {cfg.real_negatives}, but the test split holds {len(test)} images")
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(test), cfg.real_negatives, replace=False))
    real = to_rgb(test[pick])
    real_seeds = [int(i) for i in pick]
    settings = [parse_attack(a) for a in cfg.attacks]
    labels = [attack_label(s) for s in settings]
    x_T = backend.randn_latents(seeds)

    runs, per_t, shown = [], {}, {}
    for t_star, strength in sorted(cfg.runs(), key=lambda r: cfg.t_stars.index(r[0])):
        method = ShallowDiffuse(backend, cfg.method_config(t_star, strength))
        t = time.perf_counter()
        if t_star not in per_t:  # x_t* and the negatives' inversions are shared by the runs at one t*
            with torch.no_grad():
                x_star = ddim.denoise(backend, x_T, method.grid, method.grid.num_steps, method.k_star)
            per_t.clear()
            per_t[t_star] = dict(x_star=x_star, inverted={})
        shared = per_t[t_star]
        pair = generate_pair(method, key, shared["x_star"])
        wm, ref = _images(backend, pair["z_wm"]), _images(backend, pair["z_ref"])
        t_gen = time.perf_counter() - t
        fid = fidelity(wm, ref)
        reached = (pair["z_wm"] - pair["z_ref"]).flatten(1).norm(dim=1) / pair["injected"].flatten(1).norm(dim=1)
        t = time.perf_counter()
        detection, pvals = {}, {}
        for setting, label in zip(settings, labels):
            if label not in shared["inverted"]:
                shared["inverted"][label] = dict(
                    generated=method.invert(grey_attack(setting, ref, seeds, "twin")),
                    real=method.invert(grey_attack(setting, real, real_seeds, "real")))
            negs = {name: _scores(method, inv, key, cfg.target_fpr) for name, inv in shared["inverted"][label].items()}
            pos = _scores(method, method.invert(grey_attack(setting, wm, seeds, "watermarked")), key, cfg.target_fpr)
            detection[label] = detection_row(pos, negs)
            pvals[label] = dict(watermarked=pos["p"], generated=negs["generated"]["p"], real=negs["real"]["p"])
        t_det = time.perf_counter() - t
        jac = None
        if cfg.jacobian_images and strength == cfg.strengths[0]:
            t = time.perf_counter()
            n = cfg.jacobian_images
            jac = jacobian_context(backend, shared["x_star"][:n], pair["injected"][:n],
                                   method.grid.timesteps[method.k_star - 1])
            jac["seconds"] = round(time.perf_counter() - t, 1)
        run = dict(t_star=t_star, strength=strength, k_star=method.k_star,
                   timestep=method.grid.timesteps[method.k_star - 1] + 1,
                   alpha_bar=round(float(method.grid.alphas[method.k_star]), 4),
                   fidelity={k: v for k, v in fid.items() if k not in ("psnr", "ssim")},
                   change_reaching_image=dict(median=round(float(reached.median()), 4),
                                              p5=round(float(reached.quantile(0.05)), 4),
                                              p95=round(float(reached.quantile(0.95)), 4)),
                   detection=detection, jacobian=jac,
                   seconds=dict(generate=round(t_gen, 1), detect=round(t_det, 1)))
        runs.append(run)
        log(f"t* {t_star} strength {strength}: PSNR {fid['psnr_mean']} dB, SSIM {fid['ssim_mean']}, clean AUC "
            f"{detection[labels[0]]['both']['auc']} TPR@1% {detection[labels[0]]['both']['tpr_at_1pct_fpr']} "
            f"[{t_gen + t_det:.0f} s]")
        shown[(t_star, strength)] = dict(wm=wm[:cfg.figure_samples], ref=ref[:cfg.figure_samples], pvals=pvals)
        if len(runs) == 1:
            twins_grey = ref[..., 0]
    timings["runs"] = round(sum(r["seconds"]["generate"] + r["seconds"]["detect"] for r in runs), 1)

    main_run = runs[0]
    ab_main = main_run["alpha_bar"]
    spectrum = ring_spectrum(train, fmnist.SIDE // 2, ab_main)
    for row, gen in zip(spectrum, ring_spectrum(twins_grey, fmnist.SIDE // 2, ab_main)):
        row["power_generated"] = gen["power"]
    main_method = cfg.method_config(cfg.t_stars[0], cfg.strengths[0])
    geom = rings.RingGeometry(fmnist.SIDE, cfg.radius, main_method.ring_centre, cfg.inner_radius,
                              main_method.complex_key)
    figures = dict(samples="samples.png", p_values="p_values.png", tradeoff="tradeoff.png")
    _plot_samples(shown, cfg, real[:cfg.figure_samples], out / figures["samples"])
    _plot_p_values(shown[cfg.runs()[0]]["pvals"], labels, cfg, out / figures["p_values"])
    _plot_tradeoff(runs, labels, out / figures["tradeoff"])
    timings["total"] = round(time.perf_counter() - t_all, 1)

    default = ShallowDiffuseConfig()
    changed = {k: dict(value=v, default=getattr(default, k), why=WHY[k])
               for k, v in asdict(main_method).items() if k in WHY and v != getattr(default, k)}
    report = dict(
        analysis="fmnist-watermark",
        command=command or f"shallowmark analyze fmnist-watermark --out {out}",
        model=dict(kind="generalizing (regimes.generalizing_model)", n_train=len(train),
                   train_config=asdict(model.config), parameters=model.parameters,
                   final_loss=round(model.final_loss, 5), backend=backend.name,
                   latent_shape=list(backend.latent_shape), scheduler_config=backend.scheduler_config),
        data=dict(generated=len(seeds), seeds=[seeds[0], seeds[-1]], real_negatives=len(real),
                  real_from="held-out test split (not among the training images)",
                  attacks_applied_to="the grey image (channel 0 of the attacked RGB copy)"),
        key=dict(key_id=key.key_id, source="bench_keys(1, 'shallow-diffuse'): the benchmark's first fixed key",
                 rings=f"{cfg.inner_radius}..{cfg.radius}", dims=geom.dims, complex=main_method.complex_key),
        config=dict(asdict(replace(cfg, regimes=None)), regimes=dict(
            models=[asdict(m) for m in cfg.regimes.models], steps=cfg.regimes.steps, batch=cfg.regimes.batch,
            lr=cfg.regimes.lr, largest_n=cfg.regimes.sizes[-1], data_dir=cfg.regimes.data_dir,
            cache_dir=str(cfg.regimes.resolved_cache()))),
        method_config=asdict(main_method), changed_from_default=changed, ring_spectrum=spectrum,
        attacks=labels, runs=runs, figures=figures, timings_s=timings,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads, niceness {os.nice(0)}, load average {load:.1f} at the start")
    report["reading"] = _reading(report)
    write_report(out, report, _markdown(report))
    return report


# ----------------------------------------------------------------------------------------------
# Reading, figures, markdown
# ----------------------------------------------------------------------------------------------

def _clean_label(labels) -> str:
    return "clean" if "clean" in labels else labels[0]


#: The reading names the highest-fidelity run whose TPR at 1 % FPR stays at or above this under every attack.
ROBUST_TPR = 0.9


def _reading(rep: dict) -> dict:
    """The figures the text quotes, picked from the runs by the rules written here (no number is
    set by hand)."""
    main = rep["runs"][0]
    clean = _clean_label(rep["attacks"])
    det = main["detection"]
    worst = min(rep["attacks"], key=lambda a: (det[a]["both"]["tpr_at_1pct_fpr"], det[a]["both"]["auc"]))

    def worst_tpr(run):
        return min(run["detection"][a]["both"]["tpr_at_1pct_fpr"] for a in rep["attacks"])

    robust = [r for r in rep["runs"] if worst_tpr(r) >= ROBUST_TPR]
    best = max(robust, key=lambda r: r["fidelity"]["psnr_mean"]) if robust else None
    hardest = min(rep["runs"], key=lambda r: r["detection"][clean]["both"]["auc"])
    # every (t*, attack, negative set) the verdict was calibrated on (the strength does not enter:
    # the negatives and the key's direction are the same)
    flagged = {(r["t_star"], a, n): r["detection"][a][n]["flagged_at_target"]
               for r in rep["runs"] for a in rep["attacks"] for n in ("generated", "real")}
    top = max(flagged, key=lambda k: flagged[k]["value"])
    return dict(
        clean=clean,
        attack_lowers=det[worst]["both"]["tpr_at_1pct_fpr"] < det[clean]["both"]["tpr_at_1pct_fpr"]
        or det[worst]["both"]["auc"] < det[clean]["both"]["auc"],
        hardest=dict(t_star=hardest["t_star"], strength=hardest["strength"], auc={
            a: [hardest["detection"][a]["real"]["auc"], hardest["detection"][a]["generated"]["auc"]]
            for a in rep["attacks"]}),
        flagged_range=[min(v["value"] for v in flagged.values()), flagged[top]["value"]],
        flagged_top=dict(t_star=top[0], attack=top[1], negatives=top[2], **flagged[top]),
        flagged_cells=len(flagged),
        main=dict(t_star=main["t_star"], strength=main["strength"], psnr=main["fidelity"]["psnr_mean"],
                  ssim=main["fidelity"]["ssim_mean"], clean_auc=det[clean]["both"]["auc"],
                  clean_tpr=det[clean]["both"]["tpr_at_1pct_fpr"],
                  reaching=main["change_reaching_image"]["median"], jacobian=main["jacobian"]),
        worst_attack=dict(attack=worst, auc=det[worst]["both"]["auc"], tpr=det[worst]["both"]["tpr_at_1pct_fpr"]),
        best_robust=None if best is None else dict(
            t_star=best["t_star"], strength=best["strength"], psnr=best["fidelity"]["psnr_mean"],
            ssim=best["fidelity"]["ssim_mean"], worst_tpr=worst_tpr(best)),
        flagged_generated=det[clean]["generated"]["flagged_at_target"],
        flagged_real=det[clean]["real"]["flagged_at_target"])


def _plot_samples(shown: dict, cfg: FmnistWatermarkConfig, real: np.ndarray, path: Path) -> None:
    """Rows: the unwatermarked twins, then per run the watermarked images and the difference (×2,
    grey = 0); a row of real test images for comparison."""
    rows = [("unwatermarked (same seeds)", shown[cfg.runs()[0]]["ref"])]
    for t_star, strength in cfg.runs():
        s = shown[(t_star, strength)]
        diff = np.clip(128 + 2 * (s["wm"].astype(np.int16) - s["ref"].astype(np.int16)), 0, 255).astype(np.uint8)
        rows += [(f"watermarked, t* = {t_star}T, s = {strength}", s["wm"]), ("difference ×2", diff)]
    rows.append(("real test images", real))
    fig = pyplot().figure(figsize=(1.0 * cfg.figure_samples + 2.2, 1.05 * len(rows)))
    for i, (title, ims) in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, i + 1)
        ax.imshow(tile(ims, len(ims)), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Shallow Diffuse on the Fashion-MNIST model (s: key strength)", fontsize=9)
    save_figure(fig, path)


def _plot_p_values(pvals: dict, labels, cfg: FmnistWatermarkConfig, path: Path) -> None:
    cols = min(4, len(labels))
    nrows = -(-len(labels) // cols)
    fig = pyplot().figure(figsize=(3.0 * cols, 2.4 * nrows))
    for i, label in enumerate(labels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        data = {k: -np.log10(np.clip(v, 1e-300, 1.0)) for k, v in pvals[label].items()}
        top = max(2.5, float(np.percentile(np.concatenate(list(data.values())), 99)))
        bins = np.linspace(0, top, 30)
        for name, color in (("generated", "tab:blue"), ("real", "tab:green"), ("watermarked", "tab:red")):
            ax.hist(np.clip(data[name], 0, top), bins=bins, alpha=0.55, color=color, label=name)
        ax.axvline(-np.log10(cfg.target_fpr), color="k", lw=0.8, ls="--")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("−log10 p", fontsize=8)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"p-values at t* = {cfg.t_stars[0]}T, strength {cfg.strengths[0]} (dashed: target "
                 f"{cfg.target_fpr})", fontsize=9)
    save_figure(fig, path)


def _plot_tradeoff(runs, labels, path: Path) -> None:
    fig = pyplot().figure(figsize=(5.2, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    colors = pyplot().get_cmap("tab10")
    for i, r in enumerate(runs):
        x = r["fidelity"]["psnr_mean"]
        tprs = [r["detection"][a]["both"]["tpr_at_1pct_fpr"] for a in labels]
        first = r["detection"][_clean_label(labels)]["both"]["tpr_at_1pct_fpr"]
        ax.plot([x, x], [min(tprs), first], color=colors(i), lw=0.8, zorder=1)
        ax.scatter([x], [first], color=colors(i), zorder=2, label=f"t* = {r['t_star']}T, s = {r['strength']}")
        ax.scatter([x], [min(tprs)], color=colors(i), marker="v", zorder=2)
    ax.set_title("dot: clean; triangle: the run's worst attack", fontsize=8)
    ax.set_xlabel("PSNR vs same-seed unwatermarked (dB)")
    ax.set_ylabel("TPR at 1 % FPR (both negative sets)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _ci(p: dict) -> str:
    return f"{p['value']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"


def _markdown(rep: dict) -> str:
    cfg, rd, main = rep["config"], rep["reading"], rep["runs"][0]
    m = rep["model"]
    usable = [s for s in rep["ring_spectrum"] if s["ring"] <= cfg["radius"]]
    below = [s for s in usable if s["signal_at_t_star"] < s["noise_at_t_star"]]
    ratios = [s["signal_at_t_star"] / s["noise_at_t_star"] for s in usable if s["ring"] >= cfg["inner_radius"]]

    def gen_ratio(rows):
        v = [s["power_generated"] / s["power"] for s in rows]
        return f"{min(v):.2f}-{max(v):.2f}"
    lines = [
        "# Shallow Diffuse on a generalizing model (Fashion-MNIST, pixel space)", "",
        "Made by:", "", "```", rep["command"], "```", "",
        "## Reading", "",
        f"- Model: the generalizing Fashion-MNIST MLP ({m['train_config']['width']}×{m['train_config']['depth']}, "
        f"{m['parameters']:,} parameters, trained on N = {m['n_train']:,} images), no autoencoder: the key is "
        "written into the 28×28 pixels of x_t* itself.",
        f"- Main run (t* = {rd['main']['t_star']}T, strength {rd['main']['strength']}): PSNR "
        f"**{rd['main']['psnr']} dB**, SSIM **{rd['main']['ssim']}** against the same-seed unwatermarked image; "
        f"{rd['clean']}, AUC **{rd['main']['clean_auc']}** and TPR at 1 % FPR **{rd['main']['clean_tpr']}** against "
        "both negative sets together.",
        (f"- Weakest attack of the main run: {rd['worst_attack']['attack']} (AUC {rd['worst_attack']['auc']}, "
         f"TPR at 1 % FPR {rd['worst_attack']['tpr']})." if rd["attack_lowers"] else
         "- No attack lowers the main run's AUC or TPR at 1 % FPR below its clean figures."),
        "- " + (f"Highest fidelity with TPR at 1 % FPR ≥ {ROBUST_TPR} under every attack: t* = "
                f"{rd['best_robust']['t_star']}T, strength {rd['best_robust']['strength']}, PSNR "
                f"**{rd['best_robust']['psnr']} dB**, SSIM {rd['best_robust']['ssim']} (worst TPR "
                f"{rd['best_robust']['worst_tpr']})." if rd["best_robust"] else
                f"No run keeps TPR at 1 % FPR ≥ {ROBUST_TPR} under every attack."),
        f"- How much the image changes: a median {rd['main']['reaching']:.2f} of the injected change's norm "
        "is still there at t = 0 in the main run." + (
            f" The Jacobian of x̂0 at x_t* has 99 %-energy rank {rd['main']['jacobian']['rank_ratio']:.2f}·784, "
            f"and {rd['main']['jacobian']['share_in_top']:.2f} of the injected change's energy lies in that top "
            f"subspace (a random direction: {rd['main']['jacobian']['rank_ratio']:.2f}), so the injection "
            + ("lands mostly in the Jacobian's null space." if rd['main']['jacobian']['share_in_top'] < 0.5 else
               "does not land mostly in the Jacobian's null space here: the low-rank argument does not hold at "
               "this t* for this model, and the change reaches the image.")
            if rd["main"]["jacobian"] else ""),
        f"- Calibration of the verdict at target {cfg['target_fpr']} ({rd['clean']}, main t*): flagged "
        f"{_ci(rd['flagged_generated'])} of the unwatermarked generations and {_ci(rd['flagged_real'])} of the "
        f"real test images (share [95 % Wilson interval]). Over all {rd['flagged_cells']} cells (t*, attack, "
        f"negative set) the flagged share ranges {rd['flagged_range'][0]:.3f}-{rd['flagged_range'][1]:.3f}; the "
        f"highest, {rd['flagged_top']['attack']} on the {rd['flagged_top']['negatives']} negatives at t* = "
        f"{rd['flagged_top']['t_star']}T, is {_ci(rd['flagged_top'])} (the cells share images, so they are not "
        "independent trials).",
        f"- Real against generated negatives, AUC (real / generated) in the run with the lowest clean AUC (t* = "
        f"{rd['hardest']['t_star']}T, strength {rd['hardest']['strength']}): "
        + ", ".join(f"{a} {v[0]:.3f} / {v[1]:.3f}" for a, v in rd["hardest"]["auc"].items()) + ".",
        "- The trade-off over t* and strength is in the fidelity and detection tables below and in "
        "`tradeoff.png`; the injection's share in the Jacobian's top subspace is in the Jacobian section.",
        "",
        "## Setup", "",
        f"- Generated: {rep['data']['generated']} seeds ({rep['data']['seeds'][0]}..{rep['data']['seeds'][1]}), "
        "each watermarked and as its same-seed unwatermarked twin (plain DDIM from the same x_T; the twins are "
        "the generated negatives).",
        f"- Real negatives: {rep['data']['real_negatives']} images of the {rep['data']['real_from']}.",
        f"- Attacks on {rep['data']['attacks_applied_to']}: " + ", ".join(f"`{a}`" for a in rep["attacks"])
        + " (`shallowmark.attacks` strengths: noise std on [0, 1], blur radius in pixels, JPEG quality, "
          "jitter: brightness factor uniform in [1 − b, 1 + b]).",
        f"- Key: {rep['key']['source']} ({rep['key']['key_id']}), rings {rep['key']['rings']}, complex values, "
        f"{rep['key']['dims']} numbers in the statistic.",
        f"- Model: {m['kind']}, train config `{m['train_config']}`, final loss {m['final_loss']}, backend "
        f"`{m['backend']}` (latents {tuple(m['latent_shape'])}; scheduler `{m['scheduler_config']}`).",
        "- Scores: the ring statistic's cosine for ROC, its exact p-value for the verdict (one key, so no "
        "correction). TPR at 1 % FPR is the highest TPR among thresholds with FPR ≤ 1 % on that negative set.",
        "",
        "## Shallow Diffuse parameters", "",
        "Every option of `ShallowDiffuseConfig` in the main run (the other runs change `t_star` and `strength`):", "",
        "```", ", ".join(f"{k}={v!r}" for k, v in rep["method_config"].items()), "```", "",
        "Changed from the defaults, and why:", "",
    ]
    lines += markdown_table(["option", "here", "default", "why"],
                            [[k, v["value"], v["default"], v["why"]] for k, v in rep["changed_from_default"].items()])
    lines += ["", f"`channel`: {WHY['channel']}. `radius`: {WHY['radius']}. `inner_radius`: {WHY['inner_radius']}.",
              "", f"Ring spectrum of the training images at the main t* (ᾱ = {main['alpha_bar']}): the rule the "
                  "defaults were chosen by on tiny-ldm puts the key where the signal ᾱ·P(r) of x_t* is below the "
                  "noise 1 − ᾱ; among the rings 0.." + str(cfg["radius"]) + " a 28² key may use, that holds for "
                  + (("ring " if len(below) == 1 else "rings ") + ", ".join(str(s["ring"]) for s in below)
                     if below else "none")
                  + ", so the key also takes the rings just "
                    f"inside: over its rings {cfg['inner_radius']}..{cfg['radius']} the signal is "
                  + f"{min(ratios):.1f}-{max(ratios):.1f} times the noise.", ""]
    lines += markdown_table(
        ["ring r", "key", "bins", "cycles/px", "P(r)", "ᾱ·P(r)", "1 − ᾱ", "P(r), generations"],
        [[s["ring"], "yes" if cfg["inner_radius"] <= s["ring"] <= cfg["radius"] else "", s["bins"],
          s["cycles_per_pixel"], s["power"], s["signal_at_t_star"], s["noise_at_t_star"], s["power_generated"]]
         for s in rep["ring_spectrum"]], "rcrrrrrr")
    key_rows = [s for s in usable if s["ring"] >= cfg["inner_radius"]]
    outer = [s for s in rep["ring_spectrum"] if s["ring"] > cfg["radius"]]
    lines += ["", "P(r): mean power per bin of the training images; the last column: of the unwatermarked "
                  f"generations, {gen_ratio(key_rows)} times the training images' power on the key's rings"
              + (f" and {gen_ratio(outer)} times on the rings beyond them." if outer else ".")]
    lines += ["", "## Fidelity", "", "Watermarked against its same-seed unwatermarked twin (uint8, 28×28 grey); "
              "\"reaching\": ‖x0_wm − x0‖ / ‖x_t*,wm − x_t*‖, the share of the injected change left in the image.", ""]
    lines += markdown_table(
        ["t*", "strength", "PSNR mean (dB)", "median", "5th pct", "SSIM mean", "5th pct", "reaching (median)"],
        [[r["t_star"], r["strength"], r["fidelity"]["psnr_mean"], r["fidelity"]["psnr_median"],
          r["fidelity"]["psnr_p5"], r["fidelity"]["ssim_mean"], r["fidelity"]["ssim_p5"],
          r["change_reaching_image"]["median"]] for r in rep["runs"]], "rrrrrrrr")
    lines += ["", "## Detection", "",
              "Per run and attack: AUC and TPR at 1 % FPR against the unwatermarked generations (gen), the real "
              "test images (real) and both; the verdict's TPR at its p ≤ target rule, and the share of each "
              "negative set it flags.", ""]
    for r in rep["runs"]:
        lines += [f"### t* = {r['t_star']}T (step {r['timestep']} of {fmnist.T}, ᾱ = {r['alpha_bar']}), strength "
                  f"{r['strength']}", ""]
        lines += markdown_table(
            ["attack", "AUC gen", "AUC real", "AUC both", "TPR@1% gen", "TPR@1% real", "TPR@1% both",
             "median log10 p", "verdict TPR", "flagged gen", "flagged real"],
            [[a, d["generated"]["auc"], d["real"]["auc"], d["both"]["auc"], d["generated"]["tpr_at_1pct_fpr"],
              d["real"]["tpr_at_1pct_fpr"], d["both"]["tpr_at_1pct_fpr"], d["median_log10_p"],
              f"{d['tpr_at_target']['value']:.3f}", f"{d['generated']['flagged_at_target']['value']:.3f}",
              f"{d['real']['flagged_at_target']['value']:.3f}"] for a, d in r["detection"].items()], "lrrrrrrrrrr")
        lines.append("")
    jrows = [r for r in rep["runs"] if r["jacobian"]]
    if jrows:
        lines += ["## Jacobian at x_t*", "",
                  f"The exact 784×784 Jacobian J of x̂0 at the first {jrows[0]['jacobian']['images']} seeds' x_t*: "
                  "its rank by the 99 %-energy rule (share of 784), the share of the injected change δ in J's "
                  "top-k right singular subspace (a random direction's share is the rank ratio), and ‖Jδ‖/‖δ‖ "
                  "against the root-mean-square gain ‖J‖_F/√784 of a random direction.", ""]
        lines += markdown_table(["t*", "rank ratio", "δ's share in top-k", "‖Jδ‖/‖δ‖", "RMS gain", "σ_max", "s"],
                                [[r["t_star"], r["jacobian"]["rank_ratio"], r["jacobian"]["share_in_top"],
                                  r["jacobian"]["gain"], r["jacobian"]["rms_gain"], r["jacobian"]["sigma_max"],
                                  r["jacobian"]["seconds"]] for r in jrows], "rrrrrrr")
        lines.append("")
    lines += ["## Limits", "",
              "- One key (the benchmark's first), the server scenario only (generation); watermarking existing "
              "images (`embed`) is not measured here.",
              "- No geometric attack: the synchronisation template, the shift and the dihedral searches are off "
              "(see the table above), so a flip, crop or rotation would not be undone.",
              f"- {cfg['samples']} positives and {cfg['samples']} + {cfg['real_negatives']} negatives: TPR at 1 % "
              "FPR rests on the top 1 % of each negative set; TPR at 0.1 % FPR (report.json) on a handful of images.",
              "- The model is a 784-dimensional MLP; nothing here says how a U-Net or a latent model of the same "
              "data would behave.", "",
              "## Timings", "", f"{rep['machine']}.", ""]
    lines += markdown_table(["step", "seconds"], [[k, v] for k, v in rep["timings_s"].items()], "lr")
    lines += ["", "Per run (generation of all samples with their twins; inversion and scoring of every attack):", ""]
    lines += markdown_table(["t*", "strength", "generate (s)", "detect (s)"],
                            [[r["t_star"], r["strength"], r["seconds"]["generate"], r["seconds"]["detect"]]
                             for r in rep["runs"]], "rrrr")
    lines += ["", "## Figures", "", f"![samples]({rep['figures']['samples']})", "",
              f"![p-values]({rep['figures']['p_values']})", "", f"![trade-off]({rep['figures']['tradeoff']})", ""]
    return "\n".join(lines)
