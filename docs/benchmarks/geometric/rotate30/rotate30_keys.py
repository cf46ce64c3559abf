"""Why the bench key fired on 7 of 100 unwatermarked generations under a 30° rotation: the same
100 images (the benchmark's seeds 10000-10099, plain samples), clean and rotated by 15° and 30°,
against 200 random keys with the default verifier, and rotated with ``fill_borders`` (black
corners filled from their nearest pixel before verification). Per row: the mean and worst per-key
verdict rate at target 1 % and the spread of the per-key rates over its binomial value (VR; 1 = as
sampling explains). What the fill costs in power: fill_power.py.
Run: OMP_NUM_THREADS=2 python rotate30_keys.py. Output: rotate30_keys.txt"""
from pathlib import Path

import numpy as np
from PIL import Image

from shallowmark.attacks import apply_attack
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
from shallowmark.keys import WatermarkKey

root = Path.home() / ".cache/shallowmark/bench/images/tiny-ldm-b92808e3b69e7561/reference-plain-32f7b85636"
images = np.stack([np.asarray(Image.open(root / f"{s}.png").convert("RGB")) for s in range(10000, 10100)])
backend = load_backend("tiny-ldm")
plain, filled = (ShallowDiffuse(backend, ShallowDiffuseConfig(fill_borders=v)) for v in (False, True))
rng = np.random.default_rng(5)
keys = [WatermarkKey.from_hex(rng.bytes(32).hex()).for_method("shallow-diffuse") for _ in range(200)]
for name, strength, m in (("clean", None, plain), ("rotate 15", 15, plain), ("rotate 30", 30, plain),
                          ("rotate 15, fill_borders", 15, filled), ("rotate 30, fill_borders", 30, filled)):
    ims = images if strength is None else np.stack([apply_attack("rotate", im, strength) for im in images])
    p = np.concatenate([m.geometric_p_values(m.invert(ims[i:i + 10]), keys) for i in range(0, len(ims), 10)])
    rate = (p <= 0.01).mean(0)
    mean = rate.mean()
    print(f"{name:24s} n={len(ims)} keys={len(keys)}: mean rate {mean:.4f}, worst key {rate.max():.2f}, "
          f"keys at >= 5/100: {(rate >= 0.05).sum()}, VR {rate.var() / (mean * (1 - mean) / len(ims)):.2f}", flush=True)
