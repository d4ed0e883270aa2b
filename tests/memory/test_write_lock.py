"""Processes on one SQLite file queue for its write lock on an flock beside it (memory.db.WriteLock):
a writer in another process is waited for without polling, a writer that dies lets go, and a
writer that cannot get the lock in time fails with Unavailable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlmodel import select

from nightowl.errors import Unavailable
from nightowl.memory import db as memory_db
from nightowl.memory.db import make_engine, session_scope
from nightowl.memory.models import User

# Another process: takes a write session on the database, says so, and holds it until stdin closes
# (or it is killed).
HOLDER = """
import sys
from nightowl.memory.db import make_engine, session_scope
from nightowl.memory.models import User
engine = make_engine(sys.argv[1])
with session_scope(engine) as s:
    s.add(User(id="holder", token_hash="h" * 64))
    s.flush()
    print("holding", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def db_url(tmp_path):
    from nightowl.memory.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'nightowl.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def _holder(url: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_writer_waits_for_another_process_and_writes_once_it_lets_go(db_url):
    holder = _holder(db_url)
    engine = make_engine(db_url)
    wrote = threading.Event()

    def write():
        with session_scope(engine) as s:
            s.add(User(id="waiter", token_hash="w" * 64))
        wrote.set()

    t = threading.Thread(target=write)
    t.start()
    try:
        assert not wrote.wait(0.5)  # queued behind the other process
        holder.stdin.close()  # the holder commits and exits
        assert holder.wait(30) == 0
        assert wrote.wait(30)
    finally:
        t.join(30)
    with session_scope(engine) as s:
        assert sorted(s.exec(select(User.id)).all()) == ["holder", "waiter"]
    engine.dispose()


def test_a_writer_killed_with_the_lock_lets_go(db_url):
    holder = _holder(db_url)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(30)
    engine = make_engine(db_url)
    started = time.monotonic()
    with session_scope(engine) as s:
        s.add(User(id="after", token_hash="a" * 64))
    assert time.monotonic() - started < 5.0
    with session_scope(engine) as s:
        assert s.exec(select(User.id)).all() == ["after"]  # the killed writer's row never committed
    engine.dispose()


def test_a_writer_that_another_process_keeps_out_fails_with_unavailable(db_url, monkeypatch):
    monkeypatch.setattr(memory_db, "BUSY_TIMEOUT_S", 0.3)
    holder = _holder(db_url)
    engine = make_engine(db_url)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="busy"):
            with session_scope(engine):
                pass
        assert time.monotonic() - started < 5.0
        # it gave up; it did not leave the lock taken behind it: once the holder is done, writes go on
        holder.stdin.close()
        assert holder.wait(30) == 0
        with session_scope(engine) as s:
            s.add(User(id="later", token_hash="l" * 64))
    finally:
        if holder.poll() is None:
            holder.kill()
    engine.dispose()


def test_nested_writes_in_one_thread_take_the_lock_once(db_url):
    engine = make_engine(db_url)
    lock = engine.nightowl_write_lock
    with lock:
        with lock:
            assert lock._depth == 2
        assert lock._depth == 1 and lock._fd is not None
    assert lock._depth == 0 and lock._fd is None
    engine.dispose()
