"""``shallowmark loadtest --isolation processes``: served Verify throughput with the server and its
clients in processes of their own, against the same work done in process.

``shallowmark loadtest`` (the default, ``--isolation threads``) runs its client threads inside the
servers' process, where they share one interpreter lock with the gRPC handlers and the batch
thread; its served share of the in-process rate is therefore a lower bound. Here:

- one server (micro-batching on, :func:`~shallowmark.server.loadtest.server_config`) runs in a
  subprocess of its own (:class:`~shallowmark.server.soak.ServerProcess`), as a deployment would;
- for each client count, the clients (one SDK ``Client`` and one thread each, sending back to
  back) are spread over ``client_processes`` spawned processes, which start together on one
  barrier; the wall time runs from that barrier to the last answer;
- the in-process rate is the same work with no RPC (``invert`` in batches of ``max_batch``, then
  the scoring) in this process, with the server's torch thread count, measured before and after
  the served rows while the server idles, so that both see the same machine;
- with ``profile_s`` > 0, ``py-spy`` samples the server process (every thread, native frames
  folded into Python ones) for that long during the largest client count, and the report lists
  where its time went. py-spy is in the ``dev`` extra.

Goal (from the scale-out issue): served throughput at 16 clients at least 90 % of the in-process
batched rate on a GPU; on a CPU the report gives the same ratio.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from shallowmark.errors import ShallowmarkError
from shallowmark.reports import markdown_table
from shallowmark.server.loadtest import LoadtestConfig, _percentile_ms

GOAL_SERVED_SHARE = 0.9


@dataclass(frozen=True)
class ProcessLoadConfig(LoadtestConfig):
    """:class:`~shallowmark.server.loadtest.LoadtestConfig` plus ``client_processes`` (at most this
    many client processes per row; the clients are spread over them) and ``profile_s`` (py-spy
    seconds at the largest client count, 0: none). ``threads`` is the server's torch thread count
    (None: torch's default, all cores), used for the in-process rate too."""

    client_processes: int = 4
    profile_s: float = 0.0

    @classmethod
    def quick_config(cls, **kw) -> "ProcessLoadConfig":
        base = dict(clients=(1, 4), client_processes=2, requests_per_level=4, min_seconds=0.0, num_steps=10,
                    inprocess_images=4, quick=True)
        base.update(kw)
        return cls(**base)


def _client_process(address: str, token: str, image: bytes, keys: list[bytes], threads: int, per_thread: list[int],
                    min_seconds: float, barrier, results) -> None:
    """One client process: ``threads`` clients, each sending its share of Verify calls back to back
    once every process is connected (``barrier``); puts (latencies, errors, cpu_s) on ``results``."""
    from shallowmark.keys import parse_key
    from shallowmark.server.loadtest import run_clients, verify_body

    latencies: list[float] = []
    errors: list[str] = []
    try:
        body = verify_body(image, [parse_key(k) for k in keys], per_thread, min_seconds, latencies, errors)
        _, cpu = run_clients(address, token, threads, body, on_start=barrier.wait)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        barrier.abort()
        results.put(("crash", f"{type(e).__name__}: {e}"))
        return
    results.put((latencies, errors, cpu))


def _level(ctx, address: str, token: str, image: bytes, keys: list[bytes], clients: int, processes: int,
           total: int, min_seconds: float, during: Callable[[], None] | None = None) -> dict:
    """``clients`` clients over ``processes`` processes, at least ``total`` calls; ``during`` runs
    in this process once the clients are released (the profiler)."""
    procs_n = max(1, min(processes, clients))
    threads = [clients // procs_n + (1 if i < clients % procs_n else 0) for i in range(procs_n)]
    total = max(total, clients)
    shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    barrier = ctx.Barrier(procs_n + 1)
    results = ctx.Queue()
    procs, at = [], 0
    for t in threads:
        p = ctx.Process(target=_client_process, args=(address, token, image, keys, t, shares[at:at + t], min_seconds,
                                                      barrier, results), daemon=True)
        at += t
        p.start()
        procs.append(p)
    try:
        barrier.wait(timeout=300)
    except threading.BrokenBarrierError:
        # a client process failed before the start: its message is on the queue
        msgs = [results.get(timeout=30) for _ in range(results.qsize() or 1)]
        raise ShallowmarkError(f"a client process failed before the start: {msgs[0][1] if msgs else 'no message'}") from None
    t0 = time.perf_counter()
    # the profiler runs beside the clients, so that its seconds do not count in the row's wall time;
    # its failure (py-spy missing, not allowed to attach) is raised once the row is over
    failed: list[BaseException] = []

    def side_run() -> None:
        try:
            during()
        except BaseException as e:  # noqa: BLE001 - re-raised in this thread below
            failed.append(e)

    side = threading.Thread(target=side_run, name="profiler") if during is not None else None
    if side is not None:
        side.start()
    got = [results.get(timeout=3600) for _ in procs]
    wall = time.perf_counter() - t0
    if side is not None:
        side.join()
    if failed:
        raise failed[0]
    for p in procs:
        p.join(timeout=30)
    crashed = [g[1] for g in got if g[0] == "crash"]
    if crashed:
        raise ShallowmarkError(f"a client process failed: {crashed[0]}")
    lat = [x for g in got for x in g[0]]
    errors = [x for g in got for x in g[1]]
    return dict(clients=clients, client_processes=procs_n, rps=len(lat) / wall,
                p50_ms=_percentile_ms(lat, 50), p99_ms=_percentile_ms(lat, 99),
                requests=len(lat) + len(errors), errors=len(errors), wall_s=wall,
                client_cpu_s=float(sum(g[2] for g in got)), first_error=errors[0] if errors else "")


def _profile(pid: int, seconds: float, out: Path) -> dict:
    """``py-spy record`` of ``pid`` for ``seconds`` (raw folded stacks), summarised: the share of
    samples whose innermost frame of ours or of a library (torch, grpc, PIL, ...) is each function."""
    beside = Path(sys.executable).parent / "py-spy"      # a virtual environment's, even when not on PATH
    exe = str(beside) if beside.exists() else shutil.which("py-spy")
    if exe is None:
        raise ShallowmarkError("profiling needs py-spy (pip install 'shallowmark[dev]', or pip install py-spy)")
    folded = out / "server-profile.txt"
    proc = subprocess.run([exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "100",
                           "--format", "raw", "--threads", "--nonblocking", "--output", str(folded)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not folded.exists():
        raise ShallowmarkError(f"py-spy could not sample the server (exit {proc.returncode}): {proc.stderr[-500:]}")
    return summarise_profile(folded.read_text())


def summarise_profile(folded: str, top: int = 15) -> dict:
    """From py-spy's raw output (``frame;frame;... count`` per line, thread first): samples per
    thread, and the functions where the busy samples sat (the innermost frame that is not an idle
    wait), with their share of all samples."""
    per_thread: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = 0
    idle_markers = ("wait (threading.py", "_wait_for_tstate_lock", "select (selectors.py", "poll (", "sleep",
                    "_worker (concurrent/futures/thread.py")
    for line in folded.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        per_thread[frames[0]] += n
        inner = frames[-1]
        leaf["(idle: waiting)" if any(m in inner for m in idle_markers) else inner] += n
    return dict(samples=total, threads=dict(per_thread.most_common()),
                top=[dict(frame=f, share=n / total if total else 0.0) for f, n in leaf.most_common(top)])


def run(out: str | os.PathLike[str], cfg: ProcessLoadConfig | None = None, *,
        command: str = "shallowmark loadtest --isolation processes", log: Callable[[str], None] = print) -> dict:
    """Run it and write ``report.json`` and ``report.md`` into ``out``; returns the report."""
    import torch

    from shallowmark.client import Client
    from shallowmark.core.backends import load_backend
    from shallowmark.core.watermarks import load_method
    from shallowmark.keys import WatermarkKey
    from shallowmark.server.batching import vae_view
    from shallowmark.server.loadtest import METHOD, _environment, _inprocess, write_markdown
    from shallowmark.server.soak import ServerProcess
    from shallowmark.server.validation import decode_image

    cfg = cfg or ProcessLoadConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keys = [WatermarkKey.from_hex(f"{0x10AD + i:064x}", label=f"load-{i}") for i in range(cfg.n_keys)]
    mks = [k.for_method(METHOD) for k in keys]
    token = secrets.token_urlsafe(16)
    ctx = mp.get_context("spawn")   # no fork of a process that holds torch's and gRPC's threads
    rows, profile = [], None
    with tempfile.TemporaryDirectory(prefix="shallowmark-load-") as tmp:
        server = ServerProcess(dict(clients=max(cfg.clients), num_steps=cfg.num_steps, device=cfg.device,
                                    max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms, vae_batch=cfg.vae_batch),
                               cfg.threads, token, Path(tmp))
        try:
            server.wait_serving()
            address = server.info["address"]
            with Client(address, token, timeout=600) as c:
                image = c.embed(keys[0], method=METHOD, seed=1).image
                c.verify(image, mks)   # warm-up
                verify_evals = {m.name: m for m in c.info().methods}[METHOD].verify_model_evals
            # the same work in this process, on the model view a server builds (VAE chunking on a CPU)
            view = vae_view(load_backend("tiny-ldm", device=cfg.device), cfg.vae_batch, cfg.device)
            method = load_method(METHOD, view, num_steps=cfg.num_steps)
            pixels = decode_image(image, 1 << 30).pixels
            _inprocess(method, pixels, mks, 1, 1)   # warm-up
            inproc_runs = [_inprocess(method, pixels, mks, cfg.inprocess_images, cfg.max_batch)]
            log(f"in process (no RPC), before: {inproc_runs[0]:.2f} images/s in batches of {cfg.max_batch}")
            wire = [k.to_bytes() for k in mks]
            for n in cfg.clients:
                during = None
                if cfg.profile_s > 0 and n == max(cfg.clients):
                    def during(pid=server.pid):
                        nonlocal profile
                        time.sleep(min(2.0, cfg.profile_s))   # past the first batches
                        profile = _profile(pid, cfg.profile_s, out)
                r = _level(ctx, address, token, image, wire, n, cfg.client_processes, cfg.requests_per_level,
                           cfg.min_seconds, during)
                r["loadavg_1min"] = os.getloadavg()[0]
                rows.append(r)
                log(f"clients {n:>3} in {r['client_processes']} processes: {r['rps']:7.2f} req/s  "
                    f"p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  ({r['requests']} requests, "
                    f"{r['errors']} errors)")
            inproc_runs.append(_inprocess(method, pixels, mks, cfg.inprocess_images, cfg.max_batch))
            log(f"in process (no RPC), after: {inproc_runs[1]:.2f} images/s")
        finally:
            server.stop()
    inproc = float(np.mean(inproc_runs))
    top = max(rows, key=lambda r: r["clients"])
    share = top["rps"] / inproc if inproc > 0 else float("nan")
    report = dict(
        command=command, config=dict(asdict(cfg), model="tiny-ldm", method=METHOD, verify_model_evals=verify_evals,
                                     server_isolation="subprocess", server_torch_threads=server.info.get("torch_threads")),
        environment=_environment(cfg, load_start),
        throughput=[{k: v for k, v in r.items() if k != "first_error"} for r in rows],
        inprocess_rps=inproc, inprocess_rps_runs=inproc_runs,
        goals=dict(served_share_at=top["clients"], served_share_of_inprocess=share, served_share_goal=GOAL_SERVED_SHARE,
                   served_share_met=bool(share >= GOAL_SERVED_SHARE)),
        server=dict(exit_code=server.exit_code, startup_s=server.startup_s),
        profile=profile, seconds_total=time.perf_counter() - t_start,
        errors=[r["first_error"] for r in rows if r["first_error"]])
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(out, report, _markdown)
    return report


def _markdown(rep: dict) -> str:
    c, e, g = rep["config"], rep["environment"], rep["goals"]
    lines = [
        "# Served Verify throughput, server and clients in processes of their own", "",
        f"Generated by `{rep['command']}`{' (quick smoke size: not a measurement to quote)' if c['quick'] else ''}.", "",
        f"One server (micro-batching on: max batch {c['max_batch']}, max wait {c['max_wait_ms']:g} ms) in a subprocess "
        f"with {c['server_torch_threads']} torch thread(s), model {c['model']} on {c['device']}"
        f"{' (' + e['gpu'] + ')' if e.get('gpu') else ''}; the clients (one thread and one connection each, back to "
        f"back, no retries) in up to {c['client_processes']} spawned processes per row, released together. Each "
        f"request verifies one 256x256 PNG against {c['n_keys']} keys with {c['method']} ({c['num_steps']} DDIM "
        f"steps, {c['verify_model_evals']} model evaluations per verify). At least {c['requests_per_level']} requests "
        f"and {c['min_seconds']:g} s per row. {e['cpu_count']} CPUs, torch {e['torch']}, {e['platform']}; load "
        f"average {e['loadavg_start']} at the start, {e['loadavg_end']} at the end.", ""]
    lines += markdown_table(["clients", "client processes", "req/s", "p50 ms", "p99 ms", "requests", "errors",
                             "client CPU s", "load avg"],
                            [[r["clients"], r["client_processes"], f"{r['rps']:.2f}", f"{r['p50_ms']:.0f}",
                              f"{r['p99_ms']:.0f}", r["requests"], r["errors"], f"{r['client_cpu_s']:.1f}",
                              f"{r['loadavg_1min']:.1f}"] for r in rep["throughput"]], align="rrrrrrrrr")
    runs = ", ".join(f"{x:.2f}" for x in rep["inprocess_rps_runs"])
    lines += ["", f"In process, no RPC, same work and thread count: **{rep['inprocess_rps']:.2f} images/s** "
                  f"(mean of {runs}, before and after the rows).", "",
              f"**Served at {g['served_share_at']} clients: {100 * g['served_share_of_inprocess']:.0f} % of the "
              f"in-process rate** (goal {100 * g['served_share_goal']:.0f} % on a GPU): "
              f"{'met' if g['served_share_met'] else 'NOT met'} on {c['device']}.", ""]
    prof = rep.get("profile")
    if prof:
        lines += [f"## Where the server's time went ({prof['samples']} py-spy samples at {g['served_share_at']} "
                  "clients)", "", "Innermost frame of each sample, all threads; idle waits folded into one row.", ""]
        lines += markdown_table(["frame", "share"], [[f"`{t['frame']}`", f"{100 * t['share']:.1f} %"]
                                                    for t in prof["top"]])
        lines += [""]
    if rep["errors"]:
        lines += ["Errors (first per row): " + "; ".join(rep["errors"]), ""]
    return "\n".join(lines)
