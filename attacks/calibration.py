"""Calibration of a method's verdict on images it never saw: how often the verdict fires on
unwatermarked images at a target FPR, per source (the model's own generations, and each set of real
photos from :mod:`shallowmark.attacks.photos`), clean and under attacks that move the image.

The verdict at target FPR α is "p_corrected ≤ α"; a calibrated detector fires on at most a
fraction α of images not watermarked with the key. Shallow Diffuse searches geometric hypotheses
at verification (sync template, dihedral transforms, shifts) and pays for them with a Bonferroni
bound, so its rate should sit at or below α; this report measures it, with a one-sided 95 %
Clopper-Pearson upper bound, rather than assuming it.

Every verdict is cached (one JSON line per image, attack and method parameters) in the cache
folder, so an interrupted run resumes and a larger run reuses a smaller one's work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from shallowmark.errors import InvalidParameterError
from shallowmark.reports import markdown_table, write_report

__all__ = ["CalibrationConfig", "run_calibration"]

#: the attacks of the reference calibration: clean and three that move the image
DEFAULT_ATTACKS = ("clean", "rotate:15", "crop-centre:0.75", "aspect:0.8")


@dataclass(frozen=True)
class CalibrationConfig:
    """What a calibration run measures.

    ``n_generated``: unwatermarked generations of the model (seeds ``seed..``); ``photo_sources``
    and ``photos_per_source`` (None: all) choose the real photos, verified at their own sizes;
    (``()``: none); ``attacks``: ``name`` or ``name:strength``; ``target_fprs``: the verdict thresholds
    counted; ``n_keys``: the benchmark's first ``n_keys`` test keys, each image scored against each
    alone (a key's verdict rate is what its owner sees; the mean over keys is what the p-value promises)."""

    method: str = "shallow-diffuse"
    model: str = "tiny-ldm"
    n_generated: int = 250
    seed: int = 50000
    photo_sources: Optional[tuple[str, ...]] = None
    photos_per_source: Optional[int] = None
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    target_fprs: tuple[float, ...] = (0.01, 0.001)
    # keys each image is scored against (one inversion, one score per key): the first is the
    # benchmark's test key; the others show the spread a user's own key would see
    n_keys: int = 20
    batch: int = 8
    cache_dir: Optional[str] = None
    # keywords of the method's config dataclass (load_method); the report's method_params resolve them
    method_options: dict = dataclasses.field(default_factory=dict)


def _upper_bound(k: int, n: int, conf: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen k times in n."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(conf, k + 1, n - k))


def _image_seed(source: str, name: str) -> int:
    """A seed per image for the attacks' random placement, the same in every run."""
    return int(hashlib.sha256(f"{source}/{name}".encode()).hexdigest()[:8], 16)


def _cache_file(cfg: CalibrationConfig) -> Path:
    from shallowmark.attacks.photos import default_cache_dir

    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "calibration"
    root.mkdir(parents=True, exist_ok=True)
    return root / "verdicts.jsonl"


def _context(method, cfg: CalibrationConfig) -> str:
    from shallowmark.attacks.bench import _method_params

    blob = json.dumps([cfg.model, _method_params(method), cfg.n_keys], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_cache(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[(rec["ctx"], rec["source"], rec["name"], rec["attack"])] = rec.get("p_keys") or [rec["p"]]
    return out


def unwatermarked_images(method, cfg: CalibrationConfig, log) -> list[tuple[str, str, np.ndarray]]:
    """(source, name, image) of every unwatermarked image: the generations first, then the photos."""
    from shallowmark.attacks import photos

    seeds = list(range(cfg.seed, cfg.seed + cfg.n_generated))
    gen_dir = _cache_file(cfg).parent / f"generated-{cfg.model}"
    gen_dir.mkdir(exist_ok=True)
    out = []
    from PIL import Image

    missing = [s for s in seeds if not (gen_dir / f"{s}.png").exists()]
    for i in range(0, len(missing), cfg.batch):
        chunk = missing[i:i + cfg.batch]
        for s, im in zip(chunk, method.reference(chunk)):
            Image.fromarray(im).save(gen_dir / f"{s}.png")
        log(f"generated {min(i + cfg.batch, len(missing))}/{len(missing)} unwatermarked images")
    out += [("generated", str(s), np.asarray(Image.open(gen_dir / f"{s}.png").convert("RGB"))) for s in seeds]
    if cfg.photo_sources != ():    # () : generations only
        out += [(p.source, p.name, p.image) for p in photos.load(None, cfg.photo_sources, cfg.photos_per_source)]
    return out


def run_calibration(cfg: CalibrationConfig, out_dir, log: Callable = print) -> dict:
    """Verify every unwatermarked image under every attack against each of the benchmark's first
    ``n_keys`` test keys (one inversion per image), write ``report.md``/``report.json`` to ``out_dir`` and return the report."""
    from shallowmark.attacks.bench_config import bench_keys, parse_attacks
    from shallowmark.attacks.registry import apply_attack
    from shallowmark.core.backends import load_backend
    from shallowmark.core.watermarks import load_method

    method = load_method(cfg.method, load_backend(cfg.model), **cfg.method_options)
    if cfg.n_keys < 1:
        raise InvalidParameterError(f"n_keys must be at least 1; got {cfg.n_keys}")
    keys = bench_keys(cfg.n_keys, cfg.method)
    settings = parse_attacks(",".join(cfg.attacks))
    path = _cache_file(cfg)
    ctx = _context(method, cfg)
    cache = _load_cache(path)
    images = unwatermarked_images(method, cfg, log)
    with path.open("a") as f:
        for setting in settings:
            todo = [(s, n, im) for s, n, im in images if (ctx, s, n, setting.label) not in cache]
            for i in range(0, len(todo), cfg.batch):
                chunk = todo[i:i + cfg.batch]
                attacked = [apply_attack(setting.name, im, setting.strength,
                                         rng=np.random.default_rng(_image_seed(s, n)))
                            for s, n, im in chunk]
                inverted = method.invert(attacked)
                per_key = [method.score(inverted, [k]) for k in keys]          # (keys, images)
                for j, (s, n, _) in enumerate(chunk):
                    ps = [float(d[j].p_value_corrected) for d in per_key]
                    cache[(ctx, s, n, setting.label)] = ps
                    f.write(json.dumps(dict(ctx=ctx, source=s, name=n, attack=setting.label, p=ps[0],
                                            p_keys=ps)) + "\n")
                f.flush()
                log(f"{setting.label}: {min(i + cfg.batch, len(todo))}/{len(todo)} verified")
    report = _report(cfg, method, settings, images, cache, ctx)
    write_report(out_dir, report, _markdown(report))
    return report


def _report(cfg, method, settings, images, cache, ctx) -> dict:
    from shallowmark.attacks.bench import _method_params

    sources = list(dict.fromkeys(s for s, _, _ in images))
    rows = []
    for setting in settings:
        for group in sources + ["photos (all)", "all"]:
            members = [(s, n) for s, n, _ in images
                       if group == "all" or s == group or (group == "photos (all)" and s != "generated")]
            pk = np.array([cache[(ctx, s, n, setting.label)] for s, n in members], dtype=float).reshape(
                len(members), -1 if members else max(1, cfg.n_keys))
            p = pk[:, 0]
            row = dict(attack=setting.label, source=group, n=len(p), n_keys=pk.shape[1])
            for a in cfg.target_fprs:
                k = int((p <= a).sum())
                row[f"fired@{a:g}"] = k
                row[f"rate@{a:g}"] = k / len(p) if len(p) else float("nan")
                row[f"upper95@{a:g}"] = _upper_bound(k, len(p)) if len(p) else float("nan")
                rates = (pk <= a).mean(0) if len(p) else np.full(pk.shape[1], np.nan)
                row[f"keys_mean@{a:g}"] = float(rates.mean())
                row[f"keys_max@{a:g}"] = float(rates.max())
            rows.append(row)
    return dict(config=dataclasses.asdict(cfg), method_params=_method_params(method), rows=rows,
                n_images=len(images), sources={s: sum(1 for x, _, _ in images if x == s) for s in sources})


def _markdown(report: dict) -> str:
    cfg = report["config"]
    fprs = cfg["target_fprs"]
    header = ["attack", "source", "n"] + [h for a in fprs for h in (
        f"test key: fired at {a:g}", "rate (95 % upper)", f"{cfg['n_keys']} keys: mean rate", "worst key")]
    body = [[r["attack"], r["source"], r["n"]] + [c for a in fprs for c in (
        r[f"fired@{a:g}"], f"{r[f'rate@{a:g}']:.4f} ({r[f'upper95@{a:g}']:.4f})",
        f"{r[f'keys_mean@{a:g}']:.4f}", f"{r[f'keys_max@{a:g}']:.4f}")] for r in report["rows"]]
    lines = [f"# Calibration of {cfg['method']} on unwatermarked images ({cfg['model']})", "",
             f"{report['n_images']} unwatermarked images the method never saw: "
             + ", ".join(f"{k} {v}" for k, v in report["sources"].items())
             + f". Each is verified at its own size, clean and under each attack, against each of the "
             f"benchmark's first {cfg['n_keys']} test keys alone; a verdict fires when the corrected "
             "p-value is at most the target FPR. \"test key\" is the benchmark's first key, with a one-sided "
             "95 % Clopper-Pearson upper bound; the mean over keys is what the p-value promises (its rates "
             "are not independent: the keys share the images), and the worst key's rate includes the "
             "sampling spread of n images.", "",
             *markdown_table(header, body, "llr" + "rrrr" * len(fprs)), "",
             "Method parameters: `" + json.dumps(report["method_params"], default=str) + "`", ""]
    return "\n".join(lines)
