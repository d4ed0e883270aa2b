"""Ids are never handed out twice, and reads never wait for a writer (issue 12), on SQLite and PostgreSQL.

- after the rows with the highest ids are deleted (their user deleted), the next rows get higher
  ids: a worker or a night still holding an old id can't land on another user's row;
- revision 0002 converts an existing SQLite database in place: rows, ids and the children's
  references to their parents kept;
- read_scope neither queues for the write lock nor waits for another connection's write
  transaction; session_scope fails with Unavailable instead of queueing forever.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool
from sqlmodel import Session, delete, select

from nightowl.errors import Unavailable
from nightowl.memory import db as memory_db
from nightowl.memory import migrations
from nightowl.memory.db import make_engine, read_scope, session_scope
from nightowl.memory.migrations import init_db
from nightowl.memory.models import (
    AdapterVersion,
    Feedback,
    Post,
    Prediction,
    Rationale,
    RationaleJob,
    TrainingRun,
    User,
)

PRE_ALEMBIC = Path(__file__).resolve().parents[1] / "fixtures" / "pre_alembic"
# Children and the column naming their parent post.
POST_CHILDREN = {"prediction": "post_id", "feedback": "post_id", "rationale": "post_id", "rationalejob": "post_id"}


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    init_db(eng)
    yield eng
    eng.dispose()


def _rows_for(s: Session, user_id: str) -> dict[str, int]:
    """One row of every table with a surrogate id, for `user_id`; their ids."""
    post = Post(user_id=user_id, text=f"{user_id}'s words")
    s.add(post)
    s.flush()
    rows = {
        "prediction": Prediction(post_id=post.id, label="neutral", probabilities={"neutral": 1.0}),
        "feedback": Feedback(user_id=user_id, post_id=post.id, label="neutral", idempotency_key=f"k-{post.id}"),
        "rationale": Rationale(post_id=post.id, provider="test", text="because"),
        "adapterversion": AdapterVersion(user_id=user_id, version=1, path=f"{user_id}/v0001"),
        "trainingrun": TrainingRun(user_id=user_id, night_id="n", cutoff=datetime.now(timezone.utc)),
    }
    s.add_all(rows.values())
    s.flush()
    return {"post": post.id} | {name: row.id for name, row in rows.items()}


def _delete_user(s: Session, user_id: str) -> None:
    post_ids = list(s.exec(select(Post.id).where(Post.user_id == user_id)))
    for model in (Prediction, Rationale, RationaleJob, Feedback):
        s.exec(delete(model).where(model.post_id.in_(post_ids)))
    for model in (AdapterVersion, TrainingRun, Post):
        s.exec(delete(model).where(model.user_id == user_id))
    s.exec(delete(User).where(User.id == user_id))


def test_ids_of_a_deleted_users_rows_are_never_handed_out_again(engine):
    with session_scope(engine) as s:
        s.add_all([User(id="alice", token_hash="a" * 64), User(id="bob", token_hash="b" * 64)])
    with session_scope(engine) as s:
        alices = _rows_for(s, "alice")  # alice holds the highest id of every table
    with session_scope(engine) as s:
        _delete_user(s, "alice")
    with session_scope(engine) as s:
        bobs = _rows_for(s, "bob")
    for table, old_id in alices.items():
        assert bobs[table] > old_id, f"{table}: id {bobs[table]} handed out again (alice had {old_id})"


def _sqlite_relations(path: str) -> dict[str, list[tuple]]:
    con = sqlite3.connect(path)
    try:
        return {t: con.execute(f"SELECT rowid, {c} FROM {t} ORDER BY rowid").fetchall() for t, c in POST_CHILDREN.items()}
    finally:
        con.close()


def test_revision_0002_converts_an_existing_sqlite_database_keeping_rows_ids_and_references(tmp_path):
    path = str(tmp_path / "old.db")
    con = sqlite3.connect(path)
    con.executescript((PRE_ALEMBIC / "sqlite.sql").read_text())
    # An adapter trained through feedback that was deleted since: that id must not come back either.
    con.execute("UPDATE adapterversion SET trained_through_feedback_id = 7")
    con.commit()
    posts_before = con.execute("SELECT * FROM post ORDER BY id").fetchall()
    con.close()
    relations = _sqlite_relations(path)
    assert sum(map(len, relations.values())) == 6  # the fixture's children of posts 1-3

    eng = make_engine(f"sqlite:///{path}")
    try:
        assert migrations.upgrade(eng) == (migrations.INITIAL_REVISION, migrations.head())
        con = sqlite3.connect(path)
        try:
            for table in ("post", "prediction", "feedback", "rationale", "adapterversion", "trainingrun"):
                sql = con.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
                assert "AUTOINCREMENT" in sql, table
            assert con.execute("SELECT * FROM post ORDER BY id").fetchall() == posts_before
            assert con.execute("PRAGMA foreign_key_check").fetchall() == []
            assert not con.execute("SELECT name FROM sqlite_master WHERE name LIKE '%held%' OR name LIKE '_alembic%'"
                                   ).fetchall()
        finally:
            con.close()
        assert _sqlite_relations(path) == relations  # every child still names the same parent

        # The highest post (bob's, id 3) and its job go: the next post gets 4, not 3.
        with session_scope(eng) as s:
            s.exec(delete(RationaleJob).where(RationaleJob.post_id == 3))
            s.exec(delete(Post).where(Post.id == 3))
        with session_scope(eng) as s:
            post = Post(user_id="alice", text="after the upgrade")
            s.add(post)
            s.flush()
            fb = Feedback(user_id="alice", post_id=post.id, label="neutral", idempotency_key="new")
            s.add(fb)
            s.flush()
            assert (post.id, fb.id) == (4, 8)
    finally:
        eng.dispose()


def test_revision_0002_downgrades_keeping_rows(tmp_path):
    path = str(tmp_path / "old.db")
    con = sqlite3.connect(path)
    con.executescript((PRE_ALEMBIC / "sqlite.sql").read_text())
    con.close()
    relations = _sqlite_relations(path)
    eng = make_engine(f"sqlite:///{path}")
    try:
        migrations.upgrade(eng)
        with eng.begin() as conn:
            command.downgrade(migrations.config(conn), migrations.INITIAL_REVISION)
        con = sqlite3.connect(path)
        try:
            assert "AUTOINCREMENT" not in con.execute("SELECT sql FROM sqlite_master WHERE name = 'post'").fetchone()[0]
            assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        finally:
            con.close()
        assert _sqlite_relations(path) == relations
    finally:
        eng.dispose()


# -- reads never wait for writes --------------------------------------------------------------

class _Writer:
    """Another connection (as another process would have) holding a write transaction open."""

    def __init__(self, engine):
        self.engine = create_engine(engine.url, poolclass=NullPool)
        self.conn = self.engine.connect()
        if engine.dialect.name == "sqlite":
            self.conn.connection.dbapi_connection.isolation_level = None
            self.conn.exec_driver_sql("BEGIN IMMEDIATE")
        # Holds a row lock (PostgreSQL) and SQLite's write lock until close().
        self.conn.execute(text("UPDATE \"user\" SET name = 'writing' WHERE id = 'alice'"))

    def close(self) -> None:
        try:
            if self.engine.dialect.name == "sqlite":
                self.conn.exec_driver_sql("ROLLBACK")
            else:
                self.conn.rollback()
        finally:
            self.conn.close()
            self.engine.dispose()


def test_read_scope_does_not_wait_for_another_connections_write_transaction(engine):
    with session_scope(engine) as s:
        s.add(User(id="alice", name="Alice", token_hash="a" * 64))
    writer = _Writer(engine)
    names: list[str] = []

    def read() -> None:
        with read_scope(engine) as s:
            names.append(s.get(User, "alice").name)

    try:
        # The writer holds its transaction until the read is over: a read that waited for it would
        # never finish. (A bound of a second failed under load with nothing waiting.)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(60)
        assert not reader.is_alive(), "the read waited for another connection's write transaction"
        assert names == ["Alice"]  # the last committed state, not the writer's
    finally:
        writer.close()


def test_read_scope_takes_no_process_lock_and_keeps_nothing(engine):
    holding, release = threading.Event(), threading.Event()

    def hold():  # a writer of this process, holding the write lock (and, on SQLite, the in-process one)
        with session_scope(engine):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        with read_scope(engine) as s:
            assert s.exec(select(User)).all() == []
            s.add(User(id="ghost", token_hash="g" * 64))
            s.flush()
        assert time.monotonic() - started < 5.0  # the holder lets go after 10 s: a wait would show
    finally:
        release.set()
        t.join(10)
    with Session(engine) as s:
        assert s.get(User, "ghost") is None  # a read session commits nothing


def test_a_writer_that_cannot_get_the_lock_fails_with_unavailable(engine, monkeypatch):
    if not hasattr(engine, "nightowl_write_lock"):
        pytest.skip("only SQLite engines queue writers on an in-process lock")
    monkeypatch.setattr(memory_db, "BUSY_TIMEOUT_S", 0.2)
    holding, release = threading.Event(), threading.Event()

    def hold():
        with session_scope(engine):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        with pytest.raises(Unavailable, match="busy"):
            with session_scope(engine):
                pass
        assert time.monotonic() - started < 5.0  # gave up near the 0.2 s timeout, not at the holder's 10 s
    finally:
        release.set()
        t.join(10)
