"""Database engine: SQLite in WAL mode by default, any SQLAlchemy URL (PostgreSQL) by configuration."""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pool_pre_ping: a restarted PostgreSQL doesn't hand us dead connections.
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        # WAL: readers never block the writer. synchronous=FULL: a commit is on disk before we
        # acknowledge it, so acknowledged feedback survives a crash or power loss.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    # pysqlite's own transaction handling defers BEGIN until the first write, which lets two
    # writers both read then deadlock on upgrade; BEGIN IMMEDIATE takes the write lock up front.
    @event.listens_for(engine, "connect")
    def _no_pysqlite_begin(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn) -> None:  # pragma: no cover - trivial
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    # SQLite admits one writer at a time; threads of this process queue on a lock instead of
    # polling SQLite's busy handler, whose growing sleeps turn contention into second-long tails.
    # Other processes (a nightly run from the CLI) still meet busy_timeout.
    engine.nightowl_write_lock = threading.RLock()
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error: nothing written half-way."""
    with getattr(engine, "nightowl_write_lock", nullcontext()), Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
