"""Why platform-4x5 fails on some photos: the sync template's estimate on four photos after the 4:5 crop, a crop of 64 % of the area
without rescale and JPEG 80, with the p-value. Run: OMP_NUM_THREADS=1 python template_on_photos.py (after fetch-photos). Output: template_on_photos.txt"""
import numpy as np, torch
from shallowmark.attacks import photos
from shallowmark.attacks.registry import apply_attack
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks import load_method
from shallowmark.core import sync
from shallowmark.attacks.bench_config import bench_keys
torch.set_num_threads(1)
m = load_method("shallow-diffuse", load_backend("tiny-ldm"))
key = bench_keys(1, "shallow-diffuse")[0]
ps = {p.name: p for p in photos.load(None, ("opencv", "ifct"))}
for name in ["aero1.jpg", "D035.jpeg", "graf3.png", "building.jpg"]:
    img = ps[name].image
    wm = m.embed([key], img[None], output="residual")[0]
    for pipe in ["platform-4x5", "crop-keep:0.64", "jpeg:80"]:
        n, _, s = pipe.partition(":")
        a = apply_attack(n, wm, float(s) if s else None, rng=np.random.default_rng(0))
        grid = m.on_grid(a[None])[1]
        e = sync.estimate(grid[0], m.template)
        print(name, pipe, a.shape, f"found {e.found} z {e.z:.1f} support {e.support:.2f} gain {e.gain:.2f} scale {e.scale:.3f} rot {e.rotation:.1f} aspect {e.aspect:.3f}", "p", m.detect(a[None], [key])[0].p_value)
    # the template on the embed's grid itself
    e = sync.estimate(m.on_grid(wm[None])[1][0], m.template); print("  clean z", round(e.z, 1), "support", round(e.support, 2))
