"""Per-variant scores of a robustness run with ``key_variants=16``: each watermarked image's score
(−log10 p, best variant) grouped by the variant it carries (a keyed hash of its seed), read from the
benchmark's score cache. Run the benchmark first (README.md beside this folder); ``--context`` names
one attack cell of it in the cache (the ``ctx`` column of its ``scores`` table).

    python docs/reliability/forgery/key-direction/variant_scores.py --context 773d823327c4b0ef6d05a393 --out DIR
"""
import argparse
import json
import sqlite3
from pathlib import Path

import numpy as np

from shallowmark.keys import WatermarkKey, ring_variant_choice


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scores", default=str(Path.home() / ".cache/shallowmark/bench/scores.sqlite"))
    ap.add_argument("--context", action="append", required=True)
    ap.add_argument("--variants", type=int, default=16)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    db = sqlite3.connect(a.scores)
    key = WatermarkKey.from_hex(f"{1:064x}").for_method("shallow-diffuse")   # the benchmark's test key
    report = []
    for ctx in a.context:
        rows = db.execute("select seed, attack, score, p_value from scores where ctx=? and kind='pos' order by seed",
                          (ctx,)).fetchall()
        if not rows:
            raise SystemExit(f"no watermarked scores under context {ctx} in {a.scores}")
        seeds = np.array([r[0] for r in rows])
        score = np.array([r[2] for r in rows])
        variant = np.array([ring_variant_choice(key, b"seed:%d" % s, a.variants) for s in seeds])
        per = [{"variant": j, "images": int((variant == j).sum()), "median_score": float(np.median(score[variant == j]))}
               for j in range(a.variants) if (variant == j).any()]
        report.append({"context": ctx, "attack": rows[0][1], "median_p": float(np.median([r[3] for r in rows])),
                       "median_score": float(np.median(score)), "variants": per})
        med = [v["median_score"] for v in per]
        print(f"{rows[0][1]} {ctx[:8]}: median p {report[-1]['median_p']:.2g}, per-variant median score "
              f"{min(med):.2f}..{max(med):.2f} ({len(per)} variants)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "variant-scores.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
