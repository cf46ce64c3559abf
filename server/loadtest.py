"""``shallowmark loadtest``: Verify throughput and latency of a local server, micro-batching on and off.

What it measures:

- two shallowmark servers on loopback (started in this process, on free ports), one with
  micro-batching and one without, serving the embedded tiny-ldm; one watermarked image (generated
  through ``Embed``) is verified over and over against two keys with Shallow Diffuse (default 50
  DDIM steps, so a verify encodes the image and inverts 15 steps);
- for each number of concurrent clients (default 1, 4 and 16; one SDK ``Client`` and one thread
  each, sending back to back), batching on then off, one level right after the other so that both
  see the same machine: requests per second over the level's wall time, the client-side latency
  p50 and p99, the model calls made and the histogram of their batch sizes, and the process CPU
  time (on a shared machine, CPU seconds per request show the work apart from the contention);
- the in-process throughput of the same work with no RPC at all, on the server's own view of the
  model (so with the same autoencoder chunking, see :class:`~shallowmark.server.batching.VAEChunks`):
  ``invert`` on batches of ``max_batch`` images, then each image scored against the
  keys (``inprocess_rps``, measured before and after the service levels and averaged), and the same
  one image at a time (``inprocess_batch1_rps``).

The clients share the process with the servers (and their GIL), so the service figures are a lower
bound for a server on its own machine.

Goals (from the service issue), checked in the report: at the largest client count, batching on
serves at least 1.5x the requests per second of batching off; the best served rate is at least 70 %
of the in-process batched rate.

Writes ``report.json`` (``throughput`` rows ``{clients, batching, rps, p50_ms, p99_ms, requests,
errors, batches, batch_sizes, cpu_s, wall_s}``, ``inprocess_rps``, ``goals``) and ``report.md`` to
``--out``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from shallowmark.reports import markdown_table

__all__ = ["LoadtestConfig", "run_loadtest", "run_clients", "server_config", "write_markdown"]

METHOD = "shallow-diffuse"
GOAL_BATCHING_GAIN = 1.5
GOAL_SERVED_SHARE = 0.7


@dataclass(frozen=True)
class LoadtestConfig:
    """Sizes of a load test. ``quick_config()`` is a smoke size for tests.

    ``threads``: torch intra-op threads for the whole process (None: leave torch's setting, which
    follows ``OMP_NUM_THREADS``). ``vae_batch``: the servers' setting (0: automatic).
    """

    clients: tuple[int, ...] = (1, 4, 16)
    requests_per_level: int = 48      # per (clients, batching) level, spread over the clients
    # and each level runs for at least this long: on an H200, 96 requests at 16 clients took 3.6 s,
    # and the first batches (formed while the clients connect) then weigh on the row
    min_seconds: float = 10.0
    num_steps: int = 50               # DDIM steps of the method (verify inverts 30 % of them)
    max_batch: int = 8
    max_wait_ms: float = 5.0
    vae_batch: int = 0
    n_keys: int = 2
    inprocess_images: int = 32
    threads: int | None = None
    device: str = "cpu"
    quick: bool = False

    @classmethod
    def quick_config(cls, **kw) -> "LoadtestConfig":
        base = dict(clients=(1, 4, 16), requests_per_level=8, min_seconds=0.0, num_steps=10, inprocess_images=4,
                    quick=True)
        base.update(kw)
        return cls(**base)


def _percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else float("nan")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_clients(address: str, token: str, clients: int, body: Callable[[object, int], None],
                on_start: Callable[[], None] | None = None) -> tuple[float, float]:
    """``body(client, index)`` on ``clients`` threads, each with its own SDK ``Client`` (its own
    connection; no retries, so every failure is counted as the server answered it), all connected
    before the clock starts. Returns the wall time and the process CPU time from the common start to
    the end of the last thread. ``on_start`` runs at that common start, before any ``body``: a caller
    whose bodies run until a deadline sets the deadline there, so that connecting does not eat into
    it. ``body`` should count the failures it meets; an exception out of it (a bug) is raised here,
    after every thread has ended."""
    from shallowmark.client import Client

    crashed: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with Client(address, token, timeout=600, retries=0) as c:
                c.info()  # connect before the clock starts
                start.wait()
                body(c, i)
        except threading.BrokenBarrierError:
            pass  # another thread could not connect; its error is the one raised
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            crashed.append(e)
            start.abort()  # so that nobody waits forever for a thread that will not come

    # the barrier's action runs once every party has arrived and before any of them is released
    start = threading.Barrier(clients + 1, action=on_start)
    threads = [threading.Thread(target=worker, args=(i,), name=f"client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0, c0 = time.perf_counter(), _cpu_s()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    if crashed:
        raise crashed[0]
    return wall, cpu


def verify_body(image: bytes, keys, per: list[int], min_seconds: float, latencies: list[float],
                errors: list[str]) -> Callable[[object, int], None]:
    """A :func:`run_clients` body: client i sends ``per[i]`` Verify calls back to back (and keeps
    sending until ``min_seconds`` have passed), appending each success's latency to ``latencies``
    and each failure's message (an error, or the watermark not detected) to ``errors``."""
    lock = threading.Lock()

    def body(c, i: int) -> None:
        begin, sent = time.perf_counter(), 0
        while sent < per[i] or time.perf_counter() - begin < min_seconds:
            sent += 1
            t0 = time.perf_counter()
            try:
                ok, msg = c.verify(image, keys, method=METHOD).detected, "watermark not detected"
            except Exception as e:  # noqa: BLE001 - counted and reported
                ok, msg = False, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    errors.append(msg)

    return body


def _level(address: str, token: str, image: bytes, keys, clients: int, total: int, min_seconds: float = 0.0) -> dict:
    """At least ``total`` Verify calls from ``clients`` threads (one Client each), back to back; the
    clients keep sending until ``min_seconds`` have passed too."""
    per = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    wall, cpu = run_clients(address, token, clients, verify_body(image, keys, per, min_seconds, latencies, errors))
    return dict(rps=len(latencies) / wall, p50_ms=_percentile_ms(latencies, 50), p99_ms=_percentile_ms(latencies, 99),
                requests=len(latencies) + len(errors), errors=len(errors), wall_s=wall, cpu_s=cpu,
                first_error=errors[0] if errors else "")


def _inprocess(method, pixels: np.ndarray, mks, n: int, batch: int) -> float:
    """Images per second for ``n`` detections of ``pixels`` in batches of ``batch``, no RPC."""
    done, t0 = 0, time.perf_counter()
    while done < n:
        b = min(batch, n - done)
        latents = method.invert(np.repeat(pixels[None], b, axis=0))
        for i in range(b):
            method.score(latents[i:i + 1], mks, 0.01)
        done += b
    return n / (time.perf_counter() - t0)


def _size_diff(after: dict, before: dict) -> dict[str, int]:
    out = {s: n - before.get(s, 0) for s, n in after.items()}
    return {str(s): n for s, n in sorted(out.items()) if n}


def server_config(token: str, state_dir: str | os.PathLike[str], *, clients: int, num_steps: int, device: str,
                  max_batch: int, max_wait_ms: float, vae_batch: int, batching: bool = True):
    """The ``ServerConfig`` of a load-test server: loopback, a free port, tenant ``load``, shallow-diffuse
    at ``num_steps``, and room for every client's call (``workers`` above ``clients``), so that the
    figures are the model's and not admission control's refusals."""
    from shallowmark.server.config import ServerConfig

    return ServerConfig(
        host="127.0.0.1", port=0, tokens={token: "load"}, state_dir=Path(state_dir),
        method_options={METHOD: {"num_steps": num_steps}}, device=device,
        workers=clients + 4, max_queue=max(32, 2 * clients), max_batch=max_batch,
        max_wait_ms=max_wait_ms, vae_batch=vae_batch, batching=batching, reflection=False, grace_s=5.0)


def _start_servers(cfg: LoadtestConfig, backend, token: str, tmp: str) -> dict:
    """One server with batching and one without, on loopback, sharing the loaded backend."""
    from shallowmark.server.app import ServerApp

    apps = {}
    for batching in (True, False):
        server_cfg = server_config(token, Path(tmp) / f"b{int(batching)}", clients=max(cfg.clients),
                                   num_steps=cfg.num_steps, device=cfg.device, max_batch=cfg.max_batch,
                                   max_wait_ms=cfg.max_wait_ms, vae_batch=cfg.vae_batch, batching=batching)
        apps[batching] = ServerApp(server_cfg, backend_loader=lambda name, **o: backend).start()
        if not apps[batching].wait_until_ready(300):
            raise RuntimeError("the load-test server did not load its model")
    return apps


def _service_rows(cfg: LoadtestConfig, apps: dict, token: str, image: bytes, mks, log) -> list[dict]:
    """For each client count, a row with batching on and then off (side by side on the same machine)."""
    rows = []
    for n in cfg.clients:
        for batching in (True, False):
            app = apps[batching]
            before = app.pool.stats()
            r = _level(app.address, token, image, mks, n, max(cfg.requests_per_level, n), cfg.min_seconds)
            after = app.pool.stats()
            r.update(clients=n, batching=batching, batches=after["batches"] - before["batches"],
                     batch_sizes=_size_diff(after["sizes"], before["sizes"]), loadavg_1min=os.getloadavg()[0])
            rows.append(r)
            log(f"clients {n:>3}  batching {'on ' if batching else 'off'}  {r['rps']:7.2f} req/s  "
                f"p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
                f"({r['requests']} requests, {r['batches']} model calls, sizes {r['batch_sizes']}, "
                f"{r['cpu_s'] / max(r['requests'], 1):.2f} CPU s/request, {r['errors']} errors)")
    return rows


def _environment(cfg: LoadtestConfig, load_start) -> dict:
    import torch

    return dict(python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                cpu_count=os.cpu_count(), machine=platform.machine(), platform=platform.platform(),
                loadavg_start=[round(x, 2) for x in load_start], loadavg_end=[round(x, 2) for x in os.getloadavg()],
                gpu=torch.cuda.get_device_name(0) if cfg.device.startswith("cuda") else None)


def run_loadtest(out: str | os.PathLike[str], config: LoadtestConfig | None = None, *,
                 command: str = "shallowmark loadtest", log: Callable[[str], None] = print) -> dict:
    """Run the load test and write ``report.json`` and ``report.md`` into ``out``; returns the report."""
    import torch

    from shallowmark.client import Client
    from shallowmark.core.backends import load_backend
    from shallowmark.core.watermarks import load_method
    from shallowmark.keys import WatermarkKey
    from shallowmark.server.batching import VAEChunks
    from shallowmark.server.validation import decode_image

    cfg = config or LoadtestConfig()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    backend = load_backend("tiny-ldm", device=cfg.device)
    keys = [WatermarkKey.generate(label=f"load-{i}") for i in range(cfg.n_keys)]
    mks = [k.for_method(METHOD) for k in keys]
    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="shallowmark-load-") as tmp:
        apps: dict = {}
        try:
            apps = _start_servers(cfg, backend, token, tmp)
            with Client(apps[True].address, token, timeout=600) as c:
                image = c.embed(keys[0], method=METHOD, seed=1).image
                verify_evals = {m.name: m for m in c.info().methods}[METHOD].verify_model_evals
            for app in apps.values():
                with Client(app.address, token, timeout=600) as c:
                    c.verify(image, mks, method=METHOD)  # warm-up
            view = apps[True].pool.get("tiny-ldm").backend  # what the servers' methods run on (VAEChunks on a CPU)
            vae_chunk = view.chunk if isinstance(view, VAEChunks) else 0
            method = load_method(METHOD, view, num_steps=cfg.num_steps)
            pixels = decode_image(image, 1 << 30).pixels
            _inprocess(method, pixels, mks, 1, 1)  # warm-up
            inproc_runs = [_inprocess(method, pixels, mks, cfg.inprocess_images, cfg.max_batch)]
            log(f"in process (no RPC), before: {inproc_runs[0]:.2f} images/s in batches of {cfg.max_batch}")
            rows = _service_rows(cfg, apps, token, image, mks, log)
        finally:
            for app in apps.values():
                app.stop(5.0)

    inproc_runs.append(_inprocess(method, pixels, mks, cfg.inprocess_images, cfg.max_batch))
    inproc1 = _inprocess(method, pixels, mks, max(2, cfg.inprocess_images // 4), 1)
    inproc = float(np.mean(inproc_runs))
    log(f"in process (no RPC), after: {inproc_runs[1]:.2f} images/s in batches of {cfg.max_batch}; "
        f"{inproc1:.2f} one at a time")
    rows.sort(key=lambda r: (not r["batching"], r["clients"]))
    report = dict(
        command=command,
        config=dict(model="tiny-ldm", method=METHOD, num_steps=cfg.num_steps, verify_model_evals=verify_evals,
                    keys_per_verify=cfg.n_keys, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                    vae_batch=vae_chunk, requests_per_level=cfg.requests_per_level,
                    min_seconds=cfg.min_seconds, device=cfg.device, quick=cfg.quick),
        environment=_environment(cfg, load_start),
        throughput=[{k: r[k] for k in ("clients", "batching", "rps", "p50_ms", "p99_ms", "requests", "errors",
                                       "batches", "batch_sizes", "cpu_s", "wall_s", "loadavg_1min")} for r in rows],
        inprocess_rps=inproc, inprocess_rps_runs=inproc_runs, inprocess_batch=cfg.max_batch,
        inprocess_batch1_rps=inproc1, goals=goals(rows, inproc, inproc1),
        seconds_total=time.perf_counter() - t_start, errors=[r["first_error"] for r in rows if r["first_error"]],
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(out, report)
    return report


def write_markdown(out: Path, report: dict, render: Callable[[dict], str] | None = None) -> None:
    """``report.md`` from ``report`` (by ``render``, default the load test's); a hand-written
    ``notes.md`` in the same folder (the analysis of a committed run) is appended, so re-running the
    command keeps it."""
    notes = out / "notes.md"
    text = (render or _markdown)(report)
    if notes.exists():
        text += "\n" + notes.read_text()
    (out / "report.md").write_text(text)


def goals(rows: list[dict], inproc: float, inproc1: float) -> dict:
    """The issue's two goals from the measured rows, and two figures that explain them: the gain in
    requests per process CPU second (what batching saves, apart from the CPU share the run got) and
    the in-process gain of batching the model work alone (its ceiling on this hardware)."""
    on = {r["clients"]: r for r in rows if r["batching"]}
    off = {r["clients"]: r for r in rows if not r["batching"]}
    top = max(set(on) & set(off))
    best = max(r["rps"] for r in rows)
    gain = on[top]["rps"] / off[top]["rps"] if off[top]["rps"] > 0 else float("nan")
    per_cpu = {b: r[top]["requests"] / r[top]["cpu_s"] if r[top].get("cpu_s") else float("nan")
               for b, r in ((True, on), (False, off))}
    share = best / inproc if inproc > 0 else float("nan")
    return dict(batching_gain_at=top, batching_gain=gain, batching_gain_goal=GOAL_BATCHING_GAIN,
                batching_gain_met=bool(gain >= GOAL_BATCHING_GAIN),
                batching_gain_per_cpu_second=per_cpu[True] / per_cpu[False],
                inprocess_batching_gain=inproc / inproc1 if inproc1 > 0 else float("nan"),
                served_share_of_inprocess=share, served_share_goal=GOAL_SERVED_SHARE,
                served_share_met=bool(share >= GOAL_SERVED_SHARE))


def _min_seconds(c: dict) -> str:
    s = c.get("min_seconds", 0.0)   # reports written before the option have no floor
    return f" and at least {s:g} s per row" if s else ""


def _markdown(rep: dict) -> str:
    c, e, g = rep["config"], rep["environment"], rep["goals"]
    lines = [
        "# Service load test: Verify throughput and latency",
        "",
        f"Generated by `{rep['command']}`{' (quick smoke size: not a measurement to quote)' if c['quick'] else ''}.",
        "",
        f"Two servers (batching on, batching off) on loopback in the same process as their clients, model "
        f"{c['model']} on {c['device']}{' (' + e['gpu'] + ')' if e.get('gpu') else ''}; {e['cpu_count']} CPUs, "
        f"{e['torch_threads']} torch thread(s) (OMP_NUM_THREADS={e['omp_num_threads'] or 'unset'}), torch {e['torch']}, "
        f"Python {e['python']}, {e['platform']}. Each request verifies one 256x256 PNG against "
        f"{c['keys_per_verify']} keys with {c['method']} ({c['num_steps']} DDIM steps: one autoencoder encode and "
        f"{c['verify_model_evals']} denoiser evaluations per verify). At least {c['requests_per_level']} requests "
        f"per row (or one per client if more){_min_seconds(c)}, sent back to back by the clients (one thread and one "
        f"connection each); "
        f"the on and off rows of a client count ran one right after the other. Micro-batching: max batch "
        f"{c['max_batch']}, max wait {c['max_wait_ms']:g} ms, autoencoder "
        f"{'one image at a time' if c['vae_batch'] == 1 else (str(c['vae_batch']) + ' images per call') if c['vae_batch'] else 'on the whole batch'} "
        f"inside a batch. Machine load average (1/5/15 min) {e['loadavg_start']} at the start, {e['loadavg_end']} "
        f"at the end.",
        "",
    ]

    def row(r):
        return [r["clients"], "on" if r["batching"] else "off", f"{r['rps']:.2f}", f"{r['p50_ms']:.0f}",
                f"{r['p99_ms']:.0f}", r["batches"], ", ".join(f"{s}: {n}" for s, n in r["batch_sizes"].items()),
                f"{r['cpu_s'] / max(r['requests'], 1):.2f}", f"{r['cpu_s'] / r['wall_s']:.2f}",
                f"{r['loadavg_1min']:.1f}", r["errors"]]

    lines += markdown_table(["clients", "batching", "req/s", "p50 ms", "p99 ms", "model calls",
                             "batch sizes (size: calls)", "CPU s / request", "CPU used (cores)", "load avg", "errors"],
                            (row(r) for r in rep["throughput"]), align="rlrrrrlrrrr")
    runs = ", ".join(f"{x:.2f}" for x in rep["inprocess_rps_runs"])
    lines += [
        "",
        f"In process, no RPC (same image, same keys, same model view): **{rep['inprocess_rps']:.2f} images/s** in "
        f"batches of {rep['inprocess_batch']} (mean of {runs}, measured before and after the rows), "
        f"{rep['inprocess_batch1_rps']:.2f} images/s one at a time.",
        "",
        "## Goals",
        "",
        f"- Batching on vs off at {g['batching_gain_at']} clients: **{g['batching_gain']:.2f}x** "
        f"(goal {g['batching_gain_goal']:g}x): {'met' if g['batching_gain_met'] else 'NOT met'}. "
        f"In requests per process CPU second: {g['batching_gain_per_cpu_second']:.2f}x. The model work alone, "
        f"in process, runs {g['inprocess_batching_gain']:.2f}x faster in batches of {rep['inprocess_batch']} "
        f"than one image at a time: that is about the most batching can give on this hardware.",
        f"- Best served rate vs in-process batched rate: **{100 * g['served_share_of_inprocess']:.0f} %** "
        f"(goal {100 * g['served_share_goal']:.0f} %): {'met' if g['served_share_met'] else 'NOT met'}.",
        "",
        "How to read it: *model calls* fewer than *requests* means requests were batched; the batch-size "
        "column says how full the batches were. *CPU s / request* is the process's CPU time (servers and "
        "clients) per request: on a shared machine it shows the work done apart from how much of the CPU "
        "the run got; *CPU used* is that CPU time over the row's wall time (1.0 = one core busy all along).",
    ]
    if g["served_share_of_inprocess"] < 1:
        lines[-1] += (" The gap between the in-process rate and the best service row is the RPC layer's share "
                      "(PNG decoding, Ed25519 signing, gRPC, and handler threads sharing the interpreter with the "
                      "clients).")
    else:
        lines[-1] += (" A service row faster than the in-process rate is possible: the in-process loop is one "
                      "thread, while the servers decode, sign and answer on other threads as the model runs on "
                      "its torch thread; on a shared machine the rows also get different shares of the CPU.")
    if rep["errors"]:
        lines += ["", "Errors (first per row): " + "; ".join(rep["errors"])]
    return "\n".join(lines) + "\n"
