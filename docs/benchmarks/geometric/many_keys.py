"""Verdict rate on the geometric run's 100 unwatermarked generations (clean, read from the bench cache) over 200 keys,
for the geometric setting, the template alone, and the defaults. Output: many_keys.txt. Run: OMP_NUM_THREADS=2 python docs/benchmarks/geometric/many_keys.py"""
import numpy as np, torch, glob
from PIL import Image
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
from shallowmark.keys import WatermarkKey
torch.set_num_threads(2)
b = load_backend("tiny-ldm")
d = sorted(glob.glob("/root/.cache/shallowmark/bench/images/tiny-ldm-*/reference-plain-*/*.png"))
imgs = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in d])
for cfg in [dict(sync_amplitude=0.8, shift_window=8), dict(sync_amplitude=0.8, shift_window=0), dict()]:
    m = ShallowDiffuse(b, ShallowDiffuseConfig(**cfg))
    lat = torch.cat([m.invert(imgs[i:i + 20]) for i in range(0, len(imgs), 20)])
    keys = [WatermarkKey.from_hex(f"{1 + i:064x}").for_method("shallow-diffuse") for i in range(200)]
    p = np.concatenate([m.geometric_p_values(lat, keys[i:i + 20]) for i in range(0, len(keys), 20)], axis=1)
    for a in (0.01, 0.001):
        pk = (p <= a).mean(0)
        print(cfg, f"target {a:g}: mean over 200 keys x {len(imgs)} clean images {pk.mean():.4f}; key 1 {pk[0]:.2f}; per-key 50/90/99 %: {np.quantile(pk, [0.5, 0.9, 0.99]).round(3).tolist()}", flush=True)
