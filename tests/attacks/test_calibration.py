"""The calibration report: verdict rates on unwatermarked images, cached so a run resumes."""

from __future__ import annotations

import json

from shallowmark.attacks.calibration import CalibrationConfig, run_calibration


def test_calibration_counts_verdicts_per_source_and_resumes(tmp_path):
    cfg = CalibrationConfig(n_generated=3, photo_sources=(), attacks=("clean", "rotate:30"), batch=3,
                            cache_dir=str(tmp_path / "cache"))
    report = run_calibration(cfg, tmp_path / "out", log=lambda *_: None)
    rows = {(r["attack"], r["source"]): r for r in report["rows"]}
    assert report["sources"] == {"generated": 3}
    for attack in ("clean", "rotate:30"):
        r = rows[(attack, "generated")]
        assert r["n"] == 3 and 0 <= r["fired@0.01"] <= 3 and 0 < r["upper95@0.01"] <= 1
    lines = (tmp_path / "cache" / "verdicts.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(0 <= json.loads(x)["p"] <= 1 for x in lines)
    run_calibration(cfg, tmp_path / "out", log=lambda *_: None)          # everything cached: nothing re-verified
    assert len((tmp_path / "cache" / "verdicts.jsonl").read_text().splitlines()) == 6
    assert "| clean | generated | 3 |" in (tmp_path / "out" / "report.md").read_text()
