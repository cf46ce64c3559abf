"""The embed ledger: one row per watermarked image the server handed out.

A row holds the tenant, the key's public ``key_id``, method, model, the SHA-256 of the returned
PNG, the time (UTC) and the request id; never key material, tokens or prompts. It answers "did we
watermark this image, for whom, with which key?" from the image hash alone.

Backends, chosen by URL (:func:`open_ledger`):

- ``sqlite:////absolute/path.sqlite3``, ``sqlite:///relative/path.sqlite3`` (SQLAlchemy's
  spelling) or a plain path (the default is a file in the server's state folder): one file, WAL
  mode, safe for the server's threads. Enough for one server process.
- ``postgresql://...``: **not implemented yet**; :func:`open_ledger` raises a clear error. Several
  server replicas need it (see DESIGN §8).

Writes are idempotent per ``(tenant, request_id)``: a client that retries an Embed with the same
``x-request-id`` is recorded once.
"""

from __future__ import annotations

import base64
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# The record type is the SDK's: the server and the clients that list the ledger share one definition.
from shallowmark.client import LedgerEntry
from shallowmark.errors import InvalidParameterError, ShallowmarkError

__all__ = ["LedgerEntry", "LedgerError", "SQLiteLedger", "open_ledger"]

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




def _encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{row_id}".encode()).decode().rstrip("=")


def _decode_cursor(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        tag, _, num = raw.partition(":")
        if tag != "v1":
            raise ValueError
        return int(num)
    except (ValueError, UnicodeDecodeError):
        raise InvalidParameterError("page_token is not one this server issued; start again without it") from None


class SQLiteLedger:
    """Ledger in one SQLite file. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
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
            raise InvalidParameterError(f"request id {request_id!r} was already used for a different embed; "
                                        "send a fresh x-request-id for each new embed (reuse it only to retry)")
        return False

    def list(self, tenant: str, *, key_id: str | None = None, page_size: int = 100,
             page_token: str | None = None) -> tuple[list[LedgerEntry], str]:
        """The tenant's entries, newest first, and the token of the next page ("" on the last)."""
        if not 1 <= page_size <= 1000:
            raise InvalidParameterError(f"page_size must be in 1..1000; got {page_size}")
        sql = ("SELECT id, tenant, key_id, method, model, image_sha256, created_at, request_id, source "
               "FROM embeds WHERE tenant = ?")
        args: list = [tenant]
        if key_id:
            sql += " AND key_id = ?"
            args.append(key_id)
        if page_token:
            sql += " AND id < ?"
            args.append(_decode_cursor(page_token))
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(page_size + 1)
        try:
            with self._lock:
                rows = self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise LedgerError(f"cannot read the ledger: {e}") from None
        more = len(rows) > page_size
        rows = rows[:page_size]
        entries = [LedgerEntry(tenant=r[1], key_id=r[2], method=r[3], model=r[4], image_sha256=r[5],
                               created_at=datetime.fromisoformat(r[6]), request_id=r[7], source=r[8])
                   for r in rows]
        return entries, (_encode_cursor(rows[-1][0]) if more else "")

    def count(self, tenant: str | None = None) -> int:
        """Number of rows (of one tenant, or all)."""
        with self._lock:
            if tenant is None:
                return self._db.execute("SELECT COUNT(*) FROM embeds").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM embeds WHERE tenant = ?", (tenant,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_ledger(url: str) -> SQLiteLedger:
    """Open the ledger named by ``url`` (see the module docstring).

    Raises:
        InvalidParameterError: an unknown scheme.
        LedgerError: PostgreSQL (not implemented yet), or the file cannot be opened.
    """
    if url.startswith("sqlite:///"):
        return SQLiteLedger(url[len("sqlite:///"):] or ":memory:")
    if url == "sqlite://" or url == ":memory:":
        return SQLiteLedger(":memory:")
    if url.startswith(("postgres://", "postgresql://")):
        raise LedgerError("a PostgreSQL ledger is not implemented in this version of shallowmark; "
                          "use ledger_url = 'sqlite:///path/to/ledger.sqlite3' for now")
    if "://" not in url:
        return SQLiteLedger(url)
    raise InvalidParameterError(f"unknown ledger URL scheme in {url.split('://')[0]!r}; "
                                "use sqlite:///path (postgresql:// is planned)")
