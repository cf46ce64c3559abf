"""Per-key verdict rates over 1000 random keys (identity hypothesis, no search) on the latents of invert_all.py, for
x_t*, x_t* - sqrt(abar) z0 and x_t* - z0, per source; then the detection power of both statistics on watermarked.py's
latents (full default search). Run: python residual.py after both. Output: residual.txt
VR: the variance of the per-key rates over its binomial value (1 when every key fires at the same rate);
chi2mu: the mean profile's squared z-score per dimension (1 when images share no ring profile)."""
import torch, numpy as np, sys
from shallowmark.core.watermarks import rings
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
c = ShallowDiffuseConfig()
geom = rings.RingGeometry(64, c.radius, c.ring_centre, c.inner_radius, c.complex_key)
m = ShallowDiffuse(load_backend("tiny-ldm"), ShallowDiffuseConfig(key_variants=1)); abar = float(m.grid.alphas[m.k_star]); print("abar", abar)
d = torch.load("/tmp/runs/diag/lat.pt"); L = torch.cat(d["lat"]).double(); Z = torch.cat(d["z0"]).double()
n = min(len(L), len(Z)); L, Z = L[:n], Z[:n]; names = d["names"][:n]
src = np.array([nm.split("/")[0] for nm in names]); print({s: (src == s).sum() for s in set(src)})
keys = torch.randn(1000, 18, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
kk = (keys / keys.norm(dim=1, keepdim=True)).numpy()
def disp(X, label, sel):
    mp = rings.ring_profile(X[sel], c.channel, geom, whiten=True).numpy()
    mm = mp / np.linalg.norm(mp, axis=1, keepdims=True)
    p = rings.p_values(torch.from_numpy(mm @ kk.T), 18); N = sel.sum()
    out = []
    for t in (0.01, 0.05):
        pk = (p <= t).mean(0); out.append(f"t{t}: mean {pk.mean():.4f} max {pk.max():.3f} VR {pk.var()/(t*(1-t)/N):.2f}")
    mu = mp.mean(0); se = mp.std(0) / np.sqrt(N)
    print(f"{label:22s} N={N:4d} " + "; ".join(out) + f"; chi2mu {((mu/se)**2).mean():.2f}")
for grp, sel in (("generated", src == "generated"), ("photos", src != "generated")):
    if sel.sum() < 20: continue
    disp(L, f"{grp} x_t*", sel)
    disp(L - abar ** 0.5 * Z, f"{grp} x_t* - sqrt(a) z0", sel)
    disp(L - Z, f"{grp} x_t* - z0", sel)
# power on watermarked
try:
    W = torch.load("/tmp/runs/diag/wm.pt")
except Exception:
    W = None
if W:
    from shallowmark.keys import WatermarkKey
    key = WatermarkKey.from_hex(f"{1:064x}").for_method("shallow-diffuse")
    for (lab, att), (lat, z) in W.items():
        for nm, X in (("x_t*", lat.double()), ("resid", lat.double() - abar ** 0.5 * z.double())):
            p = m.geometric_p_values(X, [key]).ravel()
            print(f"wm {lab:5s} {att:12s} {nm:6s} median -log10p {np.median(-np.log10(p)):.1f}; det@1% {(p<=0.01).mean():.2f}; q10 {np.quantile(-np.log10(p), 0.1):.1f}")
