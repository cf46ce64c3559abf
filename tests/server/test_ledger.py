"""The embed ledger: one contract, run against SQLite and a real PostgreSQL (see ``pg_cluster`` in conftest),
plus what only PostgreSQL has (reconnects, several replicas on one database) and a server on it."""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timedelta, timezone

import pytest

from shallowmark.errors import InvalidParameterError
from shallowmark.server.ledger import LedgerError, PostgresLedger, SQLiteLedger, open_ledger

KEY_A = "sm1_" + "a" * 32
KEY_B = "sm1_" + "b" * 32
COLUMNS = {"id", "tenant", "key_id", "method", "model", "image_sha256", "created_at", "request_id", "source",
           "link", "config_sha256"}


def _write_at_once(ledgers, n: int) -> None:
    """Each ledger records ``n`` embeds of tenant "c" from a thread of its own, all at once."""
    writers = [threading.Thread(target=lambda led=led, t=t: [_rec(led, "c", 100 * t + i) for i in range(n)])
               for t, led in enumerate(ledgers, 1)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()


def _rec(ledger, tenant, i, key=KEY_A, **kw):
    args = dict(tenant=tenant, key_id=key, method="shallow-diffuse", model="tiny-ldm", image_sha256=f"{i:064x}",
                request_id=f"r{i}", source="generate", created_at=datetime(2025, 1, 1, tzinfo=timezone.utc))
    args.update(kw)
    return ledger.record(**args)


def _raw_table(url: str) -> tuple[list[str], list[tuple]]:
    """Column names (in the table's order, which differs between a new and a migrated table) and
    every row, read straight from the database (not through the ledger)."""
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url[len("sqlite:///"):])
        cur = db.execute("SELECT * FROM embeds")
        out = [d[0] for d in cur.description], cur.fetchall()
        db.close()
        return out
    import psycopg

    with psycopg.connect(url) as db:
        cur = db.execute("SELECT * FROM shallowmark_embeds")
        return [d.name for d in cur.description], cur.fetchall()


def _configs_of(led, key_id, method, model):
    """``led.configs`` for one key."""
    return led.configs([(key_id, method)], model)[(key_id, method)]


def _config(tag: str) -> dict:
    """record() arguments for a method configuration ``{"<tag>": 1}``."""
    import hashlib

    text = f'{{"{tag}":1}}'
    return dict(config=text, config_sha256=hashlib.sha256(text.encode()).hexdigest())


# -- the contract, on both backends ----------------------------------------------------------------


def test_pages_scopes_and_dedupes(ledger_url):
    led = open_ledger(ledger_url)
    for i in range(5):
        assert _rec(led, "a", i)
    assert not _rec(led, "a", 4)          # same request id, same embed: a retry, recorded once
    with pytest.raises(InvalidParameterError, match="already used for a different embed"):
        led.record(tenant="a", key_id=KEY_B, method="tree-ring", model="tiny-ldm",
                   image_sha256="f" * 64, request_id="r4", source="generate")
    assert _rec(led, "b", 4)              # another tenant may reuse the id
    page1, tok = led.list("a", page_size=2)
    page2, tok2 = led.list("a", page_size=2, page_token=tok)
    page3, tok3 = led.list("a", page_size=2, page_token=tok2)
    ids = [e.request_id for e in page1 + page2 + page3]
    assert ids == ["r4", "r3", "r2", "r1", "r0"] and tok and tok2 and tok3 == ""
    assert {e.tenant for e in page1 + page2 + page3} == {"a"}
    assert [e.request_id for e in led.list("b")[0]] == ["r4"]
    assert page1[0].created_at == datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert page1[0].image_sha256 == f"{4:064x}" and page1[0].method == "shallow-diffuse"
    assert led.count() == 6 and led.count("a") == 5 and led.count("nobody") == 0
    led.close()


def test_key_filter_page_bounds_and_bad_cursors(ledger_url):
    led = open_ledger(ledger_url)
    for i in range(6):
        _rec(led, "a", i, key=KEY_A if i % 2 else KEY_B)
    entries, tok = led.list("a", key_id=KEY_A, page_size=2)
    rest, tok2 = led.list("a", key_id=KEY_A, page_size=2, page_token=tok)
    assert [e.request_id for e in entries + rest] == ["r5", "r3", "r1"] and tok2 == ""
    assert led.list("a", key_id="sm1_" + "c" * 32) == ([], "")
    assert len(led.list("a", page_size=1000)[0]) == 6
    for bad in (0, 1001):
        with pytest.raises(InvalidParameterError, match="page_size"):
            led.list("a", page_size=bad)
    for bad in ("garbage!", "djI6NQ", ""):  # not base64 / another version tag / empty means "first page"
        if bad:
            with pytest.raises(InvalidParameterError, match="page_token"):
                led.list("a", page_token=bad)
    assert len(led.list("a", page_token="")[0]) == 6
    led.close()


def test_each_embed_records_its_method_configuration(ledger_url):
    """The configuration an image was embedded with is kept per record (its digest in the hash chain,
    the text once per digest), and ``configs`` returns, for one key, method and model, each one it
    was embedded with, of any tenant."""
    from shallowmark.server.ledger import LedgerIntegrityError

    led = open_ledger(ledger_url)
    x, y = _config("x"), _config("y")
    assert _rec(led, "a", 1, **x) and _rec(led, "b", 2, **x) and _rec(led, "a", 3, **y)
    assert _rec(led, "a", 4)                                   # no configuration: as older versions wrote
    assert _rec(led, "a", 5, key=KEY_B, **y) and _rec(led, "a", 6, model="other", **x)
    found = _configs_of(led, KEY_A, "shallow-diffuse", "tiny-ldm")
    assert sorted(found, key=lambda c: c[0] or "") == [(None, None), (x["config_sha256"], x["config"]),
                                                       (y["config_sha256"], y["config"])]
    assert _configs_of(led, KEY_B, "shallow-diffuse", "tiny-ldm") == [(y["config_sha256"], y["config"])]
    assert _configs_of(led, KEY_A, "tree-ring", "tiny-ldm") == [] and _configs_of(led, "sm1_" + "c" * 32, "x", "y") == []
    many = [(f"sm1_{i:032x}", "shallow-diffuse") for i in range(1200)] + [(KEY_B, "shallow-diffuse")]
    got = led.configs(many, "tiny-ldm")   # one call for many keys (three queries of at most 500)
    assert got[(KEY_B, "shallow-diffuse")] == [(y["config_sha256"], y["config"])]
    assert len(got) == 1201 and sum(map(len, got.values())) == 1
    assert not _rec(led, "a", 1, **x)                          # a retry, recorded once
    assert not _rec(led, "a", 4, **x)   # a retry of an embed an older version (or replica) recorded without one
    with pytest.raises(InvalidParameterError, match="already used"):
        _rec(led, "a", 1, **y)                                 # the same request id under another configuration
    with pytest.raises(InvalidParameterError, match="not the SHA-256"):
        _rec(led, "a", 7, config='{"x":1}', config_sha256="0" * 64)
    with pytest.raises(InvalidParameterError, match="pass both or neither"):
        _rec(led, "a", 7, config='{"x":1}')
    assert led.count() == 6
    led.close()

    t = _table(ledger_url)
    _raw_exec(ledger_url, f"UPDATE {t} SET config_sha256 = '{y['config_sha256']}' WHERE request_id = 'r1'")
    with pytest.raises(LedgerIntegrityError, match="does not match"):   # the digest is in the chain
        open_ledger(ledger_url)
    _raw_exec(ledger_url, f"UPDATE {t} SET config_sha256 = '{x['config_sha256']}' WHERE request_id = 'r1'")
    configs = "method_configs" if ledger_url.startswith("sqlite:///") else "shallowmark_method_configs"
    _raw_exec(ledger_url, f"UPDATE {configs} SET config = '{{\"x\":2}}' WHERE config_sha256 = '{x['config_sha256']}'")
    led = open_ledger(ledger_url)   # the text sits outside the chain; it is checked against its digest when read
    with pytest.raises(LedgerIntegrityError, match="does not match its digest"):
        _configs_of(led, KEY_A, "shallow-diffuse", "tiny-ldm")
    assert _configs_of(led, KEY_B, "shallow-diffuse", "tiny-ldm") == [(y["config_sha256"], y["config"])]
    led.close()


def test_a_ledger_from_before_configurations_is_migrated_with_its_chain(ledger_url, caplog):
    """A ledger of the version before per-embed configurations (hash chain, no configuration column
    or table) opens with every record, gains both, and its old records stand for "unrecorded"."""
    _filled(ledger_url, 4)
    t = _table(ledger_url)
    configs = "method_configs" if ledger_url.startswith("sqlite:///") else "shallowmark_method_configs"
    index = "embeds_key" if ledger_url.startswith("sqlite:///") else "shallowmark_embeds_key"
    _raw_exec(ledger_url, f"DROP INDEX {index}", f"ALTER TABLE {t} DROP COLUMN config_sha256", f"DROP TABLE {configs}")
    with caplog.at_level("WARNING", logger="shallowmark.server"):
        led = open_ledger(ledger_url)
    assert "adopt" not in caplog.text and "link" not in caplog.text   # the chain is kept as it was
    assert led.count() == 4 and _configs_of(led, KEY_A, "shallow-diffuse", "tiny-ldm") == [(None, None)]
    x = _config("x")
    assert _rec(led, "a", 9, **x)
    led.close()
    led = open_ledger(ledger_url)   # and the chain over old and new records verifies
    assert sorted(_configs_of(led, KEY_A, "shallow-diffuse", "tiny-ldm"), key=lambda c: c[0] or "") == \
        [(None, None), (x["config_sha256"], x["config"])]
    led.close()


def test_times_are_utc_to_the_microsecond(ledger_url):
    led = open_ledger(ledger_url)
    paris = timezone(timedelta(hours=2))
    when = datetime(2025, 6, 1, 14, 30, 5, 123456, tzinfo=paris)
    _rec(led, "a", 1, created_at=when)
    before = datetime.now(timezone.utc)
    led.record(tenant="a", key_id=KEY_A, method="ringid", model="tiny-ldm", image_sha256="e" * 64,
               request_id="now", source="image")
    (now, old), _ = led.list("a")
    assert old.created_at == when and old.created_at.tzinfo == timezone.utc and old.created_at.hour == 12
    assert now.created_at.tzinfo == timezone.utc
    assert before - timedelta(seconds=1) <= now.created_at <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert now.source == "image" and now.method == "ringid"
    led.close()


def test_survives_reopen_and_concurrent_writers(ledger_url):
    led = open_ledger(ledger_url)
    errors = []

    def writer(t):
        try:
            for i in range(20):
                _rec(led, f"t{t % 2}", 1000 * t + i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and led.count() == 120
    led.close()
    again = open_ledger(ledger_url)   # the schema is created once; the rows are still there
    assert again.count("t0") == 60 and again.count("t1") == 60
    assert not _rec(again, "t0", 0)   # and a retry after a restart is still recognised
    cols, rows = _raw_table(ledger_url)
    assert set(cols) == COLUMNS and len(rows) == 120
    again.close()


# -- PostgreSQL only -------------------------------------------------------------------------------


def test_open_ledger_picks_the_backend(pg_url, tmp_path):
    assert isinstance(open_ledger(pg_url), PostgresLedger)
    assert isinstance(open_ledger(pg_url.replace("postgresql://", "postgres://", 1)), PostgresLedger)
    assert isinstance(open_ledger(f"sqlite:///{tmp_path / 'x.sqlite3'}"), SQLiteLedger)
    assert isinstance(open_ledger(str(tmp_path / "plain.sqlite3")), SQLiteLedger)
    with pytest.raises(InvalidParameterError, match="scheme"):
        open_ledger("mysql://db")


def test_unreachable_or_malformed_postgres_is_a_clear_error_without_the_password(pg_cluster, tmp_path):
    with pytest.raises(LedgerError) as e:
        open_ledger(f"postgresql://alice:hunter2@/db?host={tmp_path}&connect_timeout=2")  # no server there
    assert "cannot open the ledger postgresql://alice@" in str(e.value) and "hunter2" not in str(e.value)
    with pytest.raises(LedgerError, match="does not exist"):
        open_ledger(pg_cluster.url("no_such_database"))
    with pytest.raises(InvalidParameterError, match="not a valid PostgreSQL URL") as e:
        open_ledger("postgresql://alice:hunter2@host/db?nonsense=1")
    assert "hunter2" not in str(e.value)


def test_reconnects_after_the_connection_is_dropped(pg_url):
    import psycopg

    led = open_ledger(pg_url)
    _rec(led, "a", 1)
    with psycopg.connect(pg_url, autocommit=True) as admin:   # as a database restart or an idle kill would
        n = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    assert len(n) == 1
    assert _rec(led, "a", 2)                  # reconnected and written
    assert [e.request_id for e in led.list("a")[0]] == ["r2", "r1"]
    led.close()


def test_two_replicas_share_one_database(pg_url):
    one, two = open_ledger(pg_url), open_ledger(pg_url)   # two servers, one database
    assert _rec(one, "a", 1)
    assert not _rec(two, "a", 1)              # a retry that reached the other replica: still once
    with pytest.raises(InvalidParameterError, match="already used"):
        _rec(two, "a", 1, image_sha256="0" * 64)
    assert _rec(two, "a", 2)
    assert [e.request_id for e in one.list("a")[0]] == ["r2", "r1"] and one.count() == 2
    # both writing at once: the head row's lock orders their inserts, so the one chain still verifies
    _write_at_once((one, two), 25)
    one.close()
    two.close()
    again = open_ledger(pg_url)
    assert again.count() == 52
    again.close()


# -- a server on PostgreSQL ------------------------------------------------------------------------


def test_server_on_postgres_records_embeds_per_tenant(tmp_path, pg_url, loader, make_config, keys):
    import grpc

    from shallowmark.client import Client, ServerError
    from shallowmark.server.app import ServerApp
    from shallowmark.server.config import load_config

    (tmp_path / "server.toml").write_text(f'ledger_url = "{pg_url}"\n')
    assert load_config(tmp_path / "server.toml").resolved_ledger_url() == pg_url   # a URL is kept as written
    app = ServerApp(make_config(tmp_path, ledger_url=pg_url), backend_loader=loader).start()
    try:
        assert isinstance(app.ledger, PostgresLedger) and app.wait_until_ready(120)
        assert not (tmp_path / "ledger.sqlite3").exists()
        with Client(app.address, "token-for-tenant-a", timeout=120, retries=0) as a, \
                Client(app.address, "token-for-tenant-b", timeout=120, retries=0) as b:
            out = a.embed(keys[0], seed=3, prompt="a private prompt", request_id="pg-embed-1")
            mine = list(a.list_embeds())
            assert [(e.tenant, e.image_sha256, e.key_id, e.request_id) for e in mine] == \
                [("a", out.image_sha256, keys[0].key_id_for("shallow-diffuse"), "pg-embed-1")]
            assert list(b.list_embeds()) == []
            with pytest.raises(ServerError) as e:
                list(b.list_embeds(tenant="a"))
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert a.embed(keys[0], seed=3, prompt="a private prompt", request_id="pg-embed-1").image_sha256 \
                == out.image_sha256   # a retry: recorded once
    finally:
        app.stop(1.0)
    cols, rows = _raw_table(pg_url)
    assert set(cols) == COLUMNS and len(rows) == 1
    dump = repr(rows)
    mk = keys[0].for_method("shallow-diffuse")
    for secret in ("token-for-tenant-a", "private prompt", mk.to_bytes().hex(), keys[0].to_hex()):
        assert secret not in dump


def test_a_role_with_only_select_insert_and_the_head_update_can_run_the_ledger(pg_url):
    import psycopg

    open_ledger(pg_url).close()   # first start, by a role that may create the tables
    role = "rw_" + pg_url.split("/")[3].split("?")[0]   # roles are per cluster: one per test database
    as_role = pg_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT SELECT, INSERT ON shallowmark_embeds TO {role}")
        with pytest.raises(LedgerError, match=f"GRANT SELECT, UPDATE ON shallowmark_ledger_head TO {role}"):
            open_ledger(as_role)   # refused at start, not at the first embed
        admin.execute(f"GRANT SELECT, UPDATE ON shallowmark_ledger_head TO {role}")
        with pytest.raises(LedgerError, match=f"GRANT SELECT, INSERT ON shallowmark_method_configs TO {role}"):
            open_ledger(as_role)
        admin.execute(f"GRANT SELECT, INSERT ON shallowmark_method_configs TO {role}")
    led = open_ledger(as_role)
    assert _rec(led, "a", 1) and not _rec(led, "a", 1) and led.count("a") == 1
    assert _rec(led, "a", 2, **_config("x")) and _configs_of(led, KEY_A, "shallow-diffuse", "tiny-ldm")[-1][1] == '{"x":1}'
    led.close()
    open_ledger(pg_url).close()   # and the chain it wrote verifies


# -- integrity: acknowledged records are never lost silently (issues 9-11) -----------------------------

# The schemas of the version before the hash chain, to make "old" ledgers with.
_OLD_SQLITE_SCHEMA = """
CREATE TABLE embeds (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, key_id TEXT NOT NULL,
    method TEXT NOT NULL, model TEXT NOT NULL, image_sha256 TEXT NOT NULL, created_at TEXT NOT NULL,
    request_id TEXT NOT NULL, source TEXT NOT NULL, UNIQUE (tenant, request_id));
CREATE INDEX embeds_tenant_id ON embeds (tenant, id);
CREATE INDEX embeds_sha ON embeds (image_sha256);
"""
_OLD_PG_SCHEMA = """
CREATE TABLE shallowmark_embeds (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tenant TEXT NOT NULL,
    key_id TEXT NOT NULL, method TEXT NOT NULL, model TEXT NOT NULL, image_sha256 TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL, request_id TEXT NOT NULL, source TEXT NOT NULL, UNIQUE (tenant, request_id));
"""


def _raw_exec(url: str, *statements: str) -> None:
    """Run statements straight on the database (as an operator, or damage, would)."""
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
        for sql in statements:
            db.execute(sql)
        db.close()
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        for sql in statements:
            db.execute(sql)


def _table(url: str) -> str:
    return "embeds" if url.startswith("sqlite:///") else "shallowmark_embeds"


def _filled(url: str, n: int) -> None:
    led = open_ledger(url)
    for i in range(n):
        assert _rec(led, "a" if i % 3 else "b", i)
    led.close()


def _overwrite_page(path, page: int) -> None:
    """Overwrite SQLite page ``page`` (1-based) with a pattern that is no valid b-tree page."""
    db = sqlite3.connect(path)
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\xde\xad\xbe\xef" * (size // 4))


def _root_page(path, name="embeds") -> int:
    db = sqlite3.connect(path)
    page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
    db.close()
    return page


def _no_models(name, **options):
    raise AssertionError("these tests load no model")


def test_a_ledger_truncated_to_zero_bytes_is_refused_and_not_served(tmp_path, make_config):
    from shallowmark.server.app import ServerApp
    from shallowmark.server.ledger import LedgerIntegrityError

    path = tmp_path / "ledger.sqlite3"   # the server's default ledger in its state folder
    _filled(f"sqlite:///{path}", 42)
    path.write_bytes(b"")
    with pytest.raises(LedgerIntegrityError) as e:
        ServerApp(make_config(tmp_path), backend_loader=_no_models)
    msg = str(e.value)
    assert "is empty (0 bytes), but 42 records were acknowledged" in msg
    assert "42 acknowledged records are missing" in msg
    assert "ledger.sqlite3.head" in msg and "backup" in msg and "move" in msg   # what the operator can do
    assert path.stat().st_size == 0   # nothing was written to it
    path.unlink()
    with pytest.raises(LedgerIntegrityError, match="does not exist, but its head record"):
        open_ledger(str(path))
    assert not path.exists()   # and no empty ledger was created in its place


def test_a_ledger_with_a_garbage_data_page_is_refused_and_not_served(tmp_path, make_config):
    from shallowmark.server.app import ServerApp
    from shallowmark.server.ledger import LedgerIntegrityError

    path = tmp_path / "ledger.sqlite3"
    _filled(f"sqlite:///{path}", 42)
    _overwrite_page(path, _root_page(path))
    with pytest.raises(LedgerIntegrityError) as e:
        ServerApp(make_config(tmp_path), backend_loader=_no_models)
    assert "ledger.sqlite3 is corrupt (" in str(e.value)
    assert "restore the ledger from the last good backup" in str(e.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "l.sqlite3").write_bytes(b"garbage, not a database" * 200)
    with pytest.raises(LedgerIntegrityError, match="is corrupt .file is not a database"):
        open_ledger(str(tmp_path / "other" / "l.sqlite3"))


_KILLED_WRITER = """
import os, signal, sys
from datetime import datetime, timezone
from shallowmark.server.ledger import open_ledger

led = open_ledger(sys.argv[1])
led._db.execute("PRAGMA wal_autocheckpoint=0")   # keep every commit in the -wal, as a busy server would
for i in range(int(sys.argv[2])):
    led.record(tenant="a", key_id="sm1_" + "a" * 32, method="shallow-diffuse", model="tiny-ldm",
               image_sha256=f"{i:064x}", request_id=f"r{i}", source="generate")
os.kill(os.getpid(), signal.SIGKILL)   # no close, no checkpoint: the records are only in the -wal
"""


def _killed_writer(path, n: int) -> None:
    import signal
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, f"sqlite:///{path}", str(n)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert path.with_name(path.name + "-wal").stat().st_size > 100 * 4096


def test_garbage_in_the_wal_after_a_kill_is_refused_with_the_number_missing(tmp_path):
    import shutil

    from shallowmark.server.ledger import LedgerIntegrityError

    path = tmp_path / "ledger.sqlite3"
    wal = path.with_name(path.name + "-wal")
    _killed_writer(path, 200)
    with open(wal, "r+b") as f:
        f.seek(wal.stat().st_size // 2)
        f.write(bytes(range(256)) * 16)   # 4 KiB of garbage in the middle
    # what SQLite itself still reads (on copies: opening the ledger must not change the originals)
    (tmp_path / "copy").mkdir()
    for p in (path, wal):
        shutil.copy(p, tmp_path / "copy" / p.name)
    readable = sqlite3.connect(tmp_path / "copy" / path.name).execute("SELECT COUNT(*) FROM embeds").fetchone()[0]
    assert 0 < readable < 200   # SQLite silently drops the frames after the bad one
    before = wal.read_bytes()
    with pytest.raises(LedgerIntegrityError) as e:
        open_ledger(f"sqlite:///{path}")
    assert f"holds {readable} hash-chained records, but 200 records were acknowledged" in str(e.value)
    assert f"{200 - readable} acknowledged records are missing" in str(e.value)
    assert "-wal" in str(e.value)
    assert wal.read_bytes() == before   # the damaged -wal is kept as found, not checkpointed or reset
    with pytest.raises(LedgerIntegrityError, match=f"{200 - readable} acknowledged records are missing"):
        open_ledger(f"sqlite:///{path}")   # and refused again, every start


def test_a_healthy_ledger_restarts_with_every_record(tmp_path):
    from shallowmark.server.ledger import head_path

    path = tmp_path / "ledger.sqlite3"
    _killed_writer(path, 150)                      # killed: the records are in the -wal only
    led = open_ledger(f"sqlite:///{path}")
    assert led.count() == 150 and not _rec(led, "a", 149)   # a retry of an acknowledged embed is still known
    assert _rec(led, "b", 1000)
    led.close()                                    # a clean stop
    led = open_ledger(f"sqlite:///{path}")
    assert led.count() == 151 and [e.request_id for e in led.list("b")[0]] == ["r1000"]
    led.close()
    head = head_path(path).read_text()
    assert '"count": 151' in head
    assert oct(head_path(path).stat().st_mode & 0o777) == "0o600"
    # a head record that lags by one (killed between the commit and the head update): kept, head caught up
    led = open_ledger(f"sqlite:///{path}")
    led._head_file = None                          # the next insert does not reach the head record
    assert _rec(led, "b", 1001)
    led.close()
    assert head_path(path).read_text() == head
    led = open_ledger(f"sqlite:///{path}")
    assert led.count() == 152 and '"count": 152' in head_path(path).read_text()
    led.close()


def test_a_damaged_head_record_is_refused(tmp_path):
    from shallowmark.server.ledger import LedgerIntegrityError, head_path

    path = tmp_path / "ledger.sqlite3"
    _filled(f"sqlite:///{path}", 3)
    for damage in (b"", b'{"format": "shallowmark-ledger-head/1", "count": 1, "head": "00"}'):
        head_path(path).write_bytes(damage)
        with pytest.raises(LedgerIntegrityError, match="head record .* is damaged"):
            open_ledger(f"sqlite:///{path}")
    head_path(path).unlink()                       # the operator's way out: adopt the ledger as it is
    led = open_ledger(f"sqlite:///{path}")
    assert led.count() == 3
    led.close()


def test_a_deleted_record_is_refused(ledger_url):
    from shallowmark.server.ledger import LedgerIntegrityError

    t = _table(ledger_url)
    _filled(ledger_url, 6)
    _raw_exec(ledger_url, f"DELETE FROM {t} WHERE request_id = 'r5'")          # the newest one
    with pytest.raises(LedgerIntegrityError, match="holds 5 hash-chained records, but 6 records were acknowledged .*"
                                                   "1 acknowledged record is missing"):
        open_ledger(ledger_url)
    _raw_exec(ledger_url, f"DELETE FROM {t} WHERE request_id = 'r2'")          # one in the middle
    with pytest.raises(LedgerIntegrityError, match=r"record id 4 \(number 3 of the hash chain\) does not match"):
        open_ledger(ledger_url)


def test_a_changed_record_is_refused(ledger_url):
    from shallowmark.server.ledger import LedgerIntegrityError

    _filled(ledger_url, 4)
    _raw_exec(ledger_url, f"UPDATE {_table(ledger_url)} SET key_id = '{KEY_B}' WHERE request_id = 'r1'")
    with pytest.raises(LedgerIntegrityError, match=r"record id 2 .* was changed"):
        open_ledger(ledger_url)


def test_a_ledger_made_by_an_older_version_is_adopted(ledger_url, caplog):
    from shallowmark.server.ledger import LedgerIntegrityError

    sqlite = ledger_url.startswith("sqlite:///")
    t = _table(ledger_url)
    when = "'2025-01-01T00:00:00.000000+00:00'"
    _raw_exec(ledger_url, *(_OLD_SQLITE_SCHEMA if sqlite else _OLD_PG_SCHEMA).split(";")[:-1],
              *(f"INSERT INTO {t} (tenant, key_id, method, model, image_sha256, created_at, request_id, source) "
                f"VALUES ('a', '{KEY_A}', 'tree-ring', 'tiny-ldm', '{i:064x}', {when}, 'old{i}', 'image')"
                for i in range(5)))
    with caplog.at_level("WARNING", logger="shallowmark.server"):
        led = open_ledger(ledger_url)
    assert "adopt" in caplog.text and "older version" in caplog.text
    assert led.count() == 5 and [e.request_id for e in led.list("a")[0]][-1] == "old0"
    assert not led.record(tenant="a", key_id=KEY_A, method="tree-ring", model="tiny-ldm", image_sha256=f"{0:064x}",
                          request_id="old0", source="image", created_at=datetime(2025, 1, 1, tzinfo=timezone.utc))
    assert _rec(led, "a", 9)
    led.close()
    cols, rows = _raw_table(ledger_url)
    assert set(cols) == COLUMNS and len(rows) == 6 and all(r[cols.index("link")] for r in rows)   # every record linked now
    caplog.clear()
    with caplog.at_level("WARNING", logger="shallowmark.server"):
        open_ledger(ledger_url).close()
    assert "adopt" not in caplog.text and "link" not in caplog.text   # adopted once
    _raw_exec(ledger_url, f"DELETE FROM {t} WHERE request_id = 'old1'")
    with pytest.raises(LedgerIntegrityError, match="does not match"):   # and the adopted records are protected
        open_ledger(ledger_url)


def test_corruption_at_run_time_is_data_loss_and_not_retried(tmp_path, make_config, loader, keys, caplog):
    import grpc

    from shallowmark.client import Client, ServerError
    from shallowmark.server.app import ServerApp
    from shallowmark.server.ledger import LedgerIntegrityError

    path = tmp_path / "ledger.sqlite3"
    _filled(f"sqlite:///{path}", 42)
    led = open_ledger(f"sqlite:///{path}")         # checked and open; then the file is damaged under it
    _overwrite_page(path, _root_page(path))
    with pytest.raises(LedgerIntegrityError, match="ledger is corrupt .database disk image is malformed"):
        _rec(led, "a", 100)
    led.close()

    _filled(f"sqlite:///{tmp_path / 's' / 'ledger.sqlite3'}", 42)
    app = ServerApp(make_config(tmp_path / "s"), backend_loader=loader).start()
    try:
        assert app.wait_until_ready(120)
        _overwrite_page(tmp_path / "s" / "ledger.sqlite3", _root_page(tmp_path / "s" / "ledger.sqlite3"))
        with Client(app.address, "token-for-tenant-a", timeout=120, retries=6, backoff=0.1) as c, \
                caplog.at_level("INFO", logger="shallowmark.server"):
            calls = (("Embed", lambda: c.embed(keys[0], seed=3)), ("ListEmbeds", lambda: list(c.list_embeds())))
            for rpc, call in calls:
                with pytest.raises(ServerError) as e:
                    call()
                assert e.value.code == grpc.StatusCode.DATA_LOSS and "retrying will not help" in e.value.details
                assert "corrupt" in e.value.details and str(tmp_path) not in e.value.details   # no server path
                assert caplog.text.count(f"rpc={rpc} ") == 1 and "status=DATA_LOSS" in caplog.text   # not retried
        assert "restore the ledger from the last good backup" in caplog.text   # the operator's part is logged
    finally:
        app.stop(1.0)


def test_corruption_at_run_time_turns_health_not_serving_once(tmp_path, make_config, loader, caplog):
    """A load balancer must stop sending to a replica whose ledger is corrupt: the first DATA_LOSS turns
    both health names NOT_SERVING (one ERROR line), and the calls still answer DATA_LOSS, not UNAVAILABLE."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from shallowmark.client import Client, ServerError
    from shallowmark.server.app import SERVICE_NAME, ServerApp

    path = tmp_path / "ledger.sqlite3"
    _filled(f"sqlite:///{path}", 42)
    app = ServerApp(make_config(tmp_path), backend_loader=loader).start()
    try:
        assert app.wait_until_ready(120)
        with grpc.insecure_channel(app.address) as channel, \
                Client(app.address, "token-for-tenant-a", timeout=60, retries=6, backoff=0.1) as c:
            stub = health_pb2_grpc.HealthStub(channel)

            def health() -> set:
                return {stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
                        for name in ("", SERVICE_NAME)}

            assert health() == {health_pb2.HealthCheckResponse.SERVING}
            # before any ledger read, so that SQLite has none of the table's pages cached: the damage is
            # met the way a bad sector or a stray write under a running server is
            _overwrite_page(path, _root_page(path))
            with caplog.at_level("INFO", logger="shallowmark.server"):
                for _ in range(3):
                    with pytest.raises(ServerError) as e:
                        list(c.list_embeds())
                    assert e.value.code == grpc.StatusCode.DATA_LOSS   # every time, also after the flip
                    assert health() == {health_pb2.HealthCheckResponse.NOT_SERVING}
                assert c.info().tenant == "a"   # calls that need no ledger are still answered
            assert caplog.text.count("rpc=ListEmbeds ") == 3   # DATA_LOSS is not retried by the SDK
            flips = [r for r in caplog.records if "Health is now NOT_SERVING" in r.getMessage()]
            assert len(flips) == 1 and flips[0].levelname == "ERROR"
            assert "ListEmbeds" in flips[0].getMessage() and "malformed" in flips[0].getMessage()
            assert app.ledger_fault and "corrupt" in app.ledger_fault
            app.load_models()   # a model load that ends after the fault must not turn it SERVING again
            assert health() == {health_pb2.HealthCheckResponse.NOT_SERVING}
    finally:
        app.stop(1.0)


# -- PostgreSQL: a restore of the whole database to an older state (each replica's local head file) ------


def _dbname(url: str) -> str:
    return url.split("/")[3].split("?")[0]


def _admin(pg_cluster, *statements: str) -> None:
    """Statements run on the cluster's maintenance database, as the operator's backup tooling would."""
    import psycopg

    with psycopg.connect(pg_cluster.url(), autocommit=True) as db:
        for sql in statements:
            db.execute(sql)


def _backup(pg_cluster, url: str) -> str:
    """A full copy of the ledger's database as it is now (a file-level copy, as a physical backup is)."""
    db = _dbname(url)
    _admin(pg_cluster, f"CREATE DATABASE {db}_backup TEMPLATE {db}")
    return f"{db}_backup"


def _restore(pg_cluster, url: str, backup: str) -> None:
    """Replace the ledger's database by ``backup``, whole: records and head row alike. FORCE ends the
    connections a running server still holds on it, as a restore would."""
    db = _dbname(url)
    _admin(pg_cluster, f"DROP DATABASE {db} WITH (FORCE)", f"CREATE DATABASE {db} TEMPLATE {backup}")


def _pg_state(url: str) -> tuple[list[tuple], tuple]:
    """Every record and the head row, read straight from the database."""
    import psycopg

    with psycopg.connect(url) as db:
        return (db.execute("SELECT * FROM shallowmark_embeds ORDER BY id").fetchall(),
                db.execute("SELECT records, head FROM shallowmark_ledger_head").fetchone())


def test_a_database_restored_from_an_older_backup_is_refused(pg_cluster, pg_url, tmp_path, make_config):
    from shallowmark.server.app import ServerApp
    from shallowmark.server.ledger import LedgerIntegrityError

    cfg = make_config(tmp_path, ledger_url=pg_url)
    hf = cfg.resolved_ledger_head_file()   # the server's default: in its state folder, named after the database
    assert hf.parent == tmp_path and hf.name.startswith(f"ledger-pg-{_dbname(pg_url)}-")
    led = open_ledger(pg_url, head_file=hf)
    for i in range(5):
        assert _rec(led, "a", i)
    led.close()
    backup = _backup(pg_cluster, pg_url)   # last night's backup: 5 records
    led = open_ledger(pg_url, head_file=hf)
    for i in range(5, 8):
        assert _rec(led, "a", i)
    assert '"count": 8' in hf.read_text() and oct(hf.stat().st_mode & 0o777) == "0o600"
    _restore(pg_cluster, pg_url, backup)   # the database is put back to last night, head row and all
    # the replica still running meets it at its next Embed (after reconnecting): nothing is appended to it
    with pytest.raises(LedgerIntegrityError, match="fewer records than this server has seen acknowledged"):
        _rec(led, "a", 8)
    led.close()
    before, head_file = _pg_state(pg_url), hf.read_text()
    assert len(before[0]) == 5 and before[1][0] == 5
    with pytest.raises(LedgerIntegrityError) as e:
        ServerApp(cfg, backend_loader=_no_models)   # and it does not start on it
    msg = str(e.value)
    assert "holds 5 hash-chained records, but 8 records were acknowledged" in msg
    assert f"this replica's local head file {hf} says so" in msg and "3 acknowledged records are missing" in msg
    assert "restored to an older state" in msg and "Restore a newer backup" in msg
    assert f"delete this replica's local head file {hf} and start again" in msg   # the operator's explicit way out
    assert _pg_state(pg_url) == before and hf.read_text() == head_file   # neither the ledger nor the file touched
    with pytest.raises(LedgerIntegrityError, match="8 records were acknowledged"):
        open_ledger(pg_url, head_file=hf)   # refused on every start, not just once
    hf.unlink()   # the operator accepts the database as it is
    led = open_ledger(pg_url, head_file=hf)
    assert led.count() == 5 and '"count": 5' in hf.read_text()
    assert _rec(led, "a", 5)
    led.close()


def test_a_restored_database_written_to_since_is_refused_as_diverged(pg_cluster, pg_url, tmp_path):
    from shallowmark.server.ledger import LedgerIntegrityError

    first = tmp_path / "one" / "ledger.head"
    led = open_ledger(pg_url, head_file=first)
    for i in range(4):
        _rec(led, "a", i)
    led.close()
    backup = _backup(pg_cluster, pg_url)
    led = open_ledger(pg_url, head_file=first)
    for i in range(4, 6):
        _rec(led, "a", i)
    led.close()
    _restore(pg_cluster, pg_url, backup)
    # a new replica (no head file of its own) adopts the restored database and appends past the first's head
    led = open_ledger(pg_url, head_file=tmp_path / "new" / "ledger.head")
    for i in range(100, 104):
        _rec(led, "b", i)
    led.close()
    before = _pg_state(pg_url)
    assert before[1][0] == 8   # more records than the first replica saw: a count alone would not tell
    with pytest.raises(LedgerIntegrityError) as e:
        open_ledger(pg_url, head_file=first)
    msg = str(e.value)
    assert "has diverged from what this replica has seen: its record number 6 of the hash chain (id 6)" in msg
    assert f"but this replica's local head file {first} says record number 6 was acknowledged" in msg
    assert f"delete this replica's local head file {first}" in msg
    assert _pg_state(pg_url) == before


def test_a_database_ahead_of_the_local_head_starts(pg_url, tmp_path, caplog):
    one_hf, two_hf = tmp_path / "one" / "ledger.head", tmp_path / "two" / "ledger.head"
    one = open_ledger(pg_url, head_file=one_hf)
    two = open_ledger(pg_url, head_file=two_hf)
    for i in range(3):
        _rec(one, "a", i)
    one.close()
    for i in range(3, 10):   # the other replica goes on appending
        _rec(two, "a", i)
    three = open_ledger(pg_url, head_file=tmp_path / "three" / "ledger.head")
    _write_at_once((two, three), 10)
    two.close()
    three.close()
    assert '"count": 3' in one_hf.read_text()
    with caplog.at_level("INFO", logger="shallowmark.server"):
        one = open_ledger(pg_url, head_file=one_hf)   # the database is ahead of what it saw: fine
    assert one.count() == 30 and "27 records appended since this replica last saw the head" in caplog.text
    assert '"count": 30' in one_hf.read_text()   # and its head file moved up to what it has now seen
    assert _rec(one, "a", 10)
    one.close()
    open_ledger(pg_url, head_file=two_hf).close()   # the other replica restarts fine too


def test_a_missing_local_head_file_is_adopted_and_a_damaged_one_refused(pg_url, tmp_path, caplog):
    from shallowmark.server.ledger import LedgerIntegrityError

    _filled(pg_url, 4)   # written by a replica that kept no head file
    hf = tmp_path / "state" / "sub" / "ledger.head"
    with caplog.at_level("INFO", logger="shallowmark.server"):
        led = open_ledger(pg_url, head_file=hf)
    assert led.count() == 4 and "no local head file" in caplog.text and "adopted" in caplog.text
    led.close()
    assert '"count": 4' in hf.read_text() and oct(hf.stat().st_mode & 0o777) == "0o600"
    assert oct(hf.parent.stat().st_mode & 0o777) == "0o700"
    hf.write_text('{"format": "shallowmark-ledger-head/1", "count": 1}')
    with pytest.raises(LedgerIntegrityError, match=f"head record {hf} is damaged.* if the ledger postgresql://"):
        open_ledger(pg_url, head_file=hf)


def test_a_database_restored_to_before_the_ledger_existed_is_refused(pg_cluster, pg_url, tmp_path):
    from shallowmark.server.ledger import LedgerIntegrityError

    empty = _backup(pg_cluster, pg_url)   # the database before the first start
    hf = tmp_path / "ledger.head"
    _filled(pg_url, 0)
    led = open_ledger(pg_url, head_file=hf)
    _rec(led, "a", 1)
    led.close()
    _restore(pg_cluster, pg_url, empty)
    with pytest.raises(LedgerIntegrityError, match=f"has no shallowmark_embeds table, but 1 record were "
                                                   f"acknowledged .this replica's local head file {hf}"):
        open_ledger(pg_url, head_file=hf)
    import psycopg

    with psycopg.connect(pg_url) as db:   # no empty ledger was created in its place
        assert db.execute("SELECT to_regclass('shallowmark_embeds')").fetchone()[0] is None


def test_the_local_head_file_config(tmp_path):
    from shallowmark.server.config import ServerConfig, load_config

    url = "postgresql://shallowmark@db.internal:5432/ledger"
    cfg = ServerConfig(state_dir=tmp_path, ledger_url=url)
    hf = cfg.resolved_ledger_head_file()
    assert hf.parent == tmp_path and hf.name.startswith("ledger-pg-ledger-") and hf.suffix == ".head"
    # the same database (another role, a password) shares it; another database or server does not
    assert ServerConfig(state_dir=tmp_path, ledger_url="postgresql://other:pw@db.internal:5432/ledger"
                        ).resolved_ledger_head_file() == hf
    for other in ("postgresql://shallowmark@db.internal:5432/ledger2", "postgresql://shallowmark@db2:5432/ledger"):
        assert ServerConfig(state_dir=tmp_path, ledger_url=other).resolved_ledger_head_file() != hf
    assert "pw" not in hf.name
    assert ServerConfig(state_dir=tmp_path).resolved_ledger_head_file() is None   # SQLite: its own .head
    with pytest.raises(InvalidParameterError, match="ledger_head_file applies to a PostgreSQL ledger only"):
        ServerConfig(state_dir=tmp_path, ledger_head_file=tmp_path / "x.head")
    (tmp_path / "server.toml").write_text(f'ledger_url = "{url}"\nledger_head_file = "heads/ledger.head"\n')
    assert load_config(tmp_path / "server.toml").resolved_ledger_head_file() == tmp_path / "heads" / "ledger.head"
