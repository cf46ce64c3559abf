"""The benchmark on a Dask cluster: ``shallowmark bench --executor dask``.

The grid, the cache and the reports are the in-process run's (:class:`~shallowmark.attacks.bench.
InProcessExecutor`, which this extends); what moves to the workers is the verification, the part
that scales with the grid (one DDIM inversion per image and attack). The runner hands the
executor a stream of jobs of ``batch`` images each (:func:`~shallowmark.attacks.bench_grid.
_score_attacks`); this executor keeps up to ``2 × workers`` of them on the cluster and gives the
scores back in order, so the cache is written as they come and an interrupted run resumes. Each
worker process loads the model and the methods once, with one torch thread, from the same
parameters the driver uses, and scores the same chunks the driver would: the scores are those of
an in-process run with one torch thread (``tests/attacks/test_bench_dask.py`` compares the
reports). Against an in-process run with more threads they can differ in the last digits, as any
two torch thread counts can (reductions are split differently), and a verdict near its threshold
can then flip.

The watermarked and unwatermarked images are made (or read from the cache) in the driver, as in
a local run: they are made once and cached, while the attacks are scored many times over.

Why Dask and not Ray: a local ``ray.init(_node_ip_address="127.0.0.1")`` (Ray 2.60) still opened
listeners on every interface (the raylet, the GCS and the workers on ``::``) and one on the host's
own address (the runtime-env agent), so it could not be kept on loopback; Dask's
``LocalCluster(host="127.0.0.1")`` listens on 127.0.0.1 only (the test checks every listener).

Where it runs: without ``dask_address`` a :class:`distributed.LocalCluster` of ``workers``
processes on loopback; with it, the scheduler at that address (``dask scheduler`` on one machine,
``dask worker tcp://SCHEDULER:8786 --nthreads 1`` on each of the others, each with shallowmark
installed). The driver must see the cache folder; the workers need none.
"""

from __future__ import annotations

import time
from collections import deque

from .bench import InProcessExecutor, _method_kwargs, detect_rows

__all__ = ["DaskExecutor"]

_WORKER_STATE: dict = {}


def _worker_methods(spec: tuple):
    """The backend and methods of ``spec`` in this worker process, loaded on its first job."""
    got = _WORKER_STATE.get(spec)
    if got is None:
        import torch

        from shallowmark.core.backends import load_backend
        from shallowmark.core.watermarks import load_method

        torch.set_num_threads(1)
        torch.set_grad_enabled(False)
        model, model_options, methods = spec
        backend = load_backend(model, **dict(model_options))
        got = _WORKER_STATE[spec] = {name: load_method(name, backend, **dict(kw)) for name, kw in methods}
    return got


def _worker_detect(spec: tuple, wanted: dict, images, keys: dict, target_fpr: float):
    """One job on a worker: (scores by method for the wanted indices, seconds)."""
    import torch

    methods = _worker_methods(spec)
    t0 = time.perf_counter()
    with torch.no_grad():
        rows = detect_rows(methods, keys, wanted, images, target_fpr)
    return rows, time.perf_counter() - t0


def _frozen(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


class DaskExecutor(InProcessExecutor):
    """:class:`InProcessExecutor` whose verification runs on Dask workers (see the module)."""

    mode = "dask"

    def __init__(self, config, backend=None, workers: int = 2, address: str | None = None):
        super().__init__(config, backend)
        self.workers, self.address = int(workers), address
        self.cluster = self.client = None

    def prepare(self, grid, log) -> None:
        from distributed import Client, LocalCluster

        super().prepare(grid, log)
        methods = tuple((n, _frozen(_method_kwargs(self.config, n))) for n in grid.method_names)
        self.spec = (self.config.model, _frozen(dict(self.config.model_options)), methods)
        if self.address:
            self.client = Client(self.address)
        else:
            # one torch thread per worker process, and nothing off loopback (no dashboard)
            self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                        host="127.0.0.1", dashboard_address=None,
                                        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            self.client = Client(self.cluster)
        self.n_workers = len(self.client.scheduler_info()["workers"])
        log(f"dask: {self.n_workers} worker(s) at {self.client.scheduler.address}")

    def detect_stream(self, jobs, grid):
        """Keep up to 2 jobs per worker on the cluster; yield ((what, wanted), scores, seconds) in
        the jobs' order."""
        ahead = 2 * max(1, self.n_workers)
        keys = {n: grid.keys[n] for n in grid.method_names}   # a few bytes each: sent with every job
        pending: deque = deque()
        for what, wanted, images in jobs:
            pending.append(((what, wanted), self.client.submit(_worker_detect, self.spec, wanted, images, keys,
                                                               grid.target_fpr, pure=False)))
            if len(pending) >= ahead:
                head, fut = pending.popleft()
                yield (head, *fut.result())
        while pending:
            head, fut = pending.popleft()
            yield (head, *fut.result())

    def config_record(self, grid) -> dict:
        rec = super().config_record(grid)
        rec["executor"] = {"mode": "dask", "workers": self.n_workers,
                           "address": self.address or "LocalCluster on 127.0.0.1"}
        return rec

    def close(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            super().close()
