"""The HTTP API: auth, shapes, and what bad or hostile input gets."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.conftest import admin_headers


def _user(client, user_id: str) -> dict[str, str]:
    r = client.post("/v1/users", json={"user_id": user_id}, headers=admin_headers())
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["database"] == "sqlite"


def test_openapi_documents_the_routes(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/users", "/v1/users/{user_id}/posts", "/v1/users/{user_id}/feedback", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/users/{user_id}/posts"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)


def test_full_flow_json_and_multipart(client):
    h = _user(client, "alice")
    r = client.post("/v1/users/alice/posts", json={"text": "$T$ is everything", "aspect": "Chuck Bass"}, headers=h)
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body["prediction"]) == {"label", "probabilities", "adapter_version"}
    post_id = body["post_id"]

    img = base64.b64encode(_jpeg()).decode()
    r = client.post("/v1/users/alice/posts", json={"text": "pic", "image_base64": img}, headers=h)
    assert r.status_code == 201 and r.json()["image_sha256"]

    r = client.post(
        "/v1/users/alice/posts",
        data={"text": "multipart $T$", "aspect": "here"},
        files={"image": ("x.jpg", _jpeg(), "image/jpeg")},
        headers=h,
    )
    assert r.status_code == 201, r.text

    fb = {"post_id": post_id, "label": "negative", "reason": "sarcastic", "idempotency_key": "fb-1"}
    r1 = client.post("/v1/users/alice/feedback", json=fb, headers=h)
    r2 = client.post("/v1/users/alice/feedback", json=fb, headers=h)
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r1.json()["feedback_id"] == r2.json()["feedback_id"]
    assert client.post("/v1/users/alice/feedback", json={**fb, "label": "positive"}, headers=h).status_code == 409

    listing = client.get("/v1/users/alice/posts?limit=10&offset=0", headers=h).json()
    assert listing["total"] == 3
    last = listing["items"][-1]
    assert last["post_id"] == post_id and last["aspect"] == "Chuck Bass"
    assert [f["idempotency_key"] for f in last["feedback"]] == ["fb-1"]
    assert {"post_id", "text", "aspect", "prediction", "feedback"} <= set(last)


def test_auth_rules(client):
    ha = _user(client, "ann")
    _user(client, "ben")
    # no token, bad token, someone else's token, a user's token for an admin route
    assert client.post("/v1/users/ann/posts", json={"text": "x"}).status_code == 401
    assert client.post("/v1/users/ann/posts", json={"text": "x"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.get("/v1/users/ben/posts", headers=ha)
    assert r.status_code == 403 and "token" in r.json()["detail"]
    assert client.post("/v1/users", json={"user_id": "eve"}, headers=ha).status_code == 403
    # the admin reaches everyone
    assert client.get("/v1/users/ann/posts", headers=admin_headers()).status_code == 200
    assert client.get("/v1/users/ben/posts", headers=admin_headers()).status_code == 200


@pytest.mark.parametrize(
    "payload, status, fragment",
    [
        ({}, 422, "text"),
        ({"text": ""}, 422, "text"),
        ({"text": "x" * 5000}, 422, "limit"),
        ({"text": "hi", "aspect": "a" * 1000}, 422, "aspect"),
        ({"text": "hi", "image_base64": "%%%not base64%%%"}, 422, "base64"),
        ({"text": "hi", "image_base64": base64.b64encode(b"GIF89a broken").decode()}, 422, "image"),
        ({"text": 5}, 422, "text"),
    ],
)
def test_bad_posts_get_clear_4xx(client, payload, status, fragment):
    h = _user(client, "bad")
    r = client.post("/v1/users/bad/posts", json=payload, headers=h)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
    assert client.get("/v1/users/bad/posts", headers=h).json()["total"] == 0


def test_hostile_requests(client):
    h = _user(client, "zed")
    assert client.post("/v1/users", json={"user_id": "../../etc"}, headers=admin_headers()).status_code == 422
    assert client.post("/v1/users", json={"user_id": "a/b"}, headers=admin_headers()).status_code == 422
    assert client.post("/v1/users", json={"user_id": "zed"}, headers=admin_headers()).status_code == 409
    assert client.post("/v1/users/ghost/posts", json={"text": "x"}, headers=admin_headers()).status_code == 404
    r = client.post("/v1/users/zed/posts", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    r = client.post("/v1/users/zed/posts", content=b"text=hi", headers={**h, "Content-Type": "text/plain"})
    assert r.status_code == 415
    big = b"\xff" * (11 * 1024 * 1024)
    r = client.post("/v1/users/zed/posts", data={"text": "hi"}, files={"image": ("b.jpg", big, "image/jpeg")}, headers=h)
    assert r.status_code == 413
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")
    r = client.post("/v1/users/zed/posts", data={"text": "hi"}, files={"image": ("b.png", bomb.getvalue(), "image/png")}, headers=h)
    assert r.status_code == 422 and "pixels" in r.json()["detail"]
    assert client.post("/v1/users/zed/feedback", json={"post_id": 1, "label": "great"}, headers=h).status_code == 422
    assert client.post("/v1/users/zed/feedback", json={"post_id": "x", "label": "positive"}, headers=h).status_code == 422
    assert client.get("/v1/users/zed/posts?limit=100000", headers=h).status_code == 422
    assert client.get("/v1/users/zed/posts", headers=h).json()["total"] == 0


def test_more_hostile_requests_get_4xx_and_write_nothing(client):
    h = _user(client, "yan")
    json_h = {**h, "Content-Type": "application/json"}
    # JSON nested past the parser's recursion limit
    r = client.post("/v1/users/yan/posts", content=b"[" * 100_000, headers=json_h)
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    # lone surrogates (valid JSON escapes, not storable text)
    for body in (b'{"text": "hi \\ud800"}', b'{"text": "hi", "aspect": "\\udfff"}'):
        r = client.post("/v1/users/yan/posts", content=body, headers=json_h)
        assert r.status_code == 422 and "Unicode" in r.json()["detail"], r.text
    r = client.post("/v1/users", content=b'{"user_id": "sur", "name": "\\ud800"}', headers={**admin_headers(), "Content-Type": "application/json"})
    assert r.status_code == 422
    # integers no row id can have; FastAPI's own validation errors come as {"detail": "<message>"} too
    for fb in ({"post_id": 2**70, "label": "positive"}, {"post_id": 0, "label": "positive"}):
        r = client.post("/v1/users/yan/feedback", json=fb, headers=h)
        assert r.status_code == 422 and isinstance(r.json()["detail"], str) and "post_id" in r.json()["detail"]
    assert client.get(f"/v1/users/yan/posts?offset={2**70}", headers=h).status_code == 422
    assert client.post("/v1/users/yan/adapters/rollback", json={"version": 2**70}, headers=h).status_code == 422
    # a chunked body (no Content-Length) over the limit is cut off with 413, not read whole
    def chunks():
        for _ in range(16):
            yield b"x" * (1024 * 1024)
    r = client.post("/v1/users/yan/posts", content=chunks(), headers=json_h)
    assert r.status_code == 413
    # a 1 x 12000 strip passes the pixel limits and must not blow up the image encoder
    strip = io.BytesIO()
    Image.new("RGB", (1, 12_000), (200, 10, 10)).save(strip, format="PNG")
    r = client.post("/v1/users/yan/posts", data={"text": "strip"}, files={"image": ("s.png", strip.getvalue(), "image/png")}, headers=h)
    assert r.status_code == 201, r.text
    assert client.get("/v1/users/yan/posts", headers=h).json()["total"] == 1


def test_post_retries_answer_200_and_a_reused_key_for_other_content_409(client):
    h = _user(client, "rey")
    body = {"text": "$T$ again", "aspect": "Mondays", "idempotency_key": "p-1"}
    r1 = client.post("/v1/users/rey/posts", json=body, headers=h)
    r2 = client.post("/v1/users/rey/posts", json=body, headers=h)
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r1.json()["post_id"] == r2.json()["post_id"] and r2.json()["duplicate"]
    assert client.post("/v1/users/rey/posts", json={**body, "context": "other"}, headers=h).status_code == 409
    img = base64.b64encode(_jpeg()).decode()
    assert client.post("/v1/users/rey/posts", json={**body, "image_base64": img}, headers=h).status_code == 409
    assert client.get("/v1/users/rey/posts", headers=h).json()["total"] == 1
