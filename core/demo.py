"""``make demo`` / ``shallowmark demo``: a short tour of what exists, on the embedded model.

Generates images with DDIM, writes them as PNG files, reads them back, inverts them by DDIM both
all the way (0→T) and only to t* = 0.3T, denoises again, and prints the round-trip errors: the
shallow round trip is the one Shallow Diffuse verification relies on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def run_demo(out: Path, seeds=(0, 1, 2, 3), t_star: float = 0.3) -> int:
    from PIL import Image

    from shallowmark.core import ddim
    from shallowmark.core.backends import load_backend
    from shallowmark.core.images import grid, psnr, to_tensor, to_uint8
    from shallowmark.core.photos import center_crop, heldout_photo

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    backend = load_backend("tiny-ldm")
    g = ddim.make_grid(backend, 50)
    k = g.position(t_star)
    print(f"model tiny-ldm: latents {backend.latent_shape}, {g.num_steps} DDIM steps, t* = {t_star}T "
          f"(step {k}, timestep {g.timesteps[k - 1]})")

    t0 = time.perf_counter()
    images = to_uint8(backend.decode(ddim.denoise(backend, backend.randn_latents(seeds), g, g.num_steps)))
    print(f"generated {len(seeds)} images in {time.perf_counter() - t0:.1f} s")
    names = [f"generated_seed{s}.png" for s in seeds]
    for name, im in zip(names, images):
        Image.fromarray(im).save(out / name)
    photo = center_crop(heldout_photo(), backend.image_size)
    Image.fromarray(photo).save(out / "photo_grace_hopper.png")
    names.append("photo_grace_hopper.png")

    # Read the files back: the round trip starts from pixels, as verification does.
    pixels = np.stack([np.asarray(Image.open(out / n).convert("RGB")) for n in names])
    z0 = backend.encode(to_tensor(pixels))
    rows, recon_full, recon_shallow = [], None, None
    t0 = time.perf_counter()
    back_T = ddim.denoise(backend, ddim.invert(backend, z0, g, 0, g.num_steps), g, g.num_steps)
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    back_s = ddim.denoise(backend, ddim.invert(backend, z0, g, 0, k), g, k)
    t_shallow = time.perf_counter() - t0
    err_T, err_s = ddim.relative_l2(back_T, z0), ddim.relative_l2(back_s, z0)
    recon_full, recon_shallow = to_uint8(backend.decode(back_T)), to_uint8(backend.decode(back_s))
    for i, n in enumerate(names):
        rows.append(dict(image=n, rel_l2_full=float(err_T[i]), rel_l2_shallow=float(err_s[i]),
                         psnr_full_db=psnr(recon_full[i], pixels[i]), psnr_shallow_db=psnr(recon_shallow[i], pixels[i])))
    sheet = grid(np.concatenate([pixels, recon_full, recon_shallow]), len(names))
    Image.fromarray(sheet).save(out / "contact_sheet.png")

    print(f"\nDDIM round trips (rows: image; full = 0→T→0, {2 * g.num_steps} model evaluations; "
          f"shallow = 0→t*→0, {2 * k})")
    print(f"{'image':<26}{'rel L2 full':>12}{'rel L2 t*':>12}{'PSNR full':>11}{'PSNR t*':>10}")
    for r in rows:
        print(f"{r['image']:<26}{r['rel_l2_full']:>12.4f}{r['rel_l2_shallow']:>12.4f}"
              f"{r['psnr_full_db']:>10.1f}{r['psnr_shallow_db']:>10.1f}")
    summary = dict(model="tiny-ldm", t_star=t_star, t_star_position=k, num_steps=g.num_steps, rows=rows,
                   seconds_full_round_trip=t_full, seconds_shallow_round_trip=t_shallow,
                   seconds_total=time.perf_counter() - t_start,
                   note="Watermark embed/verify through the gRPC service joins this demo when the service lands.")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {len(names)} images, contact_sheet.png (rows: input, full round trip, shallow round trip) "
          f"and summary.json to {out}/ in {summary['seconds_total']:.0f} s")
    return 0
