"""``shallowmark bench-sizes``: Shallow Diffuse on uploads of other sizes than the model's, and how
an image is best mapped onto the model's grid.

For each upload size (portrait, landscape, 4:3, 16:9 up to 1920×1080), the held-out photo (never
seen in training) is cropped to the size's aspect ratio and resized to it; that image is
watermarked (user scenario, residual output: the change computed on the 256² grid, resized back
and added to the photo) and verified, clean and after the platform pipelines. Three ways of
mapping the image onto the grid are compared, each used for both embedding and verification:

- ``squash``: resize the whole image to 256×256;
- ``crop``: the centre square, resized to 256×256 (the borders carry no watermark; what the service
  does, :mod:`shallowmark.core.resolution`);
- ``pad``: reflect-pad to a square, resized to 256×256 (the grid spends room on padding).

Writes ``report.json`` and ``report.md``: PSNR and SSIM against the original at its native
resolution, and p-values (one key, so uncorrected = corrected).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from shallowmark.reports import markdown_table, write_report

SIZES = ((300, 800), (512, 384), (1024, 768), (1920, 1080))   # (width, height)
MAPPINGS = ("squash", "crop", "pad")


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.LANCZOS))


def photo_at(photo: np.ndarray, w: int, h: int) -> np.ndarray:
    """The photo's largest centred region of aspect ``w:h``, resized to ``w``×``h``."""
    ph, pw = photo.shape[:2]
    if pw / ph > w / h:
        cw, ch = round(ph * w / h), ph
    else:
        cw, ch = pw, round(pw * h / w)
    top, left = (ph - ch) // 2, (pw - cw) // 2
    return _resize(photo[top:top + ch, left:left + cw], w, h)


def to_grid(img: np.ndarray, size: int, mapping: str) -> np.ndarray:
    """``img`` on the ``size``² grid by ``mapping``."""
    from shallowmark.core import resolution

    h, w = img.shape[:2]
    if mapping == "squash":
        return _resize(img, size, size)
    if mapping == "pad":
        side = max(h, w)
        pt, pl = (side - h) // 2, (side - w) // 2
        return _resize(np.pad(img, ((pt, side - h - pt), (pl, side - w - pl), (0, 0)), mode="reflect"), size, size)
    return resolution.to_grid(img[None], size)[0]


def embed_mapped(method, key, img: np.ndarray, mapping: str) -> np.ndarray:
    """Watermark ``img`` at its own size, the model seeing it through ``mapping``. ``crop`` is the
    service's own path (``method.embed``); for the others the change the watermark made on the grid
    is carried back to the image by the same mapping."""
    import torch

    from shallowmark.core import resolution
    from shallowmark.core.images import to_tensor, to_uint8

    if mapping == "crop":
        return method.embed([key], img[None], output="residual")[0]
    size = int(method.backend.image_size)
    h, w = img.shape[:2]
    grid = to_grid(img, size, mapping)
    change = to_tensor(method.embed([key], grid[None], output="residual")) - to_tensor(grid)
    if mapping == "squash":
        full = torch.nn.functional.interpolate(change, size=(h, w), mode="bicubic", align_corners=False,
                                               antialias=min(h, w) < size)[0]
    else:   # pad: the change of the padded square, then the image's part of it
        side, pt, pl = max(h, w), (max(h, w) - h) // 2, (max(h, w) - w) // 2
        full = resolution.carry_change(change, side, side)[0][:, pt:pt + h, pl:pl + w]
    return to_uint8((to_tensor(img)[0] + full)[None])[0]


def _pipelines(img: np.ndarray) -> dict[str, np.ndarray]:
    """The upload clean and after the platform pipelines (resize to a 1080 px long side + JPEG 80;
    crop to 4:5 + JPEG 80; crop to 1:1 + resize to 512)."""
    from shallowmark.attacks import codec

    h, w = img.shape[:2]
    scale = 1080 / max(h, w)
    resized = _resize(img, max(1, round(w * scale)), max(1, round(h * scale)))
    if w / h > 4 / 5:
        cw, ch = round(h * 4 / 5), h
    else:
        cw, ch = w, round(w * 5 / 4)
    c45 = img[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
    s = min(h, w)
    square = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return {"clean": img, "1080px+jpeg80": codec.jpeg(resized, 80, None), "4:5+jpeg80": codec.jpeg(c45, 80, None),
            "1:1+512": _resize(square, 512, 512)}


def _verify(method, key, img: np.ndarray, mapping: str) -> float:
    size = int(method.backend.image_size)
    if min(img.shape[:2]) < 64:
        return float("nan")
    return float(method.score(method.invert(to_grid(img, size, mapping)[None]), [key])[0].p_value)


def run(out_dir: Path, log=print, command: str = "shallowmark bench-sizes") -> dict:
    from shallowmark.attacks.bench_config import bench_keys
    from shallowmark.attacks.metrics import psnr, ssim
    from shallowmark.core.backends import load_backend
    from shallowmark.core.photos import heldout_photo
    from shallowmark.core.watermarks import load_method

    t0 = time.perf_counter()
    method = load_method("shallow-diffuse", load_backend("tiny-ldm"))
    key = bench_keys(1, "shallow-diffuse")[0]
    photo = heldout_photo()
    rows = []
    for w, h in SIZES:
        original = photo_at(photo, w, h)
        for mapping in MAPPINGS:
            t = time.perf_counter()
            marked = embed_mapped(method, key, original, mapping)
            assert marked.shape == original.shape
            p = {name: _verify(method, key, im, mapping) for name, im in _pipelines(marked).items()}
            p_null = {name: _verify(method, key, im, mapping) for name, im in _pipelines(original).items()}
            rows.append(dict(width=w, height=h, mapping=mapping, psnr=psnr(marked, original),
                             ssim=ssim(marked, original), p_values=p, p_values_unwatermarked=p_null,
                             seconds=time.perf_counter() - t))
            log(f"{w}x{h} {mapping}: PSNR {rows[-1]['psnr']:.2f} dB, p {p}")
    import torch

    res = dict(config=dict(model="tiny-ldm", method="shallow-diffuse", method_params=vars(method.config),
                           key_id=key.key_id, photo="grace_hopper (held out)", sizes=[list(s) for s in SIZES],
                           mappings=list(MAPPINGS), torch=torch.__version__, machine=platform.platform(),
                           command=command),
               rows=rows, seconds=time.perf_counter() - t0)
    write_report(out_dir, res, _markdown(res), default=float)
    return res


def _markdown(res: dict) -> str:
    c = res["config"]
    pipes = list(res["rows"][0]["p_values"])
    lines = [f"# Uploads of other sizes on `{c['model']}` ({c['method']})", "", f"Command: `{c['command']}`  ",
             f"Photo: {c['photo']}, cropped to each aspect ratio and resized; one fixed test key. Machine: "
             f"{c['machine']}, torch {c['torch']}; run took {res['seconds']:.0f} s.", "",
             "PSNR and SSIM against the original at its native resolution; p-values of the key (watermarked) "
             "and, in brackets, of the same key on the unwatermarked original after the same pipeline. The "
             "service maps by `crop` (`shallowmark.core.resolution`); the other rows are what it chose against.", ""]
    lines += markdown_table(
        ["size", "mapping", "PSNR (dB)", "SSIM", *pipes],
        ([f"{r['width']}x{r['height']}", r["mapping"], f"{r['psnr']:.2f}", f"{r['ssim']:.4f}",
          *(f"{r['p_values'][k]:.2g} ({r['p_values_unwatermarked'][k]:.2g})" for k in pipes)] for r in res["rows"]))
    return "\n".join(lines) + "\n"
