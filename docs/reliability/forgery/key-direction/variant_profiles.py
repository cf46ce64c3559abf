"""Why 16 key variants lose under geometric attacks: the whitened ring profiles of watermarked
images (16 variants, strength 1.05) and of unwatermarked ones, clean and attacked, and how well each
watermarked profile still points along its own variant.

Reads the images of the robustness run with ``key_variants=16, strength=1.05`` from the benchmark
cache (run that benchmark first, README.md beside this folder), so the watermarked images and the
unwatermarked ones are the benchmark's own (seeds 10000..).

    python docs/reliability/forgery/key-direction/variant_profiles.py --attack rotate:30 --n 40 --out DIR
"""
import argparse
import json
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shallowmark.attacks.registry import apply_attack
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks import load_method, rings
from shallowmark.keys import WatermarkKey, ring_variant_choice, ring_variants_seed


def profiles_of(method, images) -> np.ndarray:
    """The whitened ring profile (identity view, unshifted) of what verification scores: ``invert``'s
    output is exactly what ``score`` reads."""
    inverted = torch.cat([method.invert(np.stack(images[j:j + 10])) for j in range(0, len(images), 10)])
    return rings.ring_profile(inverted, method.config.channel, method.geom, True).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attack", default="rotate:30")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--cache", default=str(Path.home() / ".cache/shallowmark/bench/images/tiny-ldm-b92808e3b69e7561"))
    ap.add_argument("--watermarked", default="watermarked-shallow-diffuse-05ae4ea7e1/sm1_a47a5f328891",
                    help="the k16, strength 1.05 run's folder in the cache")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    name, _, s = a.attack.partition(":")
    strength = float(s) if s else None
    method = load_method("shallow-diffuse", load_backend("tiny-ldm"), key_variants=16, strength=1.05)
    key = WatermarkKey.from_hex(f"{1:064x}").for_method("shallow-diffuse")
    cache = Path(a.cache)
    profiles = {}
    for kind, folder in (("pos", a.watermarked), ("neg", "reference-plain-32f7b85636")):
        images = []
        for i in range(a.n):
            im = np.asarray(Image.open(cache / folder / f"{10000 + i}.png").convert("RGB"))
            rng = np.random.default_rng([zlib.crc32(a.attack.encode()), i])
            images.append(apply_attack(name, im, strength, rng=rng))
        profiles[kind] = profiles_of(method, images)
    pos, neg = profiles["pos"], profiles["neg"]
    variant = np.array([ring_variant_choice(key, b"seed:%d" % (10000 + i), 16) for i in range(a.n)])
    geom = method.geom
    keys = rings.key_vector(geom, rings.orthogonal_key_values(ring_variants_seed(key), geom, 16, 1.05)).numpy()
    own = keys[variant]
    unit = own / np.linalg.norm(own, axis=1, keepdims=True)
    along = (pos * unit).sum(1)
    norm = np.linalg.norm(pos, axis=1)
    across = np.sqrt(np.maximum(norm ** 2 - along ** 2, 0))
    # the simplest distortions: one gain per dimension, one complex gain per ring (fitted in-sample)
    gain = (pos * own).sum(0) / (own * own).sum(0)
    half = geom.dims // 2
    z, v = pos[:, :half] + 1j * pos[:, half:], own[:, :half] + 1j * own[:, half:]
    cgain = (np.conj(v) * z).sum(0) / (np.abs(v) ** 2).sum(0)
    vc = v * cgain

    def cos(x, y):
        return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)

    report = {
        "attack": a.attack, "n": a.n,
        "median_cos_own_variant": float(np.median(along / norm)),
        "median_cos_with_dimension_gains": float(np.median(cos(pos, own * gain))),
        "median_cos_with_ring_complex_gains": float(np.median(cos(pos, np.concatenate([vc.real, vc.imag], 1)))),
        "median_norm_across_own_variant": float(np.median(across)),
        "median_norm_unwatermarked_profile": float(np.median(np.linalg.norm(neg, axis=1))),
        "unwatermarked_per_dimension_std": neg.std(0).round(3).tolist(),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profiles-{a.attack.replace(':', '_')}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
