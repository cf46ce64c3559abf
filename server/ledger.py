"""The embed ledger: one row per watermarked image the server handed out.

A row holds the tenant, the key's public ``key_id``, method, model, the SHA-256 of the returned
PNG, the time (UTC) and the request id; never key material, tokens or prompts. It answers "did we
watermark this image, for whom, with which key?" from the image hash alone.

Backends, chosen by URL (:func:`open_ledger`):

- ``sqlite:////absolute/path.sqlite3``, ``sqlite:///relative/path.sqlite3`` (SQLAlchemy's
  spelling) or a plain path (the default is a file in the server's state folder): one file, WAL
  mode, safe for the server's threads. Enough for one server process. A missing file is created
  0600 (SQLite gives its ``-wal`` and ``-shm`` files the same mode) and a missing folder 0700, as
  the attestation key is. An existing file or folder keeps its mode: the operator may have chosen
  it (a backup group, say), so a file that group or others can read is only warned about in the
  log.
- ``postgresql://user@host:5432/dbname`` (or ``postgres://``; any libpq URL, e.g.
  ``postgresql:///shallowmark?host=/run/postgresql`` for a unix socket): table
  ``shallowmark_embeds`` in that database, created on first open. Several server replicas can
  share it. The password is best given by ``PGPASSWORD`` or ``~/.pgpass`` rather than in the URL;
  either way it is never written to a message or a log line. Needs ``psycopg`` (the ``server``
  extra).

Both backends behave the same (the same tests run against both): writes are idempotent per
``(tenant, request_id)`` (a client that retries an Embed with the same ``x-request-id`` is
recorded once, and the id reused for another embed is refused); ``list`` is scoped to one tenant,
newest first, with opaque cursors.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import sqlite3
import stat
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

# The record type is the SDK's: the server and the clients that list the ledger share one definition.
from shallowmark.client import LedgerEntry
from shallowmark.errors import InvalidParameterError, ShallowmarkError, shown

__all__ = ["LedgerEntry", "LedgerError", "SQLiteLedger", "PostgresLedger", "open_ledger"]

log = logging.getLogger("shallowmark.server")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeds (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant       TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    method       TEXT NOT NULL,
    model        TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    source       TEXT NOT NULL,
    UNIQUE (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS embeds_tenant_id ON embeds (tenant, id);
CREATE INDEX IF NOT EXISTS embeds_sha ON embeds (image_sha256);
"""


class LedgerError(ShallowmarkError):
    """The ledger cannot be opened or written. The servicer answers UNAVAILABLE."""


def _check_page_size(page_size: int) -> None:
    if not 1 <= page_size <= 1000:
        raise InvalidParameterError(f"page_size must be in 1..1000; got {page_size}")


def _reused_id(request_id: str) -> InvalidParameterError:
    return InvalidParameterError(f"request id {shown(request_id)} was already used for a different embed; "
                                 "send a fresh x-request-id for each new embed (reuse it only to retry)")


def _list_query(table: str, ph: str, tenant: str, key_id: str | None, page_size: int,
                page_token: str | None) -> tuple[str, list]:
    """The paging query of ``list`` for either backend (``ph``: its placeholder, ``?`` or ``%s``);
    one row more than the page, to tell whether another page follows."""
    _check_page_size(page_size)
    sql = (f"SELECT id, tenant, key_id, method, model, image_sha256, created_at, request_id, source "
           f"FROM {table} WHERE tenant = {ph}")
    args: list = [tenant]
    if key_id:
        sql += f" AND key_id = {ph}"
        args.append(key_id)
    if page_token:
        sql += f" AND id < {ph}"
        args.append(_decode_cursor(page_token))
    sql += f" ORDER BY id DESC LIMIT {ph}"
    args.append(page_size + 1)
    return sql, args


def _page(rows: list, page_size: int, created: Callable[[Any], datetime]) -> tuple[list[LedgerEntry], str]:
    """Entries and next-page token from :func:`_list_query`'s rows; ``created`` reads the backend's
    timestamp column."""
    more = len(rows) > page_size
    rows = rows[:page_size]
    entries = [LedgerEntry(tenant=r[1], key_id=r[2], method=r[3], model=r[4], image_sha256=r[5],
                           created_at=created(r[6]), request_id=r[7], source=r[8]) for r in rows]
    return entries, (_encode_cursor(rows[-1][0]) if more else "")


def _encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{row_id}".encode()).decode().rstrip("=")


#: Largest row id a cursor may name: both backends' ids are signed 64-bit, and SQLite's binding raises
#: OverflowError (PostgreSQL a range error) for a larger integer instead of finding no rows.
_MAX_ROW_ID = 2**63 - 1
_CURSOR = re.compile(r"v1:([1-9][0-9]{0,18})")  # ids start at 1; int() alone would take "-5", " 7", "1_0"


def _decode_cursor(token: str) -> int:
    bad = InvalidParameterError("page_token is not one this server issued; send the next_page_token of the "
                                "previous response unchanged, or start again without it")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        raise bad from None
    m = _CURSOR.fullmatch(raw)
    if m is None or int(m.group(1)) > _MAX_ROW_ID:
        raise bad
    return int(m.group(1))


def _create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 (and its folder 0700) unless it exists; warn if an
    existing one is open to group or others.

    SQLite would create the file 0644 (and ``mkdir`` the folder 0755), and the ledger says which
    tenant watermarked which image with which key. An empty file is a valid empty database.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("ledger %s is accessible by group/others (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
        return
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # the umask may only remove bits; make it exactly 0600
    finally:
        os.close(fd)


class SQLiteLedger:
    """Ledger in one SQLite file. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            if str(path) != ":memory:":
                _create_private(self.path)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise LedgerError(f"cannot open the ledger {path}: {e}") from None
        self._lock = threading.Lock()

    def record(self, *, tenant: str, key_id: str, method: str, model: str, image_sha256: str,
               request_id: str, source: str, created_at: datetime | None = None) -> bool:
        """Append one embed. Returns False if this exact embed was already recorded under
        ``(tenant, request_id)`` (a retry).

        Raises:
            InvalidParameterError: ``request_id`` was already used by this tenant for a *different*
                embed (the image must then not be returned: the ledger could not record it).
            LedgerError: the write failed (the embed must then not be returned to the caller).
        """
        when = (created_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
        row = (key_id, method, model, image_sha256, source)
        try:
            with self._lock:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO embeds (tenant, key_id, method, model, image_sha256, created_at, "
                    "request_id, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (tenant, key_id, method, model, image_sha256, when.isoformat(timespec="microseconds"),
                     request_id, source))
                if cur.rowcount == 1:
                    return True
                old = self._db.execute("SELECT key_id, method, model, image_sha256, source FROM embeds "
                                       "WHERE tenant = ? AND request_id = ?", (tenant, request_id)).fetchone()
        except sqlite3.Error as e:
            raise LedgerError(f"cannot write to the ledger: {e}") from None
        if tuple(old) != row:
            raise _reused_id(request_id)
        return False

    def list(self, tenant: str, *, key_id: str | None = None, page_size: int = 100,
             page_token: str | None = None) -> tuple[list[LedgerEntry], str]:
        """The tenant's entries, newest first, and the token of the next page ("" on the last)."""
        sql, args = _list_query("embeds", "?", tenant, key_id, page_size, page_token)
        try:
            with self._lock:
                rows = self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise LedgerError(f"cannot read the ledger: {e}") from None
        return _page(rows, page_size, datetime.fromisoformat)

    def count(self, tenant: str | None = None) -> int:
        """Number of rows (of one tenant, or all)."""
        with self._lock:
            if tenant is None:
                return self._db.execute("SELECT COUNT(*) FROM embeds").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM embeds WHERE tenant = ?", (tenant,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PG_TABLE = "shallowmark_embeds"

_PG_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_PG_TABLE} (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant       TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    method       TEXT NOT NULL,
    model        TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    request_id   TEXT NOT NULL,
    source       TEXT NOT NULL,
    UNIQUE (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS {_PG_TABLE}_tenant_id ON {_PG_TABLE} (tenant, id);
CREATE INDEX IF NOT EXISTS {_PG_TABLE}_sha ON {_PG_TABLE} (image_sha256);
"""

#: Key of the advisory lock held while creating the table: replicas starting together would otherwise
#: race in CREATE TABLE IF NOT EXISTS (it is not atomic in PostgreSQL and can fail on the catalog).
_PG_SCHEMA_LOCK = 0x5EA1_ED6E


def describe_pg_url(url: str) -> str:
    """``user@host:port/dbname`` of a libpq URL, for messages: never the password."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        d = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - the URL itself may hold a password; do not echo it
        return "postgresql://(unparsable URL)"
    host = str(d.get("host") or "localhost")
    port = f":{d['port']}" if d.get("port") else ""
    user = f"{d['user']}@" if d.get("user") else ""
    return f"postgresql://{user}{host}{port}/{d.get('dbname') or ''}"


class PostgresLedger:
    """Ledger in a PostgreSQL table (``shallowmark_embeds``), same behaviour as :class:`SQLiteLedger`.

    One connection in autocommit mode behind a lock (the ledger does one short statement per call,
    so a pool would buy nothing at the server's request rate). A connection that broke (the
    database restarted, an idle timeout) is re-opened once per call and the statement re-run,
    which is safe because every write is idempotent per ``(tenant, request_id)``.

    Args:
        url: a libpq URL, ``postgresql://[user[:password]@][host][:port][/dbname][?param=value...]``.
            ``connect_timeout`` defaults to 10 s when the URL does not set it.

    Raises:
        InvalidParameterError: ``url`` is not a valid libpq URL.
        LedgerError: ``psycopg`` is missing, the database cannot be reached, or the table cannot be created.
    """

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise LedgerError("a PostgreSQL ledger needs psycopg: pip install 'shallowmark[server]'") from None
        self._psycopg = psycopg
        self._url = url
        self.where = describe_pg_url(url)
        self._lock = threading.Lock()
        self._db = None
        with self._lock:
            self._db = self._connect()
            try:
                # An existing table is used as it is: CREATE ... IF NOT EXISTS would still need the CREATE
                # privilege on the schema, which a least-privilege role (SELECT, INSERT) does not have.
                if self._db.execute("SELECT to_regclass(%s)", (_PG_TABLE,)).fetchone()[0] is None:
                    with self._db.transaction():
                        self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                        self._db.execute(_PG_SCHEMA)
            except psycopg.Error as e:
                self._db.close()
                raise LedgerError(f"cannot create the ledger table in {self.where}: {_pg_message(e)}") from None

    def _connect(self):
        psycopg = self._psycopg
        try:
            from psycopg.conninfo import conninfo_to_dict

            params = conninfo_to_dict(self._url)
        except psycopg.Error as e:
            raise InvalidParameterError(f"ledger_url is not a valid PostgreSQL URL: {_pg_message(e)}") from None
        extra = {} if "connect_timeout" in params else {"connect_timeout": 10}
        try:
            db = psycopg.connect(self._url, autocommit=True, **extra)
            # UTC so that created_at comes back as it went in, whatever the server's time zone (a SET,
            # not the "options" parameter, which would replace options the URL may carry)
            db.execute("SET TIME ZONE 'UTC'")
            return db
        except psycopg.Error as e:
            raise LedgerError(f"cannot open the ledger {self.where}: {_pg_message(e)}") from None

    def _run(self, what: str, fn):
        """``fn(connection)`` under the lock; on a broken connection, reconnect once and retry."""
        psycopg = self._psycopg
        with self._lock:
            for attempt in (0, 1):
                try:
                    if self._db is None or self._db.closed:
                        self._db = self._connect()
                    return fn(self._db)
                except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                    broken = self._db is None or self._db.closed or self._db.broken
                    if attempt == 0 and broken:
                        continue
                    raise LedgerError(f"cannot {what} the ledger {self.where}: {_pg_message(e)}") from None
                except psycopg.Error as e:
                    raise LedgerError(f"cannot {what} the ledger {self.where}: {_pg_message(e)}") from None

    def record(self, *, tenant: str, key_id: str, method: str, model: str, image_sha256: str,
               request_id: str, source: str, created_at: datetime | None = None) -> bool:
        """As :meth:`SQLiteLedger.record`."""
        when = (created_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
        row = (key_id, method, model, image_sha256, source)

        def write(db):
            cur = db.execute(
                f"INSERT INTO {_PG_TABLE} (tenant, key_id, method, model, image_sha256, created_at, request_id, "
                "source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (tenant, request_id) DO NOTHING "
                "RETURNING id", (tenant, key_id, method, model, image_sha256, when, request_id, source))
            if cur.fetchone() is not None:
                return None
            return db.execute(f"SELECT key_id, method, model, image_sha256, source FROM {_PG_TABLE} "
                              "WHERE tenant = %s AND request_id = %s", (tenant, request_id)).fetchone()

        old = self._run("write to", write)
        if old is None:
            return True
        if tuple(old) != row:
            raise _reused_id(request_id)
        return False

    def list(self, tenant: str, *, key_id: str | None = None, page_size: int = 100,
             page_token: str | None = None) -> tuple[list[LedgerEntry], str]:
        """As :meth:`SQLiteLedger.list`: newest first, and the next page's token ("" on the last)."""
        sql, args = _list_query(_PG_TABLE, "%s", tenant, key_id, page_size, page_token)
        rows = self._run("read", lambda db: db.execute(sql, args).fetchall())
        return _page(rows, page_size, lambda t: t.astimezone(timezone.utc))

    def count(self, tenant: str | None = None) -> int:
        """Number of rows (of one tenant, or all)."""
        if tenant is None:
            return self._run("read", lambda db: db.execute(f"SELECT COUNT(*) FROM {_PG_TABLE}").fetchone()[0])
        return self._run("read", lambda db: db.execute(f"SELECT COUNT(*) FROM {_PG_TABLE} WHERE tenant = %s",
                                                       (tenant,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()


def _pg_message(e: Exception) -> str:
    """The first line of a psycopg error (libpq messages never include the password)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_ledger(url: str) -> SQLiteLedger | PostgresLedger:
    """Open the ledger named by ``url`` (see the module docstring).

    Raises:
        InvalidParameterError: an unknown scheme, or a malformed PostgreSQL URL.
        LedgerError: the file or the database cannot be opened.
    """
    if url.startswith("sqlite:///"):
        return SQLiteLedger(url[len("sqlite:///"):] or ":memory:")
    if url == "sqlite://" or url == ":memory:":
        return SQLiteLedger(":memory:")
    if url.startswith(("postgres://", "postgresql://")):
        return PostgresLedger(url)
    if "://" not in url:
        return SQLiteLedger(url)
    raise InvalidParameterError(f"unknown ledger URL scheme in {url.split('://')[0]!r}; "
                                "use sqlite:///path or postgresql://user@host/dbname")
