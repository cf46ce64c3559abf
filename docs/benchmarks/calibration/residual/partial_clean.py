"""The calibration rerun's clean images, before and after the residual statistic, read from the
calibration cache while the rerun's three attacks were still running (the report is written at its
end). Before: context 4a1b287738f9ebe2 (the committed report, commit 370e04e); after: 73c1690ba783dec8
(`shallowmark bench-calibration --n-generated 300` with noise_residual on). Verdict rates per key
over the same images, target 1 % and 0.1 %; VR: variance of the 20 keys' rates over its binomial
value. Run: python partial_clean.py. Output: partial_clean.txt"""
import json
from pathlib import Path

import numpy as np

cache = Path.home() / ".cache/shallowmark/calibration/verdicts.jsonl"
recs = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
runs = {lab: {(r["source"], r["name"]): r["p_keys"] for r in recs if r["ctx"] == ctx and r["attack"] == "clean"}
        for lab, ctx in (("before", "4a1b287738f9ebe2"), ("after", "73c1690ba783dec8"))}
common = sorted(set(runs["before"]) & set(runs["after"]))
print(f"{len(common)} clean images in both runs")
for group, keep in (("generated", lambda k: k[0] == "generated"), ("photos", lambda k: k[0] != "generated"),
                    ("all", lambda k: True)):
    sel = [k for k in common if keep(k)]
    for lab in ("before", "after"):
        p = np.array([runs[lab][k] for k in sel])
        rate = (p <= 0.01).mean(0)
        m = rate.mean()
        print(f"{group:9s} {lab:6s} n={len(sel):4d} target 1 %: test key {rate[0]:.4f} mean {m:.4f} worst {rate.max():.4f} "
              f"VR {rate.var() / (m * (1 - m) / len(sel)):.2f} | target 0.1 %: test key {(p[:, 0] <= 0.001).mean():.4f} "
              f"mean {(p <= 0.001).mean():.4f} worst {(p <= 0.001).mean(0).max():.4f}")
