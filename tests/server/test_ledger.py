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
COLUMNS = {"id", "tenant", "key_id", "method", "model", "image_sha256", "created_at", "request_id", "source"}


def _rec(ledger, tenant, i, key=KEY_A, **kw):
    args = dict(tenant=tenant, key_id=key, method="shallow-diffuse", model="tiny-ldm", image_sha256=f"{i:064x}",
                request_id=f"r{i}", source="generate", created_at=datetime(2025, 1, 1, tzinfo=timezone.utc))
    args.update(kw)
    return ledger.record(**args)


def _raw_table(url: str) -> tuple[set[str], list[tuple]]:
    """Column names and every row, read straight from the database (not through the ledger)."""
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url[len("sqlite:///"):])
        cur = db.execute("SELECT * FROM embeds")
        out = {d[0] for d in cur.description}, cur.fetchall()
        db.close()
        return out
    import psycopg

    with psycopg.connect(url) as db:
        cur = db.execute("SELECT * FROM shallowmark_embeds")
        return {d.name for d in cur.description}, cur.fetchall()


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
    assert cols == COLUMNS and len(rows) == 120
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
    one.close()
    two.close()


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
                [("a", out.image_sha256, keys[0].key_id, "pg-embed-1")]
            assert list(b.list_embeds()) == []
            with pytest.raises(ServerError) as e:
                list(b.list_embeds(tenant="a"))
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert a.embed(keys[0], seed=3, prompt="a private prompt", request_id="pg-embed-1").image_sha256 \
                == out.image_sha256   # a retry: recorded once
    finally:
        app.stop(1.0)
    cols, rows = _raw_table(pg_url)
    assert cols == COLUMNS and len(rows) == 1
    dump = repr(rows)
    mk = keys[0].for_method("shallow-diffuse")
    for secret in ("token-for-tenant-a", "private prompt", mk.to_bytes().hex(), keys[0].to_hex()):
        assert secret not in dump


def test_a_role_with_only_select_and_insert_can_run_the_ledger(pg_url):
    import psycopg

    open_ledger(pg_url).close()   # first start, by a role that may create the table
    role = "rw_" + pg_url.split("/")[3].split("?")[0]   # roles are per cluster: one per test database
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT SELECT, INSERT ON shallowmark_embeds TO {role}")
    led = open_ledger(pg_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1))
    assert _rec(led, "a", 1) and not _rec(led, "a", 1) and led.count("a") == 1
    led.close()
