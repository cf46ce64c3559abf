"""``shallowmark bench-photos``: the user scenario on real photos the model never saw, through the
service.

A real gRPC server (loopback, a one-off token, state in a temporary folder) serves the model; the
photos (:mod:`shallowmark.attacks.photos`, an even spread over every fetched source, at their own
sizes) are uploaded with Embed (``output="residual"``, the service's default for images that are
not at the model's size), and each watermarked copy comes back at its own size. For each photo the
report gives PSNR and SSIM of the copy against the original at native resolution, and the Verify
verdict of the copy and of the unwatermarked original, clean and after each platform pipeline
(``platform-1080``, ``platform-4x5``, ``platform-1x1``), all through the RPC, as a platform would.

Writes ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import platform
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from shallowmark.reports import markdown_table, write_report

__all__ = ["PhotoScenarioConfig", "pick", "run"]

PIPELINES = ("clean", "platform-1080", "platform-4x5", "platform-1x1")


@dataclass(frozen=True)
class PhotoScenarioConfig:
    """``n`` photos spread evenly over ``sources`` (None: every fetched source), watermarked with
    ``method`` on ``model`` with the benchmark's first test key; verdicts at ``target_fpr``."""

    n: int = 20
    sources: Optional[tuple[str, ...]] = None
    method: str = "shallow-diffuse"
    model: str = "tiny-ldm"
    target_fpr: float = 0.01
    cache_dir: Optional[str] = None
    num_steps: Optional[int] = None     # the server's DDIM steps for the method (None: its default)
    # more of the method's configuration, as the server's ``method_options`` take it (e.g.
    # {"key_variants": 16}); the report's config holds it, so a run says what it measured
    method_options: Optional[dict] = None


def pick(photos: list, n: int) -> list:
    """``n`` photos, as even a share of each source as the sources allow, each source's taken at
    evenly spaced places in its (sorted) list, so a run is the same every time."""
    from shallowmark.errors import InvalidParameterError

    if n < 1:
        raise InvalidParameterError(f"n must be at least 1; got {n}")
    by_source: dict[str, list] = {}
    for p in sorted(photos, key=lambda p: (p.source, p.name)):
        by_source.setdefault(p.source, []).append(p)
    if sum(len(v) for v in by_source.values()) < n:
        raise InvalidParameterError(f"{n} photos asked for, {sum(len(v) for v in by_source.values())} fetched "
                                    "(run `shallowmark fetch-photos`)")
    quota = {s: 0 for s in by_source}
    while sum(quota.values()) < n:              # round-robin over the sources that still have photos
        for s in by_source:
            if quota[s] < len(by_source[s]) and sum(quota.values()) < n:
                quota[s] += 1
    out = []
    for s, items in by_source.items():
        k = quota[s]
        out += [items[int(i)] for i in np.linspace(0, len(items) - 1, k).round().astype(int)] if k else []
    return out


def run(cfg: PhotoScenarioConfig, out_dir: Path, log: Callable = print,
        command: str = "shallowmark bench-photos") -> dict:
    from shallowmark.attacks import photos as photo_sets
    from shallowmark.attacks.bench_config import bench_keys
    from shallowmark.attacks.metrics import psnr, ssim
    from shallowmark.attacks.registry import apply_attack
    from shallowmark.client import Client
    from shallowmark.imaging import decode_rgb, encode_png
    from shallowmark.server.app import ServerApp
    from shallowmark.server.config import ServerConfig

    t0 = time.perf_counter()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    chosen = pick(photo_sets.load(cache, cfg.sources), cfg.n)
    licence = photo_sets.licences(cache, cfg.sources)
    key = bench_keys(1, cfg.method)[0]
    token = secrets.token_urlsafe(16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        options = dict(cfg.method_options or {}, **({"num_steps": cfg.num_steps} if cfg.num_steps else {}))
        app = ServerApp(ServerConfig(host="127.0.0.1", port=0, tokens={token: "bench-photos"},
                                     state_dir=Path(tmp) / "server", models=(cfg.model,),
                                     method_options={cfg.method: options} if options else {})
                        ).start()
        try:
            with Client(app.address, token, timeout=600) as client:
                client.wait_until_ready(timeout=300)
                for i, ph in enumerate(chosen):
                    original = ph.image
                    t = time.perf_counter()
                    res = client.embed(key, method=cfg.method, model=cfg.model, image=encode_png(original),
                                       output="residual")
                    embed_s = time.perf_counter() - t
                    marked = decode_rgb(res.image)
                    if marked.shape != original.shape:
                        raise AssertionError(f"{ph.source}/{ph.name}: sent {original.shape}, got {marked.shape} back")
                    verdicts = {}
                    for kind, img in (("watermarked", marked), ("original", original)):
                        for pipe in PIPELINES:
                            attacked = apply_attack(pipe, img, None, rng=np.random.default_rng(i))
                            v = client.verify(encode_png(attacked), [key], method=cfg.method, model=cfg.model,
                                              target_fpr=cfg.target_fpr)
                            verdicts[f"{kind}/{pipe}"] = dict(p=float(v.verdicts[0].p_value_corrected),
                                                              detected=bool(v.detected),
                                                              size=[int(attacked.shape[1]), int(attacked.shape[0])])
                    rows.append(dict(source=ph.source, name=ph.name, licence=licence.get((ph.source, ph.name), ""),
                                     width=int(original.shape[1]), height=int(original.shape[0]),
                                     psnr=psnr(marked, original), ssim=ssim(marked, original),
                                     embed_s=embed_s, verdicts=verdicts))
                    log(f"{i + 1}/{len(chosen)} {ph.source}/{ph.name} {original.shape[1]}x{original.shape[0]}: "
                        f"PSNR {rows[-1]['psnr']:.2f} dB, p " + ", ".join(
                            f"{p}={verdicts['watermarked/' + p]['p']:.1g}" for p in PIPELINES))
        finally:
            app.stop()
    import torch

    res = dict(config=dict(asdict(cfg), key_id=key.key_id, command=command, machine=platform.platform(),
                           cpus=__import__("os").cpu_count(), torch=torch.__version__),
               rows=rows, summary=_summary(rows, cfg.target_fpr), seconds=time.perf_counter() - t0)
    write_report(out_dir, res, _markdown(res), default=float)
    return res


def _summary(rows: list, target: float) -> dict:
    out = dict(n=len(rows), psnr_mean=float(np.mean([r["psnr"] for r in rows])),
               psnr_min=float(np.min([r["psnr"] for r in rows])),
               ssim_mean=float(np.mean([r["ssim"] for r in rows])), ssim_min=float(np.min([r["ssim"] for r in rows])))
    for kind in ("watermarked", "original"):
        for pipe in PIPELINES:
            out[f"{kind}/{pipe}"] = float(np.mean([r["verdicts"][f"{kind}/{pipe}"]["detected"] for r in rows]))
    return out


def _markdown(res: dict) -> str:
    c, s = res["config"], res["summary"]
    lines = [f"# Real photos through the service on `{c['model']}` ({c['method']})", "",
             f"Command: `{c['command']}`  ",
             f"{s['n']} photos the model never saw, at their own sizes, uploaded to a real gRPC server (loopback) "
             f"with Embed (output \"residual\") and checked with Verify, one fixed test key ({c['key_id']}), "
             f"target FPR {c['target_fpr']:g}. Machine: {c['machine']}, {c['cpus']} CPUs, torch {c['torch']}; "
             f"run took {res['seconds']:.0f} s." + (f" Method options: `{json.dumps(c['method_options'], sort_keys=True)}`"
                                                    if c.get("method_options") else ""), "",
             f"PSNR against the original at native resolution: mean {s['psnr_mean']:.2f} dB, lowest "
             f"{s['psnr_min']:.2f} dB; SSIM mean {s['ssim_mean']:.4f}, lowest {s['ssim_min']:.4f}.", "",
             "Detected (fraction of photos):", ""]
    lines += markdown_table(["copy", *PIPELINES],
                            ([kind, *(f"{s[f'{kind}/{p}']:.2f}" for p in PIPELINES)] for kind in ("watermarked", "original")))
    lines += ["", "Per photo: corrected p-value of the watermarked copy (and of the unwatermarked original) after each pipeline.", ""]
    lines += markdown_table(
        ["photo", "licence", "size", "PSNR (dB)", "SSIM", *PIPELINES],
        ([f"{r['source']}/{r['name']}", r["licence"], f"{r['width']}x{r['height']}", f"{r['psnr']:.2f}", f"{r['ssim']:.4f}",
          *(f"{r['verdicts']['watermarked/' + p]['p']:.2g} ({r['verdicts']['original/' + p]['p']:.2g})" for p in PIPELINES)]
         for r in res["rows"]))
    lines += ["", "Pipelines: `platform-1080` resizes to a 1080 px long side then JPEG 80; `platform-4x5` crops "
              "to 4:5 then JPEG 80; `platform-1x1` crops to 1:1 then resizes to 512x512 (`shallowmark.attacks.platform`)."]
    return "\n".join(lines) + "\n"
