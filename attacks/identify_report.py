"""Identification across many keys: one Verify searches a key family of up to 100 000 members.

What it measures, on Shallow Diffuse with its default configuration:

- **identification accuracy**: watermarked generations, each marked by one member of a family
  (:class:`~shallowmark.keys.KeyFamily`), verified against the first N members for N in ``sizes``:
  the fraction where the verdict fires at the target FPR (corrected for all N keys) *and* names the
  right member; also how often the right member ranks first whatever the threshold;
- **false positives**: unwatermarked images (the calibration's generations and real photos at their
  own sizes) verified against the same families: how often the verdict fires;
- **Verify latency** at each N through a real gRPC server (loopback), and the scoring time alone
  in-process, measured side by side in the same run.

The marked images' members are drawn from the family's first ``members`` (64), so that every N
holds them: the competition a true member meets is the N - 1 others, which are independent of it
whichever index it has. Each image is inverted once per attack; scoring it against all four sizes
costs no model evaluation. Verdicts are cached per image, attack and size in the cache folder
(``identify/results.jsonl``), so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from shallowmark.errors import InvalidParameterError
from shallowmark.reports import markdown_table, write_report

#: WIND (Arabi et al., 2024), its Table 1: identification accuracy with 100 000 keys on Stable
#: Diffusion under Tree-Ring's attack settings (JPEG 25, blur radius 4, noise std 0.1, brightness),
#: for its two-stage detector with 2048 groups. Quoted, not rerun here.
WIND_100K = {"clean": 1.00, "jpeg": 1.00, "blur": 1.00, "noise": 0.99, "jitter": 0.98}


@dataclass(frozen=True)
class IdentifyConfig:
    """One identification run (see the module docstring). ``attacks``: for the watermarked images,
    ``name`` or ``name:strength``; ``negative_attacks``: for the unwatermarked ones;
    ``photo_sources`` (None: every fetched set, ``()``: none) and ``photos_per_source``: the real
    photos among the unwatermarked images."""

    method: str = "shallow-diffuse"
    model: str = "tiny-ldm"
    n_marked: int = 100
    seed: int = 60000
    members: int = 64
    sizes: tuple[int, ...] = (64, 1000, 10000, 100000)
    attacks: tuple[str, ...] = ("clean", "jpeg:50", "jpeg", "blur", "noise", "jitter")
    n_generated_negatives: int = 100
    photo_sources: Optional[tuple[str, ...]] = None
    photos_per_source: Optional[int] = 25
    negative_attacks: tuple[str, ...] = ("clean", "jpeg:50")
    target_fpr: float = 0.01
    latency_calls: int = 5
    batch: int = 8
    cache_dir: Optional[str] = None
    # keywords of the method's config dataclass, for the scoring and the served latency alike
    method_options: dict = field(default_factory=dict)


def family_for(cfg: IdentifyConfig):
    """The run's fixed family (a report must be reproducible, so it is never drawn)."""
    from shallowmark.keys import WatermarkKey

    return WatermarkKey.from_hex("1d" * 32, label="identify").family(cfg.method, max(cfg.sizes))


def run(cfg: IdentifyConfig, out_dir: Path, log: Callable = print, command: str = "shallowmark bench-identify") -> dict:
    """Run (resuming from the cache), write ``report.json``/``report.md`` to ``out_dir``, return the report."""
    from shallowmark.attacks.bench_config import parse_attacks
    from shallowmark.attacks.calibration import CalibrationConfig, unwatermarked_images
    from shallowmark.core.backends import load_backend
    from shallowmark.core.watermarks import load_method

    if cfg.members > min(cfg.sizes) or min(cfg.sizes) < 1:
        raise InvalidParameterError(f"members ({cfg.members}) must fit in the smallest family size ({min(cfg.sizes)})")
    t0 = time.perf_counter()
    method = load_method(cfg.method, load_backend(cfg.model), **cfg.method_options)
    family = family_for(cfg)
    root = _cache_root(cfg)
    ctx = _context(method, cfg, family)
    cache = _load(root / "results.jsonl")
    marked = _marked_images(method, cfg, family, root, ctx, log)
    negatives = unwatermarked_images(method, CalibrationConfig(
        method=cfg.method, model=cfg.model, n_generated=cfg.n_generated_negatives,
        photo_sources=cfg.photo_sources, photos_per_source=cfg.photos_per_source, batch=cfg.batch,
        cache_dir=cfg.cache_dir), log)   # this run's cache (None: the calibration's, whose generations it shares)
    # an image's name holds its member, so that a run with other members never reads this one's records
    sets = [("marked", s, [(f"{seed}-{member}", im, member) for seed, im, member in marked])
            for s in parse_attacks(",".join(cfg.attacks))]
    sets += [("unmarked", s, [(f"{src}/{name}", im, None) for src, name, im in negatives])
             for s in parse_attacks(",".join(cfg.negative_attacks))]
    with (root / "results.jsonl").open("a") as f:
        for kind, setting, items in sets:
            todo = [it for it in items if (ctx, kind, it[0], setting.label) not in cache]
            for i in range(0, len(todo), cfg.batch):
                chunk = todo[i:i + cfg.batch]
                attacked = [_attack(setting, im, name) for name, im, _ in chunk]
                inverted = method.invert(attacked)
                per_size = {}
                for n in cfg.sizes:
                    fam_n = _sized(family, n)
                    t = time.perf_counter()
                    per_size[n] = (method.score(inverted, [fam_n], cfg.target_fpr), (time.perf_counter() - t) / len(chunk))
                for j, (name, _, member) in enumerate(chunk):
                    rec = dict(ctx=ctx, kind=kind, name=name, attack=setting.label, member=member, sizes={
                        str(n): dict(found=dets[j].member, detected=bool(dets[j].detected), p=float(dets[j].p_value),
                                     p_corrected=float(dets[j].p_value_corrected), score_s=dt)
                        for n, (dets, dt) in per_size.items()})
                    cache[(ctx, kind, name, setting.label)] = rec
                    f.write(json.dumps(rec) + "\n")
                f.flush()
                log(f"{kind} {setting.label}: {min(i + cfg.batch, len(todo))}/{len(todo)}")
    latency = _served_latency(cfg, family, marked[0][1], log)
    report = _report(cfg, method, family, sets, cache, ctx, latency, time.perf_counter() - t0, command)
    write_report(out_dir, report, _markdown(report))
    return report


def _sized(family, n: int):
    from dataclasses import replace

    return replace(family, size=int(n))


def _attack(setting, image, name: str):
    from shallowmark.attacks.registry import apply_attack

    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)   # the same placement every run
    return apply_attack(setting.name, image, setting.strength, rng=np.random.default_rng(seed))


def _cache_root(cfg: IdentifyConfig) -> Path:
    from shallowmark.attacks.photos import default_cache_dir

    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "identify"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _context(method, cfg: IdentifyConfig, family) -> str:
    from shallowmark.attacks.bench import _method_params

    blob = json.dumps([cfg.model, _method_params(method), family.commitment, list(cfg.sizes), cfg.target_fpr],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[(rec["ctx"], rec["kind"], rec["name"], rec["attack"])] = rec
    return out


def _marked_images(method, cfg: IdentifyConfig, family, root: Path, ctx: str, log) -> list:
    """(seed, image, member) of each watermarked generation, made where missing and cached as PNG."""
    from PIL import Image

    rng = np.random.default_rng(cfg.seed)
    members = [int(m) for m in rng.integers(0, cfg.members, cfg.n_marked)]
    seeds = list(range(cfg.seed, cfg.seed + cfg.n_marked))
    folder = root / f"marked-{ctx}"
    folder.mkdir(exist_ok=True)
    missing = [i for i, s in enumerate(seeds) if not (folder / f"{s}-{members[i]}.png").exists()]
    for i in range(0, len(missing), cfg.batch):
        idx = missing[i:i + cfg.batch]
        images = method.generate([family.member(members[j]) for j in idx], [seeds[j] for j in idx])
        for j, im in zip(idx, images):
            Image.fromarray(im).save(folder / f"{seeds[j]}-{members[j]}.png")
        log(f"marked: generated {min(i + cfg.batch, len(missing))}/{len(missing)}")
    return [(s, np.asarray(Image.open(folder / f"{s}-{m}.png").convert("RGB")), m) for s, m in zip(seeds, members)]


def _served_latency(cfg: IdentifyConfig, family, image: np.ndarray, log) -> dict:
    """Verify wall time per family size through a real server on loopback: one warm-up call, then
    ``latency_calls`` timed ones, the sizes interleaved so that the machine's noise hits each alike."""
    from shallowmark.client import Client
    from shallowmark.imaging import encode_png
    from shallowmark.server.app import ServerApp
    from shallowmark.server.config import ServerConfig

    token = secrets.token_urlsafe(16)
    png = encode_png(image)
    times: dict[int, list[float]] = {n: [] for n in cfg.sizes}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        app = ServerApp(ServerConfig(host="127.0.0.1", port=0, tokens={token: "bench-identify"},
                                     state_dir=Path(tmp) / "server", models=(cfg.model,),
                                     method_options={cfg.method: dict(cfg.method_options)})).start()
        try:
            with Client(app.address, token, timeout=600, retries=0) as client:
                client.wait_until_ready(timeout=300)
                for n in cfg.sizes:
                    client.verify(png, [_sized(family, n)], model=cfg.model, target_fpr=cfg.target_fpr)
                for _ in range(cfg.latency_calls):
                    for n in cfg.sizes:
                        t = time.perf_counter()
                        res = client.verify(png, [_sized(family, n)], model=cfg.model, target_fpr=cfg.target_fpr)
                        times[n].append(time.perf_counter() - t)
                        found[n] = (res.identified_member, res.model_evals)
        finally:
            app.stop()
    log("served Verify: " + ", ".join(f"{n} keys {statistics.median(t):.2f} s" for n, t in times.items()))
    return {str(n): dict(median_s=statistics.median(t), min_s=min(t), max_s=max(t), calls=len(t),
                         identified_member=found[n][0], model_evals=found[n][1]) for n, t in times.items()}


def _report(cfg, method, family, sets, cache, ctx, latency, seconds, command) -> dict:
    import platform

    import torch

    from shallowmark.attacks.bench import _method_params

    rows = []
    for kind, setting, items in sets:
        recs = [cache[(ctx, kind, name, setting.label)] for name, _, _ in items]
        for n in cfg.sizes:
            got = [r["sizes"][str(n)] for r in recs]
            row = dict(kind=kind, attack=setting.label, keys=n, images=len(recs),
                       detected=float(np.mean([g["detected"] for g in got])),
                       median_score_s=float(np.median([g["score_s"] for g in got])))
            if kind == "marked":
                right = [g["found"] == r["member"] for g, r in zip(got, recs)]
                row.update(identified=float(np.mean([g["detected"] and ok for g, ok in zip(got, right)])),
                           top1=float(np.mean(right)),
                           wrong_member_detected=int(sum(g["detected"] and not ok for g, ok in zip(got, right))))
            rows.append(row)
    return dict(command=command, config=asdict(cfg), family_id=family.commitment,
                method_params=_method_params(method), rows=rows, served_latency=latency, wind_100k=WIND_100K,
                environment=dict(machine=platform.platform(), cpus=__import__("os").cpu_count(),
                                 torch=torch.__version__, torch_threads=torch.get_num_threads()),
                seconds=seconds)


def _markdown(rep: dict) -> str:
    cfg = rep["config"]
    sizes = cfg["sizes"]
    marked = [r for r in rep["rows"] if r["kind"] == "marked"]
    unmarked = [r for r in rep["rows"] if r["kind"] == "unmarked"]
    attacks = list(dict.fromkeys(r["attack"] for r in marked))
    by = {(r["kind"], r["attack"], r["keys"]): r for r in rep["rows"]}
    lines = [
        "# Identification across many keys", "",
        f"Generated by `{rep['command']}` in {rep['seconds']:.0f} s "
        f"({rep['environment']['cpus']} CPUs, torch {rep['environment']['torch']}).", "",
        f"{cfg['method']} on {cfg['model']}, default configuration. {cfg['n_marked']} watermarked generations "
        f"(seeds {cfg['seed']}..), each marked by one member of one key family (drawn from its first "
        f"{cfg['members']} members, so every family size below holds it), verified against the family's first N "
        f"members. Verdict at target FPR {cfg['target_fpr']:g}, Bonferroni-corrected for all N keys. "
        f"Identified: the verdict fires and names the right member.", "",
        "## Identification accuracy (identified / right member ranked first)", ""]
    head = ["attack"] + [f"{n} keys" for n in sizes] + ["WIND, 100 000 keys (its paper)"]
    body = []
    for a in attacks:
        cells = [f"{by[('marked', a, n)]['identified']:.2f} / {by[('marked', a, n)]['top1']:.2f}" for n in sizes]
        wind = rep["wind_100k"].get(a)      # its paper has no JPEG 50
        body.append([a] + cells + [f"{wind:.2f}" if wind is not None else "-"])
    lines += markdown_table(head, body) + [""]
    wrong = sum(r["wrong_member_detected"] for r in marked)
    lines += [f"Detected with the wrong member, over every attack and size: {wrong}.", "",
              "## False positives on unwatermarked images", "",
              f"{unmarked[0]['images'] if unmarked else 0} images: {cfg['n_generated_negatives']} generations "
              f"(seeds 50000..) and real photos at their own sizes ({cfg['photos_per_source']} per photo set)."
              " Fraction on which the verdict fires:", ""]
    neg_attacks = list(dict.fromkeys(r["attack"] for r in unmarked))
    lines += markdown_table(["attack"] + [f"{n} keys" for n in sizes],
                            [[a] + [f"{by[('unmarked', a, n)]['detected']:.3f}" for n in sizes] for a in neg_attacks]) + [""]
    lat = rep["served_latency"]
    lines += ["## Verify latency", "",
              f"Through a real gRPC server on loopback, one {cfg['model']} image, {cfg['latency_calls']} calls per "
              "size after a warm-up, sizes interleaved; and the scoring alone in-process (median per image over "
              "the clean run), measured in the same run.", ""]
    lines += markdown_table(["keys", "served Verify, median s", "min s", "max s", "scoring alone, median s",
                             "model evaluations"],
                            [[str(n), f"{lat[str(n)]['median_s']:.3f}", f"{lat[str(n)]['min_s']:.3f}",
                              f"{lat[str(n)]['max_s']:.3f}",
                              f"{by[('marked', attacks[0], n)]['median_score_s']:.3f}",
                              str(lat[str(n)]['model_evals'])] for n in sizes]) + [""]
    lines += ["## Parameters", "", "```json", json.dumps(rep["method_params"], sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)
