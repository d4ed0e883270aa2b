"""Database engine: SQLite in WAL mode by default, any SQLAlchemy URL (PostgreSQL) by configuration.

Two kinds of session:
- `session_scope`: for anything that writes. On SQLite it takes the database's one write lock up
  front (`BEGIN IMMEDIATE`), after this process's threads queue for it on an in-process lock.
- `read_scope`: for reads. It takes neither lock: on SQLite a plain (deferred) `BEGIN`, which in
  WAL mode reads a snapshot and never waits for a writer, nor makes one wait; on PostgreSQL an
  ordinary transaction. Nothing written in it is kept.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

from nightowl.errors import Unavailable

# How long a writer waits for the database's write lock (SQLite's busy_timeout, and this
# process's queue in front of it) before the request fails with 503 instead of hanging.
BUSY_TIMEOUT_S = 30

# The execution option that marks a read-only session's connection (see read_scope).
_READ_ONLY = "nightowl_read_only"


def _wal(cur) -> None:
    """Switch a SQLite file to WAL (it stays so: the mode is stored in the file).

    Switching needs the file to itself, and SQLite answers "database is locked" at once, without
    its busy wait, when another connection is switching too: several processes starting on a new
    database at the same moment. So look first, and retry the switch within the busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pool_pre_ping: a restarted PostgreSQL doesn't hand us dead connections.
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        # WAL: readers never block the writer. synchronous=FULL: a commit is on disk before we
        # acknowledge it, so acknowledged feedback survives a crash or power loss.
        _wal(cur)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    # pysqlite's own transaction handling defers BEGIN until the first write, which lets two
    # writers both read then deadlock on upgrade; BEGIN IMMEDIATE takes the write lock up front.
    # Read-only sessions (read_scope) begin deferred: a WAL reader never waits for the writer.
    @event.listens_for(engine, "connect")
    def _no_pysqlite_begin(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn) -> None:  # pragma: no cover - trivial
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")

    # SQLite admits one writer at a time; threads of this process queue on a lock instead of
    # polling SQLite's busy handler, whose growing sleeps turn contention into second-long tails.
    # Other processes (a nightly run from the CLI) still meet busy_timeout.
    engine.nightowl_write_lock = threading.RLock()
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error: nothing written half-way."""
    with _write_lock(engine), Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def read_scope(engine: Engine) -> Iterator[Session]:
    """A session for reads only: it neither queues for the write lock nor waits for a writer.

    Whatever it reads is one consistent snapshot, and stays readable after the block. Nothing is
    committed: closing the session rolls its transaction back (anything added to it is dropped).
    """
    with Session(engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False) as session:
        yield session


@contextmanager
def _write_lock(engine: Engine) -> Iterator[None]:
    lock = getattr(engine, "nightowl_write_lock", None)
    if lock is None:
        yield
        return
    if not lock.acquire(timeout=BUSY_TIMEOUT_S):
        raise Unavailable(f"the database is busy: no write slot within {BUSY_TIMEOUT_S} s; retry later")
    try:
        yield
    finally:
        lock.release()
