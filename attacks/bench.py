"""``shallowmark bench``: robustness of the watermark methods under attacks, with ROC metrics.

For every method, ``n`` watermarked images (seeds ``seed .. seed+n-1``; image ``i`` carries test
key ``i mod n_keys``) and ``n`` unwatermarked images with the same seeds are attacked and scored
by the method's detector, searching all ``n_keys`` test keys. Scores follow the convention
higher = watermarked; AUC and TPR@1%FPR come from :func:`shallowmark.attacks.metrics.roc_metrics`.

The unwatermarked images are the ``reference(seeds)`` of one diffusion method (the first one in
``methods``), shared by all methods, so each ROC compares a watermarked image with the same-seed
image without the watermark — the hardest negatives a detector can meet. Fidelity (PSNR/SSIM) is
measured against each method's own ``reference(seeds)``; the shared images are reused when a
method's reference equals them (checked on the first seed), else its own references are made.
Post-hoc methods (those that can ``embed`` and are not diffusion methods) are watermarked by
embedding into those shared images, which is what their ``generate`` does.

Detection shares the DDIM inversion between methods where it can: the unwatermarked images are
inverted once per attack, Shallow Diffuse reads the latent at its t*, and Tree-Ring, RingID and
Gaussian Shading read x_T from the same inversion (when their step counts agree).

Cache (``cache_dir``): the generated PNGs, keyed by model fingerprint, method and its parameters,
key and seed, and a small SQLite file with one row per scored image, keyed by everything the
score depends on (model, method parameters, keys, attack and strength, target FPR, image). An
interrupted run resumes where it stopped, and a re-run with more attacks or a larger ``n`` only
does the new work. The cache key includes the package version; clear the cache after changing
method code without changing the version.

Outputs in ``out_dir``: ``report.json``, ``report.md``, ``roc.png`` (one panel per attack, every
method in each) and ``tradeoff.png`` (fidelity vs mean AUC under attack).

``server`` (an address) is reserved for running the benchmark through the SDK against a server,
as an auditor without model access would; the gRPC service does not exist in this version, so a
config with ``server`` set is refused with :class:`ServerModeUnavailableError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import platform
import sqlite3
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from shallowmark.errors import InvalidParameterError, MissingDependencyError, ShallowmarkError, check_choice

from . import regen as _regen  # noqa: F401  (registers the "regen" attack)
from .registry import get_attack

__all__ = [
    "AttackSetting", "BenchConfig", "ServerModeUnavailableError", "DEFAULT_ATTACKS", "QUICK_ATTACKS",
    "QUICK_METHODS", "TPR_DEFINITION", "parse_attack", "parse_attacks", "run_bench", "validate_config",
]

#: Reference attack set: the four of the design's reference settings, the other built-ins, regeneration.
DEFAULT_ATTACKS = ("clean", "jpeg", "blur", "noise", "jitter", "resize", "crop", "rotate", "median", "drop",
                   "saltpepper", "regen")
QUICK_METHODS = ("shallow-diffuse", "tree-ring")
QUICK_ATTACKS = ("clean", "jpeg", "blur")
QUICK_N = 4
QUICK_STEPS = 10

TPR_DEFINITION = ("TPR@1%FPR is the highest TPR among thresholds whose FPR ≤ 1% (an image is flagged when "
                  "score ≥ threshold; thresholds are all distinct scores, no interpolation). With n_neg "
                  "unwatermarked images at most floor(0.01·n_neg) of them may score at or above the threshold.")
DEFINITIONS = {
    "tpr_at_1pct_fpr": TPR_DEFINITION,
    "auc": "Area under the ROC curve of the detector score (higher = watermarked), ties count one half "
           "(sklearn roc_auc_score).",
    "score": "The detector's score for the best of the searched keys: ring cosine for the ring methods, "
             "fraction of matching bits for the bit-carrying methods.",
    "detected_pos": "Fraction of watermarked images whose Bonferroni-corrected p-value is ≤ target_fpr "
                    "(the calibrated verdict, no threshold fitted on the data).",
    "detected_neg": "Fraction of unwatermarked images flagged by the same verdict (empirical FPR).",
    "bit_accuracy": "Mean fraction of the best key's payload bits recovered, over the watermarked images "
                    "(methods that carry bits only).",
    "psnr_ssim": "PSNR (dB) and SSIM of each watermarked image against the same-seed unwatermarked image "
                 "from the method's own reference(), averaged over the n seeds.",
    "cost": "embed_seconds: seconds per watermarked image (generation included); verify_seconds: seconds per "
            "detection (encode, inversion, statistic); verify_model_evals: denoiser evaluations per detection.",
}

_SCHEMA_VERSION = 1
# Methods whose negatives can never be meaningfully paired (reference shares no noise with the image).
_FIDELITY_NOTES = {
    "gaussian-shading": "reference shares no noise with the watermarked image (the watermark is x_T itself): "
                        "paired PSNR/SSIM measure content change, not watermark visibility",
}


class ServerModeUnavailableError(ShallowmarkError):
    """``--server`` mode was asked for, but this version has no gRPC service to talk to."""

    def __init__(self, address: str):
        super().__init__(f"--server mode needs the gRPC service, not available in this version "
                         f"(server address given: {address!r}); run the benchmark in-process instead")


# -- configuration -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackSetting:
    """One attack of the grid: a registered attack and its strength (``None`` = the reference one)."""

    name: str
    strength: Optional[float] = None

    @property
    def value(self) -> float:
        """The strength actually used."""
        return float(get_attack(self.name).default if self.strength is None else self.strength)

    @property
    def label(self) -> str:
        """``name`` at the reference strength, else ``name:strength`` (as given on the command line)."""
        if self.strength is None or float(self.strength) == float(get_attack(self.name).default):
            return self.name
        return f"{self.name}:{float(self.strength):g}"


def parse_attack(spec) -> AttackSetting:
    """``"blur"``, ``"blur:3"``, ``("blur", 3)`` or an :class:`AttackSetting` -> AttackSetting.

    Names are not checked here (see :func:`validate_config`); a strength that is not a number is.
    """
    if isinstance(spec, AttackSetting):
        return spec
    if isinstance(spec, str):
        name, sep, s = spec.strip().partition(":")
        if not sep:
            return AttackSetting(name)
        try:
            return AttackSetting(name, float(s))
        except ValueError:
            raise InvalidParameterError(f"attack {spec!r}: strength {s!r} is not a number "
                                        "(write name or name:strength, e.g. blur:3)") from None
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        name, s = spec
        if s is None:
            return AttackSetting(str(name))
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)):
            raise InvalidParameterError(f"attack {name!r}: strength must be a number, got {s!r}")
        return AttackSetting(str(name), float(s))
    raise InvalidParameterError(f"an attack is 'name', 'name:strength' or (name, strength); got {spec!r}")


def parse_attacks(text: str) -> tuple[AttackSetting, ...]:
    """Comma-separated command-line list, e.g. ``"clean,jpeg,blur:3"``."""
    return tuple(parse_attack(p) for p in text.split(",") if p.strip())


def _all_methods() -> tuple[str, ...]:
    from shallowmark.keys import METHODS

    # the canonical order of the methods registry, without importing torch
    order = ("shallow-diffuse", "tree-ring", "ringid", "gaussian-shading", "dwtdct", "dwtdctsvd", "rivagan")
    return tuple(m for m in order if m in METHODS) + tuple(m for m in METHODS if m not in order)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shallowmark" / "bench"


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run depends on (all of it is written to ``report.json``).

    Attributes:
        methods: watermark method names (default: all seven).
        attacks: attacks as names, ``"name:strength"`` strings, ``(name, strength)`` pairs or
            :class:`AttackSetting`; default :data:`DEFAULT_ATTACKS` at reference strengths.
        n: watermarked images per method, and unwatermarked images (shared by all methods).
        seed: first seed; images use seeds ``seed .. seed+n-1``.
        n_keys: fixed test keys per method; image i carries key ``i mod n_keys``; detection
            searches all of them (so scores are the best of ``n_keys``, Bonferroni-corrected verdicts).
        target_fpr: the verdict's target false-positive rate (``detected_*`` columns).
        model: backend name; ``model_options`` go to ``load_backend``.
        num_steps: DDIM steps for the diffusion methods (``None``: their default, 50).
        method_config: per-method keyword arguments for ``load_method`` (override ``num_steps``).
        batch: images per model call.
        out_dir: where the reports go.
        cache_dir: images and scores cache (default ``$XDG_CACHE_HOME/shallowmark/bench``).
        server: address of a shallowmark server (not available in this version; refused).
        quick: marks the small grid of :meth:`quick_config` (for tests and smoke runs).
        command: the command line, recorded in the report.
    """

    methods: tuple = field(default_factory=_all_methods)
    attacks: tuple = DEFAULT_ATTACKS
    n: int = 100
    seed: int = 10_000
    n_keys: int = 1
    target_fpr: float = 0.01
    model: str = "tiny-ldm"
    model_options: dict = field(default_factory=dict)
    num_steps: Optional[int] = None
    method_config: dict = field(default_factory=dict)
    batch: int = 8
    out_dir: Any = "bench-out"
    cache_dir: Any = None
    server: Optional[str] = None
    quick: bool = False
    command: str = ""

    @classmethod
    def quick_config(cls, **overrides) -> "BenchConfig":
        """The small grid: 2 methods × 3 attacks × n=4 with 10 DDIM steps (well under a minute)."""
        kw = dict(methods=QUICK_METHODS, attacks=QUICK_ATTACKS, n=QUICK_N, num_steps=QUICK_STEPS, batch=4,
                  quick=True)
        kw.update(overrides)
        return cls(**kw)

    @property
    def seeds(self) -> list[int]:
        return list(range(int(self.seed), int(self.seed) + int(self.n)))

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else _default_cache_dir()


def _positive_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < lo:
        raise InvalidParameterError(f"{name} must be an integer >= {lo}; got {v!r}")
    return int(v)


def _method_kwarg_names(name: str) -> set[str]:
    if name == "shallow-diffuse":
        from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuseConfig

        return {f.name for f in dataclasses.fields(ShallowDiffuseConfig)}
    if name in ("tree-ring", "ringid"):
        from shallowmark.core.watermarks.tree_ring import TreeRingConfig

        return {f.name for f in dataclasses.fields(TreeRingConfig)}
    from shallowmark.core.watermarks import _CLASSES
    import importlib

    module, cls_name = _CLASSES[name]
    cls = getattr(importlib.import_module(f"shallowmark.core.watermarks.{module}"), cls_name)
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "backend")}


def validate_config(config: BenchConfig) -> tuple[list[str], list[AttackSetting]]:
    """Check every name and number of ``config`` before any work; return (methods, attacks).

    Raises:
        UnknownNameError: an unknown method, attack or model (the message lists valid choices).
        InvalidParameterError: a strength outside the attack's range, bad n / seed / keys / batch /
            target FPR / steps, or a method_config keyword the method does not take.
        MissingDependencyError: a method needs an extra that is not installed.
        ServerModeUnavailableError: ``server`` is set.
    """
    if not isinstance(config, BenchConfig):
        raise InvalidParameterError(f"run_bench takes a BenchConfig, got {type(config).__name__}")
    all_methods = _all_methods()
    methods = [config.methods] if isinstance(config.methods, str) else list(config.methods)
    if not methods:
        raise InvalidParameterError(f"no methods given; valid choices: {', '.join(sorted(all_methods))}")
    for m in methods:
        check_choice("method", m, all_methods)
    if len(set(methods)) != len(methods):
        raise InvalidParameterError(f"methods listed twice: {methods}")
    attacks_in = [config.attacks] if isinstance(config.attacks, (str, AttackSetting)) else list(config.attacks)
    if not attacks_in:
        raise InvalidParameterError("no attacks given; valid choices: " + ", ".join(sorted(_attack_names())))
    attacks: list[AttackSetting] = []
    for a in attacks_in:
        s = parse_attack(a)
        spec = get_attack(s.name)  # UnknownNameError lists the registered attacks
        spec.validate_strength(s.value)
        if all(x.label != s.label for x in attacks):
            attacks.append(s)
    from shallowmark.core.backends import backend_names

    check_choice("model", config.model, backend_names())
    _positive_int("n", config.n)
    if isinstance(config.seed, bool) or not isinstance(config.seed, (int, np.integer)) or config.seed < 0:
        raise InvalidParameterError(f"seed must be an integer >= 0; got {config.seed!r}")
    _positive_int("n_keys", config.n_keys)
    _positive_int("batch", config.batch)
    if config.num_steps is not None:
        _positive_int("num_steps", config.num_steps, 2)
    f = config.target_fpr
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
        raise InvalidParameterError(f"target_fpr must be in (0, 1); got {f!r}")
    for m, kw in dict(config.method_config).items():
        check_choice("method in method_config", m, methods)
        bad = set(kw) - _method_kwarg_names(m)
        if bad:
            raise InvalidParameterError(f"method_config[{m!r}]: unknown option(s) {sorted(bad)}; valid: "
                                        f"{', '.join(sorted(_method_kwarg_names(m)))}")
    posthoc = [m for m in methods if m in ("dwtdct", "dwtdctsvd", "rivagan")]
    if posthoc:
        from shallowmark.core.watermarks.invisible import _imwatermark

        _imwatermark()
        if "rivagan" in posthoc:
            import importlib.util

            if importlib.util.find_spec("onnxruntime") is None:
                raise MissingDependencyError("the rivagan baseline", "bench")
    if config.server is not None:
        raise ServerModeUnavailableError(str(config.server))
    return methods, attacks


def _attack_names():
    from .registry import list_attacks

    return list_attacks()


# -- cache ---------------------------------------------------------------------------------------------
def _h(obj, n: int = 16) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _model_fingerprint(backend, name: str, options: dict) -> str:
    """Hash of the backend's identity and a strided sample of every weight tensor (fast for any size)."""
    import torch

    h = hashlib.sha1(json.dumps([name, {k: str(v) for k, v in options.items()}, list(backend.latent_shape),
                                 backend.image_size], sort_keys=True).encode())
    for attr in sorted(vars(backend)):
        mod = getattr(backend, attr)
        if isinstance(mod, torch.nn.Module):
            for pname, p in mod.state_dict().items():
                flat = p.detach().flatten()
                step = max(1, flat.numel() // 4096)
                h.update(pname.encode())
                h.update(flat[::step].float().cpu().numpy().tobytes())
    h.update(backend.alphas_cumprod.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _method_params(m) -> dict:
    """The parameters that define a method instance (for the cache key and the report)."""
    cfg = getattr(m, "config", None)
    if cfg is not None and dataclasses.is_dataclass(cfg):
        params = dataclasses.asdict(cfg)
    else:
        params = {k: v for k, v in vars(m).items()
                  if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple)) and k != "name"}
    return {"class": type(m).__name__, **params}


class _Cache:
    """PNG images on disk and a SQLite table of per-image scores and timings."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(root / "scores.sqlite"))
        self.db.execute("""CREATE TABLE IF NOT EXISTS scores (
            ctx TEXT, seed INTEGER, method TEXT, attack TEXT, kind TEXT, score REAL, p_value REAL,
            detected INTEGER, bit_accuracy REAL, model_evals INTEGER, key_id TEXT,
            PRIMARY KEY (ctx, seed))""")
        self.db.execute("""CREATE TABLE IF NOT EXISTS timings (
            what TEXT, ctx TEXT, seed INTEGER, seconds REAL, PRIMARY KEY (what, ctx, seed))""")
        self.db.commit()

    def close(self):
        self.db.close()

    # images
    def image_path(self, folder: str, seed: int) -> Path:
        return self.root / "images" / folder / f"{int(seed)}.png"

    def load_images(self, folder: str, seeds: Sequence[int]) -> dict[int, np.ndarray]:
        from PIL import Image

        out = {}
        for s in seeds:
            p = self.image_path(folder, s)
            if p.exists():
                try:
                    with Image.open(p) as im:
                        out[int(s)] = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
                except OSError:  # a PNG cut short by an interruption: make it again
                    p.unlink(missing_ok=True)
        return out

    def save_images(self, folder: str, seeds: Sequence[int], images: np.ndarray) -> None:
        from PIL import Image

        for s, im in zip(seeds, images):
            p = self.image_path(folder, s)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp.png")
            Image.fromarray(np.ascontiguousarray(im)).save(tmp, format="PNG")
            os.replace(tmp, p)  # atomic: a half-written PNG is never read back

    # scores
    def scored(self, ctx: str) -> dict[int, tuple]:
        rows = self.db.execute("SELECT seed, score, p_value, detected, bit_accuracy, model_evals FROM scores "
                               "WHERE ctx = ?", (ctx,)).fetchall()
        return {int(r[0]): r[1:] for r in rows}

    def put_scores(self, rows: list[tuple]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        self.db.commit()

    # timings
    def put_timings(self, what: str, ctx: str, seeds: Sequence[int], seconds_each: float) -> None:
        self.db.executemany("INSERT OR REPLACE INTO timings VALUES (?,?,?,?)",
                            [(what, ctx, int(s), float(seconds_each)) for s in seeds])
        self.db.commit()

    def mean_timing(self, what: str, ctxs: Iterable[str], seeds: Sequence[int]) -> Optional[float]:
        ctxs = list(ctxs)
        if not ctxs:
            return None
        q = (f"SELECT AVG(seconds), COUNT(*) FROM timings WHERE what = ? AND ctx IN ({','.join('?' * len(ctxs))}) "
             f"AND seed >= ? AND seed <= ?")
        avg, cnt = self.db.execute(q, (what, *ctxs, min(seeds), max(seeds))).fetchone()
        return float(avg) if cnt else None


# -- detection with shared inversions ------------------------------------------------------------------
def _detect_batch(backend, methods: dict, keys: dict, images: np.ndarray, target_fpr: float) -> dict:
    """Detections of every method in ``methods`` on one batch, sharing DDIM inversions.

    Shallow Diffuse reads the latent at its t* (``detect_latent``), Tree-Ring / RingID / Gaussian
    Shading read x_T (``detect_noise``); methods with the same step count share one inversion.
    Other methods run their own ``detect``.
    """
    import torch

    from shallowmark.core import ddim
    from shallowmark.core.images import to_tensor

    targets: dict[int, set] = {}
    grids: dict[int, Any] = {}
    for m in methods.values():
        if hasattr(m, "detect_latent") and hasattr(m, "k_star"):
            pos = int(m.k_star)
        elif hasattr(m, "detect_noise") and hasattr(m, "grid"):
            pos = int(m.grid.num_steps)
        else:
            continue
        targets.setdefault(m.grid.num_steps, set()).add(pos)
        grids.setdefault(m.grid.num_steps, m.grid)
    latents: dict[tuple[int, int], torch.Tensor] = {}
    if targets:
        with torch.no_grad():
            z0 = backend.encode(to_tensor(images).to(backend.device))
        for ns, positions in targets.items():
            x, cur = z0, 0
            for pos in sorted(positions):
                x = ddim.invert(backend, x, grids[ns], cur, pos)
                latents[(ns, pos)] = x
                cur = pos
    out = {}
    for name, m in methods.items():
        if hasattr(m, "detect_latent") and hasattr(m, "k_star"):
            out[name] = m.detect_latent(latents[(m.grid.num_steps, int(m.k_star))], keys[name], target_fpr)
        elif hasattr(m, "detect_noise") and hasattr(m, "grid"):
            ns = m.grid.num_steps
            out[name] = m.detect_noise(latents[(ns, ns)], keys[name], target_fpr, model_evals=ns)
        else:
            out[name] = m.detect(images, keys[name], target_fpr)
    return out


def _attack_rng(setting: AttackSetting, kind: str, method: str, seed: int) -> np.random.Generator:
    """One generator per attacked image, independent of batching and run order."""
    tag = zlib.crc32(f"{setting.name}|{setting.value!r}|{kind}|{method}".encode())
    return np.random.default_rng([tag, int(seed)])


def _apply(setting: AttackSetting, images: np.ndarray, seeds: Sequence[int], kind: str, method: str,
           backend) -> np.ndarray:
    from .registry import apply_attack

    spec = get_attack(setting.name)
    ctx = {"model": backend} if "model" in spec.context else {}
    return np.stack([apply_attack(setting.name, im, setting.value, rng=_attack_rng(setting, kind, method, s), **ctx)
                     for im, s in zip(images, seeds)])


def _same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding: the same sampling run in another batch may flip a few pixels by 1."""
    if a.shape != b.shape:
        return False
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return bool(d.max() <= 2 and np.mean(d > 0) < 0.01)


def _chunks(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


# -- the run -------------------------------------------------------------------------------------------
def run_bench(config: BenchConfig, progress: bool = True, backend=None, log=None) -> dict:
    """Run the benchmark of ``config``; write the reports to ``config.out_dir`` and return report.json's dict.

    Args:
        config: the grid and its parameters (see :class:`BenchConfig`).
        progress: show a tqdm progress bar on stderr.
        backend: an already loaded backend to use instead of ``load_backend(config.model)``
            (it must be that model; it is fingerprinted for the cache either way).
        log: optional ``log(message)`` for a few status lines.

    Every name and strength is validated before any work (see :func:`validate_config`).
    """
    method_names, attacks = validate_config(config)
    log = log or (lambda msg: None)
    t_start = time.perf_counter()

    import torch
    from tqdm import tqdm

    from shallowmark.attacks.methods_report import _keys
    from shallowmark.core.watermarks import DIFFUSION_METHODS, load_method

    if backend is None:
        from shallowmark.core.backends import load_backend

        backend = load_backend(config.model, **dict(config.model_options))
    model_fp = _model_fingerprint(backend, config.model, dict(config.model_options))
    from shallowmark import __version__

    methods = {}
    for name in method_names:
        kw = {}
        if config.num_steps is not None and name in DIFFUSION_METHODS:
            kw["num_steps"] = int(config.num_steps)
        kw.update(dict(config.method_config).get(name, {}))
        methods[name] = load_method(name, backend, **kw)
    params = {n: _method_params(m) for n, m in methods.items()}
    keys = {n: _keys(config.n_keys, n) for n in method_names}
    key_ids = {n: [k.key_id for k in ks] for n, ks in keys.items()}
    seeds = config.seeds
    n, batch, fpr = int(config.n), int(config.batch), float(config.target_fpr)
    cache = _Cache(config.resolved_cache_dir())
    img_root = f"{config.model}-{model_fp}"

    def folder(name: str, kind: str, key_id: str = "") -> str:
        return f"{img_root}/{kind}-{name}-{_h([__version__, params[name]], 10)}" + (f"/{key_id[:16]}" if key_id else "")

    ref_name = next((m for m in method_names if m in DIFFUSION_METHODS), method_names[0])
    neg_folder = folder(ref_name, "reference")
    n_work = (n * (1 + len(methods))) + len(attacks) * n * (1 + len(methods))
    bar = tqdm(total=n_work, disable=not progress, desc="bench", unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        with torch.no_grad():
            # -- unwatermarked images (shared) ---------------------------------------------------------
            def references(name: str, want: Sequence[int], count: bool) -> dict[int, np.ndarray]:
                fold = folder(name, "reference")
                have = cache.load_images(fold, want)
                missing = [s for s in want if s not in have]
                if count:
                    bar.update(len(want) - len(missing))
                for chunk in _chunks(missing, batch):
                    t0 = time.perf_counter()
                    ims = methods[name].reference(list(chunk))
                    cache.save_images(fold, chunk, ims)
                    cache.put_timings("reference", fold, chunk, (time.perf_counter() - t0) / len(chunk))
                    have.update(zip(chunk, ims))
                    if count:
                        bar.update(len(chunk))
                return have

            log(f"unwatermarked images: {ref_name}.reference, seeds {seeds[0]}..{seeds[-1]}")
            neg_images = references(ref_name, seeds, True)
            # each method's reference for fidelity: the shared images if its reference equals them
            own_refs: dict[str, dict[int, np.ndarray]] = {}
            ref_shared: dict[str, bool] = {}
            for name in method_names:
                if name == ref_name:
                    ref_shared[name] = True
                    continue
                first = references(name, seeds[:1], False)
                ref_shared[name] = _same_image(first[seeds[0]], neg_images[seeds[0]])
            # -- watermarked images --------------------------------------------------------------------
            pos_images: dict[str, dict[int, np.ndarray]] = {}
            posthoc = {name: (name not in DIFFUSION_METHODS and methods[name].supports_embed and ref_shared[name])
                       for name in method_names}
            for name in method_names:
                m = methods[name]
                imgs: dict[int, np.ndarray] = {}
                for j, kid in enumerate(key_ids[name]):
                    mine = [s for i, s in enumerate(seeds) if i % config.n_keys == j]
                    fold = folder(name, "watermarked", kid)
                    have = cache.load_images(fold, mine)
                    bar.update(len(have))
                    missing = [s for s in mine if s not in have]
                    for chunk in _chunks(missing, batch):
                        t0 = time.perf_counter()
                        if posthoc[name]:
                            ims = m.embed([keys[name][j]], np.stack([neg_images[s] for s in chunk]))
                        else:
                            ims = m.generate([keys[name][j]], list(chunk))
                        cache.save_images(fold, chunk, ims)
                        cache.put_timings("embed", folder(name, "watermarked"), chunk,
                                          (time.perf_counter() - t0) / len(chunk))
                        have.update(zip(chunk, ims))
                        bar.update(len(chunk))
                    imgs.update(have)
                pos_images[name] = imgs
                if not ref_shared[name]:
                    own_refs[name] = references(name, seeds, False)
            bar.set_postfix_str("detect")

            # -- attacks and detection -----------------------------------------------------------------
            def ctx_of(name: str, setting: AttackSetting, kind: str) -> str:
                images_id = folder(name, "watermarked") if kind == "pos" else neg_folder
                return _h([_SCHEMA_VERSION, __version__, model_fp, name, params[name], key_ids[name],
                           setting.name, setting.value, fpr, kind, images_id], 24)

            def rows_for(name, setting, kind, chunk, dets, ctx):
                return [(ctx, int(s), name, setting.label, kind, float(d.score), float(d.p_value), int(d.detected),
                         None if d.bit_accuracy is None else float(d.bit_accuracy), int(d.model_evals),
                         d.key_id) for s, d in zip(chunk, dets)]

            for setting in attacks:
                bar.set_postfix_str(setting.label)
                # negatives: one attacked copy per seed, shared by every method
                need = {name: set(seeds) - set(cache.scored(ctx_of(name, setting, "neg"))) for name in method_names}
                union = sorted(set().union(*need.values()))
                bar.update(n - len(union))
                for chunk in _chunks(union, batch):
                    attacked = _apply(setting, np.stack([neg_images[s] for s in chunk]), chunk, "neg", "", backend)
                    todo = {name: methods[name] for name in method_names if need[name] & set(chunk)}
                    dets = _detect_batch(backend, todo, keys, attacked, fpr)
                    rows = []
                    for name, ds in dets.items():
                        ctx = ctx_of(name, setting, "neg")
                        rows += [r for r in rows_for(name, setting, "neg", chunk, ds, ctx) if r[1] in need[name]]
                    cache.put_scores(rows)
                    bar.update(len(chunk))
                # positives: each method's own images
                for name in method_names:
                    ctx = ctx_of(name, setting, "pos")
                    missing = [s for s in seeds if s not in cache.scored(ctx)]
                    bar.update(n - len(missing))
                    for chunk in _chunks(missing, batch):
                        attacked = _apply(setting, np.stack([pos_images[name][s] for s in chunk]), chunk, "pos",
                                          name, backend)
                        t0 = time.perf_counter()
                        dets = _detect_batch(backend, {name: methods[name]}, keys, attacked, fpr)[name]
                        cache.put_timings("verify", ctx, chunk, (time.perf_counter() - t0) / len(chunk))
                        cache.put_scores(rows_for(name, setting, "pos", chunk, dets, ctx))
                        bar.update(len(chunk))
        bar.close()

        # -- metrics -----------------------------------------------------------------------------------
        from .metrics import psnr, roc_metrics, ssim

        results, curves = [], {}
        for setting in attacks:
            for name in method_names:
                pos = cache.scored(ctx_of(name, setting, "pos"))
                neg = cache.scored(ctx_of(name, setting, "neg"))
                sp = np.array([pos[s][0] for s in seeds])
                sn = np.array([neg[s][0] for s in seeds])
                roc = roc_metrics(sp, sn)
                bits = [pos[s][3] for s in seeds if pos[s][3] is not None]
                results.append(dict(
                    method=name, attack=setting.label, attack_name=setting.name, strength=setting.value,
                    auc=roc.auc, tpr_at_1pct_fpr=roc.tpr_at_1pct_fpr, n_pos=roc.n_pos, n_neg=roc.n_neg,
                    detected_pos=float(np.mean([pos[s][2] for s in seeds])),
                    detected_neg=float(np.mean([neg[s][2] for s in seeds])),
                    bit_accuracy=float(np.mean(bits)) if bits else None,
                    median_p_value_pos=float(np.median([pos[s][1] for s in seeds])),
                ))
                curves[(setting.label, name)] = (roc.fpr, roc.tpr)
        fidelity = []
        for name in method_names:
            refs = neg_images if ref_shared[name] else own_refs[name]
            pairs = [(pos_images[name][s], refs[s]) for s in seeds]
            ps = [psnr(a, b) for a, b in pairs]
            fidelity.append(dict(method=name, psnr=float(np.mean([p for p in ps if math.isfinite(p)] or [math.inf])),
                                 ssim=float(np.mean([ssim(a, b) for a, b in pairs])),
                                 reference="shared" if ref_shared[name] else "own",
                                 note=_FIDELITY_NOTES.get(name)))
        cost = []
        for name in method_names:
            m = methods[name]
            embed_s = cache.mean_timing("embed", [folder(name, "watermarked")], seeds)
            if embed_s is not None and posthoc[name]:
                sample_s = cache.mean_timing("reference", [neg_folder], seeds)
                embed_s = embed_s + (sample_s or 0.0)
            verify_s = cache.mean_timing("verify", [ctx_of(name, a, "pos") for a in attacks if a.name == "clean"]
                                         or [ctx_of(name, a, "pos") for a in attacks], seeds)
            evals = cache.scored(ctx_of(name, attacks[0], "pos"))[seeds[0]][4]
            cost.append(dict(method=name, embed_seconds=embed_s, verify_seconds=verify_s,
                             verify_model_evals=int(evals), embed_model_evals=_embed_evals(m, name, posthoc[name])))
    finally:
        bar.close()
        cache.close()

    report = _sanitize(dict(
        config=_config_record(config, method_names, attacks, params, key_ids, model_fp, ref_name, posthoc,
                              backend),
        results=results, fidelity=fidelity, cost=cost, definitions=DEFINITIONS,
        seconds=time.perf_counter() - t_start,
    ))
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default, allow_nan=False))
    (out / "report.md").write_text(_markdown(report))
    _plot_roc(out / "roc.png", attacks, method_names, curves, results)
    _plot_tradeoff(out / "tradeoff.png", results, fidelity)
    log(f"wrote {out / 'report.json'}, report.md, roc.png, tradeoff.png ({report['seconds']:.0f} s)")
    return report


def _embed_evals(m, name: str, posthoc: bool) -> int:
    """Denoiser evaluations to make one watermarked image (sampling included)."""
    g = getattr(m, "grid", None)
    if posthoc or g is None:
        return 50 if getattr(m, "backend", None) is not None else 0  # the plain 50-step sample, then embed
    return int(g.num_steps) + int(getattr(m, "k_star", 0))  # Shallow Diffuse re-runs t*→0 on both paths


def _json_default(v):
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.ndarray, tuple)):
        return list(v)
    return str(v)


def _sanitize(obj):
    """Replace non-finite floats (JSON has none) by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("shallowmark", "torch", "diffusers", "numpy", "scipy", "scikit-learn", "scikit-image", "pillow",
                 "invisible-watermark", "onnxruntime", "opencv-python", "matplotlib", "tqdm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _machine(backend) -> dict:
    import torch

    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=str(backend.device),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def _config_record(config, method_names, attacks, params, key_ids, model_fp, ref_name, posthoc, backend) -> dict:
    from shallowmark.core.watermarks import DIFFUSION_METHODS

    return _sanitize(dict(
        methods=method_names,
        attacks=[dict(label=a.label, name=a.name, strength=a.value, scale=get_attack(a.name).scale) for a in attacks],
        n=int(config.n), n_watermarked_per_method=int(config.n), n_unwatermarked=int(config.n),
        seeds=config.seeds, n_keys=int(config.n_keys), key_ids=key_ids,
        keys_note="fixed test keys WatermarkKey.from_hex(f'{i:064x}'), i = 1..n_keys, derived per method; "
                  "image i carries key i mod n_keys and detection searches all n_keys keys",
        target_fpr=float(config.target_fpr), model=config.model, model_options=dict(config.model_options),
        model_fingerprint=model_fp, num_steps=config.num_steps, method_params=params,
        method_config=dict(config.method_config), batch=int(config.batch), out_dir=str(config.out_dir),
        cache_dir=str(config.resolved_cache_dir()), server=config.server, quick=bool(config.quick),
        unwatermarked_images=f"{ref_name}.reference(seeds), shared by all methods (same seeds as the watermarked)",
        posthoc_embedded_into_shared_references=[m for m in method_names if posthoc[m]],
        diffusion_methods=[m for m in method_names if m in DIFFUSION_METHODS],
        regen=dict(grid_steps=_regen.GRID_STEPS, default_strength=_regen.DEFAULT_STRENGTH),
        attack_rng="numpy default_rng([crc32(name|strength|pos-or-neg|method), seed]) per image",
        command=config.command or " ".join(sys.argv), versions=_versions(), machine=_machine(backend),
    ))


# -- reports -------------------------------------------------------------------------------------------
def _f(v, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _markdown(rep: dict) -> str:
    c = rep["config"]
    methods = c["methods"]
    labels = [a["label"] for a in c["attacks"]]
    res = {(r["method"], r["attack"]): r for r in rep["results"]}
    lines = [f"# Robustness benchmark on `{c['model']}`" + (" (quick grid)" if c["quick"] else ""), "",
             f"Command: `{c['command']}`  ",
             f"{c['n']} watermarked images per method and {c['n']} unwatermarked images (same seeds "
             f"{c['seeds'][0]}..{c['seeds'][-1]}), {c['n_keys']} test key(s) per method, target FPR "
             f"{c['target_fpr']:g}. Machine: {c['machine']['platform']}, {c['machine']['cpu_count']} CPUs, "
             f"torch {c['versions']['torch']}; run took {rep['seconds']:.0f} s.", "",
             f"**Definition.** {TPR_DEFINITION}", "",
             "## AUC / TPR@1%FPR", "",
             "| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{res[m, a]['auc']:.3f} / {res[m, a]['tpr_at_1pct_fpr']:.2f}"
                                               for a in labels) + " |")
    lines += ["", f"## Detected at target FPR {c['target_fpr']:g} (watermarked / unwatermarked flagged)", "",
              "| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{res[m, a]['detected_pos']:.2f} / {res[m, a]['detected_neg']:.2f}"
                                               for a in labels) + " |")
    bit_methods = [m for m in methods if any(res[m, a]["bit_accuracy"] is not None for a in labels)]
    if bit_methods:
        lines += ["", "## Bit accuracy (watermarked images)", "",
                  "| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for m in bit_methods:
            lines.append(f"| {m} | " + " | ".join(_f(res[m, a]["bit_accuracy"]) for a in labels) + " |")
    lines += ["", "## Fidelity (against the same-seed unwatermarked image)", "",
              "| method | PSNR (dB) | SSIM | note |", "|---|---|---|---|"]
    for r in rep["fidelity"]:
        lines.append(f"| {r['method']} | {_f(r['psnr'], '.2f')} | {_f(r['ssim'], '.4f')} | {r['note'] or ''} |")
    lines += ["", "## Cost per image", "",
              "| method | embed s | embed model evals | verify s | verify model evals |", "|---|---|---|---|---|"]
    for r in rep["cost"]:
        lines.append(f"| {r['method']} | {_f(r['embed_seconds'], '.2f')} | {r['embed_model_evals']} | "
                     f"{_f(r['verify_seconds'], '.3f')} | {r['verify_model_evals']} |")
    lines += ["", "## Attacks", "", "| attack | strength | meaning |", "|---|---|---|"]
    for a in c["attacks"]:
        lines.append(f"| {a['label']} | {a['strength']:g} | {a['scale']} |")
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in rep["definitions"].items()]
    lines += ["", "## Parameters", "", f"- unwatermarked images: {c['unwatermarked_images']}",
              f"- post-hoc methods embedded into the shared unwatermarked images: "
              f"{', '.join(c['posthoc_embedded_into_shared_references']) or 'none'}",
              f"- keys: {c['keys_note']}", f"- attack randomness: {c['attack_rng']}",
              f"- model fingerprint: {c['model_fingerprint']}", "", "```json",
              json.dumps({k: c[k] for k in ("method_params", "num_steps", "batch", "regen", "versions", "machine")},
                         indent=1, default=_json_default), "```", "",
              "Plots: `roc.png` (ROC per attack), `tradeoff.png` (fidelity vs mean AUC under attack)."]
    return "\n".join(lines) + "\n"


def _plot_roc(path: Path, attacks, methods, curves, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(attacks)
    cols = min(4, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    auc = {(r["attack"], r["method"]): r["auc"] for r in results}
    for i, a in enumerate(attacks):
        ax = axes[i // cols][i % cols]
        for m in methods:
            fpr, tpr = curves[(a.label, m)]
            ax.plot(fpr, tpr, label=f"{m} ({auc[a.label, m]:.3f})", lw=1.2)
        ax.axvline(0.01, color="grey", lw=0.6, ls=":")
        ax.plot([0, 1], [0, 1], color="lightgrey", lw=0.6)
        ax.set_title(a.label, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("FPR", fontsize=8)
        ax.set_ylabel("TPR", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    for j in range(k, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tradeoff(path: Path, results, fidelity) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for f in fidelity:
        attacked = [r["auc"] for r in results if r["method"] == f["method"] and r["attack_name"] != "clean"]
        rob = float(np.mean(attacked)) if attacked else float(
            np.mean([r["auc"] for r in results if r["method"] == f["method"]]))
        if f["psnr"] is None or not math.isfinite(f["psnr"]):
            continue
        ax.scatter([f["psnr"]], [rob])
        ax.annotate(f["method"], (f["psnr"], rob), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PSNR vs same-seed unwatermarked (dB)")
    ax.set_ylabel("mean AUC under attack")
    ax.set_title("fidelity vs robustness", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
