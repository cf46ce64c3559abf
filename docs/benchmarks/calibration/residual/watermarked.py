"""40 watermarked generations (seeds 20000-20039) and 20 watermarked photos (5 per source), clean, crop-corner and JPEG:
x_t* and z0. Run: python watermarked.py (writes /tmp/runs/diag/wm.pt)."""
import torch, numpy as np
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
from shallowmark.core import ddim
from shallowmark.core.images import to_tensor
from shallowmark.attacks import apply_attack, photos
from shallowmark.keys import WatermarkKey
b = load_backend("tiny-ldm"); m = ShallowDiffuse(b, ShallowDiffuseConfig(key_variants=1))
key = WatermarkKey.from_hex(f"{1:064x}").for_method("shallow-diffuse")
imgs = []
for s in range(20000, 20040, 8):
    imgs += list(m.generate([key] * 8, list(range(s, s + 8))))
ph = [p.image for p in photos.load(None, None, 5)][:20]
wph = [m.embed([key], p[None])[0] for p in ph]
out = {}
with torch.no_grad():
    for att in ("clean", "crop-corner", "jpeg"):
        for label, group in (("gen", imgs), ("photo", wph)):
            ims = [apply_attack(att, im, rng=np.random.default_rng(i)) if att != "clean" else im for i, im in enumerate(group)]
            lat, z = [], []
            for i in range(0, len(ims), 8):
                grid = m.model_input(ims[i:i + 8]); z0 = b.encode(to_tensor(grid))
                z.append(z0.float()); lat.append(ddim.invert(b, z0, m.grid, 0, m.k_star).float())
            out[(label, att)] = (torch.cat(lat), torch.cat(z)); print(label, att, flush=True)
torch.save(out, "/tmp/runs/diag/wm.pt")
