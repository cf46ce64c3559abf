"""``bench-identify`` at a smoke size: every member found at each family size, the report's tables
and the served latency, and a rerun that reads everything from the cache."""

from __future__ import annotations

import json

from shallowmark.attacks.identify_report import IdentifyConfig, run


def test_identification_report_finds_each_member_and_resumes(tmp_path):
    cfg = IdentifyConfig(n_marked=2, members=2, sizes=(2, 300), attacks=("clean", "jpeg:50"), n_generated_negatives=2,
                         photo_sources=(), negative_attacks=("clean",), latency_calls=1, batch=2,
                         cache_dir=str(tmp_path / "cache"))
    rep = run(cfg, tmp_path / "out", log=lambda *_: None)
    assert len(list((tmp_path / "cache").glob("generated-*/*.png"))) == 2   # the negatives in this run's cache
    rows = {(r["kind"], r["attack"], r["keys"]): r for r in rep["rows"]}
    assert set(rows) == {(k, a, n) for k, attacks in (("marked", ("clean", "jpeg:50")), ("unmarked", ("clean",)))
                         for a in attacks for n in (2, 300)}
    for n in (2, 300):
        clean = rows[("marked", "clean", n)]
        assert clean["images"] == 2 and clean["identified"] == clean["top1"] == 1.0 and clean["wrong_member_detected"] == 0
        assert rows[("unmarked", "clean", n)]["detected"] == 0.0
        lat = rep["served_latency"][str(n)]
        assert lat["calls"] == 1 and 0 < lat["min_s"] <= lat["median_s"] and lat["model_evals"] > 0
        assert lat["identified_member"] in (0, 1)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| clean | 1.00 / 1.00 | 1.00 / 1.00 | 1.00 |" in md and "## Verify latency" in md
    lines = (tmp_path / "cache" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {json.loads(x)["kind"] for x in lines} == {"marked", "unmarked"}
    run(cfg, tmp_path / "out", log=lambda *_: None)              # all cached: nothing inverted again
    assert len((tmp_path / "cache" / "results.jsonl").read_text().splitlines()) == 6
