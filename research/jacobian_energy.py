"""``shallowmark analyze jacobian-energy``: the posterior-mean Jacobian's rank by the papers' own
rule, on a model that generalizes and on tiny-ldm at its full latent size.

The rank of J = ∂x̂0/∂x_t is the smallest k whose top-k singular values hold 99 % of its Frobenius
norm, √Σ_{i≤k}σ_i² > 0.99·√Σσ² (:func:`~shallowmark.core.jacobian.energy_rank`), the rule of the
generalizability work's Jacobian code; ``jacobian-rank`` counts σ_i > tol·σ_max instead, which the
report also gives for comparison.

- **Fashion-MNIST** (d = 784): exact dense Jacobians of the generalizing model (the larger model of
  ``analyze regimes`` trained on the largest N, :func:`~shallowmark.research.regimes.generalizing_model`)
  at held-out test images, across t; the same for that model trained on the smallest N of
  ``analyze regimes`` (16 images) for contrast. The randomized estimator below is checked against the exact rank here.
- **tiny-ldm at full size** (d = 4·64·64 = 16 384, too large for a dense Jacobian on a CPU):
  stochastic Lanczos quadrature of JᵀJ (:func:`~shallowmark.core.jacobian.lanczos_spectrum`), whose
  Gauss nodes and weights estimate the whole spectrum, Σσ² (Hutchinson's estimate) included, from
  JVP/VJP products only; the energy rank is read off that estimated spectrum, with a bootstrap over
  the probes. :func:`~shallowmark.core.t_star.t_star_from_curve`, the rule behind ``t_star="auto"``,
  is applied to the resulting curve and compared with the automatic t* of the 16×16 crops.
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

from shallowmark.core.jacobian import DEFAULT_ENERGY, energy_rank, lanczos_spectrum
from shallowmark.core.t_star import (
    AUTO_FRACTIONS,
    AUTO_PHOTOS,
    AUTO_PROBES,
    AUTO_STEPS,
    DEFAULT_MARGIN,
    DEFAULT_TOL,
    energy_profile,
    photo_latents,
    profile_noise,
    t_star_from_curve,
)
from shallowmark.errors import InvalidParameterError
from shallowmark.reports import markdown_table, pyplot, save_figure, write_report
from shallowmark.research import fmnist
from shallowmark.research.regimes import RegimesConfig, generalizing_model, trained

@dataclass(frozen=True)
class JacobianEnergyConfig:
    """Everything the analysis depends on (all of it goes into report.json).

    Attributes:
        energy: the rule's share of ‖J‖_F (0.99 in the papers).
        fmnist_images: held-out test images at which the dense Jacobians are taken.
        fmnist_fractions: t/T of the Fashion-MNIST profile (t = round(f·1000)).
        check_probes, check_steps: the randomized estimator, run on the first Fashion-MNIST image to
            compare it with the exact rank.
        ldm_photos: bundled photos whose tiny-ldm latents are profiled at full size.
        ldm_fractions: t/T of that profile (on the ``num_steps`` DDIM grid).
        ldm_probes, ldm_steps: Lanczos probes and steps per (photo, t).
        num_steps: DDIM grid of tiny-ldm (as Shallow Diffuse uses).
        margin: the t* rule's margin (as ``t_star="auto"``).
        regimes: the Fashion-MNIST models and data (``analyze regimes``' config; its cache is shared).
        seed: noises and probes.
    """

    energy: float = DEFAULT_ENERGY
    fmnist_images: int = 8
    fmnist_fractions: tuple = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8,
                               0.9, 0.97)
    check_probes: int = 8
    check_steps: int = 40
    # the defaults are ``t_star="auto"``'s recipe, so the rule's answer on this curve is what it returns
    ldm_photos: tuple = AUTO_PHOTOS
    ldm_fractions: tuple = AUTO_FRACTIONS
    ldm_probes: int = AUTO_PROBES
    ldm_steps: int = AUTO_STEPS
    num_steps: int = 50
    margin: float = DEFAULT_MARGIN
    regimes: RegimesConfig = field(default_factory=RegimesConfig)
    seed: int = 0

    @classmethod
    def quick(cls, regimes: RegimesConfig | None = None, **kw) -> "JacobianEnergyConfig":
        """Two images, four t, a short Lanczos on one tiny-ldm t: seconds to a minute, for the tests."""
        base = dict(fmnist_images=2, fmnist_fractions=(0.1, 0.3, 0.5, 0.8), check_probes=4, check_steps=12,
                    ldm_fractions=(0.3,), ldm_probes=2, ldm_steps=4, regimes=regimes or RegimesConfig.quick())
        base.update(kw)
        return cls(**base)

    def check(self) -> None:
        if not 0.0 < float(self.energy) < 1.0:
            raise InvalidParameterError(f"energy must be in (0, 1); got {self.energy!r}")
        for name in ("fmnist_images", "check_probes", "check_steps", "ldm_probes", "ldm_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidParameterError(f"{name} must be a positive integer; got {v!r}")
        for name in ("fmnist_fractions", "ldm_fractions"):
            v = tuple(getattr(self, name))
            if not v or any(not 0.0 < float(f) < 1.0 for f in v) or list(v) != sorted(set(v)):
                raise InvalidParameterError(f"{name} must be increasing and distinct, each in (0, 1); got {v!r}")
        if not 0.0 <= float(self.margin) < 1.0:
            raise InvalidParameterError(f"margin must be in [0, 1); got {self.margin!r}")
        self.regimes.check()


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: exact dense Jacobians
# ----------------------------------------------------------------------------------------------

def fmnist_timestep(fraction: float) -> int:
    return max(1, min(fmnist.T, round(float(fraction) * fmnist.T)))


def dense_fmnist_jacobian(denoiser: fmnist.NetDenoiser, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """The exact 784×784 Jacobian of x̂0 at one x_t (1, 1, 28, 28), all rows in one batched pass."""
    f = lambda z: denoiser.x0_grad(z.view(1, 1, fmnist.SIDE, fmnist.SIDE), t).flatten()  # noqa: E731
    return torch.autograd.functional.jacobian(f, x_t.flatten().detach(), vectorize=True)


def fmnist_jtj(denoiser: fmnist.NetDenoiser, x_t: torch.Tensor, t: int):
    """v ↦ JᵀJ v for the Fashion-MNIST model, by autograd's JVP and VJP."""
    f = lambda z: denoiser.x0_grad(z, t)  # noqa: E731

    def matvec(v: torch.Tensor) -> torch.Tensor:
        xb = x_t.expand(v.shape[0], *x_t.shape[1:]).detach()
        _, jv = torch.autograd.functional.jvp(f, xb, v.to(xb.dtype))
        _, jtjv = torch.autograd.functional.vjp(f, xb, jv)
        return jtjv
    return matvec


def _noised(den: fmnist.NetDenoiser, x0: torch.Tensor, noise: torch.Tensor, fraction: float) -> tuple[int, torch.Tensor]:
    """(t, x_t) at ``fraction`` of T for clean images ``x0`` and their noise."""
    t = fmnist_timestep(fraction)
    ab = float(den.schedule.ab(t))
    return t, ab ** 0.5 * x0 + (1 - ab) ** 0.5 * noise


def fmnist_profile(model: fmnist.TrainedModel, images: np.ndarray, fractions, energy: float, seed: int,
                   log: Callable[[str], None]) -> dict:
    """Energy and tolerance rank ratios per (image, t), with the spectra's σ_max."""
    den = fmnist.NetDenoiser(model.net)
    x0 = fmnist.to_tensor(images)
    d = fmnist.DIM
    e_r, tol_r, smax, spectra0 = [], [], [], []
    t0 = time.perf_counter()
    for i in range(len(x0)):
        noise = profile_noise(x0.shape[1:], seed, i)[None]
        er, tr, sm = [], [], []
        for f in fractions:
            t, x_t = _noised(den, x0[i:i + 1], noise, f)
            s = torch.linalg.svdvals(dense_fmnist_jacobian(den, x_t, t).double())
            er.append(energy_rank(s, energy) / d)
            tr.append(float((s > DEFAULT_TOL * s[0]).sum()) / d)
            sm.append(float(s[0]))
            if i == 0:
                spectra0.append((s / s[0]).tolist())
        e_r.append(er)
        tol_r.append(tr)
        smax.append(sm)
        log(f"  image {i}: energy rank ratio " + " ".join(f"{v:.3f}" for v in er)
            + f" [{time.perf_counter() - t0:.0f} s]")
    return dict(n=model.n_train, energy_ratio=np.array(e_r), tol_ratio=np.array(tol_r), sigma_max=np.array(smax),
                spectra_image0=spectra0, seconds=time.perf_counter() - t0)


def gaussian_ratios(images: np.ndarray, fractions, energy: float) -> list[float]:
    """The energy rank ratio of the best *linear* denoiser of ``images`` (the Gaussian with their mean
    and covariance Σ): J = √ᾱ Σ (ᾱΣ + (1 − ᾱ) I)⁻¹ at every x_t, singular values √ᾱλ/(ᾱλ + 1 − ᾱ)
    over Σ's eigenvalues λ. A generalizing denoiser is close to it (and lower where the data are
    clustered), so it is the reference the trained model is read against."""
    x = fmnist.to_tensor(images).flatten(1).double()
    lam = torch.linalg.eigvalsh(torch.cov(x.T)).clamp_min(0)
    sch = fmnist.Schedule()
    out = []
    for f in fractions:
        ab = float(sch.ab(fmnist_timestep(f)))
        out.append(energy_rank(ab ** 0.5 * lam / (ab * lam + 1 - ab), energy) / fmnist.DIM)
    return out


def estimator_check(model: fmnist.TrainedModel, image: np.ndarray, exact: dict, fractions,
                    cfg: JacobianEnergyConfig) -> dict:
    """The randomized estimate against the exact energy rank on one Fashion-MNIST image: image 0 of
    the :func:`fmnist_profile` ``exact`` (the same x_t, so its dense spectra are not computed again)."""
    den = fmnist.NetDenoiser(model.net)
    x0 = fmnist.to_tensor(image[None])
    noise = profile_noise(x0.shape[1:], cfg.seed, 0)[None]
    rows = []
    for j, f in enumerate(fractions):
        t, x_t = _noised(den, x0, noise, f)
        est = lanczos_spectrum(fmnist_jtj(den, x_t, t), tuple(x_t.shape[1:]), probes=cfg.check_probes,
                               steps=cfg.check_steps, seed=cfg.seed, dtype=torch.float32)
        energy = float(np.sum(np.square(exact["spectra_image0"][j]))) * float(exact["sigma_max"][0][j]) ** 2
        rows.append(dict(fraction=f, exact=float(exact["energy_ratio"][0][j]),
                         estimate=est.energy_rank(cfg.energy) / fmnist.DIM,
                         estimate_sd=est.energy_rank_spread(cfg.energy, seed=cfg.seed) / fmnist.DIM,
                         energy_exact=energy, energy_estimate=est.total_energy()))
    return dict(probes=cfg.check_probes, steps=cfg.check_steps, rows=rows)


# ----------------------------------------------------------------------------------------------
# tiny-ldm at full size: stochastic Lanczos quadrature
# ----------------------------------------------------------------------------------------------

def ldm_profile(backend, cfg: JacobianEnergyConfig, log: Callable[[str], None]) -> dict:
    x0 = photo_latents(backend, cfg.ldm_photos)
    prof = energy_profile(backend, x0, fractions=cfg.ldm_fractions, num_steps=cfg.num_steps, energy=cfg.energy,
                          probes=cfg.ldm_probes, steps=cfg.ldm_steps, seed=cfg.seed, names=cfg.ldm_photos,
                          log=lambda m: log("  tiny-ldm full size" + m[1:]))
    # t_star="auto" runs exactly this recipe (same photos, t, probes, steps, seeds and rule)
    auto_recipe = (tuple(cfg.ldm_photos) == tuple(AUTO_PHOTOS) and tuple(cfg.ldm_fractions) == tuple(AUTO_FRACTIONS)
                   and cfg.ldm_probes == AUTO_PROBES and cfg.ldm_steps == AUTO_STEPS and cfg.seed == 0
                   and cfg.energy == DEFAULT_ENERGY and cfg.margin == DEFAULT_MARGIN)
    return dict(d=prof.dim, shape=list(prof.jacobian_shape), fractions=list(prof.fractions),
                positions=list(prof.positions), timesteps=list(prof.timesteps),
                energy_ratio=prof.ratios.tolist(), energy_ratio_sd=prof.ratio_sd.tolist(),
                mean_square_gain=prof.mean_square_gain.tolist(),
                t_star_rule=t_star_from_curve(prof.positions, prof.mean(), prof.num_steps, cfg.margin),
                is_auto_recipe=auto_recipe, seconds=prof.seconds)


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------

def middle_range(fractions, ratios, below: float = 0.1) -> Optional[tuple[float, float]]:
    """The longest run of consecutive measured t whose ratio is below ``below`` (None if none)."""
    best, cur = None, None
    for f, r in zip(fractions, ratios):
        if r < below:
            cur = (cur[0], f) if cur else (f, f)
            if best is None or (cur[1] - cur[0]) > (best[1] - best[0]):
                best = cur
        else:
            cur = None
    return best


def _r(x, nd=4):
    return np.round(np.asarray(x, dtype=float), nd).tolist()


def run_jacobian_energy_analysis(out_dir, config: JacobianEnergyConfig | None = None, *, backend=None,
                                 command: str | None = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Both profiles, the estimator check, the t* comparison; writes report.json, report.md, PNGs.
    ``backend``: tiny-ldm unless given."""
    cfg = config or JacobianEnergyConfig()
    cfg.check()
    log = log or (lambda m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings = {}

    model, train = generalizing_model(cfg.regimes, log)
    rc = cfg.regimes
    memo_images = fmnist.subset(fmnist.load_fashion_mnist("train", rc.data_dir), rc.sizes[0], rc.seed)
    memo = trained(memo_images, rc.models[-1].train_config(rc.steps, rc.batch, rc.lr), rc.resolved_cache(), log)
    test = fmnist.load_fashion_mnist("test", rc.data_dir)
    pick = test[np.random.default_rng(cfg.seed).choice(len(test), min(cfg.fmnist_images, len(test)), replace=False)]

    t = time.perf_counter()
    log(f"Fashion-MNIST, generalizing model (N = {len(train)})")
    gen = fmnist_profile(model, pick, cfg.fmnist_fractions, cfg.energy, cfg.seed, log)
    log(f"Fashion-MNIST, smallest-N model (N = {len(memo_images)})")
    mem = fmnist_profile(memo, pick, cfg.fmnist_fractions, cfg.energy, cfg.seed, log)
    timings["fmnist"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    check = estimator_check(model, pick[0], gen, cfg.fmnist_fractions, cfg)
    timings["estimator_check"] = round(time.perf_counter() - t, 1)

    if backend is None:
        from shallowmark.core.backends import load_backend

        backend = load_backend("tiny-ldm")
    t = time.perf_counter()
    ldm = ldm_profile(backend, cfg, log)
    timings["tiny_ldm_full_size"] = round(time.perf_counter() - t, 1)
    timings["total"] = round(time.perf_counter() - t_all, 1)

    fr = list(cfg.fmnist_fractions)
    gauss = gaussian_ratios(train, fr, cfg.energy)
    gen_mean = gen["energy_ratio"].mean(0)
    rows = dict(
        generalizing=dict(n_train=len(train), energy_ratio_mean=_r(gen_mean), energy_ratio_sd=_r(gen["energy_ratio"].std(0)),
                          tol_ratio_mean=_r(gen["tol_ratio"].mean(0)), sigma_max_mean=_r(gen["sigma_max"].mean(0)),
                          final_loss=round(model.final_loss, 5), below_0_1=middle_range(fr, gen_mean),
                          minimum=float(gen_mean.min()), minimum_at=fr[int(np.argmin(gen_mean))]),
        smallest_n=dict(n_train=len(memo_images), energy_ratio_mean=_r(mem["energy_ratio"].mean(0)),
                        energy_ratio_sd=_r(mem["energy_ratio"].std(0)), tol_ratio_mean=_r(mem["tol_ratio"].mean(0)),
                        final_loss=round(memo.final_loss, 5),
                        below_0_1=middle_range(fr, mem["energy_ratio"].mean(0))))
    figures = dict(profiles="energy_rank.png", spectra="spectra.png")
    _plot_profiles(fr, gen, mem, gauss, check, ldm, out / figures["profiles"])
    _plot_spectra(fr, gen["spectra_image0"], out / figures["spectra"])
    report = dict(
        analysis="jacobian-energy", command=command or f"shallowmark analyze jacobian-energy --out {out}",
        rule=f"rank = smallest k with sqrt(sum_(i<=k) s_i^2) > {cfg.energy} * sqrt(sum s_i^2); ratio = rank / d",
        config=dict(asdict(replace(cfg, regimes=None)), regimes=dict(
            models=[asdict(m) for m in rc.models], steps=rc.steps, batch=rc.batch, lr=rc.lr, largest_n=rc.sizes[-1])),
        fmnist=dict(d=fmnist.DIM, fractions=fr, gaussian_ratio=_r(gauss), gaussian_below_0_1=middle_range(fr, gauss), timesteps=[fmnist_timestep(f) for f in fr], images=len(pick),
                    images_from="held-out test split", **rows),
        estimator_check=check, tiny_ldm=ldm, figures=figures, timings_s=timings,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads")
    write_report(out, report, _markdown(report))
    return report


# ----------------------------------------------------------------------------------------------
# Figures and markdown
# ----------------------------------------------------------------------------------------------

def _plot_profiles(fr, gen, mem, gauss, check, ldm, path: Path) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for prof, label in ((gen, f"N = {gen['n']}"), (mem, f"N = {mem['n']}")):
        m, s = prof["energy_ratio"].mean(0), prof["energy_ratio"].std(0)
        line, = a1.plot(fr, m, marker="o", ms=3, label=f"{label}: 99 % energy")
        a1.fill_between(fr, m - s, m + s, alpha=0.2, color=line.get_color())
        a1.plot(fr, prof["tol_ratio"].mean(0), ls=":", color=line.get_color(), label=f"{label}: σ > 0.01 σ_max")
    a1.plot(fr, gauss, color="grey", lw=1.5, label="best linear (Gaussian) denoiser of the training set")
    a1.errorbar([r["fraction"] for r in check["rows"]], [r["estimate"] for r in check["rows"]],
                yerr=[r["estimate_sd"] for r in check["rows"]], fmt="x", color="k", ms=4,
                label=f"randomized estimate (image 0, {check['probes']} probes × {check['steps']} steps)")
    a1.axhline(0.1, color="grey", lw=0.8, ls="--")
    a1.set_title("Fashion-MNIST, d = 784, exact dense Jacobians", fontsize=9)
    a1.set_xlabel("t / T")
    a1.set_ylabel("rank ratio")
    a1.set_ylim(0, 1.02)
    a1.legend(fontsize=6)
    m = np.array(ldm["energy_ratio"]).mean(0)
    sd = np.array(ldm["energy_ratio_sd"]).mean(0)
    a2.errorbar(ldm["fractions"], m, yerr=sd, marker="o", ms=3, label="99 % energy, randomized (full size)")
    a2.axvline(ldm["t_star_rule"], color="C1", ls="--", lw=1, label=f"rule on this curve: t* = {ldm['t_star_rule']:.2f}")
    a2.set_title(f"tiny-ldm, d = {ldm['d']}, stochastic Lanczos quadrature", fontsize=9)
    a2.set_xlabel("t / T")
    a2.set_ylim(0, 1.02)
    a2.legend(fontsize=6)
    save_figure(fig, path)


def _plot_spectra(fr, spectra, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("viridis")
    for j, (f, s) in enumerate(zip(fr, spectra)):
        ax.semilogy(np.arange(1, len(s) + 1), s, color=cmap(j / max(1, len(fr) - 1)), lw=1, label=f"t/T {f:g}")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_max")
    ax.set_ylim(1e-5, 1.5)
    ax.set_title("Fashion-MNIST generalizing model, image 0", fontsize=9)
    ax.legend(fontsize=5, ncol=2)
    save_figure(fig, path)


def _range(r) -> str:
    return "none" if not r else f"t/T {r[0]:g}–{r[1]:g}"


def _markdown(rep: dict) -> str:
    fm, ck, ld, c = rep["fmnist"], rep["estimator_check"], rep["tiny_ldm"], rep["config"]
    g, m = fm["generalizing"], fm["smallest_n"]
    lines = ["# Rank of the posterior-mean Jacobian by the 99 % energy rule", "",
             f"Command: `{rep['command']}`  ", f"Machine: {rep['machine']}; total {rep['timings_s']['total']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in rep['timings_s'].items() if k != 'total')}).", "",
             f"Rule: {rep['rule']}. The σ > 0.01·σ_max count of `analyze jacobian-rank` is shown beside it.", "",
             "## Fashion-MNIST (exact)", "",
             f"Dense 784×784 Jacobians of x̂0(x_t) at {fm['images']} held-out test images, each with one seeded "
             f"noise shared across t. Generalizing model: the larger `analyze regimes` model "
             f"({c['regimes']['models'][-1]['width']}×{c['regimes']['models'][-1]['depth']} MLP) trained on "
             f"N = {g['n_train']}; beside it the same model trained on the smallest N, {m['n_train']}.", ""]
    lines += markdown_table(["t/T", "t", "generalizing: energy ratio (sd)", "generalizing: σ>0.01σ_max",
                             f"N = {m['n_train']}: energy ratio", f"N = {m['n_train']}: σ>0.01σ_max", "best linear denoiser"],
                            ([f"{f:g}", t, f"{a:.3f} ({s:.3f})", f"{b:.3f}", f"{x:.3f}", f"{y:.3f}", f"{z:.3f}"]
                             for f, t, a, s, b, x, y, z in zip(fm["fractions"], fm["timesteps"], g["energy_ratio_mean"],
                                                               g["energy_ratio_sd"], g["tol_ratio_mean"],
                                                               m["energy_ratio_mean"], m["tol_ratio_mean"],
                                                               fm["gaussian_ratio"])))
    lines += ["", f"Generalizing model: minimum {g['minimum']:.3f} at t/T = {g['minimum_at']:g}; below 0.1 over "
                  f"**{_range(g['below_0_1'])}** (goal: below 0.1 over a middle range). Smallest-N model: below 0.1 "
                  f"over {_range(m['below_0_1'])}. The best linear (Gaussian) denoiser of the same training "
                  f"images, J = √ᾱ Σ(ᾱΣ + (1 − ᾱ)I)⁻¹: below 0.1 over {_range(fm['gaussian_below_0_1'])}.", "",
              "## The randomized estimator against the exact rank", "",
              f"Stochastic Lanczos quadrature of JᵀJ, {ck['probes']} probes × {ck['steps']} steps, on image 0 of "
              "the generalizing model (sd: bootstrap over probes):", ""]
    lines += markdown_table(["t/T", "exact", "estimate ± sd", "Σσ² exact", "Σσ² estimate"],
                            ([f"{r['fraction']:g}", f"{r['exact']:.3f}", f"{r['estimate']:.3f} ± {r['estimate_sd']:.3f}",
                              f"{r['energy_exact']:.1f}", f"{r['energy_estimate']:.1f}"] for r in ck["rows"]))
    lines += ["", "## tiny-ldm at full size (randomized)", "",
              f"Latent {'×'.join(map(str, ld['shape']))} (d = {ld['d']}), photos {', '.join(c['ldm_photos'])}, "
              f"{c['ldm_probes']} probes × {c['ldm_steps']} Lanczos steps per t (each step one JVP and one VJP on a "
              "batch of the probes).", ""]
    mean = np.array(ld["energy_ratio"]).mean(0)
    sd = np.array(ld["energy_ratio_sd"]).mean(0)
    gain = np.array(ld["mean_square_gain"]).mean(0)
    lines += markdown_table(["t/T", "t", "energy ratio ± sd", "Σσ²/d"],
                            ([f"{f:.2f}", t, f"{a:.3f} ± {s:.3f}", f"{e:.4f}"]
                             for f, t, a, s, e in zip(ld["fractions"], ld["timesteps"], mean, sd, gain)))
    lines += ["", f"The t* rule (`t_star_from_curve`, margin {c['margin']}) on this curve gives **t* = "
                  f"{ld['t_star_rule']:.2f}**" + ("; this is the recipe `t_star=\"auto\"` runs, so it returns the same."
                                                  if ld.get("is_auto_recipe") else "."), "",
              f"![profiles]({rep['figures']['profiles']})", "", f"![spectra]({rep['figures']['spectra']})", ""]
    return "\n".join(lines) + "\n"
