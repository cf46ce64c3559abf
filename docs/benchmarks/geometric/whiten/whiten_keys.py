"""Per-key verdict rates over 200 keys on the saved latents, with and without whitening.
Run: python whiten_keys.py <shift_window> clean jpeg crop-jpeg (after attacked_latents.py). Output: whiten_keys.txt"""
import torch, numpy as np, sys
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
from shallowmark.keys import WatermarkKey
b = load_backend("tiny-ldm")
keys = [WatermarkKey.from_hex(f"{1 + i:064x}").for_method("shallow-diffuse") for i in range(200)]
for wh in (False, True):
    m = ShallowDiffuse(b, ShallowDiffuseConfig(sync_amplitude=0.8, shift_window=int(sys.argv[1]), whiten=wh))
    for a in sys.argv[2:]:
        lat = torch.load(f"/tmp/runs/lat_{a}.pt")
        p = np.concatenate([m.geometric_p_values(lat, keys[i:i + 20]) for i in range(0, len(keys), 20)], axis=1)
        for t in (0.01, 0.001):
            pk = (p <= t).mean(0)
            print(f"whiten={wh} {a} target {t:g}: mean {pk.mean():.4f}; key1 {pk[0]:.2f}; per-key 50/90/99/max: {np.quantile(pk,[0.5,0.9,0.99,1]).round(3).tolist()}", flush=True)
        pk = (p <= 0.01).mean(0); print("   dispersion ratio var/binom", round(pk.var() / (pk.mean() * (1 - pk.mean()) / p.shape[0]), 2))
