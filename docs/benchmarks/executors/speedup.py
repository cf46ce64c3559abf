"""The benchmark's scoring on Dask workers against this process, side by side on one machine.

The images are made once (first run, its own cache) and copied into two fresh caches, so the two
timed runs do only what the executors differ in: attacking and scoring every image. Both runs use
the same total of torch threads (``--threads`` here; one per worker there, ``--threads`` workers).

    python docs/benchmarks/executors/speedup.py --out docs/benchmarks/executors
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="shallow-diffuse,tree-ring")
    ap.add_argument("--attacks", default="clean,jpeg,rotate,crop-centre")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from shallowmark.attacks.bench import BenchConfig, parse_attacks, run_bench

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="shallowmark-speedup-"))
    common = dict(methods=tuple(args.methods.split(",")), attacks=parse_attacks(args.attacks), n=args.n)
    t0 = time.perf_counter()
    run_bench(BenchConfig(**common, out_dir=root / "make", cache_dir=root / "make-cache"), progress=False)
    made_s = time.perf_counter() - t0
    rows = {}
    for name, extra in (("local", {}), ("dask", dict(executor="dask", workers=args.threads))):
        shutil.copytree(root / "make-cache" / "images", root / f"{name}-cache" / "images")
        t0 = time.perf_counter()
        run_bench(BenchConfig(**common, **extra, out_dir=root / name, cache_dir=root / f"{name}-cache"), progress=False)
        rows[name] = time.perf_counter() - t0
    same = json.loads((root / "local" / "report.json").read_text())["results"] == \
        json.loads((root / "dask" / "report.json").read_text())["results"]
    rep = dict(parameters=vars(args), first_run_with_images_s=made_s, scoring_s=rows,
               speedup=rows["local"] / rows["dask"], identical_results=same, cpus=os.cpu_count(),
               machine=platform.platform(), torch=torch.__version__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speedup.json").write_text(json.dumps(rep, indent=2))
    (out / "speedup.md").write_text("\n".join([
        "# Benchmark scoring: Dask workers against this process", "",
        f"Command: `python docs/benchmarks/executors/speedup.py --out {args.out} --methods {args.methods} "
        f"--attacks {args.attacks} --n {args.n} --threads {args.threads}`", "",
        f"{args.n} watermarked and {args.n} unwatermarked images per method, {len(common['attacks'])} attacks, "
        f"{os.cpu_count()} CPUs ({platform.platform()}); the images were made once beforehand "
        f"({made_s:.0f} s with the first scoring), then scored from scratch by each executor.", "",
        "| executor | torch threads | scoring run (s) |", "|---|---|---|",
        f"| local (this process) | {args.threads} | {rows['local']:.0f} |",
        f"| dask LocalCluster, {args.threads} workers | 1 per worker | {rows['dask']:.0f} |", "",
        f"Speed-up: {rep['speedup']:.2f}x. Results identical: {same}.", ""]))
    print((out / "speedup.md").read_text())
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
