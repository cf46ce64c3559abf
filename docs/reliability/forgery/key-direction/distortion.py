"""Which distortion geometric attacks apply to a ring key: the complex 9×9 map from a watermarked
image's ring profile before an attack to the one after it, fitted by least squares.

Collect (one attack per run; clean first): the whitened and raw ring profiles, under every circular
shift of the search window, of the benchmark's 100 images watermarked with 16 variants at strength
1.05 (the robustness run's cache, README.md beside this folder) and of its 100 unwatermarked ones:

    python docs/reliability/forgery/key-direction/distortion.py collect clean
    python docs/reliability/forgery/key-direction/distortion.py collect rotate:30     # zoom, platform-4x5

Fit (seconds), writing distortion.json to --out:

    python docs/reliability/forgery/key-direction/distortion.py fit rotate:30 zoom platform-4x5 --out DIR

Each watermarked image's profile is taken at the shift where it best matches its own variant.
Reported per attack: the complex gain of each ring, the fitted map's diagonal and first off-diagonals
(magnitude and phase), and the median cosine of the attacked whitened profile with its own variant
and with that variant passed through the map (the same map for every image). The map fitted on the
unwatermarked images (their content only) is given beside it.
"""
import argparse
import json
import zlib
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache/shallowmark/bench/images/tiny-ldm-b92808e3b69e7561"
FOLDERS = {"pos": "watermarked-shallow-diffuse-05ae4ea7e1/sm1_a47a5f328891", "neg": "reference-plain-32f7b85636"}
STORE = Path.home() / ".cache/shallowmark/forgery"


def _npz(attack: str) -> Path:
    return STORE / f"distortion-{attack.replace(':', '_')}-100.npz"


def collect(attack: str, n: int = 100) -> None:
    import torch
    from PIL import Image

    from shallowmark.attacks.registry import apply_attack
    from shallowmark.core.backends import load_backend
    from shallowmark.core.watermarks import load_method, rings
    from shallowmark.keys import WatermarkKey, ring_variant_choice, ring_variants_seed

    method = load_method("shallow-diffuse", load_backend("tiny-ldm"), key_variants=16, strength=1.05)
    key = WatermarkKey.from_hex(f"{1:064x}").for_method("shallow-diffuse")
    geom, ch, w = method.geom, method.config.channel, method.config.shift_window
    keys = rings.key_vector(geom, rings.orthogonal_key_values(ring_variants_seed(key), geom, 16, 1.05)).numpy()
    variant = np.array([ring_variant_choice(key, b"seed:%d" % (10000 + i), 16) for i in range(n)])
    name, _, s = attack.partition(":")
    strength = float(s) if s else None
    out = {}
    for kind, folder in FOLDERS.items():
        images = []
        for i in range(n):
            im = np.asarray(Image.open(CACHE / folder / f"{10000 + i}.png").convert("RGB"))
            rng = np.random.default_rng([zlib.crc32(attack.encode()), i])
            images.append(im if name == "clean" else apply_attack(name, im, strength, rng=rng))
        inverted = torch.cat([method.invert(np.stack(images[j:j + 10])) for j in range(0, n, 10)])
        for white in (False, True):
            out[f"{kind}_{'white' if white else 'raw'}"] = rings.shift_profiles(inverted.contiguous(), ch, geom, w,
                                                                                white).numpy()
    STORE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(_npz(attack), keys=keys, variant=variant, **out)


def _complex(p: np.ndarray) -> np.ndarray:
    half = p.shape[1] // 2
    return p[:, :half] + 1j * p[:, half:]


def _real(z: np.ndarray) -> np.ndarray:
    return np.concatenate([z.real, z.imag], 1)


def _best_shift(profiles: np.ndarray, unit_keys: np.ndarray) -> np.ndarray:
    m = profiles / np.linalg.norm(profiles, axis=1, keepdims=True)
    return np.einsum("nds,nd->ns", m, unit_keys).argmax(1)


def _max_cos(profiles: np.ndarray, k: np.ndarray) -> np.ndarray:
    m = profiles / np.linalg.norm(profiles, axis=1, keepdims=True)
    return np.einsum("nds,nd->ns", m, k / np.linalg.norm(k, axis=1, keepdims=True)).max(1)


def _bands(a: np.ndarray) -> dict:
    return {name: {"magnitude": np.abs(np.diag(a, k)).round(3).tolist(),
                   "phase_deg": np.degrees(np.angle(np.diag(a, k))).round(0).tolist()}
            for name, k in (("diagonal", 0), ("above", 1), ("below", -1))}


def fit(attacks, out: Path) -> dict:
    clean = np.load(_npz("clean"))
    own = clean["keys"][clean["variant"]]
    unit = own / np.linalg.norm(own, axis=1, keepdims=True)
    rows = np.arange(len(own))
    zc_pos = _complex(clean["pos_raw"][rows, :, _best_shift(clean["pos_white"], unit)])
    zc_neg = _complex(clean["neg_raw"][:, :, 0])
    report = {"images": len(own), "clean_median_cos_own_variant": float(np.median(_max_cos(clean["pos_white"], own)))}
    for attack in attacks:
        d = np.load(_npz(attack))
        za = _complex(d["pos_raw"][rows, :, _best_shift(d["pos_white"], unit)])
        zn = _complex(d["neg_raw"][:, :, 0])
        gain = (np.conj(zc_pos) * za).sum(0) / (np.abs(zc_pos) ** 2).sum(0)
        entry = {"ring_gain": {"magnitude": np.abs(gain).round(3).tolist(),
                               "phase_deg": np.degrees(np.angle(gain)).round(0).tolist()},
                 "median_cos_own_variant": float(np.median(_max_cos(d["pos_white"], own)))}
        for kind, x, y in (("watermarked", zc_pos, za), ("unwatermarked", zc_neg, zn)):
            a, *_ = np.linalg.lstsq(x, y, rcond=None)
            entry[f"map_from_{kind}"] = {
                **_bands(a),
                "median_cos_variant_through_map": float(np.median(_max_cos(d["pos_white"], _real(_complex(own) @ a))))}
        report[attack] = entry
    out.mkdir(parents=True, exist_ok=True)
    (out / "distortion.json").write_text(json.dumps(report, indent=1))
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("collect", "fit"))
    ap.add_argument("attacks", nargs="+")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    a = ap.parse_args()
    if a.mode == "collect":
        for attack in a.attacks:
            collect(attack)
    else:
        print(json.dumps(fit(a.attacks, Path(a.out)), indent=1))


if __name__ == "__main__":
    main()
