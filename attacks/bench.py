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
in-process runner and the entry point).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
import zlib
from typing import Any, Sequence

import numpy as np

from shallowmark.errors import InvalidParameterError

from . import regen as _regen  # noqa: F401  (registers the "regen" attack)
from .bench_cache import BenchCache as _Cache
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
from .bench_report import _sanitize, detection_results, versions as _versions, write_reports
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
    """The parameters that define a method instance (for the cache key and the report)."""
    return {"class": type(m).__name__, **dataclasses.asdict(m.config)}


# -- detection with shared inversions ------------------------------------------------------------------
def _detect_batch(methods: dict, keys: dict, images: np.ndarray, target_fpr: float) -> dict:
    """Detections of every method in ``methods`` on one batch, sharing DDIM inversions
    (:func:`~shallowmark.core.watermarks.base.invert_shared`: Shallow Diffuse's x_t* on the way to
    the x_T of Tree-Ring, RingID and Gaussian Shading, when their step counts agree)."""
    from shallowmark.core.watermarks import invert_shared

    inverted = invert_shared(methods, images)
    return {name: m.score(inverted[name], keys[name], target_fpr) for name, m in methods.items()}


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
    log = log or (lambda msg: None)
    t_start = time.perf_counter()

    import torch
    from tqdm import tqdm

    from shallowmark.core.watermarks import load_method
    from shallowmark.methods import LATENT, method_spec

    if backend is None:
        from shallowmark.core.backends import load_backend

        backend = load_backend(config.model, **dict(config.model_options))
    model_fp = _model_fingerprint(backend, config.model, dict(config.model_options))
    from shallowmark import __version__

    methods = {}
    for name in method_names:
        kw = {}
        if config.num_steps is not None and method_spec(name).kind == LATENT:
            kw["num_steps"] = int(config.num_steps)
        kw.update(dict(config.method_config).get(name, {}))
        methods[name] = load_method(name, backend, **kw)
    params = {n: _method_params(m) for n, m in methods.items()}
    keys = {n: bench_keys(config.n_keys, n) for n in method_names}
    key_ids = {n: [k.key_id for k in ks] for n, ks in keys.items()}
    seeds = config.seeds
    n, batch, fpr = int(config.n), int(config.batch), float(config.target_fpr)
    cache = _Cache(config.resolved_cache_dir())
    img_root = f"{config.model}-{model_fp}"

    def folder(name: str, kind: str, key_id: str = "") -> str:
        return f"{img_root}/{kind}-{name}-{_h([__version__, params[name]], 10)}" + (f"/{key_id[:16]}" if key_id else "")

    latent = [m for m in method_names if methods[m].kind == LATENT]
    ref_name = latent[0] if latent else method_names[0]
    # The shared unwatermarked images are plain samples of the model: name them by what makes them
    # (sampler and step count), not by the key parameters of the method that draws them, so that
    # retuning one method's key does not invalidate every method's negatives.
    sampler = params[ref_name].get("num_steps") if ref_name in latent else None
    neg_folder = f"{img_root}/reference-plain-{_h([__version__, 'ddim', sampler], 10)}" if sampler else \
        folder(ref_name, "reference")
    n_work = (n * (1 + len(methods))) + len(attacks) * n * (1 + len(methods))
    bar = tqdm(total=n_work, disable=not progress, desc="bench", unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        with torch.no_grad():
            # -- unwatermarked images (shared) ---------------------------------------------------------
            def references(name: str, want: Sequence[int], count: bool) -> dict[int, np.ndarray]:
                fold = neg_folder if name == ref_name else folder(name, "reference")
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
            posthoc = {name: (name not in latent and methods[name].supports_embed and ref_shared[name])
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
                    dets = _detect_batch(todo, keys, attacked, fpr)
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
                        dets = _detect_batch({name: methods[name]}, keys, attacked, fpr)[name]
                        cache.put_timings("verify", ctx, chunk, (time.perf_counter() - t0) / len(chunk))
                        cache.put_scores(rows_for(name, setting, "pos", chunk, dets, ctx))
                        bar.update(len(chunk))
        bar.close()

        # -- metrics -----------------------------------------------------------------------------------
        from .metrics import psnr, ssim

        results, curves = detection_results(cache, attacks, method_names, seeds, ctx_of)
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
                             verify_model_evals=int(evals), embed_model_evals=m.model_evals().generate))
    finally:
        bar.close()
        cache.close()

    report = _sanitize(dict(
        config=_config_record(config, method_names, attacks, params, key_ids, model_fp, ref_name, posthoc,
                              backend),
        results=results, fidelity=fidelity, cost=cost, definitions=DEFINITIONS,
        seconds=time.perf_counter() - t_start,
    ))
    out = write_reports(config.out_dir, report, attacks, method_names, curves)
    log(f"wrote {out / 'report.json'}, report.md, roc.png, tradeoff.png ({report['seconds']:.0f} s)")
    return report


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


