"""`nightowl serve --workers N`: several server processes on one PostgreSQL database."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from nightowl.cli import app
from nightowl.devserver import ServerProcess
from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_several_workers_on_sqlite_are_refused_with_a_reason(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--workers", "2"], env={"NIGHTOWL_HOME": str(tmp_path / "home")})
    assert result.exit_code == 2
    assert "needs PostgreSQL" in result.output and "NIGHTOWL_DATABASE_URL" in result.output


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def test_two_workers_share_the_load_and_store_each_event_once(tmp_path, postgres_url):
    env = {"NIGHTOWL_ADMIN_TOKEN": ADMIN_TOKEN, "NIGHTOWL_RATIONALE_PROVIDER": "none",
           "NIGHTOWL_DATABASE_URL": postgres_url}
    with ServerProcess(tmp_path / "home", env=env, workers=2) as server:
        assert len(_children(server.proc.pid)) >= 2  # uvicorn's supervisor and its two workers
        with httpx.Client(base_url=server.url, timeout=30.0) as c:
            token = c.post("/v1/users", json={"user_id": "w"}, headers=ADMIN).json()["token"]
            user = {"Authorization": f"Bearer {token}"}
            posts = [c.post("/v1/users/w/posts", json={"text": f"post {i}"}, headers=user).json()["post_id"]
                     for i in range(8)]
        # both workers answer (each has its own model and adapter cache) once both are up; a
        # new connection each time (the kernel spreads connections, not requests, over them)
        seen, deadline = set(), time.monotonic() + 90
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.add(httpx.get(f"{server.url}/healthz", timeout=30.0).json()["process"])

        def send(i: int) -> int:  # every event twice, from two connections: stored once
            body = {"post_id": posts[i % 8], "label": "negative", "idempotency_key": f"k{i}"}
            with httpx.Client(base_url=server.url, headers=user, timeout=30.0) as c:
                return max(c.post("/v1/users/w/feedback", json=body).status_code for _ in range(2))

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(send, list(range(120)) * 2))
    assert set(statuses) <= {200, 201}, statuses
    assert len(seen) == 2 and os.getpid() not in seen
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*), count(DISTINCT idempotency_key) FROM feedback")).one() == (120, 120)
    engine.dispose()
