"""api.fast_feedback answers exactly as the FastAPI route would: the same request, sent once as the
fast path takes it (`Content-Type: application/json`) and once as only the route takes it (the same
media type with a charset parameter), gets the same status and the same body."""

from __future__ import annotations

import pytest

from tests.conftest import admin_headers

FAST = {"Content-Type": "application/json"}
ROUTED = {"Content-Type": "application/json; charset=utf-8"}  # not taken by the fast path: FastAPI's route


def _user(client, user_id: str) -> dict[str, str]:
    r = client.post("/v1/users", json={"user_id": user_id}, headers=admin_headers())
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _post(client, headers, user="ann") -> int:
    r = client.post(f"/v1/users/{user}/posts", json={"text": "what a day"}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["post_id"]


def _comparable(r) -> tuple[int, object]:
    body = r.json()
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("feedback_id", "created_at", "idempotency_key")}
    return r.status_code, body


CASES = {
    "stored": lambda p, k: f'{{"post_id": {p}, "label": "negative", "reason": "sarcastic", "idempotency_key": "{k}"}}',
    "without a key": lambda p, k: f'{{"post_id": {p}, "label": "positive"}}',
    "unknown label": lambda p, k: f'{{"post_id": {p}, "label": "sarcastic", "idempotency_key": "{k}"}}',
    "unknown post": lambda p, k: f'{{"post_id": {p + 999}, "label": "positive", "idempotency_key": "{k}"}}',
    "post id out of range": lambda p, k: '{"post_id": 0, "label": "positive"}',
    "post id a string": lambda p, k: f'{{"post_id": "{p}", "label": "positive", "idempotency_key": "{k}"}}',
    "unknown field": lambda p, k: f'{{"post_id": {p}, "label": "positive", "mood": "grim"}}',
    "missing label": lambda p, k: f'{{"post_id": {p}}}',
    "not json": lambda p, k: "{post_id: 1",
    "not an object": lambda p, k: "[1, 2]",
    "empty": lambda p, k: "",
    "lone surrogate in reason": lambda p, k: f'{{"post_id": {p}, "label": "positive", "reason": "\\ud800", "idempotency_key": "{k}"}}',
    "reason too long": lambda p, k: f'{{"post_id": {p}, "label": "positive", "reason": "{"x" * 2001}"}}',
    "key too long": lambda p, k: f'{{"post_id": {p}, "label": "positive", "idempotency_key": "{"k" * 129}"}}',
    "not utf-8": lambda p, k: b'{"post_id": 1, "label": "\xff"}',
}


@pytest.fixture
def fast_path_reads(monkeypatch) -> list[bytes]:
    """The bodies the fast path parsed (the route parses its own way: FeedbackIn.model_validate_json is the fast path's)."""
    from nightowl.api import fast_feedback

    seen, original = [], fast_feedback.FeedbackIn

    class Counted(original):
        @classmethod
        def model_validate_json(cls, data, **kw):
            seen.append(data)
            return original.model_validate_json(data, **kw)

    monkeypatch.setattr(fast_feedback, "FeedbackIn", Counted)
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_the_fast_path_answers_as_the_route_does(client, fast_path_reads, case):
    h = _user(client, "ann")
    post = _post(client, h)
    answers = []
    for n, content_type in enumerate((FAST, ROUTED)):
        body = CASES[case](post, f"{case}-{n}".replace(" ", "-"))
        answers.append(_comparable(client.post("/v1/users/ann/feedback", content=body, headers={**h, **content_type})))
        assert len(fast_path_reads) == 1  # the first went the fast way, the second down the app
    assert answers[0] == answers[1]


def test_the_fast_path_keeps_users_apart_and_retries_idempotent(client, fast_path_reads):
    ann, ben = _user(client, "ann"), _user(client, "ben")
    post = _post(client, ann)
    body = f'{{"post_id": {post}, "label": "negative", "idempotency_key": "k1"}}'
    assert client.post("/v1/users/ann/feedback", content=body, headers={**ben, **FAST}).status_code == 403
    assert client.post("/v1/users/ben/feedback", content=body, headers={**ben, **FAST}).status_code == 404  # not ben's post
    first = client.post("/v1/users/ann/feedback", content=body, headers={**ann, **FAST})
    again = client.post("/v1/users/ann/feedback", content=body, headers={**ann, **ROUTED})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["feedback_id"] == again.json()["feedback_id"] and again.json()["duplicate"]
    conflict = body.replace("negative", "positive")
    assert client.post("/v1/users/ann/feedback", content=conflict, headers={**ann, **FAST}).status_code == 409
    listed = client.get(f"/v1/users/ann/posts/{post}/feedback", headers=ann).json()
    assert [f["label"] for f in listed["items"]] == ["negative"]
    assert len(fast_path_reads) == 4
