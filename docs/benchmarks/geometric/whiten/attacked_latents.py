"""Invert the geometric run's 100 unwatermarked generations (bench cache) under each attack named on the command line,
save x_t* to /tmp/runs/lat_<attack>.pt and print the verdict rate over 200 keys (before whitening existed).
Run: OMP_NUM_THREADS=2 python attacked_latents.py clean jpeg crop-jpeg"""
import numpy as np, torch, glob, sys
from PIL import Image
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
from shallowmark.keys import WatermarkKey
from shallowmark.attacks.registry import apply_attack
from shallowmark.core.watermarks import rings
torch.set_num_threads(2)
b = load_backend("tiny-ldm")
d = sorted(glob.glob("/root/.cache/shallowmark/bench/images/tiny-ldm-*/reference-plain-*/*.png"))
imgs = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in d])
m = ShallowDiffuse(b, ShallowDiffuseConfig(sync_amplitude=0.8, shift_window=8))
keys = [WatermarkKey.from_hex(f"{1 + i:064x}").for_method("shallow-diffuse") for i in range(200)]
for atk in sys.argv[1:]:
    name, _, s = atk.partition(":")
    rng = np.random.default_rng(0)
    att = [apply_attack(name, im, float(s) if s else None, rng=rng) for im in imgs]
    lat = torch.cat([m.invert(np.stack(att[i:i + 20])) for i in range(0, len(att), 20)])
    torch.save(lat, f"/tmp/runs/lat_{atk.replace(':','_')}.pt")
    p = np.concatenate([m.geometric_p_values(lat, keys[i:i + 20]) for i in range(0, len(keys), 20)], axis=1)
    prof = rings.ring_profile(lat, 3, m.geom); u = prof / prof.norm(dim=1, keepdim=True)
    for a in (0.01, 0.001):
        pk = (p <= a).mean(0)
        print(atk, f"target {a:g}: mean {pk.mean():.4f}; key1 {pk[0]:.2f}; per-key 50/90/99: {np.quantile(pk,[0.5,0.9,0.99]).round(3).tolist()}; |mean dir| {u.mean(0).norm():.3f}", flush=True)
