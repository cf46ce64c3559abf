"""Invert the calibration's unwatermarked images (300 generations, seeds 50000-50299, and the fetched photos, clean) to x_t* with
the default Shallow Diffuse of commit 4f960e5 (template, shift search, whitening), keeping x_t* and the encoded z0.
Run: python invert_all.py (resumes; writes /tmp/runs/diag/lat.pt). Stopped after 656 of 1071 images (300 generations, 356 photos)."""
import torch, numpy as np
from pathlib import Path
from PIL import Image
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse
from shallowmark.core import ddim
from shallowmark.core.images import to_tensor
from shallowmark.attacks import photos
b = load_backend("tiny-ldm"); m = ShallowDiffuse(b)
gen = Path.home() / ".cache/shallowmark/calibration/generated-tiny-ldm"
items = [("generated", str(s), np.asarray(Image.open(gen / f"{s}.png").convert("RGB"))) for s in range(50000, 50300)]
items += [(p.source, p.name, p.image) for p in photos.load()]
out = Path("/tmp/runs/diag/lat.pt")
done = torch.load(out) if out.exists() else {"names": [], "lat": []}
done.setdefault("z0", [])
by = {n: it for n, it in ((f"{s}/{nm}", (s, nm, im)) for s, nm, im in items)}
with torch.no_grad():
    nz = sum(len(z) for z in done["z0"]); names_nz = done["names"][nz:]
    for i in range(0, len(names_nz), 8):   # z0 for the images inverted before z0 was kept
        grid = m.model_input([by[n][2] for n in names_nz[i:i + 8]])
        done["z0"].append(b.encode(to_tensor(grid)).float())
    print("z0 filled", sum(len(z) for z in done["z0"]), flush=True)
    have = set(done["names"])
    todo = [it for it in items if f"{it[0]}/{it[1]}" not in have]
    for i in range(0, len(todo), 8):
        chunk = todo[i:i + 8]
        grid = m.model_input([im for _, _, im in chunk])
        z0 = b.encode(to_tensor(grid))
        lat = ddim.invert(b, z0, m.grid, 0, m.k_star)
        done["names"] += [f"{s}/{n}" for s, n, _ in chunk]; done["lat"].append(lat.float()); done["z0"].append(z0.float())
        if i % 80 == 0 or i + 8 >= len(todo):
            torch.save(done, out); print(len(done["names"]), "/", len(items), flush=True)
torch.save(done, out)
