"""Detection of 40 watermarked generations (bench key, seeds 10000..10039) with and without whitening, under attacks.
Run: OMP_NUM_THREADS=2 python power.py. Output: power.txt"""
import torch, numpy as np
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
from shallowmark.attacks.bench_config import bench_keys
from shallowmark.attacks.registry import apply_attack
torch.set_num_threads(2)
b = load_backend("tiny-ldm")
m = ShallowDiffuse(b, ShallowDiffuseConfig(sync_amplitude=0.8, shift_window=8))
keys = bench_keys(1, "shallow-diffuse")
seeds = list(range(10000, 10040))
imgs = np.concatenate([m.generate(keys * 10, seeds[i:i + 10]) for i in range(0, 40, 10)])
np.save("/tmp/runs/wm40.npy", imgs)
for atk in ["clean", "jpeg", "jitter", "blur", "noise", "crop-jpeg", "crop-corner", "rotate:30"]:
    name, _, s = atk.partition(":")
    rng = np.random.default_rng(1)
    att = [apply_attack(name, im, float(s) if s else None, rng=rng) for im in imgs]
    lat = torch.cat([m.invert(np.stack(att[i:i + 20])) for i in range(0, len(att), 20)])
    torch.save(lat, f"/tmp/runs/wmlat_{atk.replace(':','_')}.pt")
    res = []
    for wh in (False, True):
        m2 = ShallowDiffuse(b, ShallowDiffuseConfig(sync_amplitude=0.8, shift_window=8, whiten=wh))
        p = m2.geometric_p_values(lat, keys)[:, 0]
        res.append(f"whiten={wh}: det@1% {(p <= 0.01).mean():.3f} det@0.1% {(p <= 0.001).mean():.3f} median -log10p {np.median(-np.log10(p)):.1f}")
    print(atk, " | ".join(res), flush=True)
