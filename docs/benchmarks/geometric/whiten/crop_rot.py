"""The demo's crop+rot attack (off-centre crop to 80 or 90 % of the area, then a 10 degree rotation) on 4 generations:
the template estimate and the p-value, with and without whitening. Run: OMP_NUM_THREADS=2 python crop_rot.py. Output: crop_rot.txt"""
import numpy as np
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
from shallowmark.core import sync
from shallowmark.attacks.registry import apply_attack
from shallowmark.attacks.bench_config import bench_keys
b = load_backend("tiny-ldm"); key = bench_keys(1, "shallow-diffuse")[0]
m = ShallowDiffuse(b, ShallowDiffuseConfig())
imgs = m.generate([key] * 4, [0, 1, 2, 3])
for wh in (True, False):
    mm = ShallowDiffuse(b, ShallowDiffuseConfig(whiten=wh))
    for i, im in enumerate(imgs):
        for crop in (0.8, 0.9):
            a = apply_attack("rotate", apply_attack("crop-corner", im, crop, rng=np.random.default_rng(i)), 10)
            e = sync.estimate(m.on_grid(a[None])[1][0], m.template)
            print(wh, i, crop, f"z {e.z:.1f} sup {e.support:.2f} rot {e.rotation:.1f} scale {e.scale:.3f}", f"p {mm.detect(a[None], [key])[0].p_value:.1e}")
