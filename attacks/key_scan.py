"""``shallowmark bench-key-scan``: where Shallow Diffuse's ring key should sit on a model.

Each candidate is a :class:`ShallowDiffuseConfig` (ring centre, rings, real or complex values,
channel, strength). All candidates share the same seeds, the same x_t* (one DDIM run T → t*), the
same unwatermarked reference images, and the same inverted unwatermarked images under every
attack, so their figures differ only by the key. Per candidate we measure:

- PSNR of the generated image against the same-seed unwatermarked one (server scenario);
- the median log10 p-value of its own key and the detection rate at p ≤ 0.01 under each attack,
  and the rate at which the unwatermarked images are flagged (should be ≈ 0.01: the p-values are
  exact);
- the user scenario in ``residual`` output on the held-out photo and crops of it: PSNR against
  the original and the largest p-value after JPEG at quality 75.

It writes ``report.json`` and ``report.md`` to ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from shallowmark.reports import markdown_table, write_report

DEFAULT_ATTACKS = ("clean", "jpeg", "blur", "noise", "jitter", "crop", "rotate")

#: What every candidate shares unless it says otherwise: one pattern at the FFT's corner. The scan
#: compares placements of the ring pattern, as its committed report ran; the key variants and the
#: centred origin came later, against forgery, and are measured in docs/reliability/forgery.
SCAN_BASE = dict(key_variants=1, ring_origin="corner")

# The candidates of the committed scan: the reference placement, then the annulus around DC that
# replaced it, with variations of band, value type, channel and strength.
DEFAULT_CANDIDATES = (
    dict(ring_centre="nyquist", inner_radius=0, radius=10, complex_key=False, ring_write="replace", strength=4.0),
    dict(ring_centre="dc", inner_radius=8, radius=16, complex_key=False, ring_write="replace", strength=1.0),
    dict(ring_centre="dc", inner_radius=8, radius=16, complex_key=True, ring_write="replace", strength=1.0),
    dict(ring_centre="dc", inner_radius=8, radius=16, complex_key=True, ring_write="replace", strength=0.8),
    dict(ring_centre="dc", inner_radius=8, radius=16, complex_key=True, ring_write="mean", strength=0.8,
         embed_strength=0.6),
    dict(ring_centre="dc", inner_radius=8, radius=16, complex_key=True, ring_write="mean", strength=1.0),
    dict(ring_centre="dc", inner_radius=4, radius=12, complex_key=True, ring_write="mean", strength=0.8),
    dict(ring_centre="dc", inner_radius=8, radius=16, complex_key=True, ring_write="mean", strength=0.8, channel=2),
)


def user_photos(size: int = 256) -> np.ndarray:
    """The held-out photo (centre crop) and three half-size crops of it, resized to ``size``²: the
    user scenario's images, never seen in training."""
    from PIL import Image

    from shallowmark.core.photos import center_crop, heldout_photo

    photo = heldout_photo()
    h, w = photo.shape[:2]
    side = min(h, w) // 2
    out = [center_crop(photo, size)]
    for fy, fx in ((0.2, 0.2), (0.5, 0.7), (0.8, 0.4)):
        y0, x0 = int((h - side) * fy), int((w - side) * fx)
        out.append(np.asarray(Image.fromarray(photo[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.LANCZOS)))
    return np.stack(out)


def _attack_all(images: np.ndarray, name: str, salt: int) -> np.ndarray:
    from shallowmark.attacks.registry import apply_attack

    if name == "clean":
        return images
    return np.stack([apply_attack(name, im, None, np.random.default_rng([salt, i])) for i, im in enumerate(images)])


def _decode(backend, z: torch.Tensor, batch: int) -> np.ndarray:
    from shallowmark.core.images import to_uint8

    return np.concatenate([to_uint8(backend.decode(z[i:i + batch])) for i in range(0, len(z), batch)])


@torch.no_grad()
def run(out_dir: Path, candidates=DEFAULT_CANDIDATES, n: int = 16, attacks=DEFAULT_ATTACKS, batch: int = 16,
        model: str = "tiny-ldm", n_user: int = 4, log=print, command: str = "") -> dict:
    from shallowmark.attacks import codec
    from shallowmark.attacks.bench_config import bench_keys
    from shallowmark.attacks.metrics import psnr
    from shallowmark.attacks.registry import get_attack
    from shallowmark.core import ddim
    from shallowmark.core.backends import load_backend
    from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
    from shallowmark.errors import InvalidParameterError

    if n < 1 or not 1 <= n_user <= 4:
        raise InvalidParameterError(f"n must be ≥ 1 and n_user in [1, 4]; got n={n}, n_user={n_user}")
    for a in attacks:
        if a != "clean":
            get_attack(a)  # unknown names fail here, before any model work
    t_start = time.perf_counter()
    backend = load_backend(model)
    # a candidate's user scenario uses its own strength unless it names an embed_strength
    configs = [ShallowDiffuseConfig(**{"embed_strength": None, **SCAN_BASE, **c}) for c in candidates]
    base = ShallowDiffuse(backend, ShallowDiffuseConfig(**SCAN_BASE))
    if any(ShallowDiffuse(backend, c).k_star != base.k_star for c in configs):
        raise InvalidParameterError("all candidates must share t_star and num_steps (they share x_t*)")
    seeds = list(range(20000, 20000 + n))
    key = bench_keys(7, "shallow-diffuse")[-1]  # WatermarkKey.from_hex(7), as in the committed scan
    log(f"x_t* and references for {n} seeds")
    x_star = torch.cat([ddim.denoise(backend, backend.randn_latents(seeds[i:i + batch]), base.grid,
                                     base.grid.num_steps, base.k_star) for i in range(0, n, batch)])
    z_ref = torch.cat([ddim.denoise(backend, x_star[i:i + batch], base.grid, base.k_star, 0)
                       for i in range(0, n, batch)])
    reference = _decode(backend, z_ref, batch)
    spectrum = _signal_vs_noise(z_ref, float(base.grid.alphas[base.k_star]))

    def inverted(images):
        return torch.cat([base.invert(images[i:i + batch]) for i in range(0, len(images), batch)])

    neg = {a: inverted(_attack_all(reference, a, 1)) for a in attacks}
    photos = user_photos(backend.image_size)[:n_user]
    rows = []
    for cfg in configs:
        t0 = time.perf_counter()
        sd = ShallowDiffuse(backend, cfg)
        z_wm = torch.cat([sd._finish(x_star[i:i + batch], [key] * len(x_star[i:i + batch]))[0]
                          for i in range(0, n, batch)])
        wm = _decode(backend, z_wm, batch)
        row = dict(config={k: getattr(cfg, k) for k in ("ring_centre", "inner_radius", "radius", "complex_key",
                                                          "ring_write", "channel", "strength", "embed_strength")},
                   dims=sd.geom.dims, psnr=float(np.mean([psnr(a, b) for a, b in zip(wm, reference)])), attacks={})
        for a in attacks:
            p_pos = np.array([d.p_value for d in sd.score(inverted(_attack_all(wm, a, 2)), [key])])
            p_neg = np.array([d.p_value for d in sd.score(neg[a], [key])])
            row["attacks"][a] = dict(median_log10_p=float(np.median(np.log10(np.maximum(p_pos, 1e-300)))),
                                     detected=float(np.mean(p_pos <= 0.01)), flagged_unmarked=float(np.mean(p_neg <= 0.01)))
        user = ShallowDiffuse(backend, dataclasses.replace(cfg, output="residual"))
        marked = user.embed([key] * len(photos), photos)
        p_jpeg = [d.p_value for d in user.detect(np.stack([codec.jpeg(m, 75, None) for m in marked]), [key])]
        row["user_residual"] = dict(psnr=float(np.mean([psnr(a, b) for a, b in zip(marked, photos)])),
                                    max_p_jpeg75=float(max(p_jpeg)))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        log(json.dumps(row))
    res = dict(config=dict(model=model, n=n, seeds=[seeds[0], seeds[-1]], attacks=list(attacks),
                           attack_strengths={a: (None if a == "clean" else get_attack(a).default) for a in attacks},
                           t_star=base.t_star, num_steps=base.config.num_steps, user_photos=len(photos),
                           torch=torch.__version__, machine=platform.platform(), command=command),
               spectrum=spectrum, candidates=rows, seconds=time.perf_counter() - t_start)
    write_report(out_dir, res, _markdown(res), indent=1)
    return res


def _signal_vs_noise(z0: torch.Tensor, alpha_bar: float) -> dict:
    """Where x_t* is noise: per channel and ring r (around DC), the signal power ᾱ·P(r) of the clean
    latents (ortho FFT, mean |coefficient|² over the ring) against the noise power 1 − ᾱ, and the
    first ring from which the signal stays below the noise."""
    n = z0.shape[-1]
    idx = torch.arange(n)
    d = torch.where(idx <= n // 2, idx, idx - n)
    ring = torch.sqrt(d[:, None].double() ** 2 + d[None, :].double() ** 2).round().long()
    power = torch.fft.fft2(z0.double(), norm="ortho").abs().pow(2).mean(0)          # (C, H, W)
    radii = list(range(1, n // 2))
    signal = {c: [alpha_bar * float(power[c][ring == r].mean()) for r in radii] for c in range(z0.shape[1])}
    noise = 1.0 - alpha_bar
    crossover = {c: next((r for i, r in enumerate(radii) if all(v < noise for v in sig[i:])), None)
                 for c, sig in signal.items()}
    return dict(alpha_bar=alpha_bar, noise_power=noise, radii=radii, signal_power=signal,
                noise_dominated_from_ring=crossover)


def _markdown(res: dict) -> str:
    c = res["config"]
    attacks = c["attacks"]
    lines = [f"# Shallow Diffuse key placement on `{c['model']}`", "",
             f"Command: `{c['command']}`  ",
             f"{c['n']} generated images (seeds {c['seeds'][0]}..{c['seeds'][1]}), t* = {c['t_star']}T of "
             f"{c['num_steps']} DDIM steps, one fixed test key; {c['user_photos']} user photos (held-out photo and "
             f"crops). Machine: {c['machine']}, torch {c['torch']}; run took {res['seconds']:.0f} s.", "",
             "Per attack: median log10 p of the own key / share detected at p ≤ 0.01 / share of the "
             "unwatermarked images flagged at p ≤ 0.01. Attack strengths: "
             + ", ".join(f"{a} {s}" for a, s in c["attack_strengths"].items() if s is not None) + ".", "",
             ]

    def row(r):
        k = r["config"]
        cells = [f"{r['attacks'][a]['median_log10_p']:.1f} / {r['attacks'][a]['detected']:.2f} / "
                 f"{r['attacks'][a]['flagged_unmarked']:.2f}" for a in attacks]
        return [k["ring_centre"], f"{k['inner_radius']}..{k['radius']}", "complex" if k["complex_key"] else "real",
                k["ring_write"], k["channel"], k["strength"], r["dims"], f"{r['psnr']:.2f}", *cells,
                k["embed_strength"] or k["strength"], f"{r['user_residual']['psnr']:.2f}",
                f"{r['user_residual']['max_p_jpeg75']:.2g}"]

    lines += markdown_table(["centre", "rings", "values", "write", "ch", "strength", "dims", "PSNR gen", *attacks,
                             "user strength", "user residual PSNR", "user max p JPEG-75"],
                            (row(r) for r in res["candidates"]))
    sp = res["spectrum"]
    lines += ["", f"**Where x_t\\* is noise.** At t* (ᾱ = {sp['alpha_bar']:.3f}) the noise power per Fourier "
              f"coefficient is 1 − ᾱ = {sp['noise_power']:.3f}. The signal power ᾱ·P(r) of the unwatermarked clean "
              "latents stays below it from ring " + ", ".join(f"{r} (channel {c})" for c, r in
                                                              sp["noise_dominated_from_ring"].items()) + " outwards."]
    return "\n".join(lines) + "\n"
