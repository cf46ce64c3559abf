"""What ``fill_borders`` costs or gains in power: 16 watermarked generations (seeds 20000-20015,
one key), rotated by 30° and 15° and translated by 10 %, median and minimum -log10 p with and
without it. Run: OMP_NUM_THREADS=2 python fill_power.py. Output: fill_power.txt"""
import numpy as np

from shallowmark.attacks import apply_attack
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks.shallow_diffuse import ShallowDiffuse, ShallowDiffuseConfig
from shallowmark.keys import WatermarkKey

backend = load_backend("tiny-ldm")
plain, filled = (ShallowDiffuse(backend, ShallowDiffuseConfig(fill_borders=v)) for v in (False, True))
key = WatermarkKey.from_hex(f"{3:064x}").for_method("shallow-diffuse")
marked = plain.generate([key] * 16, list(range(20000, 20016)))
for attack, strength in (("rotate", 30), ("rotate", 15), ("translate", 0.1)):
    att = np.stack([apply_attack(attack, im, strength, rng=np.random.default_rng(i)) for i, im in enumerate(marked)])
    row = []
    for m in (plain, filled):
        lp = -np.log10(np.clip([d.p_value for d in m.detect(att, [key])], 1e-300, 1))
        row.append(f"median {np.median(lp):.1f} (min {lp.min():.1f})")
    print(f"watermarked, {attack} {strength}: without fill {row[0]} | with fill {row[1]}", flush=True)
