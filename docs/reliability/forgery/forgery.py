"""Forgery and removal by averaging, against Shallow Diffuse and the latent baselines on tiny-ldm.

The attacker holds N watermarked images of one key and N unwatermarked ones, and no key and no
model. The pattern P = mean(watermarked) - mean(unwatermarked) is their estimate of the watermark:
- "unpaired": the unwatermarked images are other generations of the model (other seeds);
- "same-seed": they are the same seeds generated without the watermark (the strongest averaging
  attacker: every pair differs only by its watermark).
Forgery: P, scaled to a given PSNR against the target, is added to each of the targets (images
never watermarked: generations with other seeds and real photos on the model's grid); success is
the verdict "carries the key" at target FPR 1 %. Removal: P is subtracted from watermarked images
that were not averaged; success is the verdict turning to "not detected".

Watermarked images are generated here (seeds 30000.., cached in --cache); the unwatermarked
images are the calibration's generations (seeds 50000.., `shallowmark bench-calibration` makes
them) and photos from `shallowmark fetch-photos`.

Run: python docs/reliability/forgery/forgery.py --methods shallow-diffuse --out docs/reliability/forgery
Writes report.json and report.md to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

NS = (4, 16, 64)
PSNRS = (25.0, 30.0, 35.0)


def load_pngs(folder: Path, seeds) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / f"{s}.png").convert("RGB")) for s in seeds])


def cached(folder: Path, seeds, make, batch: int = 8) -> np.ndarray:
    """Images by seed from ``folder``, made (``make(seeds)``) and saved where missing."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    missing = [s for s in seeds if not (folder / f"{s}.png").exists()]
    for i in range(0, len(missing), batch):
        chunk = missing[i:i + batch]
        for s, im in zip(chunk, make(chunk)):
            Image.fromarray(im).save(folder / f"{s}.png")
        print(f"{folder.name}: made {i + len(chunk)}/{len(missing)}", flush=True)
    return load_pngs(folder, seeds)


def scaled(pattern: np.ndarray, psnr: float) -> np.ndarray:
    """The pattern scaled so that adding it changes an image by ``psnr`` dB (before clipping)."""
    rms = float(np.sqrt(np.mean(pattern.astype(np.float64) ** 2)))
    return pattern * (255.0 / 10 ** (psnr / 20.0) / max(rms, 1e-12))


def apply(images: np.ndarray, delta: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images.astype(np.float64) + delta), 0, 255).astype(np.uint8)


def psnr_db(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))))


class VerdictCache:
    """Verdicts already computed, one JSON line per (run, label), so an interrupted run resumes:
    ``run`` hashes what the verdicts depend on (method parameters, key, target counts)."""

    def __init__(self, path: Path, run: str):
        self.path, self.run, self.rows = path, run, {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["run"] == run:
                    self.rows[row["label"]] = np.asarray(row["detected"], dtype=bool)

    def get(self, label: str):
        return self.rows.get(label)

    def put(self, label: str, detected) -> None:
        self.rows[label] = np.asarray(detected, dtype=bool)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"run": self.run, "label": label, "detected": [bool(d) for d in detected]}) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="shallow-diffuse,tree-ring,ringid,gaussian-shading")
    ap.add_argument("--targets", type=int, default=100, help="half generations, half photos")
    ap.add_argument("--removal", type=int, default=36, help="watermarked images not averaged")
    ap.add_argument("--cache", default=str(Path.home() / ".cache/shallowmark/forgery"), help="generated images")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ns", default=",".join(map(str, NS)), help="images averaged")
    ap.add_argument("--psnrs", default=",".join(map(str, PSNRS)), help="attacker PSNRs against the target (dB)")
    ap.add_argument("--option", action="append", default=[], help="method option key=value (JSON value)")
    args = ap.parse_args()
    ns = tuple(int(v) for v in args.ns.split(","))
    psnrs = tuple(float(v) for v in args.psnrs.split(","))

    import torch

    from shallowmark.attacks import photos
    from shallowmark.attacks.bench import _method_params
    from shallowmark.attacks.bench_cache import stable_hash
    from shallowmark.attacks.bench_config import bench_keys
    from shallowmark.core.backends import load_backend
    from shallowmark.core.resolution import to_grid
    from shallowmark.core.watermarks import load_method

    torch.set_grad_enabled(False)
    backend = load_backend("tiny-ldm")
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    report = {"parameters": vars(args) | {"ns": ns, "psnrs": psnrs, "target_fpr": 0.01}, "methods": {}}
    half = args.targets // 2
    gen_dir = Path.home() / ".cache/shallowmark/calibration/generated-tiny-ldm"
    targets = np.concatenate([load_pngs(gen_dir, range(50000, 50000 + half)),
                              np.concatenate([to_grid(p.image[None], 256) for p in
                                              photos.load(None, None, -(-(args.targets - half) // 4))[: args.targets - half]])])
    unpaired = load_pngs(gen_dir, range(50100, 50100 + max(ns)))
    seeds = list(range(30000, 30000 + max(ns) + args.removal))
    for name in args.methods.split(","):
        method = load_method(name, backend, **(options if name == "shallow-diffuse" else {}))
        key = bench_keys(1, name)[0]
        # the folder names what the images depend on: the parameters and, for Shallow Diffuse, the
        # variants' ring values themselves (a change of how they are drawn keeps the parameters)
        what = [_method_params(method)] + ([method.variant_values(key).tolist()] if hasattr(method, "variant_values") else [])
        wm_all = cached(cache / f"{name}-{stable_hash(what, 10)}-{key.key_id[:12]}", seeds,
                        lambda ss: method.generate([key] * len(ss), ss))
        # the same seeds without the watermark: each latent method's reference() is the plain sample
        # from the same initial noise
        same = cached(cache / f"reference-plain-{method.config.num_steps}-steps", seeds[:max(ns)],
                      lambda ss: method.reference(ss))
        wm, held = wm_all[:max(ns)], wm_all[max(ns):]

        verdicts = VerdictCache(cache / "verdicts.jsonl", stable_hash([what, key.key_id, args.targets, args.removal], 16))

        def detected(label: str, images) -> np.ndarray:
            have = verdicts.get(label)
            if have is not None and len(have) == len(images):
                return have
            res = []
            for i in range(0, len(images), 8):
                res += [d.detected for d in method.detect(images[i:i + 8], [key], 0.01)]
            verdicts.put(label, res)
            return np.asarray(res)

        t0 = time.time()
        before = detected("targets", targets)
        rows = [{"attack": "none", "targets_detected": float(before.mean()),
                 "held_detected": float(detected("held", held).mean())}]
        for pairing, refs in (("unpaired", unpaired), ("same-seed", same)):
            for n in ns:
                pattern = wm[:n].astype(np.float64).mean(0) - refs[:n].astype(np.float64).mean(0)
                for psnr in psnrs:
                    delta = scaled(pattern, psnr)
                    forged = apply(targets, delta)
                    removed = apply(held, -delta)
                    label = f"{pairing}/{n}/{psnr:g}"
                    hit = detected("forged/" + label, forged)
                    # a target the verdict already flags unattacked (a false positive at the target
                    # FPR) is no forgery: "new" counts only the targets the pattern turned
                    rows.append({"attack": "average", "pairing": pairing, "n": n, "psnr_target": psnr,
                                 "psnr_forged": psnr_db(forged, targets), "psnr_removed": psnr_db(removed, held),
                                 "forgery_success": float(hit.mean()),
                                 "forgery_new": int((hit & ~before).sum()), "targets_clear": int((~before).sum()),
                                 "removal_detected": float(detected("removed/" + label, removed).mean())})
                    print(name, rows[-1], flush=True)
        report["methods"][name] = {"rows": rows, "seconds": time.time() - t0,
                                   "config": {k: str(v) for k, v in vars(method.config).items()}}
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "report.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    lines = ["# Forgery and removal by averaging", "",
             f"Parameters: `{json.dumps(report['parameters'], default=str)}`", ""]
    for name, res in report["methods"].items():
        base = res["rows"][0]
        lines += [f"## {name}", "",
                  f"Without attack: targets detected {base['targets_detected']:.2f} (false positives at target FPR 1 %), "
                  f"held-out watermarked images detected {base['held_detected']:.2f}. {res['seconds']:.0f} s.", "",
                  "Forgery success: the forged targets the verdict flags; \"new\": of the targets not flagged "
                  "without the attack, how many the pattern turned.", "",
                  "| pairing | N averaged | attacker PSNR (dB) | forgery success | new | watermarked still detected after removal |",
                  "|---|---|---|---|---|---|"]
        for r in res["rows"][1:]:
            new = f"{r['forgery_new']}/{r['targets_clear']}" if "forgery_new" in r else "–"
            lines.append(f"| {r['pairing']} | {r['n']} | {r['psnr_forged']:.1f} | {r['forgery_success']:.2f} | {new} | "
                         f"{r['removal_detected']:.2f} |")
        lines += ["", "Config: `" + json.dumps(res["config"]) + "`", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
