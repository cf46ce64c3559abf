"""The default configuration (one variant) on several keys: does its robustness under geometric
attacks belong to the method, or to the benchmark's one test key?

Keys: the benchmark's test keys ``WatermarkKey.from_hex(f'{i:064x}')``, i = 1..9 (key 1 is the one
every published robustness figure uses). ``--per`` generations per key (seeds 20000..), attacked;
the benchmark's 100 unwatermarked images (seeds 10000..10099, from its cache) attacked the same
way and scored against every key. Per key: the median score (−log10 p) of its watermarked images and
its TPR at 1 % FPR against its own 100 negatives (at most one at or above the threshold).

    python docs/reliability/forgery/key-direction/per_key.py --out DIR
    python docs/reliability/forgery/key-direction/per_key.py --option key_variants=16 --option strength=1.05 \
        --option 'ring_origin="centre"' --out DIR
    python docs/reliability/forgery/key-direction/per_key.py --from-scores DIR/per-key-scores.json --out DIR
"""
import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ATTACKS = (("rotate", 30.0), ("zoom", None), ("platform-4x5", None))


def measure(cache: Path, per: int, n_keys: int, options: dict) -> dict:
    from shallowmark.attacks.registry import apply_attack
    from shallowmark.core.backends import load_backend
    from shallowmark.core.watermarks import load_method
    from shallowmark.keys import WatermarkKey

    method = load_method("shallow-diffuse", load_backend("tiny-ldm"), **options)
    keys = [WatermarkKey.from_hex(f"{i:064x}").for_method("shallow-diffuse") for i in range(1, n_keys + 1)]
    t0 = time.time()
    pos = []
    for ki, key in enumerate(keys):
        seeds = [20000 + ki * per + j for j in range(per)]
        for j in range(0, per, 6):
            pos.append((ki, seeds[j:j + 6], method.generate([key] * len(seeds[j:j + 6]), seeds[j:j + 6])))
    print("generated", round(time.time() - t0), "s", flush=True)
    neg = np.stack([np.asarray(Image.open(cache / f"{10000 + i}.png").convert("RGB")) for i in range(100)])
    out = {}
    for name, strength in ATTACKS:
        tag = f"{name}:{strength}"
        p = np.zeros((len(keys), per))
        n = np.zeros((len(neg), len(keys)))
        for ki, seeds, images in pos:
            attacked = np.stack([apply_attack(name, im, strength, rng=np.random.default_rng([zlib.crc32(tag.encode()), s]))
                                 for im, s in zip(images, seeds)])
            for s, d in zip(seeds, method.detect(attacked, [keys[ki]])):
                p[ki, (s - 20000) % per] = d.score
        for j in range(0, len(neg), 10):
            attacked = np.stack([apply_attack(name, im, strength, rng=np.random.default_rng([zlib.crc32(tag.encode()), 1 + j + i]))
                                 for i, im in enumerate(neg[j:j + 10])])
            inverted = method.invert(attacked)          # one inversion, scored against every key
            for kk, key in enumerate(keys):
                for i, d in enumerate(method.score(inverted, [key])):
                    n[j + i, kk] = d.score
        out[tag] = {"pos": p.tolist(), "neg": n.tolist()}
        print(tag, round(time.time() - t0), "s", flush=True)
    return out


def tpr_at(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """The highest TPR among thresholds with at most floor(fpr·len(neg)) negatives at or above."""
    allowed = int(np.floor(fpr * len(neg)))
    threshold = np.sort(neg)[::-1][allowed]          # the first negative that must fall below
    return float((pos > threshold).mean())


def summarise(scores: dict) -> dict:
    rows = {}
    for tag, s in scores.items():
        if tag == "options":
            continue
        p, n = np.array(s["pos"]), np.array(s["neg"])
        rows[tag] = [{"key": ki + 1, "median_score": float(np.median(p[ki])), "tpr_at_1pct_fpr": tpr_at(p[ki], n[:, ki])}
                     for ki in range(p.shape[0])]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=str(Path.home() / ".cache/shallowmark/bench/images/tiny-ldm-b92808e3b69e7561/reference-plain-32f7b85636"))
    ap.add_argument("--per", type=int, default=12)
    ap.add_argument("--keys", type=int, default=9)
    ap.add_argument("--option", action="append", default=[], help="Shallow Diffuse option key=value (JSON value)")
    ap.add_argument("--from-scores")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.from_scores:
        scores = json.loads(Path(a.from_scores).read_text())
    else:
        options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in a.option)}
        scores = measure(Path(a.cache), a.per, a.keys, options)
        scores = {"options": options, **scores}
    (out / "per-key-scores.json").write_text(json.dumps(scores))
    summary = summarise(scores)
    (out / "per-key.json").write_text(json.dumps(summary, indent=1))
    lines = ["| attack | " + " | ".join(f"key {r['key']}" for r in next(iter(summary.values()))) + " |",
             "|---|" + "---|" * len(next(iter(summary.values())))]
    for tag, rows in summary.items():
        lines.append(f"| {tag} | " + " | ".join(f"{r['median_score']:.1f} / {r['tpr_at_1pct_fpr']:.2f}" for r in rows) + " |")
    options = scores.get("options", {})
    header = "Median −log10 p / TPR at 1 % FPR, per key; options: " + (json.dumps(options) if options else "defaults")
    (out / "per-key.md").write_text(header + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
