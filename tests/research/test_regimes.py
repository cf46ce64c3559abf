"""The two-regimes analysis: a quick run on generated IDX files, its report, the model cache, the
threshold rule and bad configurations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shallowmark.errors import InvalidParameterError
from shallowmark.research import fmnist, regimes
from shallowmark.research.descriptors import HighPassDescriptor


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, fmnist_dir):
    root = tmp_path_factory.mktemp("regimes")
    cfg = regimes.RegimesConfig.quick(data_dir=str(fmnist_dir), cache_dir=str(root / "cache"))
    rep = regimes.run_regimes_analysis(root / "out", cfg)
    return dict(root=root, cfg=cfg, report=rep)


def test_quick_report(quick_run):
    rep, out = quick_run["report"], quick_run["root"] / "out"
    assert json.loads((out / "report.json").read_text())["analysis"] == "regimes"
    for png in ("rp_gl.png", "samples.png", "calibration.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["n"] for r in rep["rows"]] == [16, 64, 256]
    for r in rep["rows"]:
        stats = [r["rp"], r["rp_chance"], r["optimum_gl"]] + [m[k] for m in r["models"].values()
                                                            for k in ("gl", "same_as_optimum")]
        for s in stats:
            assert 0 <= s["ci95"][0] <= s["value"] <= s["ci95"][1] <= 1 and s["n"] == 24
        assert set(r["models"]) == {"small", "large"}
        # the closed-form optimum reproduces training images: (almost) no novel samples
        assert r["optimum_gl"]["value"] <= 0.1
    md = (out / "report.md").read_text()
    assert "τ = **" in md and "| N | RP |" in md and "Reading" in md
    assert rep["timings_s"]["total"] > 0 and rep["timings_s"]["training"] > 0
    assert rep["reading"]["transition_later_for"] in ("small", "large", "neither")


def test_the_threshold_follows_its_rule(fmnist_data):
    """τ is the 95th percentile of held-out images' similarity to their nearest training image, so
    about 5 % of those different images pass; exact copies always pass."""
    train, test = fmnist_data.synthetic_images(300, 11), fmnist_data.synthetic_images(200, 12)
    cal = regimes.calibrate_threshold(HighPassDescriptor(), train, test, 200, seed=0)
    diff = np.asarray(cal.values["different_images"])
    assert abs(float(np.mean(diff > cal.threshold)) - regimes.FALSE_COPY_RATE) <= 0.01
    assert set(cal.copies_pass) == set(regimes.ALTERATIONS)
    assert all(0 <= v <= 1 for v in cal.copies_pass.values())
    assert "95th percentile" in cal.rule


def test_a_rerun_uses_the_cached_models(quick_run, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(fmnist, "train_model", no_training)
    again = regimes.run_regimes_analysis(quick_run["root"] / "again", quick_run["cfg"])
    for a, b in zip(again["rows"], quick_run["report"]["rows"]):
        assert a["rp"] == b["rp"] and a["models"]["large"]["gl"] == b["models"]["large"]["gl"]


@pytest.mark.parametrize("kw, words", [
    (dict(sizes=(64, 16)), ["increasing"]),
    (dict(sizes=(1,)), [">= 2"]),
    (dict(models=(regimes.Variant("a", width=32, seed=1), regimes.Variant("b", width=32, seed=2))),
     ["differ in architecture or width"]),
    (dict(models=(regimes.Variant("a", width=32, seed=1), regimes.Variant("b", width=64, seed=1))), ["seed"]),
    (dict(models=(regimes.Variant("a"),)), ["exactly two"]),
    (dict(noises=1), ["noises"]),
    (dict(steps=0), ["steps"]),
])
def test_bad_configs_fail_before_any_work(kw, words, tmp_path, fmnist_dir):
    cfg = regimes.RegimesConfig.quick(data_dir=str(fmnist_dir), cache_dir=str(tmp_path / "c"), **kw)
    with pytest.raises(InvalidParameterError) as e:
        regimes.run_regimes_analysis(tmp_path / "out", cfg)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "out").exists()


def test_sizes_beyond_the_data(tmp_path, fmnist_dir):
    cfg = regimes.RegimesConfig.quick(data_dir=str(fmnist_dir), sizes=(16, 1024), cache_dir=str(tmp_path / "c"))
    with pytest.raises(InvalidParameterError, match="exceeds the 600 training images"):
        regimes.run_regimes_analysis(tmp_path / "out", cfg)


def test_missing_data_names_the_package(tmp_path):
    cfg = regimes.RegimesConfig.quick(data_dir=str(tmp_path / "none"))
    with pytest.raises(fmnist.DatasetMissingError, match="dataset-fashion-mnist"):
        regimes.run_regimes_analysis(tmp_path / "out", cfg)


def test_cli_quick(tmp_path, fmnist_dir, capsys):
    from shallowmark.cli import main

    out = tmp_path / "cli"
    assert main(["analyze", "regimes", "--quick", "--data", str(fmnist_dir), "--cache", str(tmp_path / "c"),
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["command"].startswith("shallowmark analyze regimes --quick")
    assert main(["analyze", "regimes", "--quick", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) != 0
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_sizes_run_coarse_to_fine_and_the_report_says_when_complete(quick_run):
    assert regimes.coarse_to_fine([16, 64, 256, 1024, 4096, 16384]) == [16, 16384, 256, 64, 1024, 4096]
    assert regimes.coarse_to_fine([7]) == [7] and regimes.coarse_to_fine([2, 3]) == [2, 3]
    rep = quick_run["report"]
    assert rep["complete"] is True and sorted(rep["sizes_measured"]) == [16, 64, 256]
    assert "Partial report" not in (quick_run["root"] / "out" / "report.md").read_text()


def test_reading_does_not_call_a_dip_the_talks_shape_without_memorization():
    copies = dict(dip=True, gl_first={"small": 0.1, "large": 0.0})
    assert regimes._shape(copies) == "a dip between two higher ends, the talk's shape."
    novel = dict(dip=True, gl_first={"small": 1.0, "large": 0.9})
    assert "not the talk's shape" in regimes._shape(novel) and "GL 1.00, 0.90" in regimes._shape(novel)
    assert "no dip" in regimes._shape(dict(dip=False, gl_first={"small": 0.0, "large": 0.0}))
