"""The benchmark's grid, written once, and the interface of the executors that do its work.

A run is always the same steps: the unwatermarked images; each method's watermarked images (image
``i`` carries test key ``i mod n_keys``), from the cache or made in chunks of ``batch``; for every
attack, the negatives attacked once and scored by every method, then each method's positives
attacked and scored; the metrics from the cached scores; the report. What differs between running
in this process and running through the SDK against a server is who makes and scores the images,
and that is an :class:`Executor`:

- :class:`shallowmark.attacks.bench.InProcessExecutor`: the model here, shared DDIM inversions;
- :class:`shallowmark.attacks.bench_server.ServerExecutor`: Embed and Verify over RPC, no torch.

An executor for a distributed engine implements the same methods (its ``detect`` and
``watermark`` may fan a chunk out to workers); the runner, the cache and the reports stay as they are.

Cache contexts (what a cached score is keyed by) are
``stable_hash([*ctx_tag, schema, version, fingerprint, method, params, key ids, attack, strength,
target FPR, pos/neg, images id])``, so each executor's scores live under names of their own.
"""

from __future__ import annotations

import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .bench_cache import BenchCache, stable_hash
from .bench_config import _SCHEMA_VERSION, AttackSetting, BenchConfig, bench_keys, method_attack_labels
from .bench_report import _sanitize, detection_results, write_reports
from .registry import get_attack

__all__ = ["Executor", "Grid", "run_grid", "keyed_images", "apply_setting", "chunks", "pair_fidelity", "verify_cost",
           "sequential_stream"]

#: One detection as the cache stores it: (score, p-value, detected, bit accuracy or None, model
#: evaluations, best key id).
Score = tuple


@dataclass(frozen=True)
class Grid:
    """The validated grid of one run: methods, attacks, seeds, each method's fixed test keys and the
    labels of the attacks each method runs (all of them unless ``config.method_attacks`` says less)."""

    config: BenchConfig
    method_names: tuple[str, ...]
    attacks: tuple[AttackSetting, ...]
    keys: dict
    key_ids: dict
    attack_labels: dict

    @classmethod
    def build(cls, config: BenchConfig, method_names: Sequence[str], attacks: Sequence[AttackSetting]) -> "Grid":
        keys = {n: bench_keys(config.n_keys, n) for n in method_names}
        return cls(config, tuple(method_names), tuple(attacks), keys,
                   {n: [k.key_id for k in ks] for n, ks in keys.items()},
                   method_attack_labels(config, list(method_names), list(attacks)))

    def runs(self, name: str, setting: AttackSetting) -> bool:
        """Whether method ``name`` is scored under ``setting`` in this run."""
        return setting.label in self.attack_labels[name]

    def cells(self) -> int:
        """(method, attack) cells scored."""
        return sum(len(v) for v in self.attack_labels.values())

    @property
    def seeds(self) -> list[int]:
        return self.config.seeds

    @property
    def n(self) -> int:
        return int(self.config.n)

    @property
    def batch(self) -> int:
        return int(self.config.batch)

    @property
    def target_fpr(self) -> float:
        return float(self.config.target_fpr)


class Executor(Protocol):
    """Who makes and scores a run's images. ``prepare`` runs first (checks, model or server
    identity); afterwards ``fingerprint``, ``params`` (per method, what defines it) and
    ``attack_context`` (the model, for attacks that need it, or None) are set."""

    mode: str
    ctx_tag: list
    fingerprint: str
    params: dict
    attack_context: Any
    definitions: dict

    def prepare(self, grid: Grid, log: Callable[[str], None]) -> None: ...

    def images_id(self, name: str, kind: str) -> str:
        """The cache identity of method ``name``'s positives (``kind="pos"``) or of the negatives."""

    def image_work(self, grid: Grid) -> int:
        """Images the run makes or loads before scoring (for the progress bar)."""

    def make_images(self, grid: Grid, cache: BenchCache, bar) -> tuple[dict, dict]:
        """(negatives by seed, {method: positives by seed}), from the cache or made."""

    def detect(self, wanted: dict[str, list[int]], images: list[np.ndarray], grid: Grid) -> dict[str, list[Score]]:
        """For each method, the scores of the images (each of its own size) at the indices it wants,
        in that order."""

    def fidelity(self, grid: Grid, negatives: dict, positives: dict) -> list[dict]: ...

    def cost(self, grid: Grid, cache: BenchCache, ctx_of: Callable) -> list[dict]: ...

    def config_record(self, grid: Grid) -> dict: ...

    def close(self) -> None: ...


def chunks(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def _attack_rng(setting: AttackSetting, kind: str, method: str, seed: int) -> np.random.Generator:
    """One generator per attacked image, independent of batching and run order."""
    tag = zlib.crc32(f"{setting.name}|{setting.value!r}|{kind}|{method}".encode())
    return np.random.default_rng([tag, int(seed)])


def apply_setting(setting: AttackSetting, images: Sequence[np.ndarray], seeds: Sequence[int], kind: str,
                  method: str, model=None) -> list[np.ndarray]:
    """``setting`` applied to each image with its own generator (``model`` for attacks that need
    it). A list: an attack may change the images' sizes, and the executors take them as they are."""
    from .registry import apply_attack

    spec = get_attack(setting.name)
    ctx = {"model": model} if "model" in spec.context else {}
    return [apply_attack(setting.name, im, setting.value, rng=_attack_rng(setting, kind, method, s), **ctx)
            for im, s in zip(images, seeds)]


def keyed_images(grid: Grid, cache: BenchCache, bar, name: str, folder: Callable[[str], str],
                 make: Callable, timing: str) -> dict[int, np.ndarray]:
    """Method ``name``'s images by seed: each key's share of the seeds (image ``i`` carries key
    ``i mod n_keys``) from the cache folder ``folder(key_id)``, or ``make(key, seeds)`` in chunks
    of ``batch``, timed per image under ``(timing, folder(""))``."""
    images: dict[int, np.ndarray] = {}
    for j, kid in enumerate(grid.key_ids[name]):
        mine = [s for i, s in enumerate(grid.seeds) if i % grid.config.n_keys == j]
        have = cache.load_images(folder(kid), mine)
        bar.update(len(have))
        for chunk in chunks([s for s in mine if s not in have], grid.batch):
            t0 = time.perf_counter()
            made = make(grid.keys[name][j], list(chunk))
            cache.save_images(folder(kid), chunk, made)
            cache.put_timings(timing, folder(""), chunk, (time.perf_counter() - t0) / len(chunk))
            have.update(zip(chunk, made))
            bar.update(len(chunk))
        images.update(have)
    return images


def pair_fidelity(pairs) -> dict:
    """Mean PSNR (over the finite values; identical pairs give inf) and mean SSIM of image pairs."""
    import math

    from .metrics import psnr, ssim

    ps = [psnr(a, b) for a, b in pairs]
    return dict(psnr=float(np.mean([p for p in ps if math.isfinite(p)] or [math.inf])),
                ssim=float(np.mean([ssim(a, b) for a, b in pairs])))


def verify_cost(grid: Grid, cache: BenchCache, ctx_of: Callable, name: str) -> tuple:
    """(seconds per verify of the clean positives, or of all attacks' positives without a clean
    one; model evaluations per verify) of method ``name``, from the cache."""
    pos = [ctx_of(name, a, "pos") for a in grid.attacks if grid.runs(name, a)]
    clean = [ctx_of(name, a, "pos") for a in grid.attacks if a.name == "clean" and grid.runs(name, a)]
    seconds = cache.mean_timing("verify", clean or pos, grid.seeds)
    return seconds, int(cache.scored(pos[0])[grid.seeds[0]][4])


def _score_attacks(grid: Grid, ex: Executor, cache: BenchCache, bar, negatives: dict, positives: dict,
                   ctx_of: Callable) -> None:
    """Every attack: the negatives once (every method scores the copies it still needs), then each
    method's positives; scores go to the cache as they come, so an interrupted run resumes.

    The work is a stream of jobs, one chunk of ``batch`` images each, made lazily and handed to
    the executor's ``detect_stream`` where it has one (a distributed executor keeps several in
    flight on its workers) or to ``detect`` one after another. Either way the chunks, and so the
    model's batches, are the same, which keeps the scores the same."""

    def rows(name, setting, kind, seeds, scores):
        ctx = ctx_of(name, setting, kind)
        return [(ctx, int(s), name, setting.label, kind, *sc) for s, sc in zip(seeds, scores)]

    def jobs(setting):
        # (what to record, wanted indices per method, attacked images)
        mine = [m for m in grid.method_names if grid.runs(m, setting)]
        need = {m: set(grid.seeds) - set(cache.scored(ctx_of(m, setting, "neg"))) for m in mine}
        bar.update(sum(grid.n - len(v) for v in need.values()))
        for chunk in chunks(sorted(set().union(*need.values())), grid.batch):
            wanted = {m: [i for i, s in enumerate(chunk) if s in need[m]] for m in mine}
            wanted = {m: idx for m, idx in wanted.items() if idx}
            yield ("neg", chunk), wanted, apply_setting(setting, [negatives[s] for s in chunk], chunk, "neg", "",
                                                        ex.attack_context)
        for name in mine:
            missing = [s for s in grid.seeds if s not in cache.scored(ctx_of(name, setting, "pos"))]
            bar.update(grid.n - len(missing))
            for chunk in chunks(missing, grid.batch):
                yield ("pos", chunk), {name: list(range(len(chunk)))}, apply_setting(
                    setting, [positives[name][s] for s in chunk], chunk, "pos", name, ex.attack_context)

    stream = getattr(ex, "detect_stream", None) or (lambda js, g: sequential_stream(ex, js, g))
    for setting in grid.attacks:
        bar.set_postfix_str(setting.label)
        for ((kind, chunk), wanted), found, seconds in stream(jobs(setting), grid):
            if kind == "pos":
                (name,) = wanted
                ctx = ctx_of(name, setting, "pos")
                cache.put_timings("verify", ctx, chunk, seconds / len(chunk))
            cache.put_scores([r for m, idx in wanted.items()
                              for r in rows(m, setting, kind, [chunk[i] for i in idx], found[m])])
            bar.update(sum(len(idx) for idx in wanted.values()))


def sequential_stream(ex: Executor, jobs, grid: Grid):
    """``detect_stream`` for an executor without one: each job in turn, in this process. Yields
    ((what, wanted), scores by method, seconds the job took)."""
    for what, wanted, images in jobs:
        t0 = time.perf_counter()
        found = ex.detect(wanted, images, grid)
        yield (what, wanted), found, time.perf_counter() - t0


def run_grid(grid: Grid, ex: Executor, progress: bool = True, log=None) -> dict:
    """Run ``grid`` with ``ex``; write report.json, report.md, roc.png and tradeoff.png to
    ``config.out_dir`` and return report.json's dict."""
    from tqdm import tqdm

    from shallowmark import __version__

    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    config = grid.config
    try:
        ex.prepare(grid, log)
    except BaseException:
        ex.close()
        raise

    def ctx_of(name: str, setting: AttackSetting, kind: str) -> str:
        return stable_hash([*ex.ctx_tag, _SCHEMA_VERSION, __version__, ex.fingerprint, name, ex.params[name],
                            grid.key_ids[name], setting.name, setting.value, grid.target_fpr, kind,
                            ex.images_id(name, kind)], 24)

    cache = BenchCache(config.resolved_cache_dir())
    total = ex.image_work(grid) + grid.cells() * grid.n * 2
    bar = tqdm(total=total, disable=not progress, desc="bench", unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        negatives, positives = ex.make_images(grid, cache, bar)
        bar.set_postfix_str("detect")
        _score_attacks(grid, ex, cache, bar, negatives, positives, ctx_of)
        bar.close()
        results, curves = detection_results(cache, grid.attacks, grid.method_names, grid.seeds, ctx_of, grid.runs)
        fidelity = ex.fidelity(grid, negatives, positives)
        cost = ex.cost(grid, cache, ctx_of)
    finally:
        bar.close()
        cache.close()
        ex.close()
    record = ex.config_record(grid)
    record["method_attacks"] = {m: list(v) for m, v in grid.attack_labels.items() if len(v) < len(grid.attacks)}
    report = _sanitize(dict(config=record, results=results, fidelity=fidelity, cost=cost,
                            definitions=ex.definitions, seconds=time.perf_counter() - t_start))
    out = write_reports(config.out_dir, report, grid.attacks, grid.method_names, curves)
    log(f"wrote {out / 'report.json'}, report.md, roc.png, tradeoff.png ({report['seconds']:.0f} s)")
    return report
