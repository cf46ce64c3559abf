"""Configuration of ``shallowmark bench``: the grid, its parsing and its validation.

Nothing here imports torch: the server mode (``BenchConfig.server``) validates and runs on a
machine without the model stack.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from shallowmark.errors import InvalidParameterError, MissingDependencyError, ShallowmarkError, check_choice, check_int

from . import regen as _regen  # noqa: F401  (registers the "regen" attack)
from .registry import get_attack

__all__ = [
    "AttackSetting", "BenchConfig", "ServerModeUnavailableError", "DEFAULT_ATTACKS", "QUICK_ATTACKS",
    "QUICK_METHODS", "TPR_DEFINITION", "POSITIVES", "parse_attack", "parse_attacks", "validate_config",
    "bench_keys", "IMAGE_SUFFIXES", "method_attack_labels",
]

#: Reference attack set: the four of the design's reference settings, the other built-ins, regeneration.
DEFAULT_ATTACKS = ("clean", "jpeg", "blur", "noise", "jitter", "resize", "crop", "rotate", "flip", "median", "drop",
                   "saltpepper", "platform-1080", "platform-4x5", "platform-1x1", "regen")
QUICK_METHODS = ("shallow-diffuse", "tree-ring")
QUICK_ATTACKS = ("clean", "jpeg", "blur")
QUICK_N = 4
QUICK_STEPS = 10
#: Where the watermarked images of a server run come from (see :class:`BenchConfig`).
POSITIVES = ("generate", "upload")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

TPR_DEFINITION = ("TPR@1%FPR is the highest TPR among thresholds whose FPR ≤ 1% (an image is flagged when "
                  "score ≥ threshold; thresholds are all distinct scores, no interpolation). With n_neg "
                  "unwatermarked images at most floor(0.01·n_neg) of them may score at or above the threshold.")
DEFINITIONS = {
    "tpr_at_1pct_fpr": TPR_DEFINITION,
    "tpr_at_01pct_fpr": "TPR@0.1%FPR: the same at FPR ≤ 0.1% (at most floor(0.001·n_neg) unwatermarked images at or "
                        "above the threshold: with fewer than 1000 of them, none).",
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
    """``--server`` mode cannot run against the server given: unreachable, token refused, model not
    loaded, or a method it does not serve. Raised before any image is made or verified."""

    def __init__(self, address: str, reason: str):
        self.address = address
        super().__init__(f"--server mode cannot run against {address!r}: {reason}")


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


def bench_keys(n: int, method: str):
    """The fixed test keys of the benchmark, ``WatermarkKey.from_hex(f'{i:064x}')`` for i = 1..n, derived
    for ``method`` (the same keys as the methods report; a report must be reproducible, so never draw them)."""
    from shallowmark.keys import WatermarkKey

    return [WatermarkKey.from_hex(f"{1 + i:064x}").for_method(method) for i in range(n)]


def _all_methods() -> tuple[str, ...]:
    from shallowmark.methods import method_names

    return method_names()  # the registry's canonical order, without importing torch


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shallowmark" / "bench"


#: Who does a run's work (``BenchConfig.executor``).
EXECUTORS = ("local", "dask")


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
        model: backend name; ``model_options`` go to ``load_backend``. In server mode: the server's
            model to use (one of those ``GetInfo`` lists).
        num_steps: DDIM steps for the diffusion methods (``None``: their default, 50). In-process only:
            a server's operator sets its steps.
        method_config: per-method keyword arguments for ``load_method`` (override ``num_steps``);
            in-process only.
        batch: images per model call; in server mode, calls in flight at once (the server batches
            concurrent calls itself).
        out_dir: where the reports go.
        cache_dir: images and scores cache (default ``$XDG_CACHE_HOME/shallowmark/bench``).
        server: address of a shallowmark server: run through the SDK against it, as an auditor
            without model access would (see :mod:`shallowmark.attacks.bench_server`).
        positives: server mode: ``"generate"`` (the server generates each watermarked image from its
            seed) or ``"upload"`` (it watermarks the unwatermarked images themselves, for methods that
            can embed into an existing image; the others still generate).
        negatives: server mode: a folder of PNG/JPEG files to use as the unwatermarked images (the
            first ``n`` by name, centre-cropped to the model's size); default: crops of the photos
            bundled with scikit-image, scikit-learn and matplotlib.
        executor: ``"local"`` (this process) or ``"dask"``: the verification on Dask workers
            (:mod:`shallowmark.attacks.bench_dask`), a :class:`distributed.LocalCluster` of
            ``workers`` processes on loopback, or the scheduler at ``dask_address``. In-process only;
            the scores equal a local run's with one torch thread, and the cache is shared.
        method_attacks: ``{method: attacks}``: a method named here runs only these of ``attacks``
            (same spelling: names or ``"name:strength"``), every other method runs all of them. For
            the grid's costly cells: a 50-step inversion per attacked image makes the diffusion
            baselines cost a hundred times what the post-hoc ones do. The report marks the cells
            not run and states the subsets.
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
    positives: str = "generate"
    negatives: Any = None
    executor: str = "local"
    workers: int = 2
    dask_address: Optional[str] = None
    method_attacks: dict = field(default_factory=dict)
    quick: bool = False
    command: str = ""

    @classmethod
    def quick_config(cls, **overrides) -> "BenchConfig":
        """The small grid: 2 methods × 3 attacks × n=4 with 10 DDIM steps (well under a minute).

        With ``server`` set the steps are left to the server (its operator chose them)."""
        kw = dict(methods=QUICK_METHODS, attacks=QUICK_ATTACKS, n=QUICK_N, num_steps=QUICK_STEPS, batch=4,
                  quick=True)
        if overrides.get("server") is not None:
            del kw["num_steps"]
        kw.update(overrides)
        return cls(**kw)

    @property
    def seeds(self) -> list[int]:
        return list(range(int(self.seed), int(self.seed) + int(self.n)))

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else _default_cache_dir()


def _method_kwarg_names(name: str) -> set[str]:
    from shallowmark.core.watermarks import config_fields

    return set(config_fields(name))


def validate_config(config: BenchConfig) -> tuple[list[str], list[AttackSetting]]:
    """Check every name and number of ``config`` before any work; return (methods, attacks).

    In server mode this is the part that needs no server (names, numbers, the negatives folder,
    local dependencies); :func:`shallowmark.attacks.bench_server.run_server_bench` then checks the
    server itself (reachable, token, model, methods) before its first Embed or Verify. In server
    mode the default attack set leaves out the attacks that need the model (``regen``); asking
    for one explicitly is an error.

    Raises:
        UnknownNameError: an unknown method, attack or model (the message lists valid choices).
        InvalidParameterError: a strength outside the attack's range, bad n / seed / keys / batch /
            target FPR / steps, a method_config keyword the method does not take, or an option of
            the other mode.
        MissingDependencyError: a method needs an extra that is not installed.
    """
    if not isinstance(config, BenchConfig):
        raise InvalidParameterError(f"run_bench takes a BenchConfig, got {type(config).__name__}")
    server_mode = config.server is not None
    check_choice("executor", config.executor, EXECUTORS)
    if config.executor != "local" and server_mode:
        raise InvalidParameterError("executor applies to in-process runs; a server run's work is the server's")
    if config.executor == "dask":
        check_int("workers", config.workers, 1, 1024)
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise MissingDependencyError("executor 'dask' needs the distributed package: pip install 'shallowmark[dask]'") \
                from None
    all_methods = _all_methods()
    methods = [config.methods] if isinstance(config.methods, str) else list(config.methods)
    if not methods:
        raise InvalidParameterError(f"no methods given; valid choices: {', '.join(sorted(all_methods))}")
    for m in methods:
        check_choice("method", m, all_methods)
    if len(set(methods)) != len(methods):
        raise InvalidParameterError(f"methods listed twice: {methods}")
    default_attacks = config.attacks == DEFAULT_ATTACKS
    attacks_in = [config.attacks] if isinstance(config.attacks, (str, AttackSetting)) else list(config.attacks)
    if not attacks_in:
        raise InvalidParameterError("no attacks given; valid choices: " + ", ".join(sorted(_attack_names())))
    attacks: list[AttackSetting] = []
    for a in attacks_in:
        s = parse_attack(a)
        spec = get_attack(s.name)  # UnknownNameError lists the registered attacks
        spec.validate_strength(s.value)
        if server_mode and spec.context:
            if default_attacks:
                continue  # the default set in server mode: the attacks an auditor can run
            raise InvalidParameterError(
                f"attack {s.name!r} needs the diffusion model ({', '.join(spec.context)}), which server mode "
                f"does not have; server mode can run: {', '.join(server_attack_names())}")
        if all(x.label != s.label for x in attacks):
            attacks.append(s)
    method_attack_labels(config, methods, attacks)
    if server_mode:
        _validate_server_mode(config)
    else:
        from shallowmark.core.backends import backend_names

        check_choice("model", config.model, backend_names())
    check_int("n", config.n, 1)
    check_int("seed", config.seed, 0)
    check_int("n_keys", config.n_keys, 1)
    check_int("batch", config.batch, 1)
    if config.num_steps is not None:
        check_int("num_steps", config.num_steps, 2)
    f = config.target_fpr
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
        raise InvalidParameterError(f"target_fpr must be in (0, 1); got {f!r}")
    if server_mode:
        _negative_files(config)  # the folder must hold n images before anything is asked of the server
        _check_server_mode_dependencies()
        return methods, attacks
    if config.positives != "generate" or config.negatives is not None:
        raise InvalidParameterError("positives and negatives choose the images of a server run (--server); "
                                    "an in-process run makes both with the model")
    for m, kw in dict(config.method_config).items():
        check_choice("method in method_config", m, methods)
        bad = set(kw) - _method_kwarg_names(m)
        if bad:
            raise InvalidParameterError(f"method_config[{m!r}]: unknown option(s) {sorted(bad)}; valid: "
                                        f"{', '.join(sorted(_method_kwarg_names(m)))}")
    from shallowmark.methods import method_spec

    for m in methods:
        method_spec(m).check_available()
    return methods, attacks


def method_attack_labels(config: BenchConfig, methods, attacks) -> dict[str, tuple[str, ...]]:
    """The labels of the attacks each method runs: all of ``attacks`` unless ``config.method_attacks``
    names the method. Raises InvalidParameterError for a method not in the run, an attack not in
    ``attacks`` or an empty subset (each message names what the run has)."""
    labels = [a.label for a in attacks]
    given = config.method_attacks
    if not isinstance(given, dict):
        raise InvalidParameterError(f"method_attacks must map a method to its attacks; got {given!r}")
    out = {m: tuple(labels) for m in methods}
    for m, subset in given.items():
        if m not in methods:
            raise InvalidParameterError(f"method_attacks names {m!r}, which is not in this run's methods "
                                        f"({', '.join(methods)})")
        subset = [subset] if isinstance(subset, (str, AttackSetting)) else list(subset)
        if not subset:
            raise InvalidParameterError(f"method_attacks[{m!r}] is empty: leave the method out of the run instead")
        mine = {parse_attack(a).label for a in subset}
        unknown = sorted(mine - set(labels))
        if unknown:
            raise InvalidParameterError(f"method_attacks[{m!r}]: {', '.join(unknown)} not among this run's attacks "
                                        f"({', '.join(labels)})")
        out[m] = tuple(a for a in labels if a in mine)  # the run's order
    return out


def _validate_server_mode(config: BenchConfig) -> None:
    """The options a server run cannot honour: the server's operator chose the model settings."""
    if not isinstance(config.server, str) or not config.server.strip():
        raise InvalidParameterError(f"server must be an address host:port; got {config.server!r}")
    if not isinstance(config.model, str) or not config.model:
        raise InvalidParameterError(f"model must be the name of one of the server's models; got {config.model!r}")
    if config.num_steps is not None:
        raise InvalidParameterError("num_steps (--steps) cannot be set in server mode: the server's operator sets "
                                    "the steps (GetInfo reports each method's model evaluations)")
    if config.method_config or config.model_options:
        raise InvalidParameterError("method_config and model_options cannot be set in server mode: the server's "
                                    "operator configures the methods and models")
    check_choice("positives", config.positives, POSITIVES)


def _negative_files(config: BenchConfig) -> Optional[list[Path]]:
    """The first ``n`` image files (by name) of ``config.negatives``, or None for the bundled photos."""
    if config.negatives is None:
        return None
    folder = Path(config.negatives)
    if not folder.is_dir():
        raise InvalidParameterError(f"negatives: {folder} is not a folder of PNG/JPEG images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < int(config.n):
        raise InvalidParameterError(f"negatives: {folder} holds {len(files)} PNG/JPEG file(s), the run needs "
                                    f"n={int(config.n)}")
    return files[:int(config.n)]


def _check_server_mode_dependencies() -> None:
    """Server mode runs the attacks, metrics and plots here, without torch."""
    for module in ("sklearn", "skimage", "matplotlib", "tqdm"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError("bench --server (it needs scikit-learn, scikit-image, matplotlib and "
                                         "tqdm, not torch)", "audit", ImportError(f"No module named {module!r}"))


def _attack_names():
    from .registry import list_attacks

    return list_attacks()


def server_attack_names() -> list[str]:
    """The registered attacks that need nothing but the image (all of them but ``regen``)."""
    return [a for a in _attack_names() if not get_attack(a).context]
