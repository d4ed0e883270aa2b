"""Database engine: SQLite in WAL mode by default, any SQLAlchemy URL (PostgreSQL) by configuration.

Two kinds of session:
- `session_scope`: for anything that writes. On SQLite it takes the database's one write lock up
  front (`BEGIN IMMEDIATE`), after queueing for it: this process's threads on an in-process lock,
  processes on one database file (several server workers, a night run from the CLI) on an flock
  of a file beside it (`WriteLock`).
- `read_scope`: for reads. It takes neither lock: on SQLite a plain (deferred) `BEGIN`, which in
  WAL mode reads a snapshot and never waits for a writer, nor makes one wait; on PostgreSQL an
  ordinary transaction. Nothing written in it is kept. (`read_value`: one value of one hot
  single-statement read, on a raw driver connection: no session, no BEGIN, no Core machinery.)
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.sql.expression import Executable
from sqlmodel import Session, create_engine

from nightowl.errors import Unavailable

# How long a writer waits for the database's write lock (SQLite's busy_timeout, and this
# process's queue in front of it) before the request fails with 503 instead of hanging.
BUSY_TIMEOUT_S = 30

# SQLite connections kept open for reuse: the server's thread pool (anyio's default: 40 threads)
# plus its own threads (group committer, rationale worker, scheduler).
SQLITE_POOL_SIZE = 48

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
    # A pool that covers every thread that may hold a connection at once (the server's thread pool,
    # the committer, the workers): SQLAlchemy closes a connection returned beyond pool_size, and
    # reopening one (its pragmas, the schema read again) cost more than the query it was for.
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S},
        pool_size=SQLITE_POOL_SIZE,
        max_overflow=SQLITE_POOL_SIZE // 2,
    )

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

    # SQLite admits one writer at a time; writers queue on a lock instead of polling SQLite's
    # busy handler, whose growing sleeps (1, 2, 5, 10 ... 100 ms) turn contention into long tails.
    file_backed = parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:")
    engine.nightowl_write_lock = WriteLock(Path(parsed.database + "-writelock") if file_backed else None)
    return engine


class WriteLock:
    """The queue in front of SQLite's one write lock: this process's threads wait on an RLock (it
    is reentrant: a write may nest), and whichever holds it waits for the processes on the same
    database on an flock of `path`. The kernel wakes a waiter as the holder lets go, and a process
    that dies lets go: no polling, nothing stale. `acquire` gives up after BUSY_TIMEOUT_S."""

    def __init__(self, path: Path | None):
        self.path = path
        self._threads = threading.RLock()
        self._depth = 0  # this process's nesting: the flock is taken at 0 and let go back at 0
        self._fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if not self._threads.acquire(timeout=timeout):
            return False
        if self._depth == 0 and self.path is not None:
            try:
                fd = _flock(self.path, max(0.0, deadline - time.monotonic()))
            except BaseException:
                self._threads.release()
                raise
            if fd is None:
                self._threads.release()
                return False
            self._fd = fd
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor of an flock lets it go
        self._threads.release()

    def __enter__(self) -> "WriteLock":
        if not self.acquire(BUSY_TIMEOUT_S):
            raise Unavailable(f"the database is busy: no write slot within {BUSY_TIMEOUT_S} s; retry later")
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(path: Path, timeout: float) -> int | None:
    """An exclusive flock of `path` on a new descriptor (returned), or None after `timeout`.
    flock() itself cannot time out, so a contended lock is waited for in a helper thread; if the
    caller gives up first, the helper lets the lock go as soon as it gets it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    got, decided = threading.Event(), threading.Lock()
    abandoned = False

    def wait() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return
        with decided:
            if abandoned:
                os.close(fd)
            else:
                got.set()

    threading.Thread(target=wait, name="nightowl-write-flock", daemon=True).start()
    if got.wait(timeout):
        return fd
    with decided:
        if got.is_set():
            return fd
        abandoned = True
    return None


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error: nothing written half-way."""
    with write_lock(engine), Session(engine, expire_on_commit=False) as session:
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


def reads_never_wait(engine: Engine) -> bool:
    """True when a small read is safe to run on an event loop: SQLite in WAL mode reads a local
    file and takes no lock a writer holds (a server's read may wait on the network or a lock)."""
    return engine.dialect.name == "sqlite"


def read_value(engine: Engine, statement: Executable, params: dict) -> Any:
    """The first column of the first row `statement` reads, or None. For the one-row read that
    every request makes (a bearer token's user): it runs on a raw driver connection from the
    engine's pool, as the dialect compiled it once, because SQLAlchemy's per-execute work
    (events, execution contexts, result objects) cost many times the indexed query itself. Reads only: on SQLite the pool's connections begin nothing
    themselves (autocommit: the statement reads its own snapshot and waits for no writer); on
    PostgreSQL the implicit transaction is rolled back as the connection goes back to the pool."""
    sql, names = _compiled(engine, statement)
    conn = engine.raw_connection()
    try:
        cursor = conn.cursor()
        try:
            cursor.execute(sql, [params[name] for name in names] if names is not None else params)
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        conn.close()  # back to the pool (its reset rolls back whatever the driver began)
    return None if row is None else row[0]


def _compiled(engine: Engine, statement: Executable) -> tuple[str, list[str] | None]:
    """`statement`'s SQL for this engine's driver and, for a positional paramstyle, its
    parameters' order; compiled once per engine."""
    cache = engine.__dict__.setdefault("nightowl_compiled", {})
    hit = cache.get(id(statement))
    if hit is None or hit[0] is not statement:
        compiled = statement.compile(dialect=engine.dialect)
        names = list(compiled.positiontup) if compiled.positional else None
        hit = cache[id(statement)] = (statement, compiled.string, names)
    return hit[1], hit[2]


def write_lock(engine: Engine):
    """The engine's WriteLock (it raises Unavailable after BUSY_TIMEOUT_S); nothing on PostgreSQL."""
    return getattr(engine, "nightowl_write_lock", None) or nullcontext()
