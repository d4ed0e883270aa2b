"""`nightowl serve --workers N`: several server processes on one database (PostgreSQL, or the embedded SQLite file)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from nightowl.devserver import ServerProcess
from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_two_workers_share_the_load_and_store_each_event_once(tmp_path, store, request):
    env = {"NIGHTOWL_ADMIN_TOKEN": ADMIN_TOKEN, "NIGHTOWL_RATIONALE_PROVIDER": "none"}
    if store == "postgresql":
        env["NIGHTOWL_DATABASE_URL"] = request.getfixturevalue("postgres_url")
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
    engine = create_engine(env.get("NIGHTOWL_DATABASE_URL", f"sqlite:///{tmp_path / 'home' / 'nightowl.db'}"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*), count(DISTINCT idempotency_key) FROM feedback")).one() == (120, 120)
    engine.dispose()


def test_a_token_cached_by_one_worker_writes_nothing_after_its_user_is_deleted_on_another(tmp_path):
    """Each worker caches feedback callers' tokens (auth.TokenCache); the delete reaches only the
    worker that answers it. The old token's feedback must still be refused everywhere (401), also
    once a new user holds the same id: the write checks the token against the stored digest."""
    env = {"NIGHTOWL_ADMIN_TOKEN": ADMIN_TOKEN, "NIGHTOWL_RATIONALE_PROVIDER": "none"}
    with ServerProcess(tmp_path / "home", env=env, workers=2) as server:

        def new_user() -> tuple[dict, int]:
            with httpx.Client(base_url=server.url, timeout=30.0) as c:
                token = c.post("/v1/users", json={"user_id": "w"}, headers=ADMIN).json()["token"]
                auth = {"Authorization": f"Bearer {token}"}
                return auth, c.post("/v1/users/w/posts", json={"text": "a post"}, headers=auth).json()["post_id"]

        def feedback(auth: dict, post_id: int, key: str) -> int:  # a new connection each: both workers see some
            with httpx.Client(base_url=server.url, headers=auth, timeout=30.0) as c:
                return c.post("/v1/users/w/feedback", json={"post_id": post_id, "label": "negative",
                                                          "idempotency_key": key}).status_code

        old_auth, old_post = new_user()
        assert {feedback(old_auth, old_post, f"warm{i}") for i in range(24)} == {201}  # both workers cache it
        assert httpx.delete(f"{server.url}/v1/users/w", headers=ADMIN, timeout=30.0).status_code == 200
        new_auth, new_post = new_user()
        assert {feedback(old_auth, new_post, f"stale{i}") for i in range(24)} == {401}
        assert feedback(new_auth, new_post, "new") == 201
    engine = create_engine(f"sqlite:///{tmp_path / 'home' / 'nightowl.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT idempotency_key FROM feedback")).scalars().all() == ["new"]
    engine.dispose()
