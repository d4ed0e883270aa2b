"""Black box: acknowledged feedback survives `kill -9` of a real server, and retries store it once."""

from __future__ import annotations

import threading

import httpx

from nightowl.devserver import ServerProcess
from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_acknowledged_feedback_survives_kill_9(tmp_path):
    env = {"NIGHTOWL_ADMIN_TOKEN": ADMIN_TOKEN, "NIGHTOWL_RATIONALE_PROVIDER": "none"}
    server = ServerProcess(tmp_path / "home", env=env).start()
    try:
        tokens, posts = {}, {}
        for user in ("u0", "u1", "u2"):
            r = httpx.post(f"{server.url}/v1/users", json={"user_id": user}, headers=ADMIN)
            tokens[user] = {"Authorization": f"Bearer {r.json()['token']}"}
            r = httpx.post(f"{server.url}/v1/users/{user}/posts", json={"text": f"hello from {user}"}, headers=tokens[user])
            posts[user] = r.json()["post_id"]

        acked: set[tuple[str, str]] = set()
        lock = threading.Lock()
        stop = threading.Event()

        def client(user: str) -> None:
            with httpx.Client(base_url=server.url, headers=tokens[user], timeout=5.0) as c:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    key = f"{user}-{i}"
                    body = {"post_id": posts[user], "label": "negative", "idempotency_key": key}
                    try:
                        r = c.post(f"/v1/users/{user}/feedback", json=body)
                    except httpx.HTTPError:
                        return  # the server died under us: this one was never acknowledged
                    if r.status_code in (200, 201):
                        with lock:
                            acked.add((user, key))

        threads = [threading.Thread(target=client, args=(u,)) for u in tokens]
        for t in threads:
            t.start()
        while len(acked) < 60:  # mid-load
            threading.Event().wait(0.05)
        server.kill9()
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        server.stop()

    restarted = ServerProcess(tmp_path / "home", env=env).start()
    try:
        stored: dict[str, list[str]] = {}
        for user, h in tokens.items():
            # the history carries a post's newest feedback only: page through all of it
            url = f"{restarted.url}/v1/users/{user}/posts/{posts[user]}/feedback?limit=500"
            stored[user] = [f["idempotency_key"] for f in httpx.get(url, headers=h).json()["items"]]
        for user, key in acked:
            assert stored[user].count(key) == 1, f"acknowledged feedback {key} lost or duplicated"
        # A client retrying everything it sent (acknowledged or not) still stores each key once.
        for user, key in list(acked)[:20]:
            body = {"post_id": posts[user], "label": "negative", "idempotency_key": key}
            r = httpx.post(f"{restarted.url}/v1/users/{user}/feedback", json=body, headers=tokens[user])
            assert r.status_code == 200 and r.json()["duplicate"]
        total = sum(len(keys) for keys in stored.values())
        assert len(set(k for keys in stored.values() for k in keys)) == total
    finally:
        restarted.stop()
