"""Fingerprint of what the code computes, to show that a refactor changed no number.

Runs, with fixed seeds and keys: a small bench over all seven methods (n=4, 10 DDIM steps, clean /
jpeg / blur), the methods report at small sizes, and the demo at 10 steps; writes every score,
p-value and image hash it saw to one JSON file. Run it before and after a change and diff the two:

    OMP_NUM_THREADS=1 python docs/notes/same_numbers.py OUT.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def _strip(report: dict) -> dict:
    """The report without what depends on the run (paths, timings, versions, machine)."""
    keep = {k: report[k] for k in ("results", "fidelity")}
    keep["cost_evals"] = [{k: v for k, v in c.items() if "evals" in k} for c in report["cost"]]
    keep["key_ids"] = report["config"]["key_ids"]
    keep["method_params"] = report["config"]["method_params"]
    return keep


def bench_figures(tmp: Path) -> dict:
    from shallowmark.attacks.bench import BenchConfig, run_bench

    methods = ("shallow-diffuse", "tree-ring", "ringid", "gaussian-shading", "dwtdct", "dwtdctsvd", "rivagan")
    cfg = BenchConfig.quick_config(out_dir=tmp / "bench-out", cache_dir=tmp / "bench-cache", methods=methods)
    report = run_bench(cfg, progress=False)
    images = {}
    for p in sorted((tmp / "bench-cache").rglob("*.png")):
        images[str(p.relative_to(tmp / "bench-cache")).split("/", 1)[1]] = hashlib.sha256(p.read_bytes()).hexdigest()
    out = _strip(report)
    out["image_hashes"] = dict(sorted(images.items()))
    return out


def methods_figures(tmp: Path) -> dict:
    from shallowmark.attacks.methods_report import run

    res = run(tmp / "methods", n_null=8, n_ident=4, n_fidelity=2, n_nullspace=1, batch=4, log=lambda *a: None)
    res.pop("seconds", None)
    res["config"] = {k: v for k, v in res["config"].items() if k not in ("torch", "machine", "command")}
    for m in res.get("methods", {}).values():
        for k in [k for k in m if "seconds" in k or k.endswith("_s")]:
            m.pop(k)
    res["checks"] = [{k: v for k, v in c.items()} for c in res.get("checks", []) if "second" not in c["name"]]
    return res


def demo_figures(tmp: Path) -> dict:
    """The demo at 10 steps with deterministic keys (its keystore normally makes random ones).

    Its Verify calls run concurrently, and a batched model call can differ from an unbatched one in
    the last bit, so p-values are compared as rounded log10; images are compared exactly."""
    import itertools

    from shallowmark import keys as keys_mod

    try:
        from shallowmark.cli.demo import run_demo
    except ImportError:
        from shallowmark.core.demo import run_demo

    counter = itertools.count(1000)
    original = keys_mod.WatermarkKey.generate
    keys_mod.WatermarkKey.generate = classmethod(
        lambda cls, label="": cls.from_hex(f"{next(counter):064x}", label=label))
    try:
        out = tmp / "demo"
        run_demo(out, num_steps=10, log=lambda *a: None)
    finally:
        keys_mod.WatermarkKey.generate = original
    summary = json.loads((out / "summary.json").read_text())
    rows = [dict(image=r["image"], attack=r["attack"], detected=r["detected"], correct=r["correct"],
                 log10_p=round(float(np.log10(max(r["p_value"], 1e-300))), 1)) for r in summary["rows"]]
    images = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "images").glob("*.png"))}
    return dict(rows=rows, images=images, fidelity={k: round(v, 3) for k, v in summary["fidelity_psnr_db"].items()},
                detected=summary["detected_watermarked"], false_positives=summary["false_positives"])


def main() -> None:
    target = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        figures = dict(bench=bench_figures(tmp), methods=methods_figures(tmp), demo=demo_figures(tmp))
    target.write_text(json.dumps(figures, indent=1, sort_keys=True, default=str))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
