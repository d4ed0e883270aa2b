"""Group commit of feedback, on SQLite and PostgreSQL: concurrent requests share one transaction,
each is answered only once its group is committed, and one bad request fails alone."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, func, select

from nightowl.day import logger
from nightowl.day.group_commit import committer_for
from nightowl.errors import Conflict, NotFound, Unavailable
from nightowl.memory.models import Feedback, Post
from nightowl.runtime import Runtime
from tests.conftest import make_settings


@pytest.fixture
def rt(tmp_path, db_url):
    # No model: feedback never predicts, and posts are inserted directly.
    rt = Runtime(make_settings(tmp_path / "home", database_url=db_url, ingest_group_commit=True))
    yield rt
    rt.close()


def _user_with_post(rt, user_id: str) -> int:
    logger.create_user(rt, user_id)
    with Session(rt.engine) as s:
        post = Post(user_id=user_id, text=f"a post by {user_id}")
        s.add(post)
        s.commit()
        return post.id


def _stored(rt, user_id: str) -> list[Feedback]:
    with Session(rt.engine) as s:
        return list(s.exec(select(Feedback).where(Feedback.user_id == user_id).order_by(Feedback.id)))


class Gate:
    """Holds the committer inside a group, so that the requests sent meanwhile queue up as the next."""

    def __init__(self, rt):
        self.committer = committer_for(rt)
        self.open = threading.Event()
        self.entered = threading.Event()
        self.thread = threading.Thread(target=self.committer.submit, args=(self._hold,))
        self.thread.start()
        assert self.entered.wait(10)

    def _hold(self, _s):
        self.entered.set()
        self.open.wait(30)

    def queued(self) -> int:
        return self.committer._queue.qsize()

    def release(self) -> None:
        self.open.set()
        self.thread.join(10)


def _call(results: dict, name: str, fn, *args, **kwargs) -> threading.Thread:
    def run():
        try:
            results[name] = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            results[name] = exc

    t = threading.Thread(target=run)
    t.start()
    return t


def _enqueue_in_order(gate: Gate, results: dict, calls: list) -> list[threading.Thread]:
    """Start each call once the one before it is queued: the group's order is the list's."""
    threads = []
    for name, fn, args in calls:
        before = gate.queued()
        threads.append(_call(results, name, fn, *args))
        deadline = time.monotonic() + 10
        while gate.queued() <= before:
            assert time.monotonic() < deadline, f"{name} never queued"
            time.sleep(0.002)
    return threads


def test_concurrent_feedback_is_grouped_and_stored_once(rt):
    post_id = _user_with_post(rt, "alice")
    commits = []
    event.listen(rt.engine, "commit", lambda conn: commits.append(1))
    n = 60
    results: dict = {}
    threads = [
        _call(results, i, logger.log_feedback, rt, "alice", post_id, "positive", None, f"k{i}") for i in range(n)
    ]
    for t in threads:
        t.join(60)
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert len(results) == n and not any(r.duplicate for r in results.values())
    assert len(commits) < n  # grouped: fewer commits than requests
    stored = _stored(rt, "alice")
    assert sorted(f.idempotency_key for f in stored) == sorted(f"k{i}" for i in range(n))
    assert {f.id for f in stored} == {r.feedback_id for r in results.values()}


def test_a_held_group_commits_everything_queued_at_once(rt):
    post_id = _user_with_post(rt, "alice")
    commits = []
    event.listen(rt.engine, "commit", lambda conn: commits.append(1))
    gate = Gate(rt)
    groups_before = gate.committer.groups
    results: dict = {}
    calls = [(i, logger.log_feedback, (rt, "alice", post_id, "neutral", None, f"g{i}")) for i in range(20)]
    threads = _enqueue_in_order(gate, results, calls)
    time.sleep(0.05)
    assert results == {}  # nobody answered before the commit holding their row
    gate.release()
    for t in threads:
        t.join(30)
    assert all(r.feedback_id for r in results.values()) and len(results) == 20
    assert gate.committer.groups - groups_before == 2  # the held group, then all 20 in one
    assert 1 <= len(commits) <= 2  # one flush for the 20 (the held group wrote nothing)
    assert len(_stored(rt, "alice")) == 20


def test_one_bad_request_fails_alone_and_same_key_twins_store_once(rt):
    post_id = _user_with_post(rt, "alice")
    bob_post = _user_with_post(rt, "bob")
    logger.delete_user(rt, "bob")  # bob's feedback below names a user and a post that are gone
    first = logger.log_feedback(rt, "alice", post_id, "positive", "first", "used")

    def fk_violation(s):  # a row the database itself refuses: a post that does not exist
        s.add(Feedback(user_id="alice", post_id=10**9, label="positive", idempotency_key="fk"))
        s.flush()

    gate = Gate(rt)
    results: dict = {}
    calls = [
        ("ok1", logger.log_feedback, (rt, "alice", post_id, "negative", None, "ok1")),
        ("gone", logger.log_feedback, (rt, "bob", bob_post, "negative", None, "gone")),
        ("twin_a", logger.log_feedback, (rt, "alice", post_id, "neutral", "twin", "twin")),
        ("conflict", logger.log_feedback, (rt, "alice", post_id, "negative", "other", "used")),
        ("fk", gate.committer.submit, (fk_violation,)),
        ("twin_b", logger.log_feedback, (rt, "alice", post_id, "neutral", "twin", "twin")),
        ("retry", logger.log_feedback, (rt, "alice", post_id, "positive", "first", "used")),
        ("ok2", logger.log_feedback, (rt, "alice", post_id, "positive", None, "ok2")),
    ]
    threads = _enqueue_in_order(gate, results, calls)
    gate.release()
    for t in threads:
        t.join(30)

    assert isinstance(results["gone"], NotFound)
    assert isinstance(results["conflict"], Conflict)
    assert isinstance(results["fk"], IntegrityError)
    assert results["ok1"].duplicate is False and results["ok2"].duplicate is False
    assert results["twin_a"].duplicate is False
    assert results["twin_b"].duplicate is True and results["twin_b"].feedback_id == results["twin_a"].feedback_id
    assert results["retry"].duplicate is True and results["retry"].feedback_id == first.feedback_id
    stored = {f.idempotency_key: f for f in _stored(rt, "alice")}
    assert sorted(stored) == ["ok1", "ok2", "twin", "used"]
    assert (stored["used"].label, stored["used"].reason) == ("positive", "first")


def _held_group(rt, writes: list, with_parameters: bool = False) -> tuple[list, dict]:
    """`writes` (name, fn, args) queued behind a held group and committed as the next one: the
    SQL statements that group ran (with their parameters if asked), and each write's result."""
    gate = Gate(rt)
    results: dict = {}
    threads = _enqueue_in_order(gate, results, writes)
    statements: list = []

    def record(conn, cursor, statement, parameters, *rest):
        statements.append((statement, parameters) if with_parameters else statement)

    event.listen(rt.engine, "before_cursor_execute", record)
    try:
        gate.release()
        for t in threads:
            t.join(30)
    finally:
        event.remove(rt.engine, "before_cursor_execute", record)
    return statements, results


def test_a_group_of_feedback_runs_as_few_statements_as_one(rt):
    """Grouped writes are set-based: the statements a group runs do not grow with its size (one
    query per table, one multi-row INSERT), and each request still gets its own row and answer."""
    post_id = _user_with_post(rt, "alice")
    one, _ = _held_group(rt, [("a", logger.log_feedback, (rt, "alice", post_id, "positive", None, "a"))])
    forty, results = _held_group(
        rt, [(i, logger.log_feedback, (rt, "alice", post_id, "positive", None, f"b{i}")) for i in range(40)]
    )
    assert len(forty) <= len(one) + 1, f"a group of 40 ran {len(forty)} statements, a group of 1 ran {len(one)}"
    assert len({r.feedback_id for r in results.values()}) == 40 and not any(r.duplicate for r in results.values())
    assert sorted(f.idempotency_key for f in _stored(rt, "alice")) == sorted(["a"] + [f"b{i}" for i in range(40)])


def test_a_group_finds_its_rows_by_index_not_by_scanning_a_table(rt):
    """A group's reads must not grow with the rows stored before it. SQLite answers a row-value
    `(user_id, key) IN (...)` with a scan of the whole feedback table (the broker's consumer slowed
    run after run on a growing table); every read a group makes is checked with EXPLAIN."""
    if rt.engine.dialect.name != "sqlite":
        pytest.skip("EXPLAIN QUERY PLAN is SQLite's; PostgreSQL's planner may scan a table this small")
    post_id = _user_with_post(rt, "alice")
    statements, results = _held_group(
        rt, [(i, logger.log_feedback, (rt, "alice", post_id, "positive", None, f"k{i}")) for i in range(5)],
        with_parameters=True,
    )
    assert len(results) == 5
    reads = [(sql, params) for sql, params in statements if sql.lstrip().upper().startswith("SELECT")]
    assert any("idempotency_key" in sql for sql, _ in reads)
    with rt.engine.connect() as conn:
        for sql, params in reads:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
            assert not any(step.startswith("SCAN") for step in plan), (sql, plan)


def test_a_key_stored_by_another_process_mid_group_falls_back_to_one_by_one(rt):
    """Another server (PostgreSQL, several workers) stores a key between the group's reads and its
    INSERT: the multi-row INSERT fails on the unique key, its savepoint is rolled back, and each
    write of the group is written alone: the raced key is answered as the duplicate it is, the
    rest are stored, nothing twice."""
    if rt.engine.dialect.name == "sqlite":
        pytest.skip("on SQLite the committer holds the database's one write lock: no one can store in between")
    post_id = _user_with_post(rt, "alice")
    other = create_engine(rt.settings.database_url)
    raced: list[int] = []

    def another_process_stores_the_key(conn, cursor, statement, *rest):
        if statement.lstrip().upper().startswith("INSERT INTO FEEDBACK") and not raced:
            with Session(other) as s2:
                fb = Feedback(user_id="alice", post_id=post_id, label="negative", idempotency_key="raced")
                s2.add(fb)
                s2.commit()
                raced.append(fb.id)

    event.listen(rt.engine, "before_cursor_execute", another_process_stores_the_key)
    try:
        _, results = _held_group(rt, [
            ("before", logger.log_feedback, (rt, "alice", post_id, "positive", None, "before")),
            ("raced", logger.log_feedback, (rt, "alice", post_id, "negative", None, "raced")),
            ("after", logger.log_feedback, (rt, "alice", post_id, "neutral", None, "after")),
        ])
    finally:
        event.remove(rt.engine, "before_cursor_execute", another_process_stores_the_key)
        other.dispose()
    assert raced, "the race was never set up"
    assert results["raced"].duplicate is True and results["raced"].feedback_id == raced[0]
    assert results["before"].duplicate is False and results["after"].duplicate is False
    stored = _stored(rt, "alice")
    assert sorted(f.idempotency_key for f in stored) == ["after", "before", "raced"]


def test_close_commits_what_is_queued_and_refuses_what_comes_after(rt):
    post_id = _user_with_post(rt, "alice")
    gate = Gate(rt)
    results: dict = {}
    calls = [(i, logger.log_feedback, (rt, "alice", post_id, "positive", None, f"c{i}")) for i in range(10)]
    threads = _enqueue_in_order(gate, results, calls)
    closer = threading.Thread(target=rt.close)
    closer.start()
    time.sleep(0.05)
    gate.release()
    closer.join(30)
    for t in threads:
        t.join(30)
    assert all(not isinstance(r, Exception) for r in results.values()) and len(results) == 10
    assert len(_stored(rt, "alice")) == 10
    with pytest.raises(Unavailable):
        logger.log_feedback(rt, "alice", post_id, "positive", None, "late")


def test_close_errors_queued_work_it_cannot_commit(rt):
    post_id = _user_with_post(rt, "alice")
    gate = Gate(rt)
    results: dict = {}
    calls = [(i, logger.log_feedback, (rt, "alice", post_id, "positive", None, f"s{i}")) for i in range(5)]
    threads = _enqueue_in_order(gate, results, calls)
    gate.committer.close(timeout=0.1)  # the committer is stuck in the held group
    for t in threads:
        t.join(10)
    assert all(isinstance(r, Unavailable) for r in results.values()) and len(results) == 5
    gate.release()
    gate.committer._thread.join(10)
    assert not gate.committer._thread.is_alive()
    assert _stored(rt, "alice") == []  # refused, and never written


def test_per_request_commit_when_group_commit_is_off(tmp_path, db_url):
    rt = Runtime(make_settings(tmp_path / "home", database_url=db_url, ingest_group_commit=False))
    try:
        post_id = _user_with_post(rt, "alice")
        out = logger.log_feedback(rt, "alice", post_id, "positive", None, "k")
        again = logger.log_feedback(rt, "alice", post_id, "positive", None, "k")
        assert (out.duplicate, again.duplicate, again.feedback_id) == (False, True, out.feedback_id)
        assert getattr(rt, "_group_committer", None) is None
        with Session(rt.engine) as s:
            assert s.exec(select(func.count()).select_from(Feedback)).one() == 1
    finally:
        rt.close()
