"""The benchmark's metrics and reports: ``report.json``, ``report.md``, ``roc.png``, ``tradeoff.png``.

Shared by the in-process and the server runner: both store per-image scores in the cache, and the
rows of ``results`` are computed from the cache the same way. ``report.md`` states which mode made
the numbers, since the unwatermarked images and the fidelity reference differ between them.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shallowmark.reports import markdown_table, write_report

from .bench_config import TPR_DEFINITION

__all__ = ["detection_results", "write_reports", "versions"]


def detection_results(cache, attacks, method_names: Sequence[str], seeds: Sequence[int],
                      ctx_of: Callable, runs: Callable = lambda name, setting: True) -> tuple[list[dict], dict]:
    """One ``results`` row per (attack, method) scored (``runs(method, setting)``) from the cached
    scores, and the ROC curves to plot."""
    from .metrics import roc_metrics

    results, curves = [], {}
    for setting in attacks:
        for name in method_names:
            if not runs(name, setting):
                continue
            pos = cache.scored(ctx_of(name, setting, "pos"))
            neg = cache.scored(ctx_of(name, setting, "neg"))
            sp = np.array([pos[s][0] for s in seeds])
            sn = np.array([neg[s][0] for s in seeds])
            roc = roc_metrics(sp, sn)
            bits = [pos[s][3] for s in seeds if pos[s][3] is not None]
            results.append(dict(
                method=name, attack=setting.label, attack_name=setting.name, strength=setting.value,
                auc=roc.auc, tpr_at_1pct_fpr=roc.tpr_at_1pct_fpr, tpr_at_01pct_fpr=roc.tpr_at_01pct_fpr,
                n_pos=roc.n_pos, n_neg=roc.n_neg,
                detected_pos=float(np.mean([pos[s][2] for s in seeds])),
                detected_neg=float(np.mean([neg[s][2] for s in seeds])),
                bit_accuracy=float(np.mean(bits)) if bits else None,
                median_p_value_pos=float(np.median([pos[s][1] for s in seeds])),
            ))
            curves[(setting.label, name)] = (roc.fpr, roc.tpr)
    return results, curves


def write_reports(out_dir, report: dict, attacks, method_names: Sequence[str], curves: dict) -> Path:
    """Write the four report files to ``out_dir`` (created if missing) and return it."""
    out = write_report(out_dir, report, _markdown(report), default=_json_default, allow_nan=False)
    _plot_roc(out / "roc.png", attacks, method_names, curves, report["results"])
    _plot_tradeoff(out / "tradeoff.png", report["results"], report["fidelity"],
                   server=report["config"].get("mode") == "server")
    return out


def _json_default(v):
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.ndarray, tuple)):
        return list(v)
    return str(v)


def _sanitize(obj):
    """Replace non-finite floats (JSON has none) by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def versions() -> dict:
    """Python and the versions of the packages a run depends on (None: not installed)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("shallowmark", "torch", "diffusers", "numpy", "scipy", "scikit-learn", "scikit-image", "pillow",
                 "invisible-watermark", "onnxruntime", "opencv-python", "matplotlib", "tqdm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def client_machine() -> dict:
    """The machine a server run's client ran on (no torch there, so no device fields)."""
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count())


# -- Markdown ------------------------------------------------------------------------------------------
#: A (method, attack) cell the run's ``method_attacks`` left out.
NOT_RUN = "·"


def _f(v, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _detection_tables(rep: dict) -> list[str]:
    c = rep["config"]
    methods = c["methods"]
    labels = [a["label"] for a in c["attacks"]]
    res = {(r["method"], r["attack"]): r for r in rep["results"]}

    def table(cell, rows=methods):
        return markdown_table(["method", *labels], ([m, *(cell(res[m, a]) if (m, a) in res else NOT_RUN
                                                          for a in labels)] for m in rows))

    lines = []
    subsets = {m: a for m, a in (c.get("method_attacks") or {}).items()}
    if subsets:
        lines += [f"A cell `{NOT_RUN}` was not run: " + "; ".join(
            f"{m} runs only {', '.join(a)}" for m, a in subsets.items()) + " (`method_attacks`).", ""]
    lines += ["## AUC / TPR@1%FPR", "", *table(lambda r: f"{r['auc']:.3f} / {r['tpr_at_1pct_fpr']:.2f}")]
    n_neg = min(r["n_neg"] for r in rep["results"])
    lines += ["", "## TPR@0.1%FPR", "", "The highest TPR among thresholds whose FPR <= 0.1 %" + (
        f"; with {n_neg} unwatermarked images (under 1000) that is the TPR at zero false positives." if n_neg < 1000
        else "."), "", *table(lambda r: _f(r.get("tpr_at_01pct_fpr"), ".2f"))]
    lines += ["", f"## Detected at target FPR {c['target_fpr']:g} (watermarked / unwatermarked flagged)", "",
              *table(lambda r: f"{r['detected_pos']:.2f} / {r['detected_neg']:.2f}")]
    bit_methods = [m for m in methods if any(res[m, a]["bit_accuracy"] is not None for a in labels if (m, a) in res)]
    if bit_methods:
        lines += ["", "## Bit accuracy (watermarked images)", "", *table(lambda r: _f(r["bit_accuracy"]), bit_methods)]
    return lines


def _attacks_and_definitions(rep: dict) -> list[str]:
    lines = ["", "## Attacks", "", *markdown_table(["attack", "strength", "meaning"], (
        [a["label"], f"{a['strength']:g}", a["scale"]] for a in rep["config"]["attacks"]))]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in rep["definitions"].items()]
    return lines


def _fidelity_table(rep: dict) -> list[str]:
    return markdown_table(["method", "PSNR (dB)", "SSIM", "note"], (
        [r["method"], _f(r["psnr"], ".2f"), _f(r["ssim"], ".4f"), r["note"] or ""] for r in rep["fidelity"]))


def _markdown(rep: dict) -> str:
    if rep["config"].get("mode") == "server":
        return _markdown_server(rep)
    c = rep["config"]
    lines = [f"# Robustness benchmark on `{c['model']}`" + (" (quick grid)" if c["quick"] else ""), "",
             f"Command: `{c['command']}`  ",
             f"{c['n']} watermarked images per method and {c['n']} unwatermarked images (same seeds "
             f"{c['seeds'][0]}..{c['seeds'][-1]}), {c['n_keys']} test key(s) per method, target FPR "
             f"{c['target_fpr']:g}. Machine: {c['machine']['platform']}, {c['machine']['cpu_count']} CPUs, "
             f"torch {c['versions']['torch']}; run took {rep['seconds']:.0f} s.", "",
             f"**Definition.** {TPR_DEFINITION}", ""]
    lines += _detection_tables(rep)
    lines += ["", "## Fidelity (against the same-seed unwatermarked image)", "", *_fidelity_table(rep)]
    lines += ["", "## Cost per image", "", *markdown_table(
        ["method", "embed s", "embed model evals", "verify s", "verify model evals"],
        ([r["method"], _f(r["embed_seconds"], ".2f"), r["embed_model_evals"], _f(r["verify_seconds"], ".3f"),
          r["verify_model_evals"]] for r in rep["cost"]))]
    lines += _attacks_and_definitions(rep)
    lines += ["", "## Parameters", "", f"- unwatermarked images: {c['unwatermarked_images']}",
              f"- post-hoc methods embedded into the shared unwatermarked images: "
              f"{', '.join(c['posthoc_embedded_into_shared_references']) or 'none'}",
              f"- keys: {c['keys_note']}", f"- attack randomness: {c['attack_rng']}",
              f"- model fingerprint: {c['model_fingerprint']}", "", "```json",
              json.dumps({k: c[k] for k in ("method_params", "num_steps", "batch", "regen", "versions", "machine")},
                         indent=1, default=_json_default), "```", "",
              "Plots: `roc.png` (ROC per attack), `tradeoff.png` (fidelity vs mean AUC under attack)."]
    return "\n".join(lines) + "\n"


def _markdown_server(rep: dict) -> str:
    c = rep["config"]
    si = c["server_info"]
    lines = [f"# Robustness benchmark on `{c['model']}` through the server `{c['server']}`"
             + (" (quick grid)" if c["quick"] else ""), "",
             f"Command: `{c['command']}`  ",
             f"Server mode: the server made the watermarked images and ran every detection (Verify); the attacks "
             f"ran on this client. {c['n']} watermarked images per method ({c['positives_note']}) and "
             f"{c['n']} unwatermarked images ({c['unwatermarked_images']}), {c['n_keys']} test key(s) per method, "
             f"target FPR {c['target_fpr']:g}. Server version {si['server_version']}, tenant `{si['tenant']}`; "
             f"client: {c['machine']['platform']}, {c['machine']['cpu_count']} CPUs; run took "
             f"{rep['seconds']:.0f} s.", "",
             f"**Definition.** {TPR_DEFINITION}", ""]
    lines += _detection_tables(rep)
    lines += ["", "## Fidelity (user scenario: the server's watermarked version of an uploaded image vs that upload)",
              "", *_fidelity_table(rep)]
    lines += ["", "## Cost per image (seconds measured on the client, round trip included; model evaluations "
                  "as the server reports them)", "", *markdown_table(
                      ["method", "embed s", "embed model evals", "upload embed s", "upload embed model evals",
                       "verify s", "verify model evals"],
                      ([r["method"], _f(r["embed_seconds"], ".2f"), r["embed_model_evals"],
                        _f(r["upload_embed_seconds"], ".2f"), _f(r["upload_embed_model_evals"], "d"),
                        _f(r["verify_seconds"], ".3f"), r["verify_model_evals"]] for r in rep["cost"]))]
    lines += _attacks_and_definitions(rep)
    lines += ["", "## Parameters", "", f"- unwatermarked images: {c['unwatermarked_images']}",
              f"- watermarked images: {c['positives_note']}",
              f"- keys: {c['keys_note']}", f"- attack randomness: {c['attack_rng']}",
              f"- server fingerprint: {c['model_fingerprint']} (cache identity of the server's model and methods)"]
    if c["attacks_left_out"]:
        lines.append(f"- left out of the default attack set: {', '.join(c['attacks_left_out'])} "
                     "(needs the diffusion model)")
    lines += ["", "```json",
              json.dumps({"server_info": si, "method_params": c["method_params"], "batch": c["batch"],
                          "versions": c["versions"], "machine": c["machine"]}, indent=1, default=_json_default),
              "```", "",
              "Plots: `roc.png` (ROC per attack), `tradeoff.png` (upload-scenario fidelity vs mean AUC under attack)."]
    return "\n".join(lines) + "\n"


# -- plots ---------------------------------------------------------------------------------------------
def _plot_roc(path: Path, attacks, methods, curves, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(attacks)
    cols = min(4, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    auc = {(r["attack"], r["method"]): r["auc"] for r in results}
    for i, a in enumerate(attacks):
        ax = axes[i // cols][i % cols]
        for m in methods:
            if (a.label, m) not in curves:
                continue  # not run
            fpr, tpr = curves[(a.label, m)]
            ax.plot(fpr, tpr, label=f"{m} ({auc[a.label, m]:.3f})", lw=1.2)
        ax.axvline(0.01, color="grey", lw=0.6, ls=":")
        ax.plot([0, 1], [0, 1], color="lightgrey", lw=0.6)
        ax.set_title(a.label, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("FPR", fontsize=8)
        ax.set_ylabel("TPR", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    for j in range(k, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tradeoff(path: Path, results, fidelity, server: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    # Over the attacks every method ran, so that a method run on fewer (method_attacks) is compared
    # on the same ones.
    ran = [{r["attack"] for r in results if r["method"] == f["method"]} for f in fidelity]
    common = set.intersection(*ran) if ran else set()
    for f in fidelity:
        attacked = [r["auc"] for r in results if r["method"] == f["method"] and r["attack_name"] != "clean"
                    and r["attack"] in common]
        rob = float(np.mean(attacked)) if attacked else float(
            np.mean([r["auc"] for r in results if r["method"] == f["method"] and r["attack"] in common]))
        if f["psnr"] is None or not math.isfinite(f["psnr"]):
            continue
        ax.scatter([f["psnr"]], [rob])
        ax.annotate(f["method"], (f["psnr"], rob), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PSNR vs the uploaded original (dB)" if server else "PSNR vs same-seed unwatermarked (dB)")
    ax.set_ylabel("mean AUC under attack")
    ax.set_title("fidelity vs robustness", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
