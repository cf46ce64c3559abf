"""Two regimes of reproducibility on Fashion-MNIST (Zhang et al., ICML 2024): RP and GL against the
training-set size N, for two models that differ in width and seed but never in data.

For every N of :attr:`RegimesConfig.sizes` (nested subsets of the training split), both
:attr:`RegimesConfig.models` are trained by :func:`shallowmark.research.fmnist.train_model`, and all
of them, with the closed-form optimum of the empirical distribution (the memorization limit), are
sampled from the same ``noises`` initial noises by DDIM with η = 0:

- **RP(N)** = P(sim(x_A, x_B) > τ) over the shared noises: do the two models give the same image?
- **GL(N)** of each model = 1 − P(max_i sim(x, y_i) > τ) over its samples x and its N training images
  y_i: the share of samples that are not copies;
- **memorization limit**: P(sim(x_model, x_optimum) > τ), the share of noises on which a model gives
  what the empirical optimum gives (a training image);
- **chance**: the RP statistic between the two models' samples of *different* noises.

The similarity is :class:`~shallowmark.research.descriptors.HighPassDescriptor`; its threshold τ is
set by a rule fixed before any model is trained (:func:`calibrate_threshold`): the 95th percentile
of the similarity between a held-out test image and its nearest image in the largest training
subset, i.e. at most 5 % of genuinely different images count as copies. The report also says how
often mildly altered copies pass at τ.

Trained weights are cached (``$XDG_CACHE_HOME/shallowmark/analysis/fmnist``, keyed by everything that
defines a model), so an interrupted run resumes and the Jacobian, LOCO and watermark analyses reuse
the same models.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from shallowmark.errors import InvalidParameterError
from shallowmark.reports import markdown_table, pyplot, save_figure, write_report
from shallowmark.research import fmnist
from shallowmark.research.descriptors import HighPassDescriptor, nearest
from shallowmark.research.reproducibility import wilson_interval

#: Share of genuinely different images allowed to pass as copies; fixes τ (see the module docstring).
FALSE_COPY_RATE = 0.05


@dataclass(frozen=True)
class Variant:
    """One of the two models trained at every N."""

    name: str
    arch: str = "mlp"
    width: int = 512
    depth: int = 3
    seed: int = 1

    def train_config(self, steps: int, batch: int, lr: float) -> fmnist.TrainConfig:
        return fmnist.TrainConfig(arch=self.arch, width=self.width, depth=self.depth, steps=steps, batch=batch,
                                  lr=lr, seed=self.seed)


#: Chosen by measurement at N = 64 (3000 steps, batch 128, lr 2e-3), before the MLP had its linear
#: path: 1024×3 reproduced its training images (loss 0.23, 83 % of samples at raw-pixel cosine > 0.9
#: to one), 768×3 partly (0.25, high-pass nearest-image median 0.75), 512×3 did not (0.36, 0.48).
#: With a fixed linear path neither copied at any N; with its gain learned per t (research.fmnist.ResMLP)
#: both copy at N = 16 and 64 and generalize from 256 (the regimes report).
DEFAULT_MODELS = (Variant("small", width=512, depth=3, seed=1), Variant("large", width=1024, depth=3, seed=2))


@dataclass(frozen=True)
class RegimesConfig:
    """Everything the analysis depends on (all of it goes into report.json).

    Attributes:
        sizes: training-set sizes N (nested subsets of the 60 000 training images).
        models: the two variants trained at every N.
        steps, batch, lr: training, the same for every N and model.
        noises: shared initial noises sampled by every model.
        sample_steps: DDIM steps of the sampler.
        calibration_images: held-out test images (and as many training images) for τ.
        data_dir: folder of the IDX files (default: Debian's dataset-fashion-mnist path).
        cache_dir: trained weights (default ``$XDG_CACHE_HOME/shallowmark/analysis/fmnist``).
        seed: the subsets' permutation and the noises.
    """

    # 16 … 16 384: a 2× grid from 16 to 1024, where the 4× grid put the whole transition between two
    # sizes (GL 0.05-0.10 at 64, 0.93 at 256), then 4× up to 16 384, where GL is already near 1
    sizes: tuple = (16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
    models: tuple = DEFAULT_MODELS
    steps: int = 3000
    batch: int = 128
    lr: float = 2e-3
    noises: int = 1000
    sample_steps: int = 50
    calibration_images: int = 1000
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> "RegimesConfig":
        """Three sizes, tiny models, few steps and noises: seconds, for the tests."""
        base = dict(sizes=(16, 64, 256), models=(Variant("small", width=32, depth=1, seed=1),
                                                 Variant("large", width=64, depth=1, seed=2)),
                    steps=60, batch=32, noises=24, sample_steps=8, calibration_images=40)
        base.update(kw)
        return cls(**base)

    def check(self) -> None:
        if not self.sizes or any(not isinstance(n, int) or n < 2 for n in self.sizes):
            raise InvalidParameterError(f"sizes must be integers >= 2; got {self.sizes!r}")
        if list(self.sizes) != sorted(set(self.sizes)):
            raise InvalidParameterError(f"sizes must be increasing and distinct; got {self.sizes!r}")
        if len(self.models) != 2 or len({m.name for m in self.models}) != 2:
            raise InvalidParameterError("the analysis compares exactly two models with different names")
        if len({(m.arch, m.width, m.depth) for m in self.models}) != 2 or len({m.seed for m in self.models}) != 2:
            raise InvalidParameterError("the two models must differ in architecture or width and in seed")
        for name in ("noises", "sample_steps", "calibration_images"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise InvalidParameterError(f"{name} must be an integer >= 2; got {v!r}")
        self.models[0].train_config(self.steps, self.batch, self.lr).check()

    def resolved_cache(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "shallowmark" / "analysis" / "fmnist"


# ----------------------------------------------------------------------------------------------
# Trained models, cached
# ----------------------------------------------------------------------------------------------

def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def trained(images: np.ndarray, config: fmnist.TrainConfig, cache: Path,
            log: Optional[Callable[[str], None]] = None) -> fmnist.TrainedModel:
    """:func:`fmnist.train_model` on ``images``, or its cached result: the key is the training
    config and the bytes of the images, so any change to either retrains."""
    path = cache / f"{_digest(asdict(config), images.tobytes(), 'precond-edm-tlinear-v3')}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        net = fmnist.make_net(config)
        net.load_state_dict(saved["state"])
        net.eval()
        return fmnist.TrainedModel(net, config, len(images), float(saved["seconds"]), float(saved["final_loss"]),
                                   fmnist.parameter_count(net))
    model = fmnist.train_model(images, config, log=log)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(state=model.net.state_dict(), seconds=model.seconds, final_loss=model.final_loss), tmp)
    os.replace(tmp, path)  # a run killed mid-write leaves no half file under the real name
    return model


def generalizing_model(config: "RegimesConfig | None" = None,
                       log: Optional[Callable[[str], None]] = None) -> tuple[fmnist.TrainedModel, np.ndarray]:
    """The second (larger) model of ``config`` trained on the largest N, with its training images:
    the generalizing Fashion-MNIST model the Jacobian, LOCO and watermark analyses share. It is the
    same cached file the regimes analysis trains, so whichever runs first trains it."""
    config = config or RegimesConfig()
    config.check()
    images = fmnist.subset(fmnist.load_fashion_mnist("train", config.data_dir), config.sizes[-1], config.seed)
    variant = config.models[-1]
    model = trained(images, variant.train_config(config.steps, config.batch, config.lr), config.resolved_cache(), log)
    return model, images


# ----------------------------------------------------------------------------------------------
# Descriptor threshold
# ----------------------------------------------------------------------------------------------

def to_rgb(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) uint8 gray -> (n, 28, 28, 3), what the descriptors take."""
    return np.repeat(np.asarray(images)[..., None], 3, axis=-1)


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    from shallowmark.research.descriptors import _gaussian_blur

    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    return _gaussian_blur(x, sigma).squeeze(1).numpy()


#: Mild changes a copy might carry: what a near-exact reproduction of a training image looks like.
ALTERATIONS = {
    "noise σ=4/255": lambda x, rng: x + rng.normal(0, 4, x.shape),
    "noise σ=8/255": lambda x, rng: x + rng.normal(0, 8, x.shape),
    "blur σ=0.5 px": lambda x, rng: _blur(x, 0.5),
    "contrast ×0.9, +10": lambda x, rng: (x - 128) * 0.9 + 138,
}


@dataclass
class Calibration:
    threshold: float
    rule: str
    different_images: dict       # percentiles of held-out vs nearest training image
    copies_pass: dict            # alteration -> share above τ
    random_pairs_pass: float     # two random training images
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(threshold=round(self.threshold, 4), rule=self.rule, different_images=self.different_images,
                    copies_pass=self.copies_pass, random_pairs_pass=round(self.random_pairs_pass, 4))


def calibrate_threshold(descriptor, train: np.ndarray, test: np.ndarray, n: int, seed: int) -> Calibration:
    """τ = the (1 − :data:`FALSE_COPY_RATE`) quantile of the similarity between ``n`` held-out test
    images and their nearest image in ``train``; then the share of ``n`` training images that pass
    τ after each of :data:`ALTERATIONS`, and of random training pairs."""
    rng = np.random.default_rng(seed)
    q = test[rng.choice(len(test), min(n, len(test)), replace=False)]
    ref = descriptor.parts(to_rgb(train))
    diff, _ = nearest(descriptor.parts(to_rgb(q)), ref)
    tau = float(torch.quantile(diff, 1 - FALSE_COPY_RATE))
    pick = train[rng.choice(len(train), min(n, len(train)), replace=False)]
    base = descriptor(to_rgb(pick))
    copies, values = {}, {"different_images": diff.tolist()}
    for name, alter in ALTERATIONS.items():
        altered = np.clip(alter(pick.astype(np.float64), rng), 0, 255).round().astype(np.uint8)
        s = (descriptor(to_rgb(altered)) * base).sum(1)
        copies[name] = round(float((s > tau).float().mean()), 4)
        values[name] = s.tolist()
    perm = rng.permutation(len(pick))
    random_pass = float(((base * base[perm]).sum(1)[perm != np.arange(len(pick))] > tau).float().mean())
    qs = {f"p{p}": round(float(torch.quantile(diff, p / 100)), 4) for p in (50, 90, 95, 99)}
    return Calibration(tau, f"{100 * (1 - FALSE_COPY_RATE):g}th percentile of a held-out test image's similarity to "
                            f"its nearest image among the {len(train)} training images of the largest N "
                            f"({len(q)} test images)", qs, copies, random_pass, values)


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------

def _proportion(hits: int, n: int) -> dict:
    lo, hi = wilson_interval(hits, n)
    return dict(value=round(hits / n, 4), ci95=[round(lo, 4), round(hi, 4)], n=n)


def _rate(sims: torch.Tensor, tau: float) -> dict:
    return _proportion(int((sims > tau).sum()), len(sims))


def run_regimes_analysis(out_dir, config: RegimesConfig | None = None, *, command: str | None = None,
                         log: Optional[Callable[[str], None]] = None) -> dict:
    """Train, sample and score every (N, model); write report.json, report.md and the figures."""
    config = config or RegimesConfig()
    config.check()
    log = log or (lambda m: None)
    t_all = time.perf_counter()
    train_all = fmnist.load_fashion_mnist("train", config.data_dir)
    test_all = fmnist.load_fashion_mnist("test", config.data_dir)
    if config.sizes[-1] > len(train_all):
        raise InvalidParameterError(f"the largest N ({config.sizes[-1]}) exceeds the {len(train_all)} training images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    descriptor = HighPassDescriptor()
    cache = config.resolved_cache()
    timings: dict = {}

    t = time.perf_counter()
    largest = fmnist.subset(train_all, config.sizes[-1], config.seed)
    calib = calibrate_threshold(descriptor, largest, test_all, config.calibration_images, config.seed)
    tau = calib.threshold
    timings["calibration"] = round(time.perf_counter() - t, 1)
    log(f"τ = {tau:.3f} ({calib.rule})")

    noise = fmnist.initial_noise(config.noises, 10_000 + config.seed)
    rows, shown = [], {}
    report = None
    for n in coarse_to_fine(config.sizes):
        images = fmnist.subset(train_all, n, config.seed)
        ref = descriptor.parts(to_rgb(images))
        row: dict = dict(n=n, models={})
        samples = {}
        t = time.perf_counter()
        opt = fmnist.to_uint8(fmnist.ddim_sample(fmnist.EmpiricalOptimum(images), noise, config.sample_steps))
        row["optimum_sampling_s"] = round(time.perf_counter() - t, 1)
        s_opt, _ = nearest(descriptor.parts(to_rgb(opt)), ref)
        row["optimum_gl"] = _proportion(int((s_opt <= tau).sum()), len(s_opt))
        d_opt = descriptor(to_rgb(opt))
        for v in config.models:
            model = trained(images, v.train_config(config.steps, config.batch, config.lr), cache, log)
            t = time.perf_counter()
            x = fmnist.to_uint8(fmnist.ddim_sample(fmnist.NetDenoiser(model.net), noise, config.sample_steps))
            samples[v.name] = x
            best, idx = nearest(descriptor.parts(to_rgb(x)), ref)
            row["models"][v.name] = dict(
                gl=_proportion(int((best <= tau).sum()), len(best)),
                same_as_optimum=_rate((descriptor(to_rgb(x)) * d_opt).sum(1), tau),
                nearest_similarity_median=round(float(best.median()), 4),
                train_seconds=round(model.seconds, 1), sampling_seconds=round(time.perf_counter() - t, 1),
                final_loss=round(model.final_loss, 5), parameters=model.parameters)
            shown.setdefault(n, {})[v.name] = (x[:8], images[idx[:8].numpy()])
        a, b = (samples[v.name] for v in config.models)
        da, db = descriptor(to_rgb(a)), descriptor(to_rgb(b))
        pair = (da * db).sum(1)
        row["rp"] = _rate(pair, tau)
        row["rp_similarity_median"] = round(float(pair.median()), 4)
        row["rp_chance"] = _rate((da * db.roll(1, 0)).sum(1), tau)
        shown[n]["optimum"] = (opt[:8], None)
        rows.append(row)
        log(f"N={n}: RP {row['rp']['value']:.2f}, GL " + ", ".join(
            f"{k} {m['gl']['value']:.2f}" for k, m in row["models"].items()))
        rows.sort(key=lambda r: r["n"])
        timings["total"] = round(time.perf_counter() - t_all, 1)
        timings["training"] = round(sum(m["train_seconds"] for r in rows for m in r["models"].values()), 1)
        # a report after every size, so a run stopped early leaves what it measured (marked partial)
        report = _write(out, config, command, train_all, test_all, descriptor, calib, rows, shown, timings)
    return report


def coarse_to_fine(sizes: Sequence[int]) -> list[int]:
    """``sizes`` in the order that spans the range soonest: both ends, then the middle of each gap
    (16, 16 384, 256, 64, 1024, 4096 for the default), so an early partial report already shows
    the whole curve coarsely."""
    sizes = list(sizes)
    order, spans = [], [(0, len(sizes) - 1)]
    seen = set()
    for i in (0, len(sizes) - 1):
        if i not in seen:
            seen.add(i)
            order.append(sizes[i])
    while spans:
        a, b = spans.pop(0)
        if b - a < 2:
            continue
        m = (a + b) // 2
        if m not in seen:
            seen.add(m)
            order.append(sizes[m])
        spans += [(a, m), (m, b)]
    return order


def _write(out: Path, config: RegimesConfig, command, train_all, test_all, descriptor, calib, rows, shown,
           timings) -> dict:
    figures = dict(curves="rp_gl.png", samples="samples.png", calibration="calibration.png")
    _plot_curves(rows, config, out / figures["curves"])
    _plot_samples(shown, config, out / figures["samples"])
    _plot_calibration(calib, out / figures["calibration"])
    done = [r["n"] for r in rows]
    report = dict(
        analysis="regimes", command=command or f"shallowmark analyze regimes --out {out}",
        complete=len(done) == len(config.sizes), sizes_measured=done,
        config=dict(asdict(config), models=[asdict(m) for m in config.models], sizes=list(config.sizes)),
        data=dict(source=str(config.data_dir or fmnist.DEFAULT_DIR), train=len(train_all), test=len(test_all),
                  subsets="first N of one fixed permutation of the training split (nested)"),
        descriptor=descriptor.info(), calibration=calib.to_dict(),
        sampler=dict(kind="DDIM (eta 0), x0 clipped to [-1, 1]", steps=config.sample_steps, noises=config.noises,
                     noise_seed=10_000 + config.seed),
        training=dict(loss="denoising score matching, t uniform in 1..1000, cosine schedule, EDM preconditioning",
                      steps=config.steps, batch=config.batch, lr=config.lr),
        rows=rows, reading=_reading(rows, config), figures=figures, timings_s=timings,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads",
    )
    write_report(out, report, _markdown(report))
    return report


# ----------------------------------------------------------------------------------------------
# Reading the curves
# ----------------------------------------------------------------------------------------------

def transition(rows: list[dict], name: str) -> Optional[int]:
    """The smallest N at which the model's GL reaches 0.5 (None if it never does)."""
    return next((r["n"] for r in rows if r["models"][name]["gl"]["value"] >= 0.5), None)


def _reading(rows: list[dict], config: RegimesConfig) -> dict:
    rp = [r["rp"]["value"] for r in rows]
    k = int(np.argmin(rp))
    a, b = (m.name for m in config.models)
    return dict(
        rp_first=rp[0], rp_min=rp[k], rp_min_at_n=rows[k]["n"], rp_last=rp[-1],
        dip=bool(0 < k < len(rp) - 1 and rp[k] < min(rp[0], rp[-1])),
        gl_first={m.name: rows[0]["models"][m.name]["gl"]["value"] for m in config.models},
        gl_last={m.name: rows[-1]["models"][m.name]["gl"]["value"] for m in config.models},
        transition_n={m.name: transition(rows, m.name) for m in config.models},
        transition_later_for=(b if (transition(rows, b) or 10 ** 9) > (transition(rows, a) or 10 ** 9) else
                              a if (transition(rows, a) or 10 ** 9) > (transition(rows, b) or 10 ** 9) else "neither"),
    )


# ----------------------------------------------------------------------------------------------
# Figures and markdown
# ----------------------------------------------------------------------------------------------

def _figure(w: float, h: float):
    plt = pyplot()
    return plt, plt.subplots(1, 2, figsize=(w, h))


def _band(ax, ns, stats, label, **kw):
    v = [s["value"] for s in stats]
    lo = [s["ci95"][0] for s in stats]
    hi = [s["ci95"][1] for s in stats]
    line, = ax.plot(ns, v, marker="o", ms=3, label=label, **kw)
    ax.fill_between(ns, lo, hi, alpha=0.18, color=line.get_color())


def _plot_curves(rows, config, path: Path) -> None:
    plt, (fig, (ax1, ax2)) = _figure(11, 4)
    ns = [r["n"] for r in rows]
    _band(ax1, ns, [r["rp"] for r in rows], f"RP {config.models[0].name} vs {config.models[1].name}", lw=2)
    for m in config.models:
        _band(ax1, ns, [r["models"][m.name]["same_as_optimum"] for r in rows],
              f"{m.name} = empirical optimum (memorization limit)", ls="--")
    _band(ax1, ns, [r["rp_chance"] for r in rows], "chance (different noises)", ls=":", color="grey")
    for m in config.models:
        _band(ax2, ns, [r["models"][m.name]["gl"] for r in rows], f"GL {m.name} ({m.width}×{m.depth} {m.arch})")
    _band(ax2, ns, [r["optimum_gl"] for r in rows], "GL empirical optimum", ls="--", color="grey")
    for ax, title in ((ax1, "reproducibility"), (ax2, "generalization")):
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("training images N")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_samples(shown, config, path: Path) -> None:
    plt = pyplot()
    ns = sorted(shown)
    labels = []
    for m in config.models:
        labels += [m.name, f"{m.name}: nearest training image"]
    labels.append("empirical optimum")
    k = 8
    fig, axes = plt.subplots(len(ns), 1, figsize=(k * 0.9, len(ns) * len(labels) * 0.9 / 1.0), squeeze=False)
    for ax, n in zip(axes[:, 0], ns):
        tiles = []
        for m in config.models:
            x, near = shown[n][m.name]
            tiles += [x, near]
        tiles.append(shown[n]["optimum"][0])
        grid = np.concatenate([np.concatenate(list(t[:k]), axis=1) for t in tiles], axis=0)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
        ax.set_yticks([14 + 28 * i for i in range(len(labels))], labels, fontsize=6)
        ax.set_xticks([])
        ax.set_title(f"N = {n} (same noises in every row)", fontsize=8)
    save_figure(fig, path)


def _plot_calibration(calib: Calibration, path: Path) -> None:
    plt, (fig, (ax, ax2)) = _figure(9, 3.2)
    ax.hist(calib.values["different_images"], bins=40, alpha=0.7, label="held-out vs nearest training image")
    for name in ALTERATIONS:
        ax.hist(calib.values[name], bins=40, alpha=0.5, label=f"copy, {name}")
    ax.axvline(calib.threshold, color="k", lw=1, ls="--", label=f"τ = {calib.threshold:.3f}")
    ax.set_xlabel("similarity")
    ax.legend(fontsize=6)
    ax2.bar(range(len(calib.copies_pass)), list(calib.copies_pass.values()))
    ax2.set_xticks(range(len(calib.copies_pass)), list(calib.copies_pass), rotation=20, fontsize=6)
    ax2.set_ylim(0, 1.05)
    ax2.set_title("copies passing τ", fontsize=9)
    save_figure(fig, path)


def _shape(rd: dict) -> str:
    """What the RP curve's shape means, given whether the small-N end is memorization at all."""
    memorized = max(rd["gl_first"].values()) < 0.5
    if rd["dip"] and memorized:
        return "a dip between two higher ends, the talk's shape."
    if rd["dip"]:
        return ("a dip between two higher ends, **but not the talk's shape**: at the smallest N neither model "
                "copies its training images (GL " + ", ".join(f"{v:.2f}" for v in rd["gl_first"].values())
                + "), so the high end there is not the memorization regime.")
    return "**no dip between two higher ends**."


def _ci(s: dict) -> str:
    return f"{s['value']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"


def _markdown(rep: dict) -> str:
    c, cal, rd = rep["config"], rep["calibration"], rep["reading"]
    names = [m["name"] for m in c["models"]]
    lines = ["# Two regimes of reproducibility on Fashion-MNIST", "", f"Command: `{rep['command']}`  ",
             f"Machine: {rep['machine']}; total {rep['timings_s']['total']:.0f} s "
             f"(training {rep['timings_s']['training']:.0f} s).", "",
             *([] if rep.get("complete", True) else [
                 f"**Partial report:** {len(rep['sizes_measured'])} of {len(c['sizes'])} sizes measured so far "
                 f"(N = {', '.join(map(str, rep['sizes_measured']))}); the run goes coarse to fine and resumes "
                 "from its cache.", ""]),
             "Models (trained on the same nested subsets, differing in width and seed): " + "; ".join(
                 f"**{m['name']}** {m['arch']} width {m['width']} depth {m['depth']} seed {m['seed']}" for m in c["models"])
             + f". Training: {rep['training']['loss']}; {c['steps']} steps of batch {c['batch']}, Adam lr "
               f"{c['lr']:g} cosine-decayed, the same for every N. Sampler: {rep['sampler']['kind']}, "
               f"{c['sample_steps']} steps, {c['noises']} shared noises.", "",
             "## Descriptor and threshold", "",
             f"{rep['descriptor']['description']}. τ = **{cal['threshold']:.3f}**: the {cal['rule']}. "
             "Held-out images against their nearest training image: " + ", ".join(
                 f"{k} {v:.3f}" for k, v in cal["different_images"].items())
             + f". Random pairs of training images above τ: {cal['random_pairs_pass']:.3f}.", "",
             *markdown_table(["copy of a training image, altered by", "share above τ"],
                             ([k, f"{v:.3f}"] for k, v in cal["copies_pass"].items())),
             "", "## RP and GL against N (95 % Wilson intervals)", "",
             "`= optimum`: the share of noises on which the model gives the same image as the closed-form optimum "
             "of the empirical distribution (perfect memorization).", ""]
    head = ["N", "RP", "chance"] + [f"GL {n}" for n in names] + [f"{n} = optimum" for n in names] + [
        "GL optimum"] + [f"nearest-image similarity, median, {n}" for n in names] + [f"train s {n}" for n in names]
    lines += markdown_table(head, ([r["n"], _ci(r["rp"]), f"{r['rp_chance']['value']:.2f}"]
                                   + [_ci(r["models"][n]["gl"]) for n in names]
                                   + [_ci(r["models"][n]["same_as_optimum"]) for n in names]
                                   + [f"{r['optimum_gl']['value']:.2f}"]
                                   + [f"{r['models'][n]['nearest_similarity_median']:.3f}" for n in names]
                                   + [f"{r['models'][n]['train_seconds']:.0f}" for n in names] for r in rep["rows"]))
    lines += ["", f"![RP and GL]({rep['figures']['curves']})", "", f"![samples]({rep['figures']['samples']})", "",
              f"![calibration]({rep['figures']['calibration']})", "", "## Reading", "",
              f"- RP: {rd['rp_first']:.2f} at the smallest N, lowest {rd['rp_min']:.2f} at N = {rd['rp_min_at_n']}, "
              f"{rd['rp_last']:.2f} at the largest; " + _shape(rd),
              "- GL: " + "; ".join(f"{n} {rd['gl_first'][n]:.2f} → {rd['gl_last'][n]:.2f}, first ≥ 0.5 at N = "
                                   f"{rd['transition_n'][n]}" for n in names)
              + f"; the transition comes later for: {rd['transition_later_for']}.", ""]
    return "\n".join(lines) + "\n"
