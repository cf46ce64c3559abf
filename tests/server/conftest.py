"""A real gRPC server on a free localhost port, tiny-ldm with 10 DDIM steps, two tenants.

The backend is the session's ``tiny_ldm`` fixture (loaded once), handed to the server through its
``backend_loader`` hook; everything else (gRPC, auth, validation, ledger, signing) is the real thing.
"""

from __future__ import annotations

import contextlib

import pytest

TOKEN_A = "token-for-tenant-a"
TOKEN_B = "token-for-tenant-b"
STEPS = {m: {"num_steps": 10} for m in ("shallow-diffuse", "tree-ring", "ringid")}
STEPS["gaussian-shading"] = {"num_steps": 10}


def make_config(tmp_path, **kw):
    from shallowmark.server.config import ServerConfig, token_digest

    base = dict(host="127.0.0.1", port=0, tokens={TOKEN_A: "a", token_digest(TOKEN_B): "b"},
                state_dir=tmp_path, method_options=STEPS, max_message_bytes=4 * 1024 * 1024, grace_s=1.0,
                workers=4)
    base.update(kw)
    return ServerConfig(**base)


@pytest.fixture(scope="session", name="make_config")
def make_config_fixture():
    """``make_config(tmp_path, **overrides)``: the test server's ServerConfig."""
    return make_config


@pytest.fixture(scope="session")
def token_a():
    return TOKEN_A


@pytest.fixture(scope="session")
def loader(tiny_ldm):
    def load(name, **options):
        assert name == "tiny-ldm"
        return tiny_ldm

    return load


@pytest.fixture(scope="session")
def running_server(loader):
    """``running_server(tmp_path, **overrides)``: a context manager around a real server on a free
    port (:func:`make_config`), ready to serve, stopped on exit."""

    @contextlib.contextmanager
    def run(tmp_path, **overrides):
        from shallowmark.server.app import ServerApp

        app = ServerApp(make_config(tmp_path, **overrides), backend_loader=loader).start()
        try:
            assert app.wait_until_ready(120)
            yield app
        finally:
            app.stop(1.0)

    return run


@pytest.fixture(scope="session")
def server(tmp_path_factory, running_server):
    with running_server(tmp_path_factory.mktemp("server")) as app:
        yield app


@pytest.fixture(scope="session")
def client_a(server):
    from shallowmark.client import Client

    with Client(server.address, TOKEN_A, timeout=120, retries=0) as c:
        yield c


@pytest.fixture(scope="session")
def client_b(server):
    from shallowmark.client import Client

    with Client(server.address, TOKEN_B, timeout=120, retries=0) as c:
        yield c


@pytest.fixture(scope="session")
def keys():
    from shallowmark.keys import WatermarkKey

    # Fixed keys: a test run must not depend on the draw (a random draw made one round trip flaky).
    return [WatermarkKey.from_hex(f"{0xA11CE + i:064x}", label=f"k{i}") for i in range(3)]


@pytest.fixture(scope="session")
def embedded(client_a, keys):
    """One shallow-diffuse image generated for keys[0] by tenant a."""
    return client_a.embed(keys[0], method="shallow-diffuse", seed=7)


# -- a real PostgreSQL for the ledger tests ----------------------------------------------------------

_PG_BINARIES = ("initdb", "pg_ctl", "postgres")


def _pg_bin_dir():
    """A folder holding initdb, pg_ctl and postgres: $SHALLOWMARK_TEST_PG_BIN, the PATH, Debian's
    /usr/lib/postgresql/<version>/bin, or the binaries bundled in the ``pgserver`` wheel (dev extra)."""
    import importlib.util
    import os
    import shutil
    from pathlib import Path

    candidates = []
    if os.environ.get("SHALLOWMARK_TEST_PG_BIN"):
        candidates.append(Path(os.environ["SHALLOWMARK_TEST_PG_BIN"]))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)  # follows /usr/local/bin symlinks
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    spec = importlib.util.find_spec("pgserver")  # located, not imported: importing it sets up lock files
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin")
    for d in candidates:
        if all(os.access(d / b, os.X_OK) for b in _PG_BINARIES):
            return d
    return None


class _PgCluster:
    """A throwaway PostgreSQL cluster in a temp folder, reached over a unix socket only (no TCP port).

    PostgreSQL refuses to run as root, so under root the cluster runs as the ``postgres`` system
    user (or ``nobody``); root can still reach the socket.
    """

    def __init__(self, bin_dir):
        import os
        import pwd
        import subprocess
        import tempfile
        from pathlib import Path

        self.bin = bin_dir
        self.run_as: dict = {}
        # in /tmp, not pytest's tmp_path: that lives under a 0700 root folder the postgres user cannot enter
        self.root = Path(tempfile.mkdtemp(prefix="shallowmark-pg-"))
        self.data, self.sock, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self.sock.mkdir()
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    pw = pwd.getpwnam(name)
                except KeyError:
                    continue
                self.run_as = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
                for p in (self.root, self.sock):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
                break
            else:
                raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")
        self._sp = subprocess
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        # -F: no fsync (a test cluster); only the unix socket (listen_addresses empty)
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start",
                 "-o", f"-F -k {self.sock} -c listen_addresses='' -c max_connections=40 -c shared_buffers=16MB")
        self._n = 0

    def _pg(self, tool, *args):
        r = self._sp.run([str(self.bin / tool), *args], capture_output=True, text=True, timeout=120,
                         cwd=self.root, **self.run_as)
        if r.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({r.returncode}): {r.stderr or r.stdout}\n{log}")

    def url(self, dbname="postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.sock}"

    def new_database(self) -> str:
        """A fresh empty database; returns its URL (each test gets its own, so no state leaks)."""
        import psycopg

        self._n += 1
        name = f"t{self._n}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        import shutil

        try:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL cluster started once per test session (per xdist worker) and stopped at the end."""
    pytest.importorskip("psycopg", reason="psycopg is in the 'server' extra: pip install -e '.[server]'")
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries: install Debian's postgresql, or pgserver (in the 'dev' extra), "
                    "or point SHALLOWMARK_TEST_PG_BIN at a folder with initdb, pg_ctl and postgres")
    cluster = _PgCluster(bin_dir)
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster):
    """URL of a fresh database in the session's cluster."""
    return pg_cluster.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    """Each ledger contract test runs on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return request.getfixturevalue("pg_url")
