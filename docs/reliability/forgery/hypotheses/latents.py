"""Invert the benchmark's images under each attack once and keep what the detector reads (x_t*
minus the encoded image's share), so that weightings of the p-value's hypotheses can be compared on
exactly the benchmark's images without inverting again.

Run after `shallowmark bench --methods shallow-diffuse --n 100 ...` with the defaults of commit
c7ef501 (its cache holds the 100 watermarked generations and the 100 unwatermarked ones):
    python latents.py clean jpeg blur noise jitter crop-keep translate crop-corner rotate:180 flip:1 ...
Writes ~/runs/xstar/<attack>.npz (pos, neg: 100×4×64×64 each). About 100 s per attack on 2 cores."""
import sys
import time
from pathlib import Path

import numpy as np

from shallowmark.attacks.bench_cache import BenchCache
from shallowmark.attacks.bench_config import parse_attacks
from shallowmark.attacks.bench_grid import apply_setting
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig

root = Path.home() / ".cache/shallowmark/bench"
base = "tiny-ldm-b92808e3b69e7561"                       # the model's fingerprint in the bench cache
seeds = list(range(10000, 10100))
cache = BenchCache(root)
neg = cache.load_images(f"{base}/reference-plain-32f7b85636", seeds)
wm = [p for p in (root / "images" / base / "watermarked-shallow-diffuse-9157613ce3").iterdir() if p.is_dir()][0]
pos = cache.load_images(str(wm.relative_to(root / "images")), seeds)
assert len(neg) == len(pos) == 100, (len(neg), len(pos))
# the inversion does not depend on how the hypotheses are weighted: any share gives the same x_t*
m = ShallowDiffuse(load_backend("tiny-ldm"), ShallowDiffuseConfig(identity_share=1 / 16))
out = Path.home() / "runs/xstar"
out.mkdir(parents=True, exist_ok=True)
for spec in sys.argv[1:]:
    f = out / f"{spec.replace(':', '_')}.npz"
    if f.exists():
        continue
    setting, t0, res = parse_attacks(spec)[0], time.time(), {}
    for kind, ims in (("pos", pos), ("neg", neg)):
        att = apply_setting(setting, [ims[s] for s in seeds], seeds, kind, "shallow-diffuse")
        res[kind] = np.concatenate([m.invert(att[i:i + 10]).float().cpu().numpy() for i in range(0, len(att), 10)])
    np.savez(f, **res)
    print(spec, f"{time.time() - t0:.0f}s", flush=True)
