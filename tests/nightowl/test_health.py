"""Issue 12: reads that never wait for writes, failures answered as JSON with a reason, and a
/healthz that says "degraded" (503) instead of ok when something is wrong.

- while another process holds a write transaction: /healthz, a bad token's 401 and the adapter
  list answer at once; a write answers 503 (busy, Retry-After) once the busy timeout passes;
- a full disk or database is 507, anything unexpected a JSON 500, never text/plain; the CLI
  exits 6 (busy/unreachable) or 7 (full) with the reason;
- /healthz: database (timed), free disk, the rationale worker alive, the queue's lag.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from nightowl.api import create_app
from nightowl.cli import app as cli_app
from nightowl.day import logger
from nightowl.memory import db as memory_db
from nightowl.memory.db import session_scope
from nightowl.memory.models import Post, RationaleJob, User, utcnow
from nightowl.runtime import Runtime
from tests.conftest import admin_headers, make_settings

# Another process holding SQLite's write lock (an open write transaction) until it is killed or `hold_s` pass.
HOLDER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
con.execute("UPDATE user SET name = 'held' WHERE id = 'alice'")
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("ROLLBACK")
"""


def _busy(message: str = "database is locked") -> OperationalError:
    orig = sqlite3.OperationalError(message)
    orig.sqlite_errorcode = 5  # SQLITE_BUSY, as sqlite3 sets it
    return OperationalError("INSERT ...", {}, orig)


def _create_user(client: TestClient, user_id: str) -> dict[str, str]:
    r = client.post("/v1/users", json={"user_id": user_id}, headers=admin_headers())
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


@pytest.fixture
def rt(tmp_path, predictor, monkeypatch):
    monkeypatch.setattr(memory_db, "BUSY_TIMEOUT_S", 2)  # a blocked write gives up after 2 s, not 30
    runtime = Runtime(make_settings(tmp_path / "home"), predictor=predictor)
    yield runtime
    runtime.close()


@pytest.fixture
def api(rt):
    with TestClient(create_app(rt, background=False)) as c:
        yield c


# -- reads never wait for writes ---------------------------------------------------------------

def test_reads_answer_at_once_while_another_process_holds_a_write_transaction(api, rt):
    alice = _create_user(api, "alice")
    bad = {"Authorization": alice["Authorization"][:-2] + ("AA" if not alice["Authorization"].endswith("AA") else "BB")}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, rt.engine.url.database, "8"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"

        started = time.monotonic()
        r = api.get("/healthz")
        assert time.monotonic() - started < 2.0
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text

        started = time.monotonic()
        r = api.get("/v1/users/alice/adapters", headers=bad)
        assert time.monotonic() - started < 1.0
        assert r.status_code == 401 and r.json() == {"detail": "invalid token"}

        started = time.monotonic()
        r = api.get("/v1/users/alice/adapters", headers=alice)
        assert time.monotonic() - started < 1.0
        assert r.status_code == 200 and r.json()["items"] == []

        started = time.monotonic()
        r = api.get("/v1/users/alice/posts", headers=alice)  # the history
        assert time.monotonic() - started < 1.0
        assert r.status_code == 200 and r.json()["total"] == 0

        # A write waits for the lock, up to the busy timeout, then says why: 503, not a 500 after 30 s.
        started = time.monotonic()
        r = api.post("/v1/users", json={"user_id": "bob"}, headers=admin_headers())
        assert time.monotonic() - started < 6.0
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/json"
        assert "busy" in r.json()["detail"] and int(r.headers["retry-after"]) > 0
        assert holder.poll() is None  # the write transaction was held throughout
    finally:
        holder.kill()
        holder.wait()


# -- failures answered as JSON with a reason ---------------------------------------------------

def test_a_full_disk_is_507_with_a_reason(api, monkeypatch):
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", "/home/x/images/ab/cd")

    monkeypatch.setattr(logger, "create_user", full)
    r = api.post("/v1/users", json={"user_id": "bob"}, headers=admin_headers())
    assert r.status_code == 507
    assert "no space left" in r.json()["detail"] and "/home/x" not in r.json()["detail"]


def test_a_full_database_is_507(rt, api):
    _create_user(api, "alice")
    # SQLite's own "database or disk is full": the database may not grow past its present size.
    rt.engine.dispose()
    pages = sqlite3.connect(rt.engine.url.database).execute("PRAGMA page_count").fetchone()[0]

    @event.listens_for(rt.engine, "connect")
    def _cap(dbapi_conn, _record):
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

    statuses = set()
    for i in range(300):
        r = api.post("/v1/users", json={"user_id": f"u{i}", "name": "x" * 200}, headers=admin_headers())
        statuses.add(r.status_code)
        if r.status_code != 201:
            break
    assert statuses == {201, 507} or statuses == {507}, statuses
    assert "full" in r.json()["detail"]


def test_an_unexpected_error_is_a_json_500(rt, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(logger, "create_user", broken)
    with TestClient(create_app(rt, background=False), raise_server_exceptions=False) as c:
        r = c.post("/v1/users", json={"user_id": "bob"}, headers=admin_headers())
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": "internal server error"}


def test_an_unreachable_database_is_503(api, monkeypatch):
    def gone(*_a, **_k):
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(logger, "create_user", gone)
    r = api.post("/v1/users", json={"user_id": "bob"}, headers=admin_headers())
    assert r.status_code == 503 and "unreachable" in r.json()["detail"]


@pytest.mark.parametrize(
    ("error", "code", "words"),
    [(_busy(), 6, "busy"), (OSError(errno.ENOSPC, "No space left on device"), 7, "no space left")],
)
def test_cli_names_busy_and_full_with_their_exit_codes(tmp_path, monkeypatch, error, code, words):
    monkeypatch.setenv("NIGHTOWL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTOWL_RATIONALE_PROVIDER", "none")

    def failing(*_a, **_k):
        raise error

    monkeypatch.setattr(logger, "create_user", failing)
    r = CliRunner().invoke(cli_app, ["users", "create", "bob"])
    assert r.exit_code == code, r.output
    assert words in r.stderr and "Traceback" not in r.output


# -- /healthz says degraded ---------------------------------------------------------------------

def test_healthz_reports_each_check_when_all_is_well(api):
    r = api.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["problems"] == []
    assert body["database"] == "sqlite" and 0 <= body["database_ms"] < 1000
    assert body["disk_free_bytes"] > 0
    assert body["pending_rationales"] == 0 and body["rationale_lag_s"] == 0
    assert body["rationale_worker_alive"] is None  # background=False: this app started no worker


def test_healthz_is_degraded_when_the_disk_is_nearly_full(api, monkeypatch):
    monkeypatch.setattr(logger, "HEALTH_MIN_FREE_BYTES", 1 << 62)
    r = api.get("/healthz")
    assert r.status_code == 503
    assert r.json()["status"] == "degraded"
    assert [p for p in r.json()["problems"] if p.startswith("disk:")]


def test_healthz_is_degraded_when_the_database_is_unreachable(api, monkeypatch):
    def unreachable(_engine):
        raise OperationalError("SELECT 1", {}, Exception("could not connect"))

    monkeypatch.setattr(logger, "read_scope", unreachable)
    r = api.get("/healthz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "degraded" and body["database_ms"] is None and body["pending_rationales"] is None
    assert body["problems"] == ["database: the database is unreachable; retry later"]


def test_healthz_is_degraded_when_the_rationale_worker_died(api):
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    api.app.state.rationale_worker = type("Worker", (), {"_thread": dead})()
    r = api.get("/healthz")
    assert r.status_code == 503
    assert r.json()["rationale_worker_alive"] is False
    assert r.json()["problems"] == ["rationale worker: not running"]


def test_healthz_is_degraded_when_rationale_requests_wait_too_long(api, rt):
    with session_scope(rt.engine) as s:
        s.add(User(id="alice", token_hash="a" * 64))
        s.flush()
        s.add(Post(id=1, user_id="alice", text="hello"))
        s.flush()
        s.add(RationaleJob(post_id=1, next_attempt_at=utcnow() - timedelta(minutes=10)))
    r = api.get("/healthz")
    assert r.status_code == 503
    body = r.json()
    assert body["pending_rationales"] == 1 and 590 < body["rationale_lag_s"] < 700
    assert body["problems"] == [f"rationale queue: a due request has waited {body['rationale_lag_s']:.0f} s"]
    # Not yet due (backing off after a failure): no lag.
    with session_scope(rt.engine) as s:
        job = s.get(RationaleJob, 1)
        job.next_attempt_at = utcnow() + timedelta(minutes=1)
        s.add(job)
    assert api.get("/healthz").json()["rationale_lag_s"] == 0


def test_healthz_documents_503_in_openapi(api):
    spec = api.get("/openapi.json").json()
    responses = spec["paths"]["/healthz"]["get"]["responses"]
    assert {"200", "503"} <= set(responses)
    assert json.dumps(responses["503"]).count("Health") >= 1
