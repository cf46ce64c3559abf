"""From latents.py's inverted images: each hypothesis family's smallest p-value (over the key's 16
variants, before any multiplicity factor), which view carries the key, and TPR@1%FPR with the
p-value's error budget split as before (half to the 8 unshifted views alike, half to the shifts)
and as now (``identity_share`` 0.5: half to the identity, a quarter each to the other 7 views and to
the shifts). Writes report.txt beside this file."""
from pathlib import Path

import numpy as np
import torch

from shallowmark.attacks.metrics import tpr_at_fpr
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks import rings
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, dihedral
from shallowmark.keys import WatermarkKey

m = ShallowDiffuse(load_backend("tiny-ldm"))
key = WatermarkKey.from_hex(f"{1:064x}").for_method("shallow-diffuse")     # the benchmark's test key
vals, dims, w, n_var = m.variant_values(key), m.geom.dims, m.config.shift_window, m.key_variants
n_shift = 8 * (2 * w + 1) ** 2


def families(x):
    """(8 views × images) smallest unshifted p per view, (images,) smallest over all shifts of all views."""
    views = dihedral(torch.from_numpy(x))
    c = torch.stack([rings.cosines(v.contiguous(), m.config.channel, vals, m.geom, m.whitened) for v in views])
    prof = torch.cat([rings.shift_profiles(v.contiguous(), m.config.channel, m.geom, w, m.whitened) for v in views], 2)
    return rings.p_values(c, dims).min(2), rings.p_values(rings.max_cosines(prof, m.geom, vals), dims).min(1)


def before(pv, ps):
    return np.minimum(1.0, n_var * 2 * np.minimum(8 * pv.min(0), n_shift * ps))


def now(pv, ps):
    return np.minimum(1.0, n_var * np.minimum.reduce([pv[0] / 0.5, 7 * pv[1:].min(0) / 0.25, n_shift * ps / 0.25]))


def score(p):
    return -np.log10(np.clip(p, 1e-300, 1.0))


lines = ["attack | TPR@1%FPR before -> now | TPR@0.1%FPR before -> now | detected at 1 % (pos/neg) before -> now"
         " | positives whose smallest unshifted p is at: identity / LR mirror / another view"]
for f in sorted((Path.home() / "runs/xstar").glob("*.npz")):
    d = np.load(f)
    (pv, ps), (nv, ns) = families(d["pos"]), families(d["neg"])
    cells = []
    for a in (0.01, 0.001):
        cells.append(" -> ".join(f"{tpr_at_fpr(score(r(pv, ps)), score(r(nv, ns)), a):.2f}" for r in (before, now)))
    cells.append(" -> ".join(f"{np.mean(r(pv, ps) <= 0.01):.2f}/{np.mean(r(nv, ns) <= 0.01):.2f}" for r in (before, now)))
    at = np.bincount(np.minimum(pv.argmin(0), 2), minlength=3)
    cells.append(f"{at[0]} / {at[1]} / {at[2]}")
    lines.append(f"{f.stem.replace('_', ':')} | " + " | ".join(cells))
    print(lines[-1], flush=True)
(Path(__file__).parent / "report.txt").write_text("\n".join(lines) + "\n")
