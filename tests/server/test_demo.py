"""``shallowmark demo`` end to end at a reduced size (10 DDIM steps instead of 50)."""

from __future__ import annotations

import json


def test_demo_through_the_service(tmp_path, monkeypatch):
    from shallowmark.cli.demo import ATTACKS, run_demo
    from shallowmark.keys import WatermarkKey

    # Fixed keys: with random ones an unwatermarked control is "detected" with probability ~target FPR.
    fixed = iter([bytes([7] * 32), bytes([11] * 32)])
    monkeypatch.setattr(WatermarkKey, "generate", classmethod(lambda cls, label="": cls(secret=next(fixed), label=label)))
    lines: list[str] = []
    assert run_demo(tmp_path, num_steps=10, workers=4, log=lines.append) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["rows"]
    assert summary["num_steps"] == 10 and summary["verify_model_evals"] == 3
    assert len(rows) == 5 * (1 + len(ATTACKS)) and summary["attacks"] == list(ATTACKS)

    clean_wm = [r for r in rows if r["watermarked"] and r["attack"] == "clean"]
    assert {r["image"] for r in clean_wm} == {"generated seed 0", "generated seed 1", "photo (uploaded)"}
    assert all(r["detected"] and r["key_id"] == r["expected_key_id"] for r in clean_wm)
    old, new = (k["server_key_id"] for k in summary["keys"])
    assert {r["image"]: r["key_id"] for r in clean_wm}["generated seed 0"] == old   # the retired key
    assert {r["image"]: r["key_id"] for r in clean_wm}["photo (uploaded)"] == new

    controls = [r for r in rows if not r["watermarked"]]
    assert len(controls) == 2 * (1 + len(ATTACKS))
    assert not any(r["detected"] for r in controls) and summary["false_positives"] == 0
    assert summary["attestations_verified"] == len(rows) and summary["ledger_entries"] == 3
    assert summary["verify_batches"] < len(rows)   # concurrent verifies were batched

    assert (tmp_path / "contact_sheet.png").read_bytes().startswith(b"\x89PNG")
    assert len(list((tmp_path / "images").glob("*.png"))) == len(rows)
    assert any(f"false positives on controls: 0/{len(controls)}" in line for line in lines)
