"""The benchmark on Dask workers gives the in-process run's scores, and a local cluster stays on
loopback."""

from __future__ import annotations

import json
import shutil

import pytest

from shallowmark.attacks.bench import BenchConfig, run_bench
from shallowmark.errors import InvalidParameterError, UnknownNameError

pytest.importorskip("distributed", reason="the dask executor needs distributed (dev extra)")


def _results(path):
    rep = json.loads((path / "report.json").read_text())
    # timings are the machine's; everything measured from the scores must be equal
    for row in rep["cost"]:
        row.pop("verify_seconds"), row.pop("embed_seconds")
    return rep["results"], rep["fidelity"], rep["cost"], rep["config"].get("executor")


def test_dask_executor_gives_the_local_scores_and_listens_on_loopback_only(tmp_path, tiny_ldm, monkeypatch):
    import psutil

    import shallowmark.attacks.bench_dask as bd

    listeners = []
    close = bd.DaskExecutor.close

    def close_after_looking(self):
        # every listening socket of this process and of the cluster's processes, while they run
        procs = [psutil.Process()] + psutil.Process().children(recursive=True)
        pids = {p.pid for p in procs}
        listeners.extend(c.laddr.ip for c in psutil.net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN and c.pid in pids)
        close(self)

    monkeypatch.setattr(bd.DaskExecutor, "close", close_after_looking)
    common = dict(methods=("shallow-diffuse", "dwtdct"), attacks=("clean", "jpeg:50"), n=4, num_steps=10, batch=2)
    local = BenchConfig(**common, out_dir=tmp_path / "local", cache_dir=tmp_path / "cache-local")
    dask = BenchConfig(**common, out_dir=tmp_path / "dask", cache_dir=tmp_path / "cache-dask", executor="dask",
                       workers=2)
    run_bench(local, progress=False, backend=tiny_ldm)
    # the same images (made once), but no scores: the Dask run scores everything itself
    shutil.copytree(tmp_path / "cache-local" / "images", tmp_path / "cache-dask" / "images")
    run_bench(dask, progress=False, backend=tiny_ldm)
    res_l, fid_l, cost_l, ex_l = _results(tmp_path / "local")
    res_d, fid_d, cost_d, ex_d = _results(tmp_path / "dask")
    assert res_d == res_l and fid_d == fid_l and cost_d == cost_l
    assert ex_l is None and ex_d["mode"] == "dask" and ex_d["workers"] == 2
    assert listeners and set(listeners) == {"127.0.0.1"}, listeners


def test_executor_choices_are_checked_before_any_work(tmp_path):
    with pytest.raises(UnknownNameError, match="executor"):
        run_bench(BenchConfig(executor="ray", out_dir=tmp_path), progress=False)
    with pytest.raises(InvalidParameterError, match="in-process runs"):
        run_bench(BenchConfig(executor="dask", server="127.0.0.1:1", out_dir=tmp_path), progress=False)
    with pytest.raises(InvalidParameterError, match="workers"):
        run_bench(BenchConfig(executor="dask", workers=0, out_dir=tmp_path), progress=False)
