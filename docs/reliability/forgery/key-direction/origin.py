"""Corner against centre: Shallow Diffuse with the ring pattern at the FFT's origin (the latent's
corners, the default) or at the latent's centre (``ring_origin="centre"``), with one key variant and
with 16 at strength 1.05, under the geometric attacks that 16 corner variants lost on.

Key: the benchmark's (``WatermarkKey.from_hex(f'{1:064x}')``). ``--pos`` generations per
configuration (seeds 10000..), attacked; the benchmark's first ``--neg`` unwatermarked images (seeds
10000.., from its cache), attacked the same way, inverted once and scored by every configuration.
Per configuration and attack: the median score (−log10 p) and the TPR at 1 % FPR against those
negatives (at most floor(1 % of them) at or above the threshold); and the median PSNR of the
watermarked images against the unwatermarked ones of the same seeds.

    python docs/reliability/forgery/key-direction/origin.py --pos 24 --neg 100 --out DIR
"""
import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shallowmark.attacks.registry import apply_attack
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks import load_method
from shallowmark.keys import WatermarkKey

ATTACKS = (("clean", None), ("rotate", 30.0), ("zoom", None), ("platform-4x5", None))
CONFIGS = {"corner-k16": dict(key_variants=16, strength=1.05),
           "centre-k16": dict(key_variants=16, strength=1.05, ring_origin="centre"),
           "corner-k1": dict(), "centre-k1": dict(ring_origin="centre")}
REFERENCE = Path.home() / ".cache/shallowmark/bench/images/tiny-ldm-b92808e3b69e7561/reference-plain-32f7b85636"


def attacked(name, strength, images, ids):
    if name == "clean":
        return images
    tag = f"{name}:{strength}"
    return np.stack([apply_attack(name, im, strength, rng=np.random.default_rng([zlib.crc32(tag.encode()), i]))
                     for im, i in zip(images, ids)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pos", type=int, default=24)
    ap.add_argument("--neg", type=int, default=100)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    backend = load_backend("tiny-ldm")
    methods = {k: load_method("shallow-diffuse", backend, **v) for k, v in CONFIGS.items()}
    key = WatermarkKey.from_hex(f"{1:064x}").for_method("shallow-diffuse")
    neg = np.stack([np.asarray(Image.open(REFERENCE / f"{10000 + i}.png").convert("RGB")) for i in range(a.neg)])
    seeds = list(range(10000, 10000 + a.pos))
    t0 = time.time()
    neg_scores = {k: {} for k in CONFIGS}
    for name, strength in ATTACKS:
        x = attacked(name, strength, neg, range(1, 1 + a.neg))
        # the configurations differ only in how x_t* is scored, so one inversion serves them all
        inverted = torch.cat([methods["corner-k1"].invert(x[j:j + 10]) for j in range(0, a.neg, 10)])
        for k, m in methods.items():
            neg_scores[k][name] = [d.score for d in m.score(inverted, [key])]
    results = {}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, m in methods.items():
        wm = np.concatenate([m.generate([key] * len(seeds[j:j + 6]), seeds[j:j + 6]) for j in range(0, a.pos, 6)])
        mse = ((wm.astype(np.float64) - neg[:a.pos].astype(np.float64)) ** 2).mean((1, 2, 3))
        row = {"psnr_median": float(np.median(10 * np.log10(255 ** 2 / mse)))}
        for name, strength in ATTACKS:
            pos = np.array([d.score for d in m.detect(attacked(name, strength, wm, seeds), [key])])
            ns = np.sort(neg_scores[k][name])[::-1]
            threshold = float(ns[int(np.floor(0.01 * len(ns)))])
            # tpr1: TPR at 1 % FPR; thr: the threshold; pos: every watermarked image's score
            row[name] = dict(median=float(np.median(pos)), tpr1=float(np.mean(pos > threshold)), thr=threshold,
                             pos=[round(float(s), 2) for s in pos])
        results[k] = row
        print(k, json.dumps({n: [round(v["median"], 2), v["tpr1"]] if isinstance(v, dict) else round(v, 2)
                             for n, v in row.items()}), round(time.time() - t0), "s", flush=True)
        # neg: every configuration's scores of the unwatermarked images, by attack
        (out / "origin.json").write_text(json.dumps(dict(results=results, neg=neg_scores, n_pos=a.pos, n_neg=a.neg),
                                                    indent=1))


if __name__ == "__main__":
    main()
