"""Replicas on one PostgreSQL ledger, one of them SIGKILLed under load: the run behind
``docs/reliability/replicas.md`` and ``tests/server/test_replicas.py``.

What it runs:

- two ``shallowmark serve --config`` processes on loopback, each with its own port, state folder and
  metrics port, sharing one PostgreSQL ledger (``ledger_url``) and one attestation key (what the
  Kubernetes manifests under ``deploy/`` do);
- ``clients`` client threads, each with its own SDK ``Client`` given *both* addresses (gRPC's
  ``round_robin`` with client-side health checking), each making ``calls_per_client`` calls that
  alternate an Embed of a generated image (its own request id, so a retry is recorded once) and a
  Verify of the last image it got back, which must be detected;
- once ``kill_after`` calls have been answered, and as soon as A is working on at least one (read
  from its metrics), replica A gets SIGKILL: the calls it had in flight fail on the client with
  UNAVAILABLE and are retried on B under the client's retry policy;
- at the end, the ledger (read through B) must hold every acknowledged Embed exactly once, with the
  image hash the client got; then A is started again on the same port, must serve on its own, and
  the balanced client must send it Verify calls again (counted on A's metrics endpoint).

Run (opt-in; the test suite runs the small default)::

    python -m shallowmark.server.replicas --pg-url postgresql://user@host/db --out docs/reliability/replicas

The database must be empty or hold only this run's ledger: the check counts every record of the
tenant.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ReplicasConfig", "Replica", "run_replicas", "render"]

TOKEN = "replica-run-token"


@dataclass(frozen=True)
class ReplicasConfig:
    """``clients`` threads of ``calls_per_client`` calls each; replica A is killed once
    ``kill_after`` calls are answered; the servers run shallow-diffuse at ``num_steps`` with
    ``threads`` torch threads each; ``retries`` is each client's retry budget per call."""

    clients: int = 8
    calls_per_client: int = 6
    kill_after: int = 12
    num_steps: int = 10
    threads: int = 1
    retries: int = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """``shallowmark serve --config`` in its own process, on a fixed port (so it comes back at the
    same address), with its own state folder and metrics port and the shared ledger and
    attestation key."""

    def __init__(self, folder: Path, name: str, pg_url: str, attestation_key: Path, cfg: ReplicasConfig):
        self.folder, self.name, self.threads = Path(folder) / name, name, cfg.threads
        self.folder.mkdir(parents=True)
        self.port, self.metrics_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = self.folder / "server.toml"
        self.config.write_text("\n".join([
            'host = "127.0.0.1"', f"port = {self.port}", f"state_dir = {json.dumps(str(self.folder / 'state'))}",
            f"ledger_url = {json.dumps(pg_url)}", f"attestation_key = {json.dumps(str(attestation_key))}",
            f"metrics_port = {self.metrics_port}", "grace_s = 5.0",
            "[tokens]", f'"{TOKEN}" = "acme"',
            "[methods.shallow-diffuse]", f"num_steps = {cfg.num_steps}", ""]))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log = open(self.folder / f"server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "shallowmark.cli", "serve", "--config", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "OMP_NUM_THREADS": str(self.threads)})

    def wait_serving(self, timeout: float = 180.0) -> float:
        """Seconds until its health says SERVING. Raises RuntimeError if it exits or takes longer."""
        from shallowmark.client import Client

        t0 = deadline = time.monotonic()
        deadline += timeout
        with Client(self.address, TOKEN, retries=0, timeout=10) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"replica {self.name} exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    c.wait_until_ready(timeout=5)
                    return time.monotonic() - t0
                except Exception:  # noqa: BLE001 - not listening or not loaded yet
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"replica {self.name} not SERVING after {timeout:.0f} s:\n{self.tail()}")

    def metric(self, name: str, rpc: str | None = None) -> float:
        """The sum of metric ``name`` over its Watermark-service series (those of ``rpc`` only, if
        given), from this process's metrics endpoint."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and 'grpc_service="shallowmark.v1.Watermark"' in line
                   and (rpc is None or f'grpc_method="{rpc}"' in line))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def tail(self) -> str:
        self.log.flush()
        return (self.folder / f"server-{self.starts}.log").read_bytes()[-3000:].decode(errors="replace")


def run_replicas(cfg: ReplicasConfig, pg_url: str, folder: Path | None = None) -> dict:
    """Run it (see the module docstring) and return the figures; nothing is asserted here."""
    from shallowmark import WatermarkKey
    from shallowmark.client import Client

    folder = Path(folder or tempfile.mkdtemp(prefix="shallowmark-replicas-"))
    key = WatermarkKey.generate()
    a, b = (Replica(folder, n, pg_url, folder / "attestation.pem", cfg) for n in ("a", "b"))
    rep: dict = {"config": asdict(cfg)}
    acked: list[tuple[str, str]] = []          # (request id, image sha256) of every acknowledged Embed
    verified: list[bool] = []
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()
    at_kill: dict = {}

    def client(i: int) -> None:
        with Client([a.address, b.address], TOKEN, retries=cfg.retries, backoff=0.2, timeout=600) as c:
            image = None
            for j in range(cfg.calls_per_client):
                t0 = time.perf_counter()
                try:
                    if image is None or j % 2 == 0:
                        rid = f"c{i}-e{j}"
                        r = c.embed(key, seed=1000 * i + j, request_id=rid)
                        image = r.image
                        with lock:
                            acked.append((rid, r.image_sha256))
                    else:
                        v = c.verify(image, key)
                        with lock:
                            verified.append(v.detected)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        failures.append(f"client {i} call {j}: {e!r}")
                with lock:
                    latencies.append(time.perf_counter() - t0)

    def killer() -> None:
        # Not from a client thread: a client holding the lock would keep the others from sending
        # their next calls, and batched calls finish together, so A could be caught idle. Once
        # kill_after calls are answered, wait until A is working on some, then kill it.
        while len(acked) + len(verified) < cfg.kill_after and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        deadline = time.monotonic() + 120
        while (n := a.metric("shallowmark_rpc_in_flight")) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        at_kill.update(answered=len(acked) + len(verified), a_in_flight=n,
                       a_served=a.metric("shallowmark_rpc_requests_total"),
                       b_served=b.metric("shallowmark_rpc_requests_total"))
        a.kill()
        killed.set()

    try:
        a.start()
        rep["a_start_s"] = a.wait_serving()   # A makes the shared attestation key; B then reads it
        b.start()
        rep["b_start_s"] = b.wait_serving()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(cfg.clients)]
        for t in threads:
            t.start()
        kt = threading.Thread(target=killer)
        kt.start()
        for t in threads:
            t.join()
        kt.join()
        rep["load_s"] = time.perf_counter() - t0
        rep["killed"] = killed.is_set() and a.proc.returncode == -signal.SIGKILL
        rep["at_kill"] = at_kill
        rep["b_served_total"] = b.metric("shallowmark_rpc_requests_total")
        rep.update(calls=cfg.clients * cfg.calls_per_client, answered=len(acked) + len(verified),
                   failures=failures, embeds_acknowledged=len(acked), verifies=len(verified),
                   verifies_detected=sum(verified),
                   latency_s={"p50": _quantile(latencies, 0.5), "p99": _quantile(latencies, 0.99),
                              "max": max(latencies, default=float("nan"))})
        with Client(b.address, TOKEN) as c:
            entries = list(c.list_embeds())
        counts = collections.Counter(e.request_id for e in entries)
        by_rid = {e.request_id: e.image_sha256 for e in entries}
        acked_ids = {rid for rid, _ in acked}
        rep["ledger"] = {"records": len(entries), "missing": sorted(acked_ids - set(counts)),
                         "duplicated": sorted(r for r, n in counts.items() if n > 1),
                         "unacknowledged": sorted(set(counts) - acked_ids),
                         "hash_mismatch": sorted(rid for rid, sha in acked if by_rid.get(rid, sha) != sha)}
        # A rejoins: it serves on its own, and the balanced client sends it calls again
        a.start()
        rep["a_restart_s"] = a.wait_serving()
        with Client(a.address, TOKEN, retries=0) as c:
            again = c.embed(key, seed=99, request_id="after-restart")
            alone = c.verify(again.image, key).detected
        before = a.metric("shallowmark_rpc_requests_total", "Verify")
        with Client([a.address, b.address], TOKEN) as c:
            balanced = [c.verify(again.image, key).detected for _ in range(6)]
        rep["rejoin"] = {"alone_detected": alone, "balanced_detected": all(balanced), "balanced_calls": len(balanced),
                         "verifies_on_a": a.metric("shallowmark_rpc_requests_total", "Verify") - before}
    finally:
        for r in (a, b):
            r.stop()
    return rep


def _quantile(values, q: float) -> float:
    import numpy as np

    return float(np.quantile(values, q)) if values else float("nan")


def render(rep: dict) -> str:
    c, k, led, rj = rep["config"], rep.get("at_kill", {}), rep["ledger"], rep["rejoin"]
    lat = rep["latency_s"]
    return "\n".join([
        "# Replicas on one PostgreSQL ledger, one SIGKILLed under load", "",
        "Command: `python -m shallowmark.server.replicas --pg-url URL --out docs/reliability/replicas`", "",
        f"Two `shallowmark serve` processes on loopback (tiny-ldm, shallow-diffuse at {c['num_steps']} steps, "
        f"{c['threads']} torch thread(s) each), one PostgreSQL ledger, {c['clients']} client threads with both "
        f"addresses (round_robin, client-side health checking, {c['retries']} retries per call), "
        f"{c['calls_per_client']} calls each, Embed and Verify alternating. Replica A was SIGKILLed after "
        f"{k.get('answered', '?')} answered calls, with {k.get('a_in_flight', float('nan')):.0f} Watermark "
        f"calls in flight on it (it had finished {k.get('a_served', float('nan')):.0f}, B "
        f"{k.get('b_served', float('nan')):.0f}).", "",
        "| figure | value |", "|---|---|",
        f"| calls made / answered OK | {rep['calls']} / {rep['answered']} |",
        f"| calls failed (beyond the retry policy) | {len(rep['failures'])} |",
        f"| Embeds acknowledged | {rep['embeds_acknowledged']} |",
        f"| Verifies detected | {rep['verifies_detected']} of {rep['verifies']} |",
        f"| ledger records | {led['records']} |",
        f"| acknowledged but missing / duplicated / recorded but never acknowledged / wrong hash | "
        f"{len(led['missing'])} / {len(led['duplicated'])} / {len(led['unacknowledged'])} / {len(led['hash_mismatch'])} |",
        f"| latency per call, p50 / p99 / max (s, retries included) | {lat['p50']:.2f} / {lat['p99']:.2f} / {lat['max']:.2f} |",
        f"| start to SERVING: A, B, A again (s) | {rep['a_start_s']:.1f}, {rep['b_start_s']:.1f}, {rep['a_restart_s']:.1f} |",
        f"| A restarted: its own Embed + Verify detected | {rj['alone_detected']} |",
        f"| then {rj['balanced_calls']} balanced Verifies: detected / served by A | {rj['balanced_detected']} / {rj['verifies_on_a']:.0f} |",
        "", "Failures: " + ("none" if not rep["failures"] else "; ".join(rep["failures"])), ""])


def main(argv=None) -> int:
    from shallowmark.reports import write_report

    p = argparse.ArgumentParser(description="replicas on one PostgreSQL ledger, one SIGKILLed under load")
    p.add_argument("--pg-url", required=True, help="an empty PostgreSQL database for the run's ledger")
    p.add_argument("--out", required=True)
    for f, v in asdict(ReplicasConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=int, default=v)
    a = p.parse_args(argv)
    cfg = ReplicasConfig(**{f: getattr(a, f) for f in asdict(ReplicasConfig())})
    rep = run_replicas(cfg, a.pg_url)
    write_report(a.out, rep, render(rep))
    print(render(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
