"""Calibration of Shallow Diffuse's verdict on the reference run's unwatermarked images, over many keys.

The reference run uses one bench key; on its 100 unwatermarked images that key's verdict at target FPR
1 % flagged 3 of them (clean). This checks whether that is the key or the detector: it scores the same
100 images against 400 independent keys and reports the FPR per key and over all keys.

    python docs/benchmarks/robustness/calibration_check.py CACHE_DIR > docs/benchmarks/robustness/calibration_check.txt

CACHE_DIR is the --cache folder of the reference run (its reference-plain-* images are the unwatermarked ones).
"""

import glob
import sys

import numpy as np
import torch
from PIL import Image
from scipy.stats import kstest

from shallowmark import WatermarkKey
from shallowmark.attacks.bench_config import bench_keys
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks import load_method

torch.set_num_threads(1)
backend = load_backend("tiny-ldm")
sd = load_method("shallow-diffuse", backend)
files = sorted(glob.glob(f"{sys.argv[1]}/images/tiny-ldm-*/reference-plain-*/*.png"))[:100]
images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
x_star = torch.cat([sd.invert(images[i:i + 20]) for i in range(0, len(images), 20)])
keys = [WatermarkKey.from_hex(f"{i + 5000:064x}").for_method("shallow-diffuse") for i in range(400)]
_, p = sd._ring_p_values(x_star, keys)                     # (images, keys)
per_key = (p <= 0.01).mean(0)
print(f"{len(images)} unwatermarked images x {len(keys)} keys, verdict at p <= 0.01")
print(f"FPR over all (image, key) pairs: {(p <= 0.01).mean():.4f}")
print("per-key FPR quantiles 50/90/99/100 %:", np.quantile(per_key, [0.5, 0.9, 0.99, 1.0]).round(3).tolist())
rng = np.random.default_rng(0)
binom = rng.binomial(len(images), 0.01, size=(2000, len(keys))) / len(images)
print("the same quantiles if every key's count were Binomial(n, 0.01) (simulated):",
      np.quantile(binom, [0.5, 0.9, 0.99, 1.0]).round(3).tolist())
print("KS test of all p-values against uniform:", kstest(p.ravel(), "uniform"))
_, pb = sd._ring_p_values(x_star, bench_keys(1, "shallow-diffuse"))
print(f"the reference run's bench key: FPR {(pb <= 0.01).mean():.2f}, smallest p {np.sort(pb.ravel())[:4].round(4).tolist()}")
