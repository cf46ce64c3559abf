"""``shallowmark soak``: a long mixed Embed/Verify run against one server, for errors, latency and memory over time.

What it runs:

- one shallowmark server (tiny-ldm, shallow-diffuse at ``num_steps``, batching on) as a **subprocess**
  of this one, started through :func:`shallowmark.server.app.serve` as ``shallowmark serve`` runs it,
  and stopped at the end with SIGTERM (so the drain is part of the run). A subprocess, not a server in
  this process as :mod:`.loadtest` has: the RSS read from ``/proc/<pid>/status`` is then the server's
  own, without the clients' threads, buffers and images, and the clients do not share its GIL;
- ``clients`` client threads (:func:`shallowmark.server.loadtest.run_clients`: one SDK ``Client`` and
  connection each, no retries, so every failure is counted with the code the server answered), each
  looping for ``duration_s`` over a random mix (:data:`MIX`) of four operations:

  - ``embed-generate``: Embed of a generated image (a random seed) with one of ``n_keys`` keys;
  - ``embed-upload``: Embed of an uploaded small photo (matplotlib's held-out ``grace_hopper``, its
    centre 256x256), ``output="residual"``;
  - ``verify-marked``: Verify of one of the last 64 images the run embedded, against its key and
    another; it must be detected and identified as that key;
  - ``verify-plain``: Verify of an unwatermarked image (the photo at 256x256 and at its own
    512x600), against two keys; it must not be detected.

  Every Verify's attestation is checked against the server key (read from the server, not from the
  response); a failed check counts as a failure ``client:AttestationError``;
- every ``sample_s`` (1 s unless the run is longer than 1000 s), the server's VmRSS, VmHWM, thread
  count, open file descriptors and CPU time from ``/proc/<pid>``;
- after the stop, the ledger is opened again (which walks its whole hash chain) and its record count
  compared with the Embeds answered OK.

Writes ``report.json`` and ``report.md`` to ``--out`` (a hand-written ``notes.md`` there is appended to
``report.md``, as for the load test): requests and failures by operation, RPC and status code, p50/p99
latency, throughput, the same in :data:`WINDOWS` windows of the run, the RSS samples with start, max
and end, and the verdict of :func:`rss_verdict` (RSS *bounded* or not, by the rule it states).

Opt-in: nothing in the default test suite runs it for long (``tests/server/test_soak.py`` runs it for
10 s with 2 clients, to check the report).
"""

from __future__ import annotations

import collections
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from shallowmark.reports import markdown_table
from shallowmark.server.loadtest import METHOD, _environment, _percentile_ms, run_clients, server_config, write_markdown

__all__ = ["SoakConfig", "run_soak", "rss_verdict", "MIX", "LOAD_CODES", "DOCUMENTED_CODES"]

#: Operation -> (RPC, share of the requests).
MIX = {"embed-generate": ("Embed", 0.2), "embed-upload": ("Embed", 0.2),
       "verify-marked": ("Verify", 0.4), "verify-plain": ("Verify", 0.2)}

#: The codes a healthy server may answer a well-formed call under load (docs/service.md): refused as
#: full, unavailable, or out of time. Any other failure is a finding.
LOAD_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED")

#: Every status code docs/service.md documents (INTERNAL there is "a server bug").
DOCUMENTED_CODES = ("OK", "DATA_LOSS", "INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED",
                    "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION", "INTERNAL")

#: RSS is *bounded* when it grew by at most this fraction over the second half of the load phase.
RSS_GROWTH_LIMIT = 0.05

RSS_RULE = ("bounded: the median RSS of the last 10 % of the load phase's samples is at most "
            f"{100 * RSS_GROWTH_LIMIT:g} % above the median of the 10 % around its midpoint (growth over the "
            "second half of the run, after the warm-up; medians, so that one sample's spike does not decide)")

#: Number of time windows the run is cut into for the report's over-time table.
WINDOWS = 10

#: Recent embedded images kept for ``verify-marked`` (bounded, so that the clients' memory is).
MARKED_KEPT = 64

_TOKEN_ENV = "SHALLOWMARK_SOAK_TOKEN"
_START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class SoakConfig:
    """Sizes of a soak run.

    ``threads``: torch intra-op threads of the server (1 by default: on a shared CPU more only
    contend; raise it on a machine of its own). ``sample_s``: None for 1 s, or ``duration_s / 1000`` on
    longer runs so that the report stays small.
    """

    duration_s: float = 300.0
    clients: int = 16
    num_steps: int = 10
    max_batch: int = 8
    max_wait_ms: float = 5.0
    vae_batch: int = 0
    n_keys: int = 4
    threads: int | None = 1
    device: str = "cpu"
    sample_s: float | None = None
    seed: int = 0
    mix: dict = field(default_factory=lambda: {op: share for op, (_, share) in MIX.items()})

    @property
    def interval_s(self) -> float:
        return self.sample_s if self.sample_s else max(1.0, self.duration_s / 1000.0)


# -- the server subprocess ---------------------------------------------------------------------------------


def _child(folder: Path) -> int:
    """The server side (``python -m shallowmark.server.soak --child FOLDER``): serve until SIGTERM."""
    import logging

    import torch

    from shallowmark.server.app import serve

    spec = json.loads((folder / "server.json").read_text())
    token = os.environ.pop(_TOKEN_ENV)
    # WARNING and above only: the per-call INFO lines of a long run would be most of the file
    logging.basicConfig(level=logging.WARNING, handlers=[logging.FileHandler(folder / "server.log")],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = server_config(token, folder / "state", **spec["server"])

    def ready(app) -> None:
        info = dict(address=app.address, pid=os.getpid(), torch_threads=torch.get_num_threads(),
                    public_key=app.signer.public_key_raw.hex())
        tmp = folder / "ready.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, folder / "ready.json")  # the parent never reads half a file

    serve(cfg, on_ready=ready)
    return 0


class ServerProcess:
    """A load-test server (:func:`~shallowmark.server.loadtest.server_config` with ``server``'s
    fields, ``threads`` torch threads or torch's default) in a subprocess of its own: started and
    waited for until health SERVING, stopped by SIGTERM. Its log is ``folder/server.log``."""

    def __init__(self, server: dict, threads: int | None, token: str, folder: Path):
        self.folder = folder
        spec = dict(threads=threads, server=server)
        (folder / "server.json").write_text(json.dumps(spec))
        env = dict(os.environ, **{_TOKEN_ENV: token})  # not on the command line, which any user can read
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self._out = open(folder / "server.out", "wb")
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "shallowmark.server.soak", "--child", str(folder)],
                                     stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.pid = self.proc.pid
        self.info: dict = {}
        self.startup_s = float("nan")
        self.stop_s = float("nan")
        self.exit_code: int | str | None = None
        self.died = False   # exited before the SIGTERM: a crash or a kill, not a drain

    def tail(self, n: int = 3000) -> str:
        self._out.flush()
        return (self.folder / "server.out").read_bytes()[-n:].decode(errors="replace")

    def wait_serving(self, timeout: float = _START_TIMEOUT_S) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        ready = self.folder / "ready.json"
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before listening:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not listen within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.2)
        self.info = json.loads(ready.read_text())
        with grpc.insecure_channel(self.info["address"]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not become SERVING within {timeout:.0f} s "
                                       f"(exit code {self.proc.returncode}):\n{self.tail()}")
                time.sleep(0.5)
        self.startup_s = time.perf_counter() - self.t_spawn

    def stop(self) -> None:
        """SIGTERM (the server drains for its grace_s) and wait; killed if it hangs past that."""
        from shallowmark.server.app import STOP_SLACK_S

        if self.proc.poll() is None:
            t0 = time.perf_counter()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5.0 + STOP_SLACK_S + 30.0)   # grace_s of server_config, then slack
                self.exit_code = self.proc.returncode
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = "killed (did not stop after SIGTERM)"
            self.stop_s = time.perf_counter() - t0
        elif self.exit_code is None:
            self.died, self.exit_code = True, self.proc.returncode
        self._out.close()


# -- memory sampling -----------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_sample(pid: int) -> dict | None:
    """VmRSS and VmHWM (MiB), threads, open fds and CPU seconds of ``pid``; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    fields = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    if "VmRSS" not in fields:   # a zombie has no memory left to report
        return None
    rest = stat.rpartition(")")[2].split()   # after the command name, which may hold spaces
    return dict(rss_mib=int(fields["VmRSS"][0]) / 1024, hwm_mib=int(fields["VmHWM"][0]) / 1024,
                threads=int(fields["Threads"][0]), fds=fds, cpu_s=(int(rest[11]) + int(rest[12])) / _CLK_TCK)


class _Sampler(threading.Thread):
    """Samples the server every ``interval`` s; sets ``gone`` when the process has exited."""

    def __init__(self, server: ServerProcess, interval: float, t0: Callable[[], float]):
        super().__init__(name="rss-sampler", daemon=True)
        self.server, self.interval, self.t0 = server, interval, t0
        self.samples: list[dict] = []
        self.gone = threading.Event()
        self._halt = threading.Event()   # not _stop: threading.Thread has a method of that name

    def run(self) -> None:
        while not self._halt.is_set():
            s = _proc_sample(self.server.pid)
            if s is None or self.server.proc.poll() is not None:
                self.gone.set()
                return
            s["t_s"] = round(time.perf_counter() - self.t0(), 3)
            self.samples.append(s)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        if self.ident is not None:   # never started when a client could not connect
            self.join()


def rss_verdict(samples: list[dict], load_s: float, limit: float = RSS_GROWTH_LIMIT) -> dict:
    """Start, max and end RSS and whether it stayed bounded (:data:`RSS_RULE`) over the load phase
    (the samples with ``0 <= t_s <= load_s``). ``bounded`` is None when fewer than 4 samples fell in it."""
    rss = [s["rss_mib"] for s in samples]
    during = [s["rss_mib"] for s in samples if 0 <= s["t_s"] <= load_s]
    out = dict(rule=RSS_RULE, limit=limit, start_mib=rss[0] if rss else None, max_mib=max(rss) if rss else None,
               end_mib=during[-1] if during else None, hwm_mib=max((s["hwm_mib"] for s in samples), default=None),
               samples_in_load=len(during), mid_mib=None, last_mib=None, growth_last_half=None, bounded=None)
    if len(during) < 4:
        return out
    k = max(1, len(during) // 10)
    lo = len(during) // 2 - k // 2
    mid, last = statistics.median(during[lo:lo + k]), statistics.median(during[-k:])
    growth = last / mid - 1.0
    out.update(mid_mib=mid, last_mib=last, growth_last_half=growth, bounded=bool(growth <= limit))
    return out


# -- the clients -----------------------------------------------------------------------------------------------


@dataclass
class _Call:
    op: str
    t_s: float          # start, from the start of the load phase
    dt_s: float
    code: str           # "OK", a status code name, or "client:<exception type>"
    mismatch: bool = False


def _images() -> tuple[bytes, list[bytes]]:
    """The photo to upload and the unwatermarked images to verify (PNG bytes)."""
    from shallowmark.core.photos import center_crop, heldout_photo
    from shallowmark.imaging import encode_png

    photo = heldout_photo()
    small = encode_png(center_crop(photo, 256))
    return small, [small, encode_png(photo)]


def _load(cfg: SoakConfig, address: str, token: str, pinned: bytes, stop_at: Callable[[], float],
          gone: threading.Event, t0: Callable[[], float],
          on_start: Callable[[], None]) -> tuple[list[_Call], float, float, dict]:
    """The clients' loop; returns every call, the wall and client CPU seconds, and the first message per code."""
    from shallowmark.attestation import verify_attestation
    from shallowmark.client import ServerError
    from shallowmark.keys import WatermarkKey

    # fixed keys: a plain image's verdict against them is the same every run
    keys = [WatermarkKey.from_hex(f"{0x50A4 + i:064x}", label=f"soak-{i}") for i in range(cfg.n_keys)]
    mks = [k.for_method(METHOD) for k in keys]
    upload, plain = _images()
    ops = list(cfg.mix)
    weights = [cfg.mix[o] for o in ops]
    marked: collections.deque = collections.deque(maxlen=MARKED_KEPT)
    calls: list[_Call] = []
    first: dict[str, str] = {}
    lock = threading.Lock()

    def body(c, i: int) -> None:
        rng = random.Random(cfg.seed * 1_000_003 + i)
        while time.perf_counter() < stop_at() and not gone.is_set():
            op = rng.choices(ops, weights)[0]
            with lock:
                pick = marked[rng.randrange(len(marked))] if marked else None
            if op == "verify-marked" and pick is None:
                op = "embed-generate"   # nothing embedded yet to verify
            k = rng.randrange(len(keys))
            start = time.perf_counter()
            code, mismatch, msg = "OK", False, ""
            try:
                if op.startswith("embed"):
                    if op == "embed-generate":
                        r = c.embed(keys[k], method=METHOD, seed=rng.getrandbits(63))
                    else:
                        r = c.embed(keys[k], method=METHOD, image=upload, output="residual")
                    with lock:
                        marked.append((r.image, k, r.key_id))
                else:
                    if op == "verify-marked":
                        image, k, expected = pick
                    else:
                        image, expected = plain[rng.randrange(len(plain))], None
                    others = [j for j in range(len(keys)) if j != k]
                    res = c.verify(image, [mks[k], mks[rng.choice(others)]])
                    verify_attestation(res, pinned, image=image)
                    mismatch = (not res.detected or res.identified_key_id != expected) if expected else res.detected
            except ServerError as e:
                code, msg = e.code.name, e.details
            except Exception as e:  # noqa: BLE001 - counted and reported, as the server's codes are
                code, msg = f"client:{type(e).__name__}", str(e)
            call = _Call(op, start - t0(), time.perf_counter() - start, code, mismatch)
            with lock:
                calls.append(call)
                if msg and code not in first:
                    first[code] = msg[:300]

    wall, cpu = run_clients(address, token, cfg.clients, body, on_start=on_start)
    return calls, wall, cpu, first


def _stats(calls: list[_Call], wall: float) -> dict:
    codes = collections.Counter(c.code for c in calls)
    ok = [c.dt_s for c in calls if c.code == "OK"]
    return dict(requests=len(calls), ok=len(ok), failed=len(calls) - len(ok),
                by_status=dict(sorted(codes.items())), p50_ms=_percentile_ms(ok, 50), p99_ms=_percentile_ms(ok, 99),
                ok_rps=len(ok) / wall if wall > 0 else float("nan"),
                verdict_mismatches=sum(c.mismatch for c in calls))


def _windows(calls: list[_Call], samples: list[dict], duration: float) -> list[dict]:
    width = duration / WINDOWS
    out = []
    for w in range(WINDOWS):
        lo, hi = w * width, (w + 1) * width
        inside = [c for c in calls if lo <= c.t_s < hi or (w == WINDOWS - 1 and c.t_s >= hi)]
        rss = [s["rss_mib"] for s in samples if lo <= s["t_s"] < hi]
        row = _stats(inside, width)
        out.append(dict(t0_s=round(lo, 1), t1_s=round(hi, 1), requests=row["requests"], failed=row["failed"],
                        by_status=row["by_status"], ok_rps=row["ok_rps"], p50_ms=row["p50_ms"], p99_ms=row["p99_ms"],
                        rss_max_mib=max(rss) if rss else None))
    return out


def _server_log(folder: Path) -> dict:
    """The WARNING and ERROR lines the server logged: counts and the first few."""
    path = folder / "server.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    records = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or " CRITICAL " in ln]
    return dict(warnings=sum(" WARNING " in ln for ln in records), errors=sum(" WARNING " not in ln for ln in records),
                first=[ln[:400] for ln in records[:5]])


def _ledger_check(folder: Path, embeds_ok: int) -> dict:
    from shallowmark.server.ledger import LedgerError, open_ledger

    try:
        led = open_ledger(str(folder / "state" / "ledger.sqlite3"))   # opening walks the whole hash chain
        try:
            n = led.count()
        finally:
            led.close()
    except LedgerError as e:
        return dict(records=None, embeds_ok=embeds_ok, matches=False, error=str(e)[:500])
    return dict(records=n, embeds_ok=embeds_ok, matches=n == embeds_ok, error="")


# -- the run ---------------------------------------------------------------------------------------------------


def run_soak(out: str | os.PathLike[str], config: SoakConfig | None = None, *, command: str = "shallowmark soak",
             log: Callable[[str], None] = print) -> dict:
    """Run the soak and write ``report.json`` and ``report.md`` into ``out``; returns the report."""
    cfg = config or SoakConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    token = secrets.token_urlsafe(16)
    clock = {"t0": time.perf_counter()}
    t0 = lambda: clock["t0"]   # noqa: E731 - the load phase's start, set once the server is up
    with tempfile.TemporaryDirectory(prefix="shallowmark-soak-") as tmp:
        folder = Path(tmp)
        server = ServerProcess(dict(clients=cfg.clients, num_steps=cfg.num_steps, device=cfg.device,
                                    max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms, vae_batch=cfg.vae_batch),
                               cfg.threads, token, folder)
        sampler = None
        try:
            server.wait_serving()
            log(f"server pid {server.pid} on {server.info['address']} SERVING after {server.startup_s:.1f} s; "
                f"{cfg.clients} clients for {cfg.duration_s:g} s")
            sampler = _Sampler(server, cfg.interval_s, t0)

            def on_start() -> None:
                # the load phase (its deadline and the memory samples' clock) starts once every client is
                # connected, not before: connecting took up to 0.1 s of a 10 s run and left the wall short
                clock["t0"] = time.perf_counter()
                sampler.start()

            calls, wall, client_cpu, first = _load(cfg, server.info["address"], token,
                                                    bytes.fromhex(server.info["public_key"]),
                                                    lambda: clock["t0"] + cfg.duration_s, sampler.gone, t0, on_start)
            load_s = time.perf_counter() - clock["t0"]
        finally:
            if sampler is not None:
                sampler.stop()
            server.stop()
        samples = sampler.samples
        server_log = _server_log(folder)
        embeds_ok = sum(c.code == "OK" for c in calls if c.op.startswith("embed"))
        ledger = _ledger_check(folder, embeds_ok)

    by_rpc: dict[str, list[_Call]] = collections.defaultdict(list)
    for c in calls:
        by_rpc[MIX[c.op][0]].append(c)
    total = _stats(calls, wall)
    failures = {k: n for k, n in total["by_status"].items() if k != "OK"}
    unexpected = {k: n for k, n in failures.items() if k not in LOAD_CODES}
    rss = rss_verdict(samples, load_s)
    server_cpu = samples[-1]["cpu_s"] - samples[0]["cpu_s"] if len(samples) > 1 else float("nan")
    env = _environment(cfg, load_start)
    env.update(server_torch_threads=server.info.get("torch_threads"), client_torch_threads=env.pop("torch_threads"))
    notes = [f"{env['cpu_count']} CPUs; load average (1/5/15 min) {env['loadavg_start']} at the start and "
             f"{env['loadavg_end']} at the end: latency and throughput are this machine's share, not the server's "
             "capacity.",
             f"Server CPU: {server_cpu:.0f} s over the {load_s:.0f} s load phase "
             f"({server_cpu / load_s if load_s > 0 else float('nan'):.2f} cores busy on average); the clients "
             f"(this process) {client_cpu:.1f} s."]
    report = dict(
        command=command,
        parameters=dict(asdict(cfg), model="tiny-ldm", method=METHOD, keys_per_verify=2, sample_s=cfg.interval_s,
                        operations={op: dict(rpc=rpc, share=cfg.mix[op]) for op, (rpc, _) in MIX.items()},
                        server_isolation="subprocess", workers=cfg.clients + 4, max_queue=max(32, 2 * cfg.clients),
                        client_timeout_s=600, client_retries=0, marked_kept=MARKED_KEPT),
        environment=env,
        server=dict(pid=server.pid, startup_s=server.startup_s, exit_code=server.exit_code, stop_s=server.stop_s,
                    exited_during_run=server.died, cpu_s=server_cpu, log=server_log),
        load=dict(wall_s=wall, load_s=load_s, client_cpu_s=client_cpu, **total),
        rpcs={rpc: _stats(cs, wall) for rpc, cs in sorted(by_rpc.items())},
        operations={op: _stats([c for c in calls if c.op == op], wall) for op in MIX},
        failures=dict(by_status=failures, unexpected=unexpected, load_codes=list(LOAD_CODES),
                      undocumented=sorted(k for k in failures if k not in DOCUMENTED_CODES), first_message=first),
        windows=_windows(calls, samples, cfg.duration_s),
        rss=dict(source="/proc/<server pid>/status VmRSS", interval_s=cfg.interval_s, **rss,
                 samples=[[s["t_s"], round(s["rss_mib"], 2), s["threads"], s["fds"], round(s["cpu_s"], 2)]
                          for s in samples], sample_columns=["t_s", "rss_mib", "threads", "fds", "cpu_s"]),
        ledger=ledger,
        notes=notes,
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(out, report, _markdown)
    log(f"{total['requests']} requests, {total['failed']} failed {failures or ''}; RSS {_mib(rss['start_mib'])} -> "
        f"max {_mib(rss['max_mib'])} -> end {_mib(rss['end_mib'])} MiB, bounded: {rss['bounded']}")
    return report


# -- the Markdown report ------------------------------------------------------------------------------------------


def _mib(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _ms(x) -> str:
    return "-" if x != x else f"{x:.0f}"   # NaN: no successful request


def _codes(by: dict) -> str:
    failed = {k: n for k, n in by.items() if k != "OK"}
    return ", ".join(f"{k}: {n}" for k, n in failed.items()) or "none"


def _markdown(rep: dict) -> str:
    p, e, s, ld, r = rep["parameters"], rep["environment"], rep["server"], rep["load"], rep["rss"]
    mix = ", ".join(f"{op} {100 * o['share']:.0f} %" for op, o in p["operations"].items())
    lines = [
        "# Service soak run: mixed Embed/Verify",
        "",
        f"Generated by `{rep['command']}`.",
        "",
        f"One server ({p['model']}, {p['method']} at {p['num_steps']} DDIM steps, max batch {p['max_batch']}, "
        f"{p['workers']} workers, {e['server_torch_threads']} torch thread(s), {p['device']}) in its own process, "
        f"{p['clients']} client threads in another (one connection each, no retries, {p['client_timeout_s']} s "
        f"timeout) for {p['duration_s']:g} s; each request is one of {mix}. {e['cpu_count']} CPUs, torch "
        f"{e['torch']}, Python {e['python']}, {e['platform']}. The server was SERVING {s['startup_s']:.1f} s after "
        f"it was started and stopped by SIGTERM {s['stop_s']:.1f} s after the run with exit code {s['exit_code']}.",
        "",
        f"**{ld['requests']} requests, {ld['failed']} failed** ({_codes(ld['by_status'])}); "
        f"{ld['ok_rps']:.2f} successful requests/s over {ld['wall_s']:.0f} s. Failures outside the load codes "
        f"({', '.join(rep['failures']['load_codes'])}): **{sum(rep['failures']['unexpected'].values())}**. "
        f"Verdicts that were wrong (a marked image not identified, a plain one detected): "
        f"**{ld['verdict_mismatches']}**.",
        "",
    ]
    rows = [[op, o["rpc"], rep["operations"][op]["requests"],
             rep["operations"][op]["ok"], _codes(rep["operations"][op]["by_status"]),
             _ms(rep["operations"][op]["p50_ms"]), _ms(rep["operations"][op]["p99_ms"]),
             f"{rep['operations'][op]['ok_rps']:.2f}", rep["operations"][op]["verdict_mismatches"]]
            for op, o in p["operations"].items()]
    rows += [[f"**{rpc}**", rpc, x["requests"], x["ok"], _codes(x["by_status"]), _ms(x["p50_ms"]), _ms(x["p99_ms"]),
              f"{x['ok_rps']:.2f}", x["verdict_mismatches"]] for rpc, x in rep["rpcs"].items()]
    lines += markdown_table(["operation", "RPC", "requests", "ok", "failed (by status)", "p50 ms", "p99 ms",
                             "ok req/s", "wrong verdicts"], rows, align="llrrlrrrr")
    lines += ["", "## Over time", ""]
    lines += markdown_table(["window s", "requests", "failed", "ok req/s", "p50 ms", "p99 ms", "max RSS MiB"],
                            ([f"{w['t0_s']:g}-{w['t1_s']:g}", w["requests"], w["failed"], f"{w['ok_rps']:.2f}",
                              _ms(w["p50_ms"]), _ms(w["p99_ms"]), _mib(w["rss_max_mib"])] for w in rep["windows"]),
                            align="lrrrrrr")
    verdict = {True: "**bounded**", False: "**NOT bounded**", None: "not judged (too few samples)"}[r["bounded"]]
    growth = "" if r["growth_last_half"] is None else (
        f": {r['mid_mib']:.1f} MiB at the midpoint, {r['last_mib']:.1f} MiB at the end, "
        f"{100 * r['growth_last_half']:+.1f} %")
    lines += ["", "## Server memory", "",
              f"{r['source']} every {r['interval_s']:g} s ({len(r['samples'])} samples, all in report.json): "
              f"**{_mib(r['start_mib'])} MiB at the start, {_mib(r['max_mib'])} MiB at most, {_mib(r['end_mib'])} MiB "
              f"at the end** (peak VmHWM {_mib(r['hwm_mib'])} MiB). RSS {verdict}{growth}.",
              "", f"Rule: {r['rule']}.", ""]
    step = max(1, len(r["samples"]) // 10)
    picked = r["samples"][::step] + ([r["samples"][-1]] if r["samples"] and (len(r["samples"]) - 1) % step else [])
    lines += markdown_table(["t s", "RSS MiB", "threads", "open fds", "server CPU s"],
                            ([f"{t:.0f}", f"{m:.1f}", th, fd, f"{c:.0f}"] for t, m, th, fd, c in picked),
                            align="rrrrr")
    lg, led = s["log"], rep["ledger"]
    lines += ["", "## Checks", "",
              f"- Ledger after the stop: {led['records']} records for {led['embeds_ok']} Embeds answered OK "
              f"({'match' if led['matches'] else 'MISMATCH'}; reopening it verified the hash chain)"
              + (f": {led['error']}" if led["error"] else "") + ".",
              f"- Server log: {lg['warnings']} warnings, {lg['errors']} errors."
              + "".join(f"\n  - `{ln}`" for ln in lg["first"]),
              f"- Server exit code after SIGTERM: {s['exit_code']}.",
              ]
    if rep["failures"]["first_message"]:
        lines += ["- First message per failure code: " + "; ".join(
            f"{k}: {v}" for k, v in rep["failures"]["first_message"].items())]
    if s["exited_during_run"]:
        lines += [f"- **The server exited during the run** (exit code {s['exit_code']}); the clients stopped then."]
    lines += ["", "## Conditions", ""] + [f"- {n}" for n in rep["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child(Path(sys.argv[2])))
    sys.exit("usage: python -m shallowmark.server.soak --child FOLDER (started by run_soak; use `shallowmark soak`)")
