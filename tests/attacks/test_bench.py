"""The robustness benchmark: quick run and its reports, cache reuse, resume, input validation, CLI.

One quick run (2 methods × 3 attacks × n=4, 10 DDIM steps) is shared by the module; the other
runs reuse its cache, so they only score the attacks they add.
"""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest

from shallowmark.errors import InvalidParameterError, ShallowmarkError, UnknownNameError

# bench (and through it the "regen" attack) is imported inside the tests, not at collection time:
# registering "regen" while test_attacks.py is collected would add it to its context-free lists.


def _bench():
    from shallowmark.attacks import bench

    return bench


class _Counter:
    """Wraps load_method so every generate/reference/embed call on the methods is counted."""

    def __init__(self, mp):
        import shallowmark.core.watermarks as wm

        self.calls = {"generate": 0, "reference": 0, "embed": 0}
        orig = wm.load_method

        def load(name, backend=None, **cfg):
            m = orig(name, backend, **cfg)
            for what in self.calls:
                fn = getattr(m, what)

                def wrapped(*a, _fn=fn, _what=what, **k):
                    self.calls[_what] += 1
                    return _fn(*a, **k)

                setattr(m, what, wrapped)
            return m

        mp.setattr(wm, "load_method", load)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, tiny_ldm):
    bench = _bench()
    root = tmp_path_factory.mktemp("bench")
    cfg = bench.BenchConfig.quick_config(out_dir=root / "out", cache_dir=root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        counter = _Counter(mp)
        report = bench.run_bench(cfg, progress=True, backend=tiny_ldm)
    return dict(root=root, cfg=cfg, report=report, calls=counter.calls)


def _row(report, method, attack):
    return next(r for r in report["results"] if r["method"] == method and r["attack"] == attack)


def test_quick_report_files_and_schema(quick):
    bench = _bench()
    out = quick["root"] / "out"
    assert quick["calls"]["generate"] > 0 and quick["calls"]["reference"] > 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep) >= {"config", "results", "fidelity", "cost", "definitions"}
    c = rep["config"]
    for k in ("methods", "attacks", "n", "seeds", "n_keys", "target_fpr", "model", "model_fingerprint",
              "method_params", "versions", "machine", "batch", "cache_dir", "server", "quick"):
        assert k in c, k
    assert c["methods"] == list(bench.QUICK_METHODS) and c["n"] == 4 and len(c["seeds"]) == 4
    assert [a["label"] for a in c["attacks"]] == list(bench.QUICK_ATTACKS)
    assert c["versions"]["torch"] and c["machine"]["cpu_count"]
    assert c["method_params"]["shallow-diffuse"]["num_steps"] == bench.QUICK_STEPS
    assert len(rep["results"]) == len(bench.QUICK_METHODS) * len(bench.QUICK_ATTACKS)
    for r in rep["results"]:
        assert set(r) >= {"method", "attack", "auc", "tpr_at_1pct_fpr", "n_pos", "n_neg", "bit_accuracy",
                          "detected_pos", "detected_neg"}
        assert r["n_pos"] == r["n_neg"] == 4
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["tpr_at_1pct_fpr"] <= 1.0
        assert r["bit_accuracy"] is None  # ring methods carry no bits
    for m in bench.QUICK_METHODS:  # the clean images are detected
        assert _row(rep, m, "clean")["auc"] == 1.0
        assert _row(rep, m, "clean")["detected_pos"] == 1.0
    assert {f["method"] for f in rep["fidelity"]} == set(bench.QUICK_METHODS)
    sd = next(f for f in rep["fidelity"] if f["method"] == "shallow-diffuse")
    assert sd["psnr"] > 25 and 0 < sd["ssim"] <= 1
    for cst in rep["cost"]:
        assert cst["embed_seconds"] > 0 and cst["verify_seconds"] > 0 and cst["verify_model_evals"] > 0
    evals = {cst["method"]: cst["verify_model_evals"] for cst in rep["cost"]}
    assert evals == {"shallow-diffuse": 3, "tree-ring": 10}
    assert "highest TPR among thresholds whose FPR ≤ 1%" in rep["definitions"]["tpr_at_1pct_fpr"]
    md = (out / "report.md").read_text()
    assert "| method | clean | jpeg | blur |" in md and "highest TPR among thresholds" in md
    assert "PSNR" in md and "verify model evals" in md
    # TPR at 0.1 % FPR beside 1 %; with 4 negatives it is the TPR at zero false positives, and says so
    assert "## TPR@0.1%FPR" in md and "with 4 unwatermarked images (under 1000)" in md
    assert all(0.0 <= r["tpr_at_01pct_fpr"] <= r["tpr_at_1pct_fpr"] for r in rep["results"])
    for png in ("roc.png", "tradeoff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_with_one_more_attack_reuses_cache(quick, tiny_ldm):
    bench = _bench()
    pngs = sorted((quick["root"] / "cache" / "images").rglob("*.png"))
    assert len(pngs) >= 4 * 3  # unwatermarked + watermarked per method (+ the reference checks)
    mtimes = [p.stat().st_mtime_ns for p in pngs]
    cfg = bench.BenchConfig.quick_config(out_dir=quick["root"] / "out2", cache_dir=quick["root"] / "cache",
                                         attacks=bench.QUICK_ATTACKS + ("noise:0.05",))
    with pytest.MonkeyPatch.context() as mp:
        counter = _Counter(mp)
        detected = []
        orig = bench._detect_batch
        mp.setattr(bench, "_detect_batch", lambda ms, *a: detected.append(sorted(ms)) or orig(ms, *a))
        rep = bench.run_bench(cfg, progress=False, backend=tiny_ldm)
    assert counter.calls == {"generate": 0, "reference": 0, "embed": 0}
    assert [p.stat().st_mtime_ns for p in pngs] == mtimes
    # only the new attack is scored: its negatives once (both methods), its positives per method
    assert detected == [["shallow-diffuse", "tree-ring"], ["shallow-diffuse"], ["tree-ring"]]
    for r in quick["report"]["results"]:
        assert _row(rep, r["method"], r["attack"]) == r
    assert _row(rep, "tree-ring", "noise:0.05")["n_pos"] == 4


def test_interrupted_run_resumes(quick, tiny_ldm, tmp_path):
    bench = _bench()
    cache = quick["root"] / "cache"
    # one image per batch: 4 batches of negatives, then 4 of positives
    cfg = bench.BenchConfig.quick_config(out_dir=tmp_path / "out", cache_dir=cache, methods=("shallow-diffuse",),
                                         attacks=("drop",), batch=1)
    orig = bench._detect_batch
    calls = []

    def flaky(methods, *a):
        calls.append(sorted(methods))
        if len(calls) == 6:  # the negatives and one positive are scored when the run stops
            raise KeyboardInterrupt("simulated interruption")
        return orig(methods, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "_detect_batch", flaky)
        with pytest.raises(KeyboardInterrupt):
            bench.run_bench(cfg, progress=False, backend=tiny_ldm)
    assert not (tmp_path / "out" / "report.json").exists()
    with sqlite3.connect(cache / "scores.sqlite") as db:
        done = dict(db.execute("SELECT kind, COUNT(*) FROM scores WHERE attack = 'drop' GROUP BY kind").fetchall())
    assert done == {"neg": 4, "pos": 1}

    calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        counter = _Counter(mp)
        mp.setattr(bench, "_detect_batch", lambda ms, *a: calls.append(sorted(ms)) or orig(ms, *a))
        resumed = bench.run_bench(cfg, progress=False, backend=tiny_ldm)
    assert counter.calls == {"generate": 0, "reference": 0, "embed": 0}
    assert calls == [["shallow-diffuse"]] * 3  # only the 3 missing positives
    assert (tmp_path / "out" / "report.json").exists()

    # the same numbers as an uninterrupted run from the same images
    fresh_cache = tmp_path / "fresh"
    shutil.copytree(cache / "images", fresh_cache / "images")
    fresh = bench.run_bench(bench.BenchConfig.quick_config(out_dir=tmp_path / "out-fresh", cache_dir=fresh_cache,
                                                           methods=("shallow-diffuse",), attacks=("drop",), batch=1),
                            progress=False, backend=tiny_ldm)
    (r,) = fresh["results"]
    (got,) = resumed["results"]
    for k in ("auc", "tpr_at_1pct_fpr", "detected_pos", "detected_neg", "n_pos", "n_neg"):
        assert got[k] == r[k], k
    assert got["median_p_value_pos"] == pytest.approx(r["median_p_value_pos"], rel=1e-6)


@pytest.mark.parametrize("kw, error, words", [
    (dict(methods=("shallow-diffuse", "nope")), UnknownNameError, ["nope", "tree-ring", "rivagan"]),
    (dict(attacks=("clean", "jpegg")), UnknownNameError, ["jpegg", "jpeg", "regen", "saltpepper"]),
    (dict(attacks=("jpeg:0",)), InvalidParameterError, ["jpeg", "[1, 100]"]),
    (dict(attacks=(("blur", -1),)), InvalidParameterError, ["blur", "[0, 64]"]),
    (dict(attacks=("regen:1",)), InvalidParameterError, ["regen", "(0, 1)"]),
    (dict(attacks=("median:4",)), InvalidParameterError, ["odd"]),
    (dict(attacks=("blur:x",)), InvalidParameterError, ["blur:x"]),
    (dict(model="nope"), UnknownNameError, ["tiny-ldm"]),
    (dict(n=0), InvalidParameterError, ["n must"]),
    (dict(target_fpr=1.5), InvalidParameterError, ["target_fpr"]),
    (dict(method_config={"tree-ring": {"bogus": 1}}), InvalidParameterError, ["bogus", "radius"]),
    (dict(method_attacks={"ringid": ("clean",)}), InvalidParameterError, ["'ringid'", "not in this run's methods"]),
    (dict(method_attacks={"tree-ring": ("noise",)}), InvalidParameterError, ["noise", "not among", "clean, jpeg, blur"]),
    (dict(method_attacks={"tree-ring": ()}), InvalidParameterError, ["empty", "leave the method out"]),
    (dict(method_attacks={"tree-ring": ("jpegg",)}), InvalidParameterError, ["jpegg", "not among"]),
    # server mode: what the server's operator decides, or what needs the model, is refused before connecting
    (dict(server="localhost:50051", num_steps=10), InvalidParameterError, ["num_steps", "server's operator"]),
    (dict(server="localhost:50051", attacks=("clean", "regen")), InvalidParameterError,
     ["regen", "needs the diffusion model", "saltpepper"]),
])
def test_bad_config_fails_before_any_work(kw, error, words, tmp_path, monkeypatch):
    bench = _bench()
    import shallowmark.core.backends as backends

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the config was validated")

    monkeypatch.setattr(backends, "load_backend", no_work)
    cfg = bench.BenchConfig.quick_config(out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", **kw)
    with pytest.raises(error) as e:
        bench.run_bench(cfg, progress=False)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_method_run_on_fewer_attacks(quick, tiny_ldm, tmp_path, monkeypatch):
    """method_attacks: tree-ring only on clean; its other cells are neither scored nor reported,
    the scored ones equal the full run's (same cache), and the report says what was left out."""
    bench = _bench()
    detected = []
    orig = bench._detect_batch
    monkeypatch.setattr(bench, "_detect_batch", lambda ms, *a: detected.append(sorted(ms)) or orig(ms, *a))
    cfg = bench.BenchConfig.quick_config(out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                                         method_attacks={"tree-ring": ("clean",)})
    shutil.copytree(quick["root"] / "cache" / "images", tmp_path / "cache" / "images")
    rep = bench.run_bench(cfg, progress=False, backend=tiny_ldm)
    assert sorted((r["method"], r["attack"]) for r in rep["results"]) == sorted(
        [("shallow-diffuse", a) for a in bench.QUICK_ATTACKS] + [("tree-ring", "clean")])
    # jpeg and blur: the negatives and positives of shallow-diffuse only
    assert detected.count(["shallow-diffuse", "tree-ring"]) == 1 and ["tree-ring"] in detected
    assert sum(1 for d in detected if "tree-ring" in d) == 2
    for r in rep["results"]:
        full = _row(quick["report"], r["method"], r["attack"])
        assert (r["auc"], r["tpr_at_1pct_fpr"], r["detected_neg"]) == (full["auc"], full["tpr_at_1pct_fpr"],
                                                                      full["detected_neg"])
    assert rep["config"]["method_attacks"] == {"tree-ring": ["clean"]}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "tree-ring runs only clean" in md and "| tree-ring | 1.000 / 1.00 | · | · |" in md
    assert {c["method"]: c["verify_model_evals"] for c in rep["cost"]}["tree-ring"] == 10


def test_cli_method_attacks(capsys, tmp_path):
    from shallowmark.cli import main

    assert main(["bench", "--method-attacks", "tree-ring", "--out", str(tmp_path / "o")]) == 2
    assert "write METHODS=ATTACKS" in capsys.readouterr().err
    assert main(["bench", "--method-attacks", "tree-ring=clean", "--method-attacks", "tree-ring,ringid=jpeg",
                 "--out", str(tmp_path / "o")]) == 2
    assert "names 'tree-ring' twice" in capsys.readouterr().err
    assert main(["bench", "--methods", "shallow-diffuse", "--method-attacks", "tree-ring=clean",
                 "--out", str(tmp_path / "o")]) == 2
    assert "not in this run's methods" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_method_option(capsys, tmp_path):
    from shallowmark.cli import main
    from shallowmark.cli.bench import _method_options

    assert _method_options(["shallow-diffuse:key_variants=16", "shallow-diffuse:output=residual",
                            "tree-ring:strength=1.5"]) == {
        "shallow-diffuse": {"key_variants": 16, "output": "residual"}, "tree-ring": {"strength": 1.5}}
    # the flag's shape: refused before any work, with the form to write
    assert main(["bench", "--method-option", "shallow-diffuse.key_variants=16", "--out", str(tmp_path / "o")]) == 2
    assert "write METHOD:KEY=VALUE" in capsys.readouterr().err
    # an option the method does not take: named with the valid ones, nothing written
    assert main(["bench", "--methods", "shallow-diffuse", "--method-option", "shallow-diffuse:variants=16",
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown option(s) ['variants']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_server_error_type():
    bench = _bench()
    assert issubclass(bench.ServerModeUnavailableError, ShallowmarkError)


def test_parse_attacks():
    bench = _bench()
    got = bench.parse_attacks("clean, jpeg,blur:3,jpeg:25,regen:0.3")
    assert [a.label for a in got] == ["clean", "jpeg", "blur:3", "jpeg", "regen:0.3"]
    assert got[2].value == 3.0 and got[1].value == 25.0 == got[3].value
    assert bench.parse_attack(("noise", 0.05)).label == "noise:0.05"
    with pytest.raises(InvalidParameterError):
        bench.parse_attack(("noise", "a lot"))


def test_cli_errors(capsys, tmp_path):
    from shallowmark.cli import main

    assert main(["bench", "--server", "localhost:50051", "--steps", "10", "--out", str(tmp_path / "o")]) == 2
    assert "server's operator sets the steps" in capsys.readouterr().err
    assert main(["bench", "--methods", "shallow-diffuse,nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "gaussian-shading" in err
    assert main(["bench", "--attacks", "clean,blur:99", "--out", str(tmp_path / "o")]) == 2
    assert "outside valid range" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_quick_from_cache(quick, tmp_path, capsys):
    from shallowmark.cli import main

    out = tmp_path / "cli"
    assert main(["bench", "--quick", "--out", str(out), "--cache", str(quick["root"] / "cache"), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["command"].startswith("shallowmark bench --quick")
    assert [(r["method"], r["attack"], r["auc"]) for r in rep["results"]] == \
        [(r["method"], r["attack"], r["auc"]) for r in quick["report"]["results"]]
    assert "AUC / TPR@1%FPR" in capsys.readouterr().out
    np.testing.assert_equal(rep["config"]["seeds"], quick["report"]["config"]["seeds"])


def test_attacks_that_change_the_size_are_scored_as_they_are(quick, tiny_ldm, tmp_path):
    """The platform pipelines crop and resize; the benchmark hands their results to the methods at
    their new sizes (the latent methods map them onto the model's grid themselves)."""
    bench = _bench()
    cfg = bench.BenchConfig.quick_config(out_dir=tmp_path / "out", cache_dir=quick["root"] / "cache",
                                         methods=("shallow-diffuse",), attacks=("platform-1x1", "platform-4x5"))
    rep = bench.run_bench(cfg, progress=False, backend=tiny_ldm)
    rows = {r["attack"]: r for r in rep["results"]}
    assert rows["platform-1x1"]["n_pos"] == rows["platform-4x5"]["n_neg"] == 4
    assert rows["platform-1x1"]["auc"] == 1.0          # a 256² image cropped to 1:1 and resized to 512
