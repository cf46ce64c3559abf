"""``shallowmark bench --server``: the benchmark through the SDK against a real local server.

The server is started as in tests/server/conftest.py (tiny-ldm with 10 DDIM steps, a fixed token,
its own state folder). One small run (shallow-diffuse and tree-ring × clean, jpeg × n=3) is shared
by the module; the other tests reuse its cache, so they only make the calls they add. Every RPC the
bench makes is counted on the client, and the server's ledger and job counter confirm the counts.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from shallowmark.errors import InvalidParameterError, UnknownNameError

TOKEN = "bench-audit-token"
METHODS = ("shallow-diffuse", "tree-ring")
ATTACKS = ("clean", "jpeg")
N = 3
ROW_KEYS = {"method", "attack", "attack_name", "strength", "auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "n_pos", "n_neg",
            "detected_pos", "detected_neg", "bit_accuracy", "median_p_value_pos"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ldm):
    from shallowmark.server.app import ServerApp
    from shallowmark.server.config import ServerConfig

    steps = {m: {"num_steps": 10} for m in ("shallow-diffuse", "tree-ring", "ringid", "gaussian-shading")}
    cfg = ServerConfig(host="127.0.0.1", port=0, tokens={TOKEN: "auditor"}, method_options=steps,
                       state_dir=tmp_path_factory.mktemp("bench-server"), grace_s=1.0, workers=4)
    app = ServerApp(cfg, backend_loader=lambda name, **options: tiny_ldm).start()
    assert app.wait_until_ready(120)
    yield app
    app.stop(1.0)


def _counting_client(address: str, token: str = TOKEN, **kw):
    """A Client that counts its Embed, Verify and GetInfo calls (thread-safe: the bench calls concurrently)."""
    from shallowmark.client import Client

    class Counting(Client):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = collections.Counter()
            self._lock = threading.Lock()

        def _count(self, what):
            with self._lock:
                self.calls[what] += 1

        def embed(self, *a, **k):
            self._count("embed")
            return super().embed(*a, **k)

        def verify(self, *a, **k):
            self._count("verify")
            return super().verify(*a, **k)

        def info(self, *a, **k):
            self._count("info")
            return super().info(*a, **k)

    kw.setdefault("timeout", 120)
    kw.setdefault("retries", 0)
    return Counting(address, token, **kw)


def _config(app, root, out="out", **kw):
    from shallowmark.attacks.bench import BenchConfig

    base = dict(server=app.address, methods=METHODS, attacks=ATTACKS, n=N, batch=3, out_dir=root / out,
                cache_dir=root / "cache")
    base.update(kw)
    return BenchConfig(**base)


def _served(server):
    return server.ledger.count(), server.pool.stats()["jobs"]


def _run(server, cfg):
    from shallowmark.attacks.bench import run_bench

    with _counting_client(server.address) as c:
        report = run_bench(cfg, progress=False, client=c)
    return report, dict(c.calls)


def _row(report, method, attack):
    return next(r for r in report["results"] if r["method"] == method and r["attack"] == attack)


@pytest.fixture(scope="module")
def first(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-audit")
    before = _served(server)
    report, calls = _run(server, _config(server, root))
    return dict(root=root, report=report, calls=calls, before=before, after=_served(server))


def test_server_run_reports_and_calls(first):
    rep, out = first["report"], first["root"] / "out"
    # 3 uploads (fidelity, shallow-diffuse only) + 3 generated per method; Verify: 2 attacks × 2 methods × 3+3
    assert first["calls"] == {"info": 1, "embed": 9, "verify": 24}
    assert first["after"][0] - first["before"][0] == 9  # the server's ledger recorded every Embed
    assert json.loads((out / "report.json").read_text()) == rep
    for png in ("roc.png", "tradeoff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    c = rep["config"]
    assert c["mode"] == "server" and c["server"] == c["server_info"]["address"]
    assert c["methods"] == list(METHODS) and c["n"] == N and [a["label"] for a in c["attacks"]] == list(ATTACKS)
    si = c["server_info"]
    assert si["server_version"] and si["tenant"] == "auditor" and si["default_model"] == "tiny-ldm"
    assert [m["name"] for m in si["models"]] == ["tiny-ldm"] and si["models"][0]["image_size"] == 256
    assert set(METHODS) <= {m["name"] for m in si["methods"]}
    assert c["positives"] == {"shallow-diffuse": "generate", "tree-ring": "generate"}
    assert c["negatives"]["source"] == "photos" and c["versions"]["shallowmark-server"] == si["server_version"]
    assert len(rep["results"]) == len(METHODS) * len(ATTACKS)
    for r in rep["results"]:
        assert set(r) == ROW_KEYS
        assert r["n_pos"] == r["n_neg"] == N and r["bit_accuracy"] is None
    assert _row(rep, "shallow-diffuse", "clean")["auc"] == 1.0
    assert _row(rep, "shallow-diffuse", "clean")["detected_pos"] == 1.0
    assert all(r["detected_neg"] == 0.0 for r in rep["results"]), [(r["method"], r["attack"], r["detected_neg"]) for r in rep["results"] if r["detected_neg"]]
    fid = {f["method"]: f for f in rep["fidelity"]}
    assert fid["shallow-diffuse"]["reference"] == "upload" and fid["shallow-diffuse"]["psnr"] > 20
    assert 0 < fid["shallow-diffuse"]["ssim"] <= 1
    assert fid["tree-ring"]["psnr"] is None and "cannot watermark an uploaded image" in fid["tree-ring"]["note"]
    cost = {x["method"]: x for x in rep["cost"]}
    assert {m: x["verify_model_evals"] for m, x in cost.items()} == {"shallow-diffuse": 3, "tree-ring": 10}
    assert {m: x["embed_model_evals"] for m, x in cost.items()} == {"shallow-diffuse": 13, "tree-ring": 10}
    assert cost["shallow-diffuse"]["upload_embed_model_evals"] == 9
    assert cost["shallow-diffuse"]["upload_embed_seconds"] > 0
    assert cost["tree-ring"]["upload_embed_seconds"] is None
    assert all(x["embed_seconds"] > 0 and x["verify_seconds"] > 0 for x in cost.values())
    assert "client" in rep["definitions"]["cost"] and "method_score" in rep["definitions"]["score"]
    md = (out / "report.md").read_text()
    assert f"through the server `{c['server']}`" in md and "| method | clean | jpeg |" in md
    assert "user scenario" in md and "highest TPR among thresholds" in md


def test_server_rerun_is_served_from_cache(server, first):
    before = _served(server)
    report, calls = _run(server, _config(server, first["root"], out="out2"))
    assert calls == {"info": 1}  # GetInfo validates the server; no Embed, no Verify
    assert _served(server) == before  # nothing new in the ledger, no model job on the server
    assert report["results"] == first["report"]["results"]
    assert report["fidelity"] == first["report"]["fidelity"]


def test_upload_positives_reuse_the_fidelity_embeds(server, first):
    report, calls = _run(server, _config(server, first["root"], out="up", methods=("shallow-diffuse",),
                                         attacks=("clean",), positives="upload"))
    # the uploads and the negatives' scores are cached: only the uploads' own Verify calls are new
    assert calls == {"info": 1, "verify": N}
    assert report["config"]["positives"] == {"shallow-diffuse": "upload"}
    assert "watermarked versions of the unwatermarked images" in report["config"]["positives_note"]
    row = _row(report, "shallow-diffuse", "clean")
    assert row["auc"] == 1.0 and row["detected_pos"] == 1.0


@pytest.mark.parametrize("kw, error, words", [
    (dict(methods=("shallow-diffuse", "nope")), UnknownNameError, ["nope", "tree-ring", "gaussian-shading"]),
    (dict(attacks=("clean", "regen")), InvalidParameterError, ["regen", "needs the diffusion model", "jpeg"]),
    (dict(attacks=("jpeg:0",)), InvalidParameterError, ["jpeg", "[1, 100]"]),
    (dict(num_steps=10), InvalidParameterError, ["server's operator"]),
    (dict(positives="both"), UnknownNameError, ["both", "generate", "upload"]),
    (dict(negatives="FOLDER"), InvalidParameterError, ["holds 1 PNG/JPEG file(s)", "n=3"]),
])
def test_bad_input_fails_before_any_rpc(server, tmp_path, kw, error, words):
    from shallowmark.attacks.bench import run_bench

    if kw.get("negatives") == "FOLDER":
        (tmp_path / "neg").mkdir()
        (tmp_path / "neg" / "a.png").write_bytes(b"")
        kw["negatives"] = tmp_path / "neg"
    before = _served(server)
    with _counting_client(server.address) as c:
        with pytest.raises(error) as e:
            run_bench(_config(server, tmp_path, **kw), progress=False, client=c)
    for w in words:
        assert w in str(e.value)
    assert c.calls == {} and _served(server) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_server_side_errors_before_any_embed(server, tmp_path):
    from shallowmark.attacks.bench import ServerModeUnavailableError, run_bench

    before = _served(server)
    with _counting_client(server.address) as c:
        with pytest.raises(UnknownNameError) as e:  # a model this server does not serve
            run_bench(_config(server, tmp_path, model="stable-diffusion"), progress=False, client=c)
    assert "model on the server" in str(e.value) and "tiny-ldm" in str(e.value)
    assert c.calls == {"info": 1}
    with _counting_client(server.address, token="wrong-token") as c:
        with pytest.raises(ServerModeUnavailableError, match="refused the token.*SHALLOWMARK_TOKEN or pass --token"):
            run_bench(_config(server, tmp_path), progress=False, client=c)
    with _counting_client("127.0.0.1:1") as c:  # nothing listens on port 1
        with pytest.raises(ServerModeUnavailableError, match="no shallowmark server answered"):
            run_bench(_config(server, tmp_path, server="127.0.0.1:1"), progress=False, client=c)
    assert _served(server) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_cli_server_mode(server, first, tmp_path, capsys, monkeypatch):
    from shallowmark.cli import main

    before = _served(server)
    out = tmp_path / "cli"
    # --quick in server mode leaves the steps to the server; the grid is the module's, so it is all cached
    assert main(["bench", "--quick", "--server", server.address, "--token", TOKEN, "--n", str(N), "--attacks",
                 "clean,jpeg", "--cache", str(first["root"] / "cache"), "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["command"].startswith("shallowmark bench --quick --server")
    assert rep["config"]["quick"] and rep["config"]["mode"] == "server"
    assert rep["results"] == first["report"]["results"]
    assert "through the server" in capsys.readouterr().out
    assert _served(server) == before
    monkeypatch.delenv("SHALLOWMARK_TOKEN", raising=False)
    assert main(["bench", "--server", server.address, "--methods", "shallow-diffuse,nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "ringid" in err
    assert main(["bench", "--server", "127.0.0.1:1", "--n", "3", "--out", str(tmp_path / "o")]) == 2
    assert "no shallowmark server answered" in capsys.readouterr().err
    assert main(["bench", "--server", server.address, "--n", "3", "--out", str(tmp_path / "o")]) == 2
    assert "refused the token" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


_NO_TORCH = r"""
import json, sys


class NoTorch:
    # refuse the import itself (a None entry in sys.modules would confuse scipy's torch detection)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers"):
            raise ImportError(f"{name} is not installed here")


sys.meta_path.insert(0, NoTorch())
from shallowmark.attacks.bench import BenchConfig, run_bench
from shallowmark.client import Client

address, token, cache, out, negatives = sys.argv[1:6]
cfg = BenchConfig(server=address, methods=("shallow-diffuse",), attacks=("clean", "blur"), n=3, batch=3,
                  cache_dir=cache, out_dir=out, negatives=negatives)
with Client(address, token, timeout=120, retries=0) as c:
    run_bench(cfg, progress=False, client=c)
print(json.dumps({"torch_loaded": "torch" in sys.modules}))
"""


def test_server_mode_runs_without_torch(server, first, tmp_path):
    from PIL import Image

    neg = tmp_path / "neg"
    neg.mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(300, 280), (256, 256), (512, 400)]):  # sent at their own sizes
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(neg / f"{i}.jpg", quality=90)
    before = _served(server)
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, server.address, TOKEN, str(first["root"] / "cache"),
                           str(tmp_path / "out"), str(neg)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"torch_loaded": False}
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["config"]["negatives"]["source"] == "folder"
    assert rep["config"]["negatives"]["files"] == ["0.jpg", "1.jpg", "2.jpg"]
    assert _row(rep, "shallow-diffuse", "clean")["auc"] == 1.0
    # new negatives: 3 uploads of them; the generated positives come from the cache
    assert _served(server)[0] - before[0] == 3
    fid = {f["method"]: f for f in rep["fidelity"]}["shallow-diffuse"]   # each upload back at its own size
    assert fid["reference"] == "upload" and fid["psnr"] > 30
