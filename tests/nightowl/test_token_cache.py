"""The token cache (auth.TokenCache) that feedback requests authenticate through: a lookup gone
stale never lets a token write for a user it no longer names, and no other request uses it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from nightowl.api import create_app
from nightowl.auth import TokenCache, hash_token
from nightowl.day import logger
from nightowl.runtime import Runtime
from tests.conftest import admin_headers, make_settings

FAST = {"Content-Type": "application/json"}
ROUTED = {"Content-Type": "application/json; charset=utf-8"}  # FastAPI's route, not the fast path


def test_the_cache_keeps_the_most_recently_used_within_its_capacity():
    cache = TokenCache(capacity=2)
    cache.put("a", "ann")
    cache.put("b", "bob")
    assert cache.get("a") == "ann"  # now the most recent
    cache.put("c", "cy")
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == ("ann", None, "cy", 2)
    cache.forget("a")
    cache.forget("a")  # forgetting what is not there is fine
    assert cache.get("a") is None
    with pytest.raises(ValueError):
        TokenCache(capacity=0)


@pytest.fixture(params=["group commit", "per-request commit"])
def app_client(request, tmp_path, predictor):
    rt = Runtime(
        make_settings(tmp_path / "home", ingest_group_commit=request.param == "group commit"), predictor=predictor
    )
    with TestClient(create_app(rt, background=False)) as c:
        yield c, rt
    rt.close()


def _user(client, user_id: str) -> tuple[str, dict[str, str]]:
    r = client.post("/v1/users", json={"user_id": user_id}, headers=admin_headers())
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    return token, {"Authorization": f"Bearer {token}"}


def _post(client, user_id: str, headers) -> int:
    r = client.post(f"/v1/users/{user_id}/posts", json={"text": "what a day"}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["post_id"]


def _feedback(client, user_id, post_id, auth, content_type, key):
    body = f'{{"post_id": {post_id}, "label": "negative", "idempotency_key": "{key}"}}'
    return client.post(f"/v1/users/{user_id}/feedback", content=body, headers={**auth, **content_type})


def test_feedback_is_authenticated_from_the_cache_and_nothing_else_is(app_client, monkeypatch):
    client, rt = app_client
    token, auth = _user(client, "ann")
    post_id = _post(client, "ann", auth)
    reads = []
    real_read = logger.read_value
    monkeypatch.setattr(logger, "read_value", lambda *a: reads.append(a) or real_read(*a))

    for i, content_type in enumerate([FAST, ROUTED, FAST]):
        assert _feedback(client, "ann", post_id, auth, content_type, f"k{i}").status_code == 201
    assert len(reads) == 0  # the post's lookup filled the cache; no feedback asked the store
    assert rt.token_cache.get(hash_token(token)) == "ann"

    assert client.get("/v1/users/ann/posts", headers=auth).status_code == 200
    assert len(reads) == 1  # any other request asks the store


@pytest.mark.parametrize("content_type", [FAST, ROUTED], ids=["fast path", "FastAPI route"])
def test_a_stale_cached_token_cannot_write_for_the_user_created_again(app_client, content_type):
    client, rt = app_client
    old_token, old_auth = _user(client, "ann")
    old_post = _post(client, "ann", old_auth)
    assert _feedback(client, "ann", old_post, old_auth, content_type, "before").status_code == 201
    assert rt.token_cache.get(hash_token(old_token)) == "ann"

    assert client.delete("/v1/users/ann", headers=admin_headers()).status_code == 200
    assert rt.token_cache.get(hash_token(old_token)) is None  # this worker forgets it at once
    # Another worker still holding it: its feedback is refused by the write, and forgotten there.
    rt.token_cache.put(hash_token(old_token), "ann")
    r = _feedback(client, "ann", old_post, old_auth, content_type, "deleted")
    assert (r.status_code, r.json()["detail"]) == (401, "invalid token")
    assert rt.token_cache.get(hash_token(old_token)) is None

    _, new_auth = _user(client, "ann")  # the same id, a new user with a new token
    new_post = _post(client, "ann", new_auth)
    rt.token_cache.put(hash_token(old_token), "ann")  # as a worker that never saw the delete holds it
    r = _feedback(client, "ann", new_post, old_auth, content_type, "stale")
    assert (r.status_code, r.json()["detail"]) == (401, "invalid token")
    assert rt.token_cache.get(hash_token(old_token)) is None
    assert client.get("/v1/users/ann/posts", headers=old_auth).status_code == 401
    stored = client.get(f"/v1/users/ann/posts/{new_post}/feedback", headers=admin_headers())
    assert stored.status_code == 200 and stored.json()["items"] == []

    assert _feedback(client, "ann", new_post, new_auth, content_type, "new").status_code == 201
