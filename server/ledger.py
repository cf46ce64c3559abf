"""The embed ledger: one row per watermarked image the server handed out.

A row holds the tenant, the key's public ``key_id``, method, model, the SHA-256 of the returned
PNG, the time (UTC), the request id and the SHA-256 of the method's effective configuration;
never key material, tokens or prompts. It answers "did we watermark this image, for whom, with
which key?" from the image hash alone. Each configuration's text (canonical JSON of the method's
config dataclass) is kept once, in ``method_configs`` (PostgreSQL: ``shallowmark_method_configs``),
under its digest: an image verifies only under the configuration it was embedded with, so Verify
asks the ledger which ones a key was embedded with (:meth:`SQLiteLedger.configs`) and rebuilds
the method from them, which lets a server change its options or a release change a default
without orphaning the images made before. Records made before the configuration was recorded
have none (NULL) and are verified under the method's ``unrecorded_options``.

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

Integrity: acknowledged records are never lost silently. Every record carries ``link``, a SHA-256
hash chain (``link = sha256(previous link || canonical JSON of the record)``, in id order, from
:data:`GENESIS`), and the chain's head (number of records and last link) is kept where losing the
database does not lose it too:

- SQLite: in a sidecar file next to the database, ``<ledger file>.head`` (JSON with its own
  SHA-256; written to a temporary file, fsynced, renamed over the old one and the folder fsynced)
  after each committed insert and before the Embed is acknowledged;
- PostgreSQL: in the one-row table ``shallowmark_ledger_head``, updated in the insert's
  transaction (its row lock also orders the inserts of several replicas). That row is restored
  with the database, so each server also keeps its own *local head file* (the server passes
  ``ServerConfig.resolved_ledger_head_file()``, by default a file in its state folder named after
  the database): the newest ``(count, head)`` it has seen acknowledged, in the same format and
  written the same way as SQLite's sidecar, after the insert's commit and before the Embed is
  acknowledged. At start the database's chain must contain that head (its record number
  ``count`` has that link); a database restored to an older state (behind, or diverged from, what
  this replica saw) is refused. A database that is ahead (other replicas appended) is fine and the
  file moves up to it; a missing file (first start, a new replica) is written from the database as
  it is, and deleting it is how the operator accepts a rolled-back database. While serving, an
  insert into a database whose head row counts fewer records than this process has seen is
  refused (:class:`LedgerIntegrityError`) and nothing is appended.

Opening a ledger checks it before serving from it: SQLite's ``PRAGMA integrity_check`` (on a
read-only connection, so a refused ledger and its ``-wal`` file are left exactly as found), then the
whole chain against the head. A corrupt database, a missing, emptied or shortened one, or a
changed or deleted record raises :class:`LedgerIntegrityError`, which says what was found and what
to do; the server does not start. A new ledger (no database, no head) starts empty. A ledger made
by an older version (no ``link`` column, or no head) is adopted: its records are linked as they
are, the head is written and a warning is logged. Records without a link (written by an older
version after the upgrade) are not covered by the chain and are counted in a warning. A ledger made
before per-embed configurations gains the column and the table at its first open (PostgreSQL: by
a role that may alter the table); its records keep their links. The configuration's digest is in
the chain (a record's content ends with it when it has one); the texts are not, and each is
checked against its digest when read. Corruption
met at run time raises :class:`LedgerIntegrityError` as well; the servicer answers DATA_LOSS,
which clients do not retry.
"""

from __future__ import annotations

import base64
import hashlib
import json
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

__all__ = ["LedgerEntry", "LedgerError", "LedgerIntegrityError", "SQLiteLedger", "PostgresLedger",
           "open_ledger", "pg_head_file"]

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
    link         TEXT,
    config_sha256 TEXT,
    UNIQUE (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS embeds_tenant_id ON embeds (tenant, id);
CREATE INDEX IF NOT EXISTS embeds_sha ON embeds (image_sha256);
CREATE TABLE IF NOT EXISTS method_configs (
    config_sha256 TEXT PRIMARY KEY,
    method        TEXT NOT NULL,
    config        TEXT NOT NULL
);
"""


class LedgerError(ShallowmarkError):
    """The ledger cannot be opened or written. The servicer answers UNAVAILABLE."""


class LedgerIntegrityError(LedgerError):
    """The ledger is corrupt, or holds fewer or other records than were acknowledged. Raised when it
    is opened (the server then does not start) and when corruption is met at run time (the servicer
    answers DATA_LOSS, which clients do not retry). The message says what was found and what the
    operator can do."""


def _check_page_size(page_size: int) -> None:
    if not 1 <= page_size <= 1000:
        raise InvalidParameterError(f"page_size must be in 1..1000; got {page_size}")


def _same_embed(old: tuple, new: tuple) -> bool:
    """Whether a recorded ``(key_id, method, model, image_sha256, source, config_sha256)`` is the
    embed ``new`` retries. A record without a configuration (made by an older version, before an
    upgrade, or by an older replica) matches on the rest: the retry is that embed."""
    if old[-1] is None or new[-1] is None:
        return old[:-1] == new[:-1]
    return old == new


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


# -- the hash chain ----------------------------------------------------------------------------------

#: The link "before" the first record.
GENESIS = hashlib.sha256(b"shallowmark ledger chain v1").hexdigest()

#: The row of the chain, for either backend: id, the eight content columns and the method
#: configuration's digest (NULL in records made before it was recorded); the link follows.
_CHAIN_COLUMNS = "id, tenant, key_id, method, model, image_sha256, created_at, request_id, source, config_sha256"

#: Rows read (and linked, on adoption) per query when walking the chain.
_CHAIN_BATCH = 2000

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _content(tenant: str, key_id: str, method: str, model: str, image_sha256: str, created_at: str,
             request_id: str, source: str, config_sha256: str | None = None) -> bytes:
    """The canonical bytes of one record (``created_at``: UTC ISO 8601 to the microsecond, as
    ``datetime.isoformat(timespec="microseconds")`` writes it). The configuration's digest joins
    only when there is one, so the records of the versions before it keep their links."""
    fields = [tenant, key_id, method, model, image_sha256, created_at, request_id, source]
    if config_sha256 is not None:
        fields.append(config_sha256)
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


def _checked_config(config_sha256: str | None, config: str | None) -> None:
    """A configuration is stored under the SHA-256 of its text (server.attestation.config_json)."""
    if (config_sha256 is None) != (config is None):
        raise InvalidParameterError("config_sha256 and config go together: pass both or neither")
    if config is not None and hashlib.sha256(config.encode()).hexdigest() != config_sha256:
        raise InvalidParameterError("config_sha256 is not the SHA-256 of config")


#: Keys per query of ``configs`` (SQLite allows 32 766 parameters; a smaller IN list plans better).
_CONFIGS_CHUNK = 500


def _configs_query(embeds: str, configs: str, ph: str, n: int) -> str:
    # the distinct triples first, from the covering index (key_id, model, method, config_sha256), then
    # their texts: a key embedded a million times is a million index entries, not a million joins
    return (f"SELECT e.key_id, e.method, e.config_sha256, c.config FROM (SELECT DISTINCT key_id, method, "
            f"config_sha256 FROM {embeds} WHERE model = {ph} AND key_id IN ({', '.join([ph] * n)})) e "
            f"LEFT JOIN {configs} c ON c.config_sha256 = e.config_sha256")


def _configs(keys, model: str, fetch: Callable[[str, list], list], where: str,
             embeds: str, configs: str, ph: str) -> dict[tuple[str, str], list[tuple[str | None, str | None]]]:
    """:meth:`SQLiteLedger.configs` for either backend: ``fetch(sql, args)`` runs one query.
    Each configuration is checked against its digest: the texts sit outside the hash chain (the
    records' digests are in it)."""
    wanted = {(k, m) for k, m in keys}
    ids = sorted({k for k, _ in wanted})
    out: dict[tuple[str, str], list] = {w: [] for w in wanted}
    for i in range(0, len(ids), _CONFIGS_CHUNK):
        chunk = ids[i:i + _CONFIGS_CHUNK]
        for key_id, method, sha, text in fetch(_configs_query(embeds, configs, ph, len(chunk)), [model, *chunk]):
            if (key_id, method) not in out:
                continue
            if sha is not None and (text is None or hashlib.sha256(text.encode()).hexdigest() != sha):
                log.error("the ledger %s has lost or changed the method configuration %s", where, sha)
                raise LedgerIntegrityError(_RUNTIME_CORRUPT.format(f"method configuration {sha[:16]} is "
                                                                   "missing or does not match its digest"))
            out[(key_id, method)].append((sha, text))
    for found in out.values():
        found.sort(key=lambda c: c[0] or "")
    return out


def _link(prev: str, content: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev) + content).hexdigest()


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class _Chain:
    """What walking a ledger's rows in id order found."""

    rows: int = 0                 # every row
    count: int = 0                # rows with a link, all verified
    head: str = GENESIS           # the last link
    last_linked_id: int = 0
    unlinked: int = 0             # rows without a link before the last linked one (older version)
    trailing: int = 0             # rows without a link after it (adoption links them)
    at_mark: str | None = None    # the link after ``mark`` linked rows, if there were that many


def _walk(batches, where: str, created: Callable[[Any], str], mark: int | None = None) -> _Chain:
    """Verify the chain over ``batches`` (lists of rows: :data:`_CHAIN_COLUMNS` then ``link``, in id
    order). Raises LedgerIntegrityError at the first row whose link is not the one computed."""
    c = _Chain(at_mark=GENESIS if mark == 0 else None)
    for rows in batches:
        for r in rows:
            c.rows += 1
            if r[10] is None:
                c.trailing += 1
                continue
            link = _link(c.head, _content(r[1], r[2], r[3], r[4], r[5], created(r[6]), r[7], r[8], r[9]))
            if r[10] != link:
                raise LedgerIntegrityError(
                    f"the ledger {where} is damaged: record id {r[0]} (number {c.count + 1} of the hash chain) does "
                    "not match the chain, so it or a record before it was changed, or a record before it was "
                    "deleted. The server was not started on it; restore the ledger from a backup taken before "
                    "the damage (keep a copy of this one for the investigation)")
            c.unlinked += c.trailing
            c.trailing = 0
            c.head, c.count, c.last_linked_id = link, c.count + 1, r[0]
            if c.count == mark:
                c.at_mark = link
    return c


def _short(where: str, found: int, acked: int, head_at: str, what: str, remedy: str) -> LedgerIntegrityError:
    """The error for a ledger with fewer linked records than were acknowledged."""
    missing = acked - found
    return LedgerIntegrityError(
        f"the ledger {where} {what}, but {acked} record{'s' if acked != 1 else ''} were acknowledged "
        f"({head_at}): {missing} acknowledged record{'s are' if missing != 1 else ' is'} missing. The server was "
        f"not started on it, so nothing more is overwritten. {remedy}")


def _corrupt(where: str, problems: list[str], keep: str, at_start: bool = True) -> LedgerIntegrityError:
    found = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
    return LedgerIntegrityError(
        f"the ledger {where} is corrupt ({found}). "
        + ("The server was not started on it. " if at_start else "Stop the server. ")
        + f"Keep a copy of {keep}, then restore the ledger from the last good backup (or salvage "
        f"rows with `sqlite3 {where} .recover`)")


#: What a client is told when corruption is met at run time (the details, with the file or database,
#: go to the server log).
_RUNTIME_CORRUPT = ("the server's embed ledger is corrupt ({}), so embeds cannot be recorded or listed until the "
                    "operator restores it from a backup; retrying will not help")


# -- SQLite --------------------------------------------------------------------------------------------

#: SQLite's primary result codes for a damaged file: SQLITE_CORRUPT, SQLITE_NOTADB.
_SQLITE_CORRUPT_CODES = (11, 26)


def _sqlite_corrupt(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in _SQLITE_CORRUPT_CODES
    msg = str(e)
    return "malformed" in msg or "not a database" in msg


_HEAD_FORMAT = "shallowmark-ledger-head/1"


def head_path(db_path: str | os.PathLike[str]) -> Path:
    """The SQLite ledger's head sidecar: ``<ledger file>.head`` in the same folder."""
    p = Path(db_path)
    return p.with_name(p.name + ".head")


def _head_digest(count: int, head: str) -> str:
    return hashlib.sha256(f"{_HEAD_FORMAT}\n{count}\n{head}".encode()).hexdigest()


def _read_head(path: Path, ledger: str | None = None) -> tuple[int, str] | None:
    """``(count, head)`` from the sidecar (or a PostgreSQL replica's local head file, whose ledger is
    ``ledger``: not the file's name without ``.head``); None if there is none."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LedgerError(f"cannot read the ledger's head record {path}: {e}") from None
    try:
        d = json.loads(raw)
        count, head = d["count"], d["head"]
        ok = (d["format"] == _HEAD_FORMAT and type(count) is int and count >= 0 and isinstance(head, str)
              and _HEX64.fullmatch(head) is not None and d["sha256"] == _head_digest(count, head))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise LedgerIntegrityError(
            f"the ledger's head record {path} is damaged ({len(raw)} bytes that are not a valid head record), so "
            f"it cannot tell how many records were acknowledged. The server was not started. Restore {path.name} "
            f"together with its ledger from a backup; or, if the ledger {ledger or path.with_suffix('')} is known to "
            "be complete, move the head record away and start again: the ledger is then adopted as it is")
    return count, head


def _write_head(path: Path, count: int, head: str, dir_fd: int | None) -> None:
    """Replace the sidecar atomically and durably: temporary file, fsync, rename, fsync of the folder."""
    data = json.dumps({"format": _HEAD_FORMAT, "count": count, "head": head,
                       "sha256": _head_digest(count, head)}).encode() + b"\n"
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if dir_fd is not None:
        os.fsync(dir_fd)


class SQLiteLedger:
    """Ledger in one SQLite file. Thread-safe (one connection behind a lock). One process only: the
    chain's head is kept in this object (and in the sidecar, :func:`head_path`).

    Raises:
        LedgerIntegrityError: the file is corrupt, or missing, empty or shorter than its head record
            says, or a record was changed or deleted (see the module docstring).
        LedgerError: the file cannot be opened.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._count, self._head, self._acked = 0, GENESIS, 0
        self._head_file: Path | None = None
        self._dir_fd: int | None = None
        if str(path) == ":memory:":
            try:
                self._db = self._connect(str(path))
            except sqlite3.Error as e:
                raise LedgerError(f"cannot open the ledger {path}: {e}") from None
            return
        self._head_file = head_path(self.path)
        acked = _read_head(self._head_file)
        chain = self._check(acked)
        try:
            _create_private(self.path)
            self._db = self._connect(str(path))
        except (sqlite3.Error, OSError) as e:
            raise LedgerError(f"cannot open the ledger {path}: {e}") from None
        try:
            if chain.trailing:
                chain = self._link_trailing(chain)
            if hasattr(os, "O_DIRECTORY"):
                self._dir_fd = os.open(self._head_file.parent, os.O_RDONLY | os.O_DIRECTORY)
            self._count, self._head = chain.count, chain.head
            if acked != (chain.count, chain.head):
                _write_head(self._head_file, chain.count, chain.head, self._dir_fd)
        except (sqlite3.Error, OSError) as e:
            self.close()
            raise LedgerError(f"cannot open the ledger {path}: {e}") from None
        except BaseException:
            self.close()
            raise
        self._acked = self._count

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=5000")
        # FULL: a commit is on disk (the -wal fsynced) before the head record counts it and the Embed is
        # acknowledged. SQLite's default, set in case a build defaults to NORMAL.
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        cols = {r[1] for r in db.execute("PRAGMA table_info(embeds)")}
        if "link" not in cols:
            db.execute("ALTER TABLE embeds ADD COLUMN link TEXT")  # made by an older version: _link_trailing
        if "config_sha256" not in cols:
            db.execute("ALTER TABLE embeds ADD COLUMN config_sha256 TEXT")  # its records keep NULL
        # after the column exists (a ledger from before it gains it just above); covers configs()
        db.execute("CREATE INDEX IF NOT EXISTS embeds_key ON embeds (key_id, model, method, config_sha256)")
        return db

    def _check(self, acked: tuple[int, str] | None) -> _Chain:
        """Check the file before anything writes to it (a read-only connection: a damaged ``-wal`` is
        left as it is, not checkpointed or reset) and compare its chain with the head record."""
        where, hf = str(self.path), self._head_file
        remedy = ("(The file was truncated or replaced by an older copy, or its -wal file was damaged after a "
                  f"crash.) Restore the ledger from a backup that has them (keep a copy of {self.path.name} and its "
                  "-wal file first). If you accept the loss (e.g. you restored an older backup on purpose), move "
                  f"{hf} away and start again: the ledger is then adopted as it is")
        if not self.path.exists():
            if acked and acked[0]:
                raise LedgerIntegrityError(
                    f"the ledger {where} does not exist, but its head record {hf} says {acked[0]} records were "
                    f"acknowledged. The server was not started. Restore the ledger from a backup (or fix the "
                    f"ledger_url if it moved). To start a new, empty ledger instead, move {hf} away")
            return _Chain()
        size = self.path.stat().st_size
        try:
            ro = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open the ledger {where}: {e}") from None
        try:
            problems = [r[0] for r in ro.execute("PRAGMA integrity_check(20)")]
            if problems != ["ok"]:
                raise _corrupt(where, problems, f"{self.path.name} and its -wal file")
            cols = {r[1] for r in ro.execute("PRAGMA table_info(embeds)")}
            link = "link" if "link" in cols else "NULL"
            columns = _CHAIN_COLUMNS if "config_sha256" in cols else _CHAIN_COLUMNS.replace("config_sha256", "NULL")

            def batches():
                after = 0
                while rows := ro.execute(f"SELECT {columns}, {link} FROM embeds WHERE id > ? ORDER BY id "
                                         f"LIMIT {_CHAIN_BATCH}", (after,)).fetchall():
                    yield rows
                    after = rows[-1][0]

            chain = _walk(batches() if cols else (), where, str, mark=acked[0] if acked else None)
        except sqlite3.Error as e:
            if _sqlite_corrupt(e):
                raise _corrupt(where, [str(e)], f"{self.path.name} and its -wal file") from None
            raise LedgerError(f"cannot read the ledger {where}: {e}") from None
        finally:
            ro.close()
        if acked is None:
            if chain.rows:
                log.warning("ledger %s has no head record %s (made by an older version, or the record was removed): "
                            "adopting its %d records as they are (SQLite integrity check passed%s); from now on "
                            "missing or changed records are detected", where, hf, chain.rows,
                            f", {chain.count} hash-chained records verified" if chain.count else "")
            return chain
        count, head = acked
        if chain.count < count:
            if size == 0 and not chain.rows:
                what = "is empty (0 bytes)"
            elif not chain.rows:
                what = "holds no records"
            else:
                what = f"holds {chain.count} hash-chained records"
            raise _short(where, chain.count, count, f"its head record {hf} says so", what, remedy)
        if chain.at_mark != head:
            raise LedgerIntegrityError(
                f"the ledger {where} is not the one its head record {hf} describes: its first {count} records do "
                "not hash to the acknowledged head, so records were changed or replaced (another database file "
                f"put in its place?). The server was not started. {remedy}")
        if chain.count > count:
            log.info("ledger %s: %d records committed after the last acknowledged one (the server stopped between "
                     "the two); kept", where, chain.count - count)
        if chain.unlinked:
            log.warning("ledger %s: %d records have no hash-chain link (written by an older shallowmark version); "
                        "they are kept but not covered by the integrity check", where, chain.unlinked)
        return chain

    def _link_trailing(self, chain: _Chain) -> _Chain:
        """Link the rows after the last linked one that have no link (an older version's rows, all of them
        in a ledger it made), in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            after = chain.last_linked_id
            while rows := db.execute(f"SELECT {_CHAIN_COLUMNS} FROM embeds WHERE id > ? ORDER BY id LIMIT "
                                     f"{_CHAIN_BATCH}", (after,)).fetchall():
                links = []
                for r in rows:
                    chain.head = _link(chain.head, _content(*r[1:]))
                    links.append((chain.head, r[0]))
                db.executemany("UPDATE embeds SET link = ? WHERE id = ?", links)
                chain.count += len(rows)
                after = rows[-1][0]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.info("ledger %s: linked %d records that had no hash-chain link (written by an older version)",
                 self.path, chain.trailing)
        chain.trailing = 0
        return chain

    def _failed(self, what: str, e: sqlite3.Error) -> LedgerError:
        if _sqlite_corrupt(e):
            log.error("%s", _corrupt(str(self.path), [str(e)], f"{self.path.name} and its -wal file", at_start=False))
            return LedgerIntegrityError(_RUNTIME_CORRUPT.format(e))
        return LedgerError(f"cannot {what} the ledger: {e}")

    def record(self, *, tenant: str, key_id: str, method: str, model: str, image_sha256: str,
               request_id: str, source: str, created_at: datetime | None = None,
               config_sha256: str | None = None, config: str | None = None) -> bool:
        """Append one embed. Returns False if this exact embed was already recorded under
        ``(tenant, request_id)`` (a retry).

        ``config`` is the method's effective configuration as canonical JSON
        (:func:`shallowmark.server.attestation.config_json`) and ``config_sha256`` its SHA-256: the
        record holds the digest (in the hash chain) and the ledger keeps each configuration once, so
        that Verify can check an image under the configuration it was embedded with (:meth:`configs`).

        Raises:
            InvalidParameterError: ``request_id`` was already used by this tenant for a *different*
                embed (the image must then not be returned: the ledger could not record it).
            LedgerIntegrityError: the database is corrupt.
            LedgerError: the write failed, or the head record could not be written (the embed must
                then not be returned to the caller; its retry completes the head record).
        """
        _checked_config(config_sha256, config)
        when = _iso(created_at or datetime.now(timezone.utc))
        row = (key_id, method, model, image_sha256, source, config_sha256)
        content = _content(tenant, key_id, method, model, image_sha256, when, request_id, source, config_sha256)
        with self._lock:
            link = _link(self._head, content)
            try:
                if config is not None:  # before the record that names it (a left-over one costs nothing)
                    self._db.execute("INSERT OR IGNORE INTO method_configs (config_sha256, method, config) "
                                     "VALUES (?, ?, ?)", (config_sha256, method, config))
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO embeds (tenant, key_id, method, model, image_sha256, created_at, "
                    "request_id, source, link, config_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (tenant, key_id, method, model, image_sha256, when, request_id, source, link, config_sha256))
                inserted = cur.rowcount == 1
                if inserted:
                    self._count, self._head = self._count + 1, link
                else:
                    old = self._db.execute("SELECT key_id, method, model, image_sha256, source, config_sha256 "
                                           "FROM embeds WHERE tenant = ? AND request_id = ?",
                                           (tenant, request_id)).fetchone()
            except sqlite3.Error as e:
                raise self._failed("write to", e) from None
            if self._head_file is not None and self._acked < self._count:
                try:
                    _write_head(self._head_file, self._count, self._head, self._dir_fd)
                except OSError as e:
                    raise LedgerError(f"the embed was written to the ledger but its head record {self._head_file} "
                                      f"cannot be updated ({e}); it is not acknowledged") from None
                self._acked = self._count
        if inserted:
            return True
        if not _same_embed(tuple(old), row):
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
            raise self._failed("read", e) from None
        return _page(rows, page_size, datetime.fromisoformat)

    def configs(self, keys, model: str) -> dict[tuple[str, str], list[tuple[str | None, str | None]]]:
        """For each ``(key_id, method)`` of ``keys``, every method configuration the key was embedded
        with by that method on ``model``, by any tenant (the key id is a commitment to the key
        material, which whoever asks holds): ``(config_sha256, config)`` sorted by digest, with
        ``(None, None)`` (first) for records made before the configuration was recorded, and an
        empty list for a key without a record. One query per 500 keys.

        Raises:
            LedgerIntegrityError: a stored configuration is missing or does not match its digest.
        """
        def fetch(sql, args):
            try:
                with self._lock:
                    return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise self._failed("read", e) from None

        return _configs(keys, model, fetch, str(self.path), "embeds", "method_configs", "?")

    def count(self, tenant: str | None = None) -> int:
        """Number of rows (of one tenant, or all)."""
        try:
            with self._lock:
                if tenant is None:
                    return self._db.execute("SELECT COUNT(*) FROM embeds").fetchone()[0]
                return self._db.execute("SELECT COUNT(*) FROM embeds WHERE tenant = ?", (tenant,)).fetchone()[0]
        except sqlite3.Error as e:
            raise self._failed("read", e) from None

    def close(self) -> None:
        with self._lock:
            if getattr(self, "_db", None) is not None:
                self._db.close()
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None


_PG_TABLE = "shallowmark_embeds"
_PG_HEAD = "shallowmark_ledger_head"

_PG_HEAD_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_PG_HEAD} (
    id      SMALLINT PRIMARY KEY CHECK (id = 1),
    records BIGINT NOT NULL,
    head    TEXT NOT NULL
);
"""

_PG_CONFIGS = "shallowmark_method_configs"

# The per-embed method configuration (added after the hash chain; a table without it is migrated by
# :meth:`PostgresLedger._prepare`). Its own statements, so that the migration can run them alone.
_PG_CONFIG_SCHEMA = f"""
CREATE INDEX IF NOT EXISTS {_PG_TABLE}_key ON {_PG_TABLE} (key_id, model, method, config_sha256);
CREATE TABLE IF NOT EXISTS {_PG_CONFIGS} (
    config_sha256 TEXT PRIMARY KEY,
    method        TEXT NOT NULL,
    config        TEXT NOT NULL
);
"""

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
    link         TEXT,
    config_sha256 TEXT,
    UNIQUE (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS {_PG_TABLE}_tenant_id ON {_PG_TABLE} (tenant, id);
CREATE INDEX IF NOT EXISTS {_PG_TABLE}_sha ON {_PG_TABLE} (image_sha256);
{_PG_CONFIG_SCHEMA}{_PG_HEAD_SCHEMA}
INSERT INTO {_PG_HEAD} (id, records, head) VALUES (1, 0, '{GENESIS}') ON CONFLICT (id) DO NOTHING;
"""

#: Key of the advisory lock held while creating the table: replicas starting together would otherwise
#: race in CREATE TABLE IF NOT EXISTS (it is not atomic in PostgreSQL and can fail on the catalog).
_PG_SCHEMA_LOCK = 0x5EA1_ED6E

#: SQLSTATEs of a damaged relation (data_corrupted, index_corrupted).
_PG_CORRUPT = ("XX001", "XX002")


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


def pg_head_file(url: str, state_dir: str | os.PathLike[str]) -> Path:
    """The default local head file of the PostgreSQL ledger at ``url``:
    ``<state_dir>/ledger-pg-<dbname>-<12 hex>.head``.

    The hex is a SHA-256 of the URL's host, port and database name, so two ledgers (two databases,
    or one name on two servers) never share a file. Neither the password (a file name is no place
    for it, even hashed) nor the user takes part: the same database reached as another role is the
    same ledger.

    Raises:
        InvalidParameterError: ``url`` is not a valid libpq URL.
        LedgerError: ``psycopg`` is missing.
    """
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise LedgerError("a PostgreSQL ledger needs psycopg: pip install 'shallowmark[server]'") from None
    try:
        d = conninfo_to_dict(url)
    except Exception as e:  # noqa: BLE001 - psycopg.ProgrammingError; the URL may hold a password
        raise InvalidParameterError(f"ledger_url is not a valid PostgreSQL URL: {_pg_message(e)}") from None
    dbname = str(d.get("dbname") or d.get("user") or "")   # libpq's default database is the user's name
    ident = json.dumps([str(d.get("host") or ""), str(d.get("port") or ""), dbname])
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", dbname)[:40] or "default"
    return Path(state_dir) / f"ledger-pg-{label}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}.head"


def _rolled_back(remedy_file: Path) -> str:
    """What the operator can do about a database older than this replica's local head file."""
    return ("Restore a newer backup of the database, one that holds those records (or fix ledger_url if it "
            "points at the wrong database). To accept the database as it is instead, so that the acknowledged "
            "records it lacks stay lost (that is your decision to take, on purpose), delete this replica's "
            f"local head file {remedy_file} and start again: the replica then adopts the database's current head. "
            "Every other replica that refuses to start the same way has a local head file of its own to delete")


class PostgresLedger:
    """Ledger in a PostgreSQL table (``shallowmark_embeds``), same behaviour as :class:`SQLiteLedger`.

    One connection in autocommit mode behind a lock (the ledger does one short transaction per call,
    so a pool would buy nothing at the server's request rate). A connection that broke (the
    database restarted, an idle timeout) is re-opened once per call and the statement re-run,
    which is safe because every write is idempotent per ``(tenant, request_id)``.

    The chain's head is the one row of ``shallowmark_ledger_head``: each insert locks it (``FOR
    UPDATE``, which also orders the inserts of several replicas), links the record to it and moves
    it, in one transaction. With ``head_file``, the newest head this process has seen acknowledged
    is also kept in that local file (see the module docstring): it catches a restore of the whole
    database to an older state, which restores the head row too. A role that only runs the ledger
    needs SELECT and INSERT on ``shallowmark_embeds`` and ``shallowmark_method_configs``, and SELECT
    and UPDATE on ``shallowmark_ledger_head``; creating the tables, or adding the chain to a table an older
    version made, needs a role that may (the owner).

    Args:
        url: a libpq URL, ``postgresql://[user[:password]@][host][:port][/dbname][?param=value...]``.
            ``connect_timeout`` defaults to 10 s when the URL does not set it.
        head_file: this replica's local head file (the server's default: :func:`pg_head_file`);
            ``None``: none, so a rollback of the whole database is not detected.

    Raises:
        InvalidParameterError: ``url`` is not a valid libpq URL.
        LedgerIntegrityError: records are missing, changed or deleted, or the database is older
            than (or diverged from) what ``head_file`` says was acknowledged (see the module docstring).
        LedgerError: ``psycopg`` is missing, the database cannot be reached, or the tables cannot be
            created or used by this role.
    """

    def __init__(self, url: str, head_file: str | os.PathLike[str] | None = None):
        try:
            import psycopg
        except ImportError:
            raise LedgerError("a PostgreSQL ledger needs psycopg: pip install 'shallowmark[server]'") from None
        self._psycopg = psycopg
        self._url = url
        self.where = describe_pg_url(url)
        self._lock = threading.Lock()
        self._db = None
        self._head_file = Path(head_file) if head_file is not None else None
        self._dir_fd: int | None = None
        # (count, head): the newest acknowledged head this process knows of, and the one in the local
        # file (they differ only after a failed write of the file); None without a head file
        self._seen: tuple[int, str] | None = None
        self._written: tuple[int, str] | None = None
        local = _read_head(self._head_file, self.where) if self._head_file is not None else None
        with self._lock:
            self._db = self._connect()
            try:
                self._prepare(local)
                head = self._check(local)
                if self._head_file is not None:
                    self._open_head_file(local, head)
            except psycopg.Error as e:
                self._abort()
                raise LedgerError(f"cannot open the ledger tables in {self.where}: {_pg_message(e)}") from None
            except OSError as e:
                self._abort()
                raise LedgerError(f"cannot write this replica's local head file {self._head_file} of the ledger "
                                  f"{self.where}: {e}") from None
            except BaseException:
                self._abort()
                raise

    def _abort(self) -> None:
        """Close what ``__init__`` opened (it holds the lock, so not :meth:`close`)."""
        self._db.close()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _open_head_file(self, local: tuple[int, str] | None, head: tuple[int, str]) -> None:
        """Move the local head file up to the database's checked head (the same, or ahead of it)."""
        hf = self._head_file
        hf.parent.mkdir(parents=True, exist_ok=True, mode=0o700)   # as the SQLite ledger's folder
        if hasattr(os, "O_DIRECTORY"):
            self._dir_fd = os.open(hf.parent, os.O_RDONLY | os.O_DIRECTORY)
        if local != head:
            _write_head(hf, head[0], head[1], self._dir_fd)
        if local is None:
            log.info("ledger %s: this replica has no local head file %s yet (first start, or a new replica): "
                     "adopted the database's head as it is (%d records); from now on a restore of the database to "
                     "an older state is detected at start", self.where, hf, head[0])
        elif head[0] > local[0]:
            log.info("ledger %s: %d records appended since this replica last saw the head (by other replicas); "
                     "local head file %s moved up", self.where, head[0] - local[0], hf)
        self._seen = self._written = head

    def _column(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s AND NOT "
                                "attisdropped", (_PG_TABLE, name)).fetchone() is not None

    def _check_privilege(self, table: str, write: str, doing: str, why: str) -> None:
        """Refuse at start a role that may not read ``table`` or ``write`` (an SQL privilege) it."""
        role, can_read, can_write = self._db.execute(
            f"SELECT current_user, has_table_privilege(%s, 'SELECT'), has_table_privilege(%s, '{write}')",
            (table, table)).fetchone()
        if not (can_read and can_write):
            raise LedgerError(f"the role {role} may not {'read' if not can_read else doing} {table} in {self.where}, "
                              f"which {why}: GRANT SELECT, {write} ON {table} TO {role}")

    def _state(self) -> tuple[bool, bool, bool, bool]:
        """Whether the embeds table, its link column and the head row exist, and whether the per-embed
        configuration (its column and table) does."""
        db = self._db
        table, head, configs = db.execute("SELECT to_regclass(%s), to_regclass(%s), to_regclass(%s)",
                                          (_PG_TABLE, _PG_HEAD, _PG_CONFIGS)).fetchone()
        link = table is not None and self._column("link")
        configured = table is not None and configs is not None and self._column("config_sha256")
        if head is not None:
            self._check_privilege(_PG_HEAD, "UPDATE", "update", "every embed does (it holds the ledger's hash-chain head)")
        if configs is not None:
            self._check_privilege(_PG_CONFIGS, "INSERT", "insert into", "every embed and verify does (it holds the "
                                  "method configurations images were embedded with)")
        row = head is not None and db.execute(f"SELECT 1 FROM {_PG_HEAD} WHERE id = 1").fetchone() is not None
        return table is not None, link, row, configured

    def _prepare(self, local: tuple[int, str] | None = None) -> None:
        """Create the tables, or add the chain to a ledger an older version made (adoption).

        An existing, complete ledger is used as it is: CREATE ... IF NOT EXISTS would still need the
        CREATE privilege on the schema, which a least-privilege role does not have."""
        table, link, row, configured = self._state()
        if table and link and row and configured:
            return
        if not table and local and local[0]:
            # a database restored to before the ledger existed (or another one): do not create an empty
            # ledger in it, which would then be "ahead" of nothing and look fine to a new replica
            raise _short(self.where, 0, local[0], f"this replica's local head file {self._head_file} says so",
                         f"has no {_PG_TABLE} table", _rolled_back(self._head_file))
        db = self._db
        try:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                table, link, row, configured = self._state()   # another replica may have done it meanwhile
                if not table:
                    db.execute(_PG_SCHEMA)
                    return
                if not configured:   # made before the per-embed configuration: its records keep NULL
                    db.execute(f"ALTER TABLE {_PG_TABLE} ADD COLUMN IF NOT EXISTS config_sha256 TEXT")
                    db.execute(_PG_CONFIG_SCHEMA)
                if row and not link:
                    raise LedgerIntegrityError(
                        f"the ledger {self.where} has a hash-chain head row in {_PG_HEAD} but {_PG_TABLE} has lost "
                        "its link column, so its records cannot be checked. The server was not started on it. "
                        "Restore the database from a backup; to adopt the records as they are, DELETE FROM "
                        f"{_PG_HEAD} as the table owner and start again")
                elif not (link and row):
                    self._adopt(link)
        except self._psycopg.errors.InsufficientPrivilege as e:
            if not table:
                raise LedgerError(f"cannot create the ledger tables in {self.where}: {_pg_message(e)}") from None
            raise LedgerError(
                f"the ledger in {self.where} was made by an older shallowmark version (or its head row was "
                f"removed) and needs its hash chain or its method-configuration table added, which this role may "
                f"not do ({_pg_message(e)}): start "
                f"this version once with the role that owns {_PG_TABLE}, then again with this one") from None

    def _adopt(self, has_link: bool) -> None:
        db = self._db
        if not has_link:
            db.execute(f"ALTER TABLE {_PG_TABLE} ADD COLUMN IF NOT EXISTS link TEXT")
        db.execute(_PG_HEAD_SCHEMA)
        chain = _walk(self._batches(db, "link"), self.where, _iso)
        after = chain.last_linked_id
        while rows := db.execute(f"SELECT {_CHAIN_COLUMNS} FROM {_PG_TABLE} WHERE id > %s ORDER BY id LIMIT "
                                 f"{_CHAIN_BATCH}", (after,)).fetchall():
            links = []
            for r in rows:
                chain.head = _link(chain.head, _content(*r[1:6], _iso(r[6]), r[7], r[8], r[9]))
                links.append((chain.head, r[0]))
            with db.cursor() as cur:
                cur.executemany(f"UPDATE {_PG_TABLE} SET link = %s WHERE id = %s", links)
            chain.count += len(rows)
            after = rows[-1][0]
        db.execute(f"INSERT INTO {_PG_HEAD} (id, records, head) VALUES (1, %s, %s)", (chain.count, chain.head))
        log.warning("ledger %s had no hash-chain head (made by an older version, or the head row was removed): "
                    "adopted its %d records as they are (%d linked now); from now on missing or changed records "
                    "are detected", self.where, chain.rows, chain.trailing)

    @staticmethod
    def _batches(db, link: str):
        after = 0
        while rows := db.execute(f"SELECT {_CHAIN_COLUMNS}, {link} FROM {_PG_TABLE} WHERE id > %s ORDER BY id "
                                 f"LIMIT {_CHAIN_BATCH}", (after,)).fetchall():
            yield rows
            after = rows[-1][0]

    def _check(self, local: tuple[int, str] | None = None) -> tuple[int, str]:
        """Verify the chain against the head row, and that it holds this replica's ``local`` head, in one
        snapshot. Returns the head row's ``(count, head)``."""
        db = self._db
        with db.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            count, head = db.execute(f"SELECT records, head FROM {_PG_HEAD} WHERE id = 1").fetchone()
            chain = _walk(self._batches(db, "link"), self.where, _iso, mark=count)
            at_local = None
            if local and local[0] and chain.count >= local[0]:
                # record number local[0] of the chain (the walk above has verified its link)
                at_local = db.execute(f"SELECT id, link FROM {_PG_TABLE} WHERE link IS NOT NULL ORDER BY id "
                                      "OFFSET %s LIMIT 1", (local[0] - 1,)).fetchone()
        head_at = f"the head row in {_PG_HEAD} says so"
        if chain.count < count:
            raise _short(self.where, chain.count, count, head_at,
                         f"holds {chain.count} hash-chained record{'s' if chain.count != 1 else ''}",
                         "Restore the database from a backup that has them. If you accept the loss, "
                         f"DELETE FROM {_PG_HEAD} as the table owner and start again: the ledger is then adopted "
                         "as it is")
        if chain.count > count or chain.at_mark != head:
            raise LedgerIntegrityError(
                f"the ledger {self.where} does not match its head row in {_PG_HEAD} ({chain.count} hash-chained "
                f"records against {count} acknowledged): records were changed or replaced, or the head row was. "
                "The server was not started on it. Restore the database from a backup; if the records are known "
                f"to be right, DELETE FROM {_PG_HEAD} as the table owner and start again to adopt them as they are")
        if chain.unlinked or chain.trailing:
            log.warning("ledger %s: %d records have no hash-chain link (written by an older shallowmark version); "
                        "they are kept but not covered by the integrity check", self.where,
                        chain.unlinked + chain.trailing)
        if local:
            self._check_local(local, chain.count, at_local)
        return count, head

    def _check_local(self, local: tuple[int, str], count: int, at_local: tuple[int, str] | None) -> None:
        """The database (whose chain, of ``count`` records, is verified) must hold the ``local`` head: it
        may be ahead of it (other replicas appended), never behind or beside it."""
        hf, (n, head) = self._head_file, local
        if count < n:
            raise _short(self.where, count, n, f"this replica's local head file {hf} says so, the last with chain "
                         f"hash {head}", f"holds {count} hash-chained record{'s' if count != 1 else ''}",
                         "The database was restored to an older state (an older backup?), or ledger_url points at "
                         f"another database. {_rolled_back(hf)}")
        if n and (at_local is None or at_local[1] != head):
            rid, found = at_local or ("?", "none")
            raise LedgerIntegrityError(
                f"the ledger {self.where} has diverged from what this replica has seen: its record number {n} of "
                f"the hash chain (id {rid}) has chain hash {found}, but this replica's local head file {hf} says "
                f"record number {n} was acknowledged with chain hash {head}. So the database's records up to there "
                "are not the acknowledged ones: it was restored to an older state and written to since, or "
                "ledger_url points at another database. The server was not started on it, so nothing was "
                f"written to it. {_rolled_back(hf)}")

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
                    if getattr(e, "sqlstate", None) in _PG_CORRUPT:
                        log.error("the ledger %s is corrupt: %s", self.where, _pg_message(e))
                        raise LedgerIntegrityError(_RUNTIME_CORRUPT.format(_pg_message(e))) from None
                    raise LedgerError(f"cannot {what} the ledger {self.where}: {_pg_message(e)}") from None

    def record(self, *, tenant: str, key_id: str, method: str, model: str, image_sha256: str,
               request_id: str, source: str, created_at: datetime | None = None,
               config_sha256: str | None = None, config: str | None = None) -> bool:
        """As :meth:`SQLiteLedger.record`."""
        _checked_config(config_sha256, config)
        when = (created_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
        row = (key_id, method, model, image_sha256, source, config_sha256)
        content = _content(tenant, key_id, method, model, image_sha256, _iso(when), request_id, source,
                           config_sha256)

        def write(db):
            with db.transaction():
                head = db.execute(f"SELECT records, head FROM {_PG_HEAD} WHERE id = 1 FOR UPDATE").fetchone()
                if head is None:
                    log.error("the ledger %s has lost its head row (%s)", self.where, _PG_HEAD)
                    raise LedgerIntegrityError(_RUNTIME_CORRUPT.format("its hash-chain head is gone"))
                if self._seen is not None and head[0] < self._seen[0]:
                    # restored to an older state while this server runs (the reconnect after the restore
                    # got here): append nothing to it; the head file keeps the newer head for the next start
                    log.error("the ledger %s went back to an older state while serving: its head row says %d "
                              "records, this replica has seen %d acknowledged (local head file %s)",
                              self.where, head[0], self._seen[0], self._head_file)
                    raise LedgerIntegrityError(_RUNTIME_CORRUPT.format(
                        "it holds fewer records than this server has seen acknowledged"))
                link = _link(head[1], content)
                if config is not None:
                    db.execute(f"INSERT INTO {_PG_CONFIGS} (config_sha256, method, config) VALUES (%s, %s, %s) "
                               "ON CONFLICT (config_sha256) DO NOTHING", (config_sha256, method, config))
                cur = db.execute(
                    f"INSERT INTO {_PG_TABLE} (tenant, key_id, method, model, image_sha256, created_at, request_id, "
                    "source, link, config_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT "
                    "(tenant, request_id) DO NOTHING RETURNING id",
                    (tenant, key_id, method, model, image_sha256, when, request_id, source, link, config_sha256))
                if cur.fetchone() is not None:
                    db.execute(f"UPDATE {_PG_HEAD} SET records = records + 1, head = %s WHERE id = 1", (link,))
                    old, new = None, (head[0] + 1, link)
                else:
                    new = None
                    old = db.execute(f"SELECT key_id, method, model, image_sha256, source, config_sha256 FROM "
                                     f"{_PG_TABLE} WHERE tenant = %s AND request_id = %s",
                                     (tenant, request_id)).fetchone()
            if self._seen is None:
                return old
            # committed (only now: a failed commit must not move it); the local head file goes after the commit
            # and before the Embed is acknowledged, as SQLite's sidecar does (a retry after a failed write,
            # inserting nothing, completes it)
            if new is not None:
                self._seen = new
            if self._seen != self._written:
                try:
                    _write_head(self._head_file, self._seen[0], self._seen[1], self._dir_fd)
                except OSError as e:
                    raise LedgerError(f"the embed was written to the ledger but this replica's local head file "
                                      f"{self._head_file} cannot be updated ({e}); it is not acknowledged") from None
                self._written = self._seen
            return old

        old = self._run("write to", write)
        if old is None:
            return True
        if not _same_embed(tuple(old), row):
            raise _reused_id(request_id)
        return False

    def list(self, tenant: str, *, key_id: str | None = None, page_size: int = 100,
             page_token: str | None = None) -> tuple[list[LedgerEntry], str]:
        """As :meth:`SQLiteLedger.list`: newest first, and the next page's token ("" on the last)."""
        sql, args = _list_query(_PG_TABLE, "%s", tenant, key_id, page_size, page_token)
        rows = self._run("read", lambda db: db.execute(sql, args).fetchall())
        return _page(rows, page_size, lambda t: t.astimezone(timezone.utc))

    def configs(self, keys, model: str) -> dict[tuple[str, str], list[tuple[str | None, str | None]]]:
        """As :meth:`SQLiteLedger.configs`."""
        return _configs(keys, model, lambda sql, args: self._run("read", lambda db: db.execute(sql, args).fetchall()),
                        self.where, _PG_TABLE, _PG_CONFIGS, "%s")

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
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None


def _pg_message(e: Exception) -> str:
    """The first line of a psycopg error (libpq messages never include the password)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_ledger(url: str, *, head_file: str | os.PathLike[str] | None = None) -> SQLiteLedger | PostgresLedger:
    """Open the ledger named by ``url`` (see the module docstring). ``head_file``: a PostgreSQL
    ledger's local head file (see :class:`PostgresLedger`); a SQLite ledger ignores it, its head is
    always ``<ledger file>.head``.

    Raises:
        InvalidParameterError: an unknown scheme, or a malformed PostgreSQL URL.
        LedgerError: the file or the database cannot be opened.
    """
    if url.startswith("sqlite:///"):
        return SQLiteLedger(url[len("sqlite:///"):] or ":memory:")
    if url == "sqlite://" or url == ":memory:":
        return SQLiteLedger(":memory:")
    if url.startswith(("postgres://", "postgresql://")):
        return PostgresLedger(url, head_file)
    if "://" not in url:
        return SQLiteLedger(url)
    raise InvalidParameterError(f"unknown ledger URL scheme in {url.split('://')[0]!r}; "
                                "use sqlite:///path or postgresql://user@host/dbname")
