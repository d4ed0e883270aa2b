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


# --- issue 12: strict bodies, UTF-8 JSON everywhere, the schema says what is enforced, auth before
# the body, per-route limits, a bounded history ------------------------------------------------


def test_unknown_fields_are_refused_by_name(client):
    h = _user(client, "uma")
    img = base64.b64encode(_jpeg()).decode()
    r = client.post("/v1/users/uma/posts", json={"text": "hi", "image_base6": img}, headers=h)
    assert r.status_code == 422 and "image_base6" in r.json()["detail"], r.text
    r = client.post("/v1/users/uma/posts", files={"text": (None, "hi"), "aspekt": (None, "x")}, headers=h)
    assert r.status_code == 422 and "aspekt" in r.json()["detail"], r.text
    r = client.post("/v1/users", json={"user_id": "vic", "nmae": "Vic"}, headers=admin_headers())
    assert r.status_code == 422 and "nmae" in r.json()["detail"]
    r = client.post("/v1/users/uma/feedback", json={"post_id": 1, "label": "positive", "reasn": "x"}, headers=h)
    assert r.status_code == 422 and "reasn" in r.json()["detail"]
    r = client.post("/v1/users/uma/adapters/rollback", json={"version": None, "force": True}, headers=h)
    assert r.status_code == 422 and "force" in r.json()["detail"]
    assert client.get("/v1/users/uma/posts", headers=h).json()["total"] == 0
    assert client.post("/v1/users", json={"user_id": "vic"}, headers=admin_headers()).status_code == 201


def test_bad_json_is_422_on_every_json_route(client):
    h = _user(client, "wes")
    json_h = {**h, "Content-Type": "application/json"}
    admin_json = {**admin_headers(), "Content-Type": "application/json"}
    bodies = {
        "nested": b"[" * 20_000,  # within the small-body limit, past the parser's depth
        "not UTF-8": b'{"post_id": 1, "label": "positive", "reason": "caf\xe9"}',
        "UTF-16": '{"post_id": 1, "label": "positive"}'.encode("utf-16"),
        "broken": b'{"post_id": 1,',
    }
    for what, body in bodies.items():
        for path, headers in (
            ("/v1/users/wes/feedback", json_h),
            ("/v1/users", admin_json),
            ("/v1/users/wes/adapters/rollback", json_h),
            ("/v1/users/wes/posts", json_h),
        ):
            r = client.post(path, content=body, headers=headers)
            assert r.status_code == 422, (what, path, r.status_code, r.text)
            assert "JSON" in r.json()["detail"] or "UTF-8" in r.json()["detail"], (what, path, r.text)
    r = client.post("/v1/users/wes/feedback", content=b"post_id=1", headers={**h, "Content-Type": "text/plain"})
    assert r.status_code == 415


def test_multipart_text_that_is_not_utf8_is_refused(client):
    h = _user(client, "xia")
    boundary = "nightowlboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n".encode()
        + "caf\u00e9 $T$".encode("latin-1")
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {**h, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    r = client.post("/v1/users/xia/posts", content=body, headers=headers)
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"], r.text
    assert client.get("/v1/users/xia/posts", headers=h).json()["total"] == 0
    r = client.post("/v1/users/xia/posts", content=body.replace("caf\u00e9".encode("latin-1"), "caf\u00e9".encode()), headers=headers)
    assert r.status_code == 201, r.text
    assert client.get("/v1/users/xia/posts", headers=h).json()["items"][0]["text"] == "caf\u00e9 $T$"


def test_openapi_says_what_the_server_enforces(tmp_path, predictor):
    from fastapi.testclient import TestClient

    from nightowl.api import create_app
    from nightowl.auth import USER_ID_PATTERN
    from nightowl.runtime import Runtime
    from tests.conftest import make_settings

    settings = make_settings(
        tmp_path / "home",
        labels=["not_ironic", "ironic"],
        limits={"max_text_chars": 300, "max_aspect_chars": 40, "max_reason_chars": 90, "max_idempotency_key_chars": 16},
    )
    rt = Runtime(settings, predictor=predictor)
    try:
        spec = TestClient(create_app(rt, background=False)).get("/openapi.json").json()
    finally:
        rt.close()
    user_id_params = [
        p for path in spec["paths"].values() for op in path.values() for p in op.get("parameters", []) if p["name"] == "user_id"
    ]
    assert len(user_id_params) == sum("{user_id}" in path for path, ops in spec["paths"].items() for _ in ops) >= 7
    for p in user_id_params:
        assert p["schema"]["pattern"] == USER_ID_PATTERN.pattern and p["schema"]["maxLength"] == 64
    components = spec["components"]["schemas"]
    assert components["UserCreate"]["properties"]["user_id"]["pattern"] == USER_ID_PATTERN.pattern

    def string(prop):
        return next((s for s in prop.get("anyOf", []) if s.get("type") == "string"), prop)

    post = spec["paths"]["/v1/users/{user_id}/posts"]["post"]["requestBody"]["content"]
    for body in (post["application/json"]["schema"], post["multipart/form-data"]["schema"]):
        props = body["properties"]
        assert (props["text"]["minLength"], props["text"]["maxLength"]) == (1, 300)
        assert string(props["aspect"])["maxLength"] == 40
        assert string(props["context"])["maxLength"] == 300
        assert string(props["idempotency_key"])["maxLength"] == 16
        assert body["additionalProperties"] is False
    feedback = components["FeedbackIn"]
    assert feedback["properties"]["label"]["enum"] == ["not_ironic", "ironic"]
    assert string(feedback["properties"]["reason"])["maxLength"] == 90
    assert string(feedback["properties"]["idempotency_key"])["maxLength"] == 16
    for name in ("UserCreate", "FeedbackIn", "RollbackIn"):
        assert components[name]["additionalProperties"] is False


def test_raw_aspect_length_is_what_the_schema_says(client):
    h = _user(client, "yul")
    r = client.post("/v1/users/yul/posts", json={"text": "hi", "aspect": "a" * 200 + "   "}, headers=h)
    assert r.status_code == 422 and "aspect" in r.json()["detail"]
    assert client.post("/v1/users/yul/posts", json={"text": "hi", "aspect": "a" * 200}, headers=h).status_code == 201


def _asgi_call(app, method: str, path: str, headers: dict[str, str], body_chunks: list[bytes]):
    """Drive the app by hand: what it answered, and how many body chunks it read."""
    import anyio

    reads, sent = [0], []
    chunks = list(body_chunks)

    async def receive():
        reads[0] += 1
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
    }
    anyio.run(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, reads[0]


def test_unauthenticated_bodies_are_never_read(client):
    import json

    app = client.app
    chunk = b"x" * (1024 * 1024)
    for path in ("/v1/users", "/v1/users/ann/feedback", "/v1/users/ann/posts", "/v1/users/ann/adapters/rollback"):
        for auth in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer " + "A" * 43}):
            # chunked (no Content-Length): only the token decides, and nothing of the body is read
            status, body, reads = _asgi_call(app, "POST", path, {"Content-Type": "application/json", **auth}, [chunk] * 14)
            assert (status, reads) == (401, 0), (path, auth, status, reads)
            assert "token" in json.loads(body)["detail"]


def test_per_route_body_limits(client):
    h = _user(client, "zoe")
    post_id = client.post("/v1/users/zoe/posts", json={"text": "hi"}, headers=h).json()["post_id"]
    big_reason = {"post_id": post_id, "label": "positive", "reason": "x" * 200_000}
    for path, body in (
        ("/v1/users/zoe/feedback", big_reason),
        ("/v1/users", {"user_id": "big", "name": "x" * 200_000}),
        ("/v1/users/zoe/adapters/rollback", {"version": None, "pad": "x" * 200_000}),
    ):
        r = client.post(path, json=body, headers={**h, **(admin_headers() if path == "/v1/users" else {})})
        assert r.status_code == 413 and "byte limit" in r.json()["detail"], (path, r.text)
    # the longest valid reason, every character escaped as a surrogate pair (json.dumps' default), still fits
    r = client.post("/v1/users/zoe/feedback", json={"post_id": post_id, "label": "positive", "reason": "\U0001f989" * 2000}, headers=h)
    assert r.status_code == 201, r.text
    # an image post may still carry megabytes
    strip = io.BytesIO()
    Image.effect_noise((600, 600), 80).convert("RGB").save(strip, format="PNG")
    assert len(strip.getvalue()) > 200_000
    r = client.post("/v1/users/zoe/posts", data={"text": "big"}, files={"image": ("n.png", strip.getvalue(), "image/png")}, headers=h)
    assert r.status_code == 201, r.text


def test_history_caps_feedback_per_post_and_pages_the_rest(client):
    h = _user(client, "abe")
    hb = _user(client, "bea")
    post_id = client.post("/v1/users/abe/posts", json={"text": "busy"}, headers=h).json()["post_id"]
    other = client.post("/v1/users/bea/posts", json={"text": "hers"}, headers=hb).json()["post_id"]
    keys = [f"k{i:02d}" for i in range(25)]
    for key in keys:
        assert client.post("/v1/users/abe/feedback", json={"post_id": post_id, "label": "neutral", "idempotency_key": key}, headers=h).status_code == 201
    item = client.get("/v1/users/abe/posts", headers=h).json()["items"][0]
    assert item["feedback_total"] == 25
    assert [f["idempotency_key"] for f in item["feedback"]] == keys[5:]  # the newest 20, oldest first
    pages = [
        client.get(f"/v1/users/abe/posts/{post_id}/feedback?limit=10&offset={offset}", headers=h).json()
        for offset in (0, 10, 20)
    ]
    assert all(p["total"] == 25 and p["post_id"] == post_id for p in pages)
    assert [f["idempotency_key"] for p in pages for f in p["items"]] == keys
    # owner or admin only; another user's post is not found, another user's path is forbidden
    assert client.get(f"/v1/users/abe/posts/{post_id}/feedback", headers=admin_headers()).json()["total"] == 25
    assert client.get(f"/v1/users/abe/posts/{other}/feedback", headers=h).status_code == 404
    assert client.get(f"/v1/users/abe/posts/{post_id}/feedback", headers=hb).status_code == 403
    assert client.get(f"/v1/users/abe/posts/{post_id}/feedback").status_code == 401
    assert client.get(f"/v1/users/abe/posts/{post_id}/feedback?limit=501", headers=h).status_code == 422
