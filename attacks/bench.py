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

With ``server`` set (an address), :func:`run_bench` runs the same grid through the SDK against a
shallowmark server instead, as an auditor without model access would; see
:mod:`shallowmark.attacks.bench_server`. The modules: :mod:`~shallowmark.attacks.bench_config`
(the grid and its validation), :mod:`~shallowmark.attacks.bench_cache` (the cache),
:mod:`~shallowmark.attacks.bench_report` (metrics rows and the report files), this one (the
in-process executor and the entry point), :mod:`~shallowmark.attacks.bench_grid` (the steps of a
run, shared by both modes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np

from shallowmark.errors import InvalidParameterError

from . import regen as _regen  # noqa: F401  (registers the "regen" attack)
from .bench_cache import stable_hash as _h
from .bench_config import (  # noqa: F401  (re-exported: the public names of the benchmark live here)
    DEFAULT_ATTACKS,
    DEFINITIONS,
    QUICK_ATTACKS,
    QUICK_METHODS,
    QUICK_N,
    QUICK_STEPS,
    TPR_DEFINITION,
    _FIDELITY_NOTES,
    _SCHEMA_VERSION,
    AttackSetting,
    BenchConfig,
    ServerModeUnavailableError,
    bench_keys,
    parse_attack,
    parse_attacks,
    validate_config,
)
from .bench_grid import Grid, chunks, keyed_images, pair_fidelity, run_grid, verify_cost
from .bench_report import _sanitize, versions as _versions
from .registry import get_attack

__all__ = [
    "AttackSetting", "BenchConfig", "ServerModeUnavailableError", "DEFAULT_ATTACKS", "QUICK_ATTACKS",
    "QUICK_METHODS", "TPR_DEFINITION", "parse_attack", "parse_attacks", "run_bench", "validate_config",
]


# -- cache identity of the model and the methods ---------------------------------------------------------
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
    """The parameters that define a method instance (for the cache key and the report): its config,
    and its synchronisation template's where it has one (whose search settings are not config)."""
    params = {"class": type(m).__name__, **dataclasses.asdict(m.config)}
    if dataclasses.is_dataclass(getattr(m, "template", None)):
        params["sync_template"] = dataclasses.asdict(m.template)
    return params


# -- detection with shared inversions ------------------------------------------------------------------
def _detect_batch(methods: dict, keys: dict, images: np.ndarray, target_fpr: float) -> dict:
    """Detections of every method in ``methods`` on one batch, sharing DDIM inversions
    (:func:`~shallowmark.core.watermarks.base.invert_shared`: Shallow Diffuse's x_t* on the way to
    the x_T of Tree-Ring, RingID and Gaussian Shading, when their step counts agree)."""
    from shallowmark.core.watermarks import invert_shared

    inverted = invert_shared(methods, images)
    return {name: m.score(inverted[name], keys[name], target_fpr) for name, m in methods.items()}


def detect_rows(methods: dict, keys: dict, wanted: dict, images, target_fpr: float) -> dict:
    """The cache rows of one batch: for each method in ``wanted``, its scores of the images at
    the indices it wants (one shared inversion per batch, :func:`_detect_batch`)."""
    dets = _detect_batch({n: methods[n] for n in wanted}, keys, images, target_fpr)
    return {n: [_score_row(dets[n][i]) for i in idx] for n, idx in wanted.items()}


def _same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding: the same sampling run in another batch may flip a few pixels by 1."""
    if a.shape != b.shape:
        return False
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return bool(d.max() <= 2 and np.mean(d > 0) < 0.01)


# -- the in-process executor ---------------------------------------------------------------------------
class InProcessExecutor:
    """The grid's work on a model in this process (see :mod:`~shallowmark.attacks.bench_grid`).

    Negatives are the ``reference(seeds)`` of the first latent method, shared by every method;
    a method whose own reference equals them (checked on the first seed) is compared with them for
    fidelity, otherwise with its own. Post-hoc methods are watermarked by embedding into the shared
    negatives, which is what their ``generate`` does. Detection shares DDIM inversions
    (:func:`_detect_batch`)."""

    mode = "in-process"
    ctx_tag: list = []
    definitions = DEFINITIONS

    def __init__(self, config: BenchConfig, backend=None):
        self.config, self.backend = config, backend

    def prepare(self, grid, log) -> None:
        import torch

        from shallowmark.core.watermarks import load_method
        from shallowmark.methods import LATENT

        config = self.config
        if self.backend is None:
            from shallowmark.core.backends import load_backend

            self.backend = load_backend(config.model, **dict(config.model_options))
        self._grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)  # this thread only; restored by close()
        self.fingerprint = _model_fingerprint(self.backend, config.model, dict(config.model_options))
        self.methods = {name: load_method(name, self.backend, **_method_kwargs(config, name)) for name in grid.method_names}
        self.params = {n: _method_params(m) for n, m in self.methods.items()}
        self.attack_context = self.backend
        latent = [m for m in grid.method_names if self.methods[m].kind == LATENT]
        self.latent = latent
        self.ref_name = latent[0] if latent else grid.method_names[0]
        # The shared unwatermarked images are plain samples of the model: name them by what makes them
        # (sampler and step count), not by the key parameters of the method that draws them, so that
        # retuning one method's key does not invalidate every method's negatives.
        sampler = self.params[self.ref_name].get("num_steps") if self.ref_name in latent else None
        self.neg_folder = f"{self._root}/reference-plain-{_h([_version(), 'ddim', sampler], 10)}" if sampler else \
            self.folder(self.ref_name, "reference")
        log(f"unwatermarked images: {self.ref_name}.reference, seeds {grid.seeds[0]}..{grid.seeds[-1]}")

    @property
    def _root(self) -> str:
        return f"{self.config.model}-{self.fingerprint}"

    def folder(self, name: str, kind: str, key_id: str = "") -> str:
        return f"{self._root}/{kind}-{name}-{_h([_version(), self.params[name]], 10)}" + \
            (f"/{key_id[:16]}" if key_id else "")

    def images_id(self, name: str, kind: str) -> str:
        return self.folder(name, "watermarked") if kind == "pos" else self.neg_folder

    def image_work(self, grid) -> int:
        return grid.n * (1 + len(grid.method_names))

    def _references(self, cache, bar, name: str, want, count: bool) -> dict:
        fold = self.neg_folder if name == self.ref_name else self.folder(name, "reference")
        have = cache.load_images(fold, want)
        missing = [s for s in want if s not in have]
        if count:
            bar.update(len(want) - len(missing))
        for chunk in chunks(missing, int(self.config.batch)):
            t0 = time.perf_counter()
            ims = self.methods[name].reference(list(chunk))
            cache.save_images(fold, chunk, ims)
            cache.put_timings("reference", fold, chunk, (time.perf_counter() - t0) / len(chunk))
            have.update(zip(chunk, ims))
            if count:
                bar.update(len(chunk))
        return have

    def make_images(self, grid, cache, bar) -> tuple[dict, dict]:
        seeds = grid.seeds
        negatives = self._references(cache, bar, self.ref_name, seeds, True)
        self.ref_shared = {name: name == self.ref_name or _same_image(
            self._references(cache, bar, name, seeds[:1], False)[seeds[0]], negatives[seeds[0]])
            for name in grid.method_names}
        self.posthoc = {name: (name not in self.latent and self.methods[name].supports_embed and self.ref_shared[name])
                        for name in grid.method_names}
        positives, self.own_refs = {}, {}
        for name in grid.method_names:
            m = self.methods[name]
            if self.posthoc[name]:
                def make(key, chunk, m=m):
                    return m.embed([key], np.stack([negatives[s] for s in chunk]))
            else:
                def make(key, chunk, m=m):
                    return m.generate([key], chunk)
            positives[name] = keyed_images(grid, cache, bar, name, lambda kid, n=name: self.folder(n, "watermarked", kid),
                                           make, "embed")
            if not self.ref_shared[name]:
                self.own_refs[name] = self._references(cache, bar, name, seeds, False)
        return negatives, positives

    def detect(self, wanted: dict, images: np.ndarray, grid) -> dict:
        return detect_rows(self.methods, grid.keys, wanted, images, grid.target_fpr)

    def fidelity(self, grid, negatives: dict, positives: dict) -> list[dict]:
        out = []
        for name in grid.method_names:
            refs = negatives if self.ref_shared[name] else self.own_refs[name]
            out.append(dict(method=name, **pair_fidelity([(positives[name][s], refs[s]) for s in grid.seeds]),
                            reference="shared" if self.ref_shared[name] else "own", note=_FIDELITY_NOTES.get(name)))
        return out

    def cost(self, grid, cache, ctx_of) -> list[dict]:
        out = []
        for name in grid.method_names:
            embed_s = cache.mean_timing("embed", [self.folder(name, "watermarked")], grid.seeds)
            if embed_s is not None and self.posthoc[name]:
                embed_s += cache.mean_timing("reference", [self.neg_folder], grid.seeds) or 0.0
            verify_s, evals = verify_cost(grid, cache, ctx_of, name)
            out.append(dict(method=name, embed_seconds=embed_s, verify_seconds=verify_s, verify_model_evals=evals,
                            embed_model_evals=self.methods[name].model_evals().generate))
        return out

    def config_record(self, grid) -> dict:
        return _config_record(self.config, list(grid.method_names), grid.attacks, self.params, grid.key_ids,
                              self.fingerprint, self.ref_name, self.posthoc, self.backend)

    def close(self) -> None:
        import torch

        torch.set_grad_enabled(getattr(self, "_grad", True))


def _method_kwargs(config: BenchConfig, name: str) -> dict:
    """The options method ``name`` is loaded with in a run of ``config``: its step count (latent
    methods) and its ``method_config`` entry."""
    from shallowmark.methods import LATENT

    kw = {"num_steps": int(config.num_steps)} if config.num_steps is not None and _kind(name) == LATENT else {}
    kw.update(dict(config.method_config).get(name, {}))
    return kw


def _score_row(d) -> tuple:
    """A :class:`Detection` as the cache stores it."""
    return (float(d.score), float(d.p_value), int(d.detected), None if d.bit_accuracy is None else float(d.bit_accuracy),
            int(d.model_evals), d.key_id)


def _kind(name: str) -> str:
    from shallowmark.methods import method_spec

    return method_spec(name).kind


def _version() -> str:
    from shallowmark import __version__

    return __version__


# -- the entry point -----------------------------------------------------------------------------------
def run_bench(config: BenchConfig, progress: bool = True, backend=None, log=None, client=None) -> dict:
    """Run the benchmark of ``config``; write the reports to ``config.out_dir`` and return report.json's dict.

    Args:
        config: the grid and its parameters (see :class:`BenchConfig`).
        progress: show a tqdm progress bar on stderr.
        backend: an already loaded backend to use instead of ``load_backend(config.model)``
            (it must be that model; it is fingerprinted for the cache either way). In-process only.
        log: optional ``log(message)`` for a few status lines.
        client: server mode only: a connected :class:`shallowmark.client.Client` for
            ``config.server`` (TLS, token); default ``Client(config.server, $SHALLOWMARK_TOKEN)``.

    Every name and strength is validated before any work (see :func:`validate_config`); in server
    mode the server too (reachable, token, model, methods) before its first Embed or Verify.
    """
    if isinstance(config, BenchConfig) and config.server is not None:
        if backend is not None:
            raise InvalidParameterError("backend= runs the benchmark in-process; a server run uses the server's model")
        from .bench_server import run_server_bench

        return run_server_bench(config, progress=progress, log=log, client=client)
    if client is not None:
        raise InvalidParameterError("client= needs config.server, the address that client talks to")
    method_names, attacks = validate_config(config)
    if config.executor == "dask":
        from .bench_dask import DaskExecutor

        ex = DaskExecutor(config, backend, workers=config.workers, address=config.dask_address)
    else:
        ex = InProcessExecutor(config, backend)
    return run_grid(Grid.build(config, method_names, attacks), ex, progress, log)


def _machine(backend) -> dict:
    import torch

    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=str(backend.device),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def _config_record(config, method_names, attacks, params, key_ids, model_fp, ref_name, posthoc, backend) -> dict:
    from shallowmark.methods import LATENT, method_spec

    return _sanitize(dict(
        mode="in-process", methods=method_names,
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
        diffusion_methods=[m for m in method_names if method_spec(m).kind == LATENT],
        regen=dict(grid_steps=_regen.GRID_STEPS, default_strength=_regen.DEFAULT_STRENGTH),
        attack_rng="numpy default_rng([crc32(name|strength|pos-or-neg|method), seed]) per image",
        command=config.command or " ".join(sys.argv), versions=_versions(), machine=_machine(backend),
    ))


