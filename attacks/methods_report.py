"""``shallowmark bench-methods``: the watermark methods side by side on one model, clean images.

Writes ``report.json`` (with a ``checks`` list of ``{name, value, goal, passed}``) and
``report.md`` to ``out_dir``. Figures: each method detects its own key (median p-value), the
false-positive rate at target FPR 1% on unwatermarked images, identification among 32 and 256
keys, Shallow Diffuse fidelity for ``plain`` and ``nullspace`` injection, the user scenario on a
photo that was never generated (``decode`` and ``residual`` output), and verification cost.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from shallowmark.attacks import codec
from shallowmark.attacks.bench_config import bench_keys
from shallowmark.reports import markdown_table, write_report


def _batched(fn, items, batch):
    out = []
    for i in range(0, len(items), batch):
        out.append(fn(items[i:i + batch]))
    return np.concatenate(out)


def _null_set(backend, methods: dict, n_null: int, batch: int):
    """Unwatermarked 50-step samples (seeds 5000..), shared by every method, and each method's
    :meth:`invert` output for them (one shared inversion per batch, see ``invert_shared``)."""
    from shallowmark.core import ddim
    from shallowmark.core.images import to_uint8
    from shallowmark.core.watermarks import invert_shared

    grid = ddim.make_grid(backend, 50)
    null_seeds = list(range(5000, 5000 + n_null))
    z_null = torch.cat([ddim.denoise(backend, backend.randn_latents(null_seeds[i:i + batch]), grid, 50)
                        for i in range(0, n_null, batch)])
    images = np.concatenate([to_uint8(backend.decode(z_null[i:i + batch])) for i in range(0, n_null, batch)])
    parts = [invert_shared(methods, images[i:i + batch]) for i in range(0, n_null, batch)]
    inverted = {name: (torch.cat([p[name] for p in parts]) if methods[name].inversion is not None
                       else np.concatenate([p[name] for p in parts])) for name in methods}
    return images, inverted


def _method_row(name: str, m, null_inverted, n_ident: int, n_fidelity: int, batch: int) -> dict:
    """Detection, wrong-key rate, FPR on the null set, identification among 32 and 256 keys, cost,
    and (latent methods) fidelity against the same seed."""
    from shallowmark.attacks.metrics import psnr, ssim
    from shallowmark.methods import LATENT

    keys256 = bench_keys(256, name)
    keys32 = keys256[:n_ident]
    seeds = list(range(1000, 1000 + n_ident))
    t0 = time.perf_counter()
    wm = _batched(lambda idx: m.generate([keys32[i] for i in idx], [seeds[i] for i in idx]),
                  list(range(n_ident)), batch)
    t_gen = (time.perf_counter() - t0) / n_ident
    t1 = time.perf_counter()
    det32 = m.detect(wm, keys32)
    t_det = (time.perf_counter() - t1) / n_ident
    det256 = m.detect(wm, keys256)
    p_true = [d.per_key_p[k.key_id] for d, k in zip(det32, keys32)]
    wrong = [d.per_key_p[keys32[(i + 1) % n_ident].key_id] for i, d in enumerate(det32)]
    nulls = m.score(null_inverted, [keys256[-1]])
    row = dict(
        median_p_clean=float(statistics.median(p_true)), max_p_clean=float(max(p_true)),
        detected_clean=float(np.mean([p <= 0.01 for p in p_true])),
        wrong_key_detected=float(np.mean([p <= 0.01 for p in wrong])),
        fpr_at_1pct=float(np.mean([d.detected for d in nulls])), n_null=len(nulls),
        ident_acc_32=float(np.mean([d.key_id == k.key_id for d, k in zip(det32, keys32)])),
        ident_acc_256=float(np.mean([d.key_id == k.key_id for d, k in zip(det256, keys32)])),
        verify_model_evals=det32[0].model_evals, embed_seconds_per_image=t_gen, verify_seconds_per_image=t_det,
    )
    if m.kind != LATENT:
        own_single = [m.detect(wm[i:i + 1], [keys32[i]])[0] for i in range(min(4, n_ident))]
        row["median_p_single_key"] = float(statistics.median(d.p_value for d in own_single))
    else:
        ref = _batched(lambda idx: m.reference([seeds[i] for i in idx]), list(range(n_fidelity)), batch)
        row["psnr_vs_same_seed"] = float(np.mean([psnr(a, b) for a, b in zip(wm[:n_fidelity], ref)]))
        row["ssim_vs_same_seed"] = float(np.mean([ssim(a, b) for a, b in zip(wm[:n_fidelity], ref)]))
    return row


def _injection_modes(backend, key, n_fidelity: int, n_nullspace: int, batch: int, log) -> dict:
    """Shallow Diffuse fidelity and detection with ``plain`` and ``nullspace`` injection."""
    from shallowmark.attacks.metrics import psnr, ssim
    from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig

    fid = {}
    for mode, n in (("plain", n_fidelity), ("nullspace", n_nullspace)):
        m = ShallowDiffuse(backend, ShallowDiffuseConfig(injection=mode))
        seeds = list(range(2000, 2000 + n))
        t0 = time.perf_counter()
        wm = _batched(lambda idx: m.generate(key, [seeds[i] for i in idx]), list(range(n)), batch)
        secs = (time.perf_counter() - t0) / n
        ref = _batched(lambda idx: m.reference([seeds[i] for i in idx]), list(range(n)), batch)
        det = m.detect(wm, key)
        fid[mode] = dict(n=n, psnr=float(np.mean([psnr(a, b) for a, b in zip(wm, ref)])),
                         ssim=float(np.mean([ssim(a, b) for a, b in zip(wm, ref)])),
                         median_p=float(statistics.median(d.p_value for d in det)), embed_seconds_per_image=secs)
        log(f"shallow-diffuse {mode}: {fid[mode]}")
    return fid


def _user_scenario(backend, key, log) -> dict:
    """The held-out photo (centre crop and three rescaled crops) watermarked with ``decode`` and
    ``residual`` output, and detected clean and after JPEG q75."""
    from PIL import Image

    from shallowmark.attacks.metrics import psnr, ssim
    from shallowmark.core.photos import center_crop, heldout_photo
    from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig

    photo = heldout_photo()
    h, w = photo.shape[:2]
    crops = [center_crop(photo, 256)]
    for (top, left, size) in ((0, 0, 320), (h - 300, w - 300, 300), (h // 4, w // 5, 400)):
        crops.append(np.asarray(Image.fromarray(photo[top:top + size, left:left + size]).resize((256, 256),
                                                                                                 Image.LANCZOS)))
    originals = np.stack(crops)
    user = {}
    for mode in ("decode", "residual"):
        m = ShallowDiffuse(backend, ShallowDiffuseConfig(output=mode))
        wm = m.embed(key, originals)
        det = m.detect(wm, key)
        det_jpeg = m.detect(np.stack([codec.jpeg(x, 75, None) for x in wm]), key)
        user[mode] = dict(n=len(originals), psnr=float(np.mean([psnr(a, b) for a, b in zip(wm, originals)])),
                          ssim=float(np.mean([ssim(a, b) for a, b in zip(wm, originals)])),
                          p_values=[d.p_value for d in det], p_values_jpeg75=[d.p_value for d in det_jpeg])
        log(f"user scenario {mode}: {user[mode]}")
    return user


def _checks(res: dict, methods: dict) -> list[dict]:
    """The report's goals: each method detects its own key and stays calibrated; Shallow Diffuse and
    RingID (built for it) identify; fidelity; verification cost against Tree-Ring."""
    checks = []

    def check(name, value, goal, ok):
        checks.append(dict(name=name, value=value, goal=goal, passed=bool(ok)))

    for name, row in res["methods"].items():
        check(f"median_p_clean/{name}", row["median_p_clean"], "< 1e-6", row["median_p_clean"] < 1e-6)
        check(f"fpr_at_1pct/{name}", row["fpr_at_1pct"], "<= 0.02", row["fpr_at_1pct"] <= 0.02)
        if name in ("shallow-diffuse", "ringid"):
            check(f"ident_acc_32/{name}", row["ident_acc_32"], ">= 0.95", row["ident_acc_32"] >= 0.95)
        else:
            check(f"ident_acc_32/{name}", row["ident_acc_32"], "reported", True)
        check(f"ident_acc_256/{name}", row["ident_acc_256"], "reported", True)
    for mode, r in res["shallow_diffuse_injection"].items():
        check(f"psnr/shallow-diffuse-{mode}", r["psnr"], ">= 30", r["psnr"] >= 30)
    for mode, r in res["user_scenario"].items():
        check(f"psnr_user_scenario/shallow-diffuse-{mode}", r["psnr"],
              ">= 35 (residual)" if mode == "residual" else "reported", r["psnr"] >= 35 if mode == "residual" else True)
    ratio = (methods["shallow-diffuse"].model_evals().verify / methods["tree-ring"].model_evals().verify)
    check("verify_evals_ratio/shallow-diffuse-vs-tree-ring", ratio, "<= 0.35", ratio <= 0.35)
    return checks


@torch.no_grad()
def run(out_dir: Path, n_null: int = 200, n_ident: int = 32, n_fidelity: int = 8, n_nullspace: int = 4,
        batch: int = 8, log=print, command: str = "") -> dict:
    from shallowmark.core.backends import load_backend
    from shallowmark.core.watermarks import load_method, method_names

    t_start = time.perf_counter()
    backend = load_backend("tiny-ldm")
    methods = {n: load_method(n, backend) for n in method_names()}
    res: dict = {"config": dict(model="tiny-ldm", n_null=n_null, n_ident=n_ident, n_fidelity=n_fidelity,
                                n_nullspace=n_nullspace, target_fpr=0.01, num_steps=50,
                                shallow_diffuse=vars(methods["shallow-diffuse"].config),
                                tree_ring=vars(methods["tree-ring"].config),
                                gaussian_shading=dict(capacity=methods["gaussian-shading"].capacity),
                                torch=torch.__version__, machine=platform.platform(), command=command),
                 "methods": {}}
    log(f"generating {n_null} unwatermarked images")
    _, null_inverted = _null_set(backend, methods, n_null, batch)
    log(f"  done in {time.perf_counter() - t_start:.0f} s")
    for name, m in methods.items():
        t0 = time.perf_counter()
        row = res["methods"][name] = _method_row(name, m, null_inverted[name], n_ident, n_fidelity, batch)
        log(f"{name}: {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})} "
            f"({time.perf_counter() - t0:.0f} s)")
    key = bench_keys(1, "shallow-diffuse")
    res["shallow_diffuse_injection"] = _injection_modes(backend, key, n_fidelity, n_nullspace, batch, log)
    res["user_scenario"] = _user_scenario(backend, key, log)
    res["checks"] = _checks(res, methods)
    res["seconds"] = time.perf_counter() - t_start
    write_report(out_dir, res, _markdown(res), default=float)
    return res


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-3 and v != 0) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def _markdown(res: dict) -> str:
    c = res["config"]
    lines = [f"# Watermark methods on `{c['model']}` (clean images)", "",
             f"Command: `{c['command']}`  ", f"Machine: {c['machine']}, torch {c['torch']}; run took {res['seconds']:.0f} s.",
             "", "p-values are under \"not watermarked with this key\"; the verdict is taken at target FPR 1%, "
             "Bonferroni-corrected for the number of keys searched. Keys are fixed test keys.", ""]

    def fidelity(r):
        return f"{r['psnr_vs_same_seed']:.1f} / {r['ssim_vs_same_seed']:.3f}" if "psnr_vs_same_seed" in r else "–"

    lines += markdown_table(
        ["method", "median p (own key)", "detected", "wrong key detected", "FPR at 1% (unwatermarked)", "ident. 32 keys",
         "ident. 256 keys", "PSNR / SSIM vs same seed", "verify model evals", "s / embed", "s / verify"],
        ([name, _fmt(r["median_p_clean"]), f"{r['detected_clean']:.2f}", f"{r['wrong_key_detected']:.2f}",
          f"{r['fpr_at_1pct']:.3f} (n={r['n_null']})", f"{r['ident_acc_32']:.2f}", f"{r['ident_acc_256']:.2f}",
          fidelity(r), r["verify_model_evals"], f"{r['embed_seconds_per_image']:.2f}",
          f"{r['verify_seconds_per_image']:.2f}"] for name, r in res["methods"].items()))
    lines += ["", "## Shallow Diffuse: plain vs null-space injection", "", *markdown_table(
        ["injection", "images", "PSNR (dB)", "SSIM", "median p", "s / image"],
        ([mode, r["n"], f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", _fmt(r["median_p"]), f"{r['embed_seconds_per_image']:.1f}"]
         for mode, r in res["shallow_diffuse_injection"].items()))]
    lines += ["", "## User scenario: the held-out photo (grace_hopper) and 3 crops, watermarked and verified", "",
              *markdown_table(["output", "PSNR (dB) vs original", "SSIM", "max p clean", "max p after JPEG q75"],
                              ([mode, f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", _fmt(max(r["p_values"])),
                                _fmt(max(r["p_values_jpeg75"]))] for mode, r in res["user_scenario"].items()))]
    lines += ["", "## Checks", "", *markdown_table(["name", "value", "goal", "passed"], (
        [ch["name"], _fmt(ch["value"]), ch["goal"], "yes" if ch["passed"] else "**no**"] for ch in res["checks"]))]
    lines += ["", "Parameters: " + json.dumps({k: c[k] for k in ("shallow_diffuse", "tree_ring", "gaussian_shading")})]
    return "\n".join(lines) + "\n"
