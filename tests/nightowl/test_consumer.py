"""Issue 14, item 3: `nightowl consume` stores posts and feedback from NATS JetStream.

Against the real NATS server at 127.0.0.1:4222 (CI runs one; a missing server fails, with how to
start it), each test on streams and subjects of its own, the store a real SQLite runtime:
- published posts and feedback are stored through the logger, acked, and the lag drops to 0;
- a message seen twice is stored once: the same Nats-Msg-Id outside JetStream's dedup window, the
  same body key, and a redelivery after a consumer that stored but never acked (a crash before the ack);
- poison (not JSON, unknown field, unknown user, bad label, oversized) lands on the DLQ with its
  reason and payload, and the good message after it is still stored;
- the lag shows in logger.health, /healthz and `nightowl health`; null with no broker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import uuid

import nats
import nats.js.errors
import pytest
from fastapi.testclient import TestClient

from nightowl.day import broker, logger
from nightowl.day.consumer import Consumer
from nightowl.runtime import Runtime
from nightowl.settings import BrokerSettings
from tests.conftest import make_settings

NATS_URL = "nats://127.0.0.1:4222"



@pytest.fixture(scope="module", autouse=True)
def nats_server():
    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=2).close()
    except OSError as exc:
        pytest.fail(
            f"no NATS server at {NATS_URL} ({exc}): these tests need one with JetStream on; "
            "start it with `nats-server -js -a 127.0.0.1 -p 4222`",
            pytrace=False,
        )


@pytest.fixture
def cfg():
    tag = uuid.uuid4().hex[:10]
    c = BrokerSettings(
        url=NATS_URL,
        stream=f"T_{tag}",
        subjects=[f"t{tag}.in.>"],
        durable=f"d{tag}",
        dlq_subject=f"t{tag}.dlq",
        batch_size=16,
        ack_wait_s=1.0,
        nak_delay_s=0.2,
    )
    yield c

    async def drop():
        nc = await nats.connect(NATS_URL)
        for name in (c.stream, broker.dlq_stream(c)):
            try:
                await nc.jetstream().delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass
        await nc.close()

    asyncio.run(drop())


@pytest.fixture
def rt(tmp_path, predictor, cfg):
    r = Runtime(make_settings(tmp_path / "home", broker=cfg), predictor=predictor)
    logger.create_user(r, "alice")
    yield r
    r.close()


def post_msg(text: str, user: str = "alice", **body) -> bytes:
    return json.dumps({"kind": "post", "user_id": user, "body": {"text": text, **body}}).encode()


def feedback_msg(post_id: int, label: str, user: str = "alice", **body) -> bytes:
    return json.dumps({"kind": "feedback", "user_id": user, "body": {"post_id": post_id, "label": label, **body}}).encode()


def publish(cfg: BrokerSettings, *messages: bytes | tuple[bytes, dict], dedup_window_s: float | None = None) -> list:
    async def go():
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        if dedup_window_s is not None:
            await js.add_stream(name=cfg.stream, subjects=cfg.subjects, duplicate_window=dedup_window_s)
        else:
            await broker.ensure(js, cfg)
        acks = []
        for m in messages:
            data, headers = m if isinstance(m, tuple) else (m, None)
            acks.append(await js.publish(cfg.subjects[0].replace(">", "x"), data, headers=headers))
            if dedup_window_s is not None:
                await asyncio.sleep(dedup_window_s * 1.5)  # past JetStream's window: it stores the copy
        await nc.close()
        return acks

    return asyncio.run(go())


def consume(rt: Runtime, cfg: BrokerSettings):
    return asyncio.run(Consumer(rt, cfg).run(until_idle=True, fetch_timeout_s=0.5))


def dead_letters(cfg: BrokerSettings, n: int) -> list[dict]:
    async def go():
        nc = await nats.connect(NATS_URL)
        sub = await nc.jetstream().pull_subscribe(cfg.dlq_subject, stream=broker.dlq_stream(cfg))
        msgs = await sub.fetch(n, timeout=2)
        await nc.close()
        return [json.loads(m.data) for m in msgs]

    return asyncio.run(go())


def texts(rt: Runtime) -> list[str]:
    return sorted(p.text for p in logger.list_posts(rt, "alice", limit=500).items)


def test_posts_and_feedback_are_stored_and_acked(rt, cfg):
    publish(cfg, post_msg("first"), (post_msg("second", aspect="food"), {"Nats-Msg-Id": "m-2"}))
    stats = consume(rt, cfg)
    assert (stats.stored, stats.dead_lettered) == (2, 0)
    assert texts(rt) == ["first", "second"]
    post_id = next(p.post_id for p in logger.list_posts(rt, "alice").items if p.text == "second")

    publish(cfg, feedback_msg(post_id, "positive", reason="tasty"))
    assert consume(rt, cfg).stored == 1
    items = logger.list_feedback(rt, "alice", post_id).items
    assert [(f.label, f.reason) for f in items] == [("positive", "tasty")]
    assert logger.health(rt).broker_lag == 0  # everything acked


def test_a_batch_of_feedback_shares_one_commit_and_a_bad_one_fails_alone(rt, cfg):
    from sqlalchemy import event

    first = logger.log_post(rt, "alice", "one").post_id
    second = logger.log_post(rt, "alice", "two").post_id
    logger.create_user(rt, "bob")
    bobs = logger.log_post(rt, "bob", "bob's").post_id
    publish(
        cfg,
        feedback_msg(first, "positive", idempotency_key="a"),
        feedback_msg(first, "positive", idempotency_key="a"),  # its twin in the same batch: stored once
        feedback_msg(second, "negative", reason="no"),
        feedback_msg(10**9, "positive"),  # no such post
        feedback_msg(bobs, "positive"),  # another user's post: not found for alice
        feedback_msg(first, "ecstatic"),  # not a label: refused before anything is queued
        feedback_msg(first, "negative", idempotency_key="a"),  # key "a" reused for other content
    )
    commits = []
    event.listen(rt.engine, "commit", lambda conn: commits.append(1))
    stats = consume(rt, cfg)
    assert (stats.stored, stats.duplicates, stats.dead_lettered) == (2, 1, 4)
    assert len(commits) == 1  # the batch's feedback: one transaction, one flush
    assert [(f.label, f.idempotency_key) for f in logger.list_feedback(rt, "alice", first).items] == [("positive", "a")]
    assert [(f.label, f.reason) for f in logger.list_feedback(rt, "alice", second).items] == [("negative", "no")]
    assert logger.list_feedback(rt, "bob", bobs).items == []
    reasons = sorted(letter["reason"].split(":")[0] for letter in dead_letters(cfg, 4))
    assert reasons == ["Conflict", "InvalidInput", "NotFound", "NotFound"]
    assert logger.health(rt).broker_lag == 0


def test_a_message_seen_twice_is_stored_once(rt, cfg, monkeypatch):
    # The same Nats-Msg-Id after JetStream's dedup window: both copies reach the consumer.
    acks = publish(cfg, (post_msg("dup"), {"Nats-Msg-Id": "same"}), (post_msg("dup"), {"Nats-Msg-Id": "same"}),
                   dedup_window_s=0.1)
    assert not any(a.duplicate for a in acks)
    stats = consume(rt, cfg)
    assert (stats.stored, stats.duplicates) == (1, 1)
    # The same key in the body, no message id.
    publish(cfg, post_msg("keyed", idempotency_key="k1"), post_msg("keyed", idempotency_key="k1"))
    assert consume(rt, cfg).duplicates == 1
    assert texts(rt) == ["dup", "keyed"]

    # A consumer that stores but dies before its ack: the message comes back after ack_wait and
    # its key (stream incarnation + sequence: no id, no body key) finds the stored row.
    from nats.aio.msg import Msg

    publish(cfg, post_msg("crash"))
    with monkeypatch.context() as m:
        async def lost_ack(self):  # the process died between the commit and the ack
            return None

        m.setattr(Msg, "ack", lost_ack)
        assert consume(rt, cfg).stored == 1
    assert logger.health(rt).broker_lag == 1  # delivered, never acked
    time.sleep(cfg.ack_wait_s + 0.2)
    again = consume(rt, cfg)
    assert (again.stored, again.duplicates) == (0, 1)
    assert texts(rt) == ["crash", "dup", "keyed"]
    assert logger.health(rt).broker_lag == 0


def test_poison_goes_to_the_dlq_and_never_blocks_the_stream(rt, cfg):
    post_id = logger.log_post(rt, "alice", "a post").post_id
    poison = {
        "not JSON": b"\xff not json",
        "unknown field": post_msg("x", colour="red"),
        "unknown user": post_msg("x", user="nobody"),
        "bad label": feedback_msg(post_id, "ecstatic"),
        "oversized": post_msg("x" * (rt.settings.limits.max_text_chars + 1)),
        "unknown kind": json.dumps({"kind": "like", "user_id": "alice", "body": {}}).encode(),
    }
    publish(cfg, *[(data, {"Nats-Msg-Id": name}) for name, data in poison.items()], post_msg("good after poison"))
    stats = consume(rt, cfg)
    assert (stats.stored, stats.dead_lettered) == (1, len(poison))
    assert "good after poison" in texts(rt)

    letters = {letter["headers"]["Nats-Msg-Id"]: letter for letter in dead_letters(cfg, len(poison) + 1)}
    assert set(letters) == set(poison)
    for name, data in poison.items():
        assert base64.b64decode(letters[name]["payload_base64"]) == data
        assert letters[name]["reason"]
    assert "not JSON" in letters["not JSON"]["reason"]
    assert "colour" in letters["unknown field"]["reason"]
    assert "NotFound" in letters["unknown user"]["reason"]
    assert "ecstatic" in letters["bad label"]["reason"]
    assert "limit" in letters["oversized"]["reason"]
    # Terminated, not pending: nothing comes back and the lag is 0.
    time.sleep(cfg.ack_wait_s + 0.2)
    assert consume(rt, cfg).dead_lettered == 0
    assert logger.health(rt).broker_lag == 0


def test_lag_shows_in_health_and_healthz(rt, cfg, sqlite_runtime):
    from nightowl.api import create_app

    publish(cfg, *[post_msg(f"p{i}") for i in range(4)])
    assert logger.health(rt).broker_lag == 4
    with TestClient(create_app(rt, background=False)) as client:
        r = client.get("/healthz")
        assert r.json()["broker_lag"] == 4, r.text
        consume(rt, cfg)
        assert client.get("/healthz").json()["broker_lag"] == 0
    assert logger.health(sqlite_runtime).broker_lag is None  # no broker: null, nothing connects

    started = time.perf_counter()  # configured but unreachable: null, and /healthz stays fast
    down = Runtime(make_settings(rt.settings.home.parent / "down", broker={"url": "nats://127.0.0.1:9"}),
                   predictor=rt.predictor)
    try:
        assert logger.health(down).broker_lag is None
    finally:
        down.close()
    assert time.perf_counter() - started < 2.0


def test_cli_consume_until_idle(rt, cfg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from nightowl.cli import app as cli_app

    publish(cfg, post_msg("from the cli"))
    monkeypatch.setenv("NIGHTOWL_HOME", str(rt.settings.home))
    monkeypatch.setenv("NIGHTOWL_RATIONALE_PROVIDER", "none")
    monkeypatch.setenv("NIGHTOWL_BROKER", cfg.model_dump_json())
    r = CliRunner().invoke(cli_app, ["consume", "--until-idle"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["stored"] == 1
    assert "from the cli" in texts(rt)

    monkeypatch.setenv("NIGHTOWL_BROKER__URL", "nats://127.0.0.1:9")
    monkeypatch.delenv("NIGHTOWL_BROKER")
    r = CliRunner().invoke(cli_app, ["consume", "--until-idle"])
    assert r.exit_code == 6 and "nats-server -js" in r.output, r.output


def test_a_transient_failure_is_retried_not_dead_lettered(rt, cfg, monkeypatch):
    from nightowl.day import consumer
    from nightowl.errors import Unavailable

    real, calls = consumer.store_message, []

    def busy_once(rt_, data, key):
        calls.append(key)
        if len(calls) == 1:
            raise Unavailable("the database is busy (another process holds its write lock); retry later")
        return real(rt_, data, key)

    monkeypatch.setattr(consumer, "store_message", busy_once)
    publish(cfg, post_msg("after a busy moment"))
    stats = consume(rt, cfg)  # nak'ed with nak_delay_s (0.2 s), redelivered within the same run
    assert (stats.retried, stats.stored, stats.dead_lettered) == (1, 1, 0)
    assert len(calls) == 2 and calls[0] == calls[1]  # the same key both times
    assert texts(rt) == ["after a busy moment"]
    assert logger.health(rt).broker_lag == 0


def test_a_group_commit_that_fails_is_retried_for_every_message_in_it(rt, cfg, monkeypatch):
    from concurrent.futures import Future

    from nightowl.errors import Unavailable

    post_id = logger.log_post(rt, "alice", "a post").post_id
    real, calls = logger.queue_feedback, []

    def busy_once(rt_, writes):
        calls.append(len(writes))
        if len(calls) > 1:
            return real(rt_, writes)
        failed = Future()  # the commit holding the batch failed: nothing of it is on disk
        failed.set_exception(Unavailable("the database is busy; retry later"))
        return failed

    monkeypatch.setattr(logger, "queue_feedback", busy_once)
    publish(cfg, *[feedback_msg(post_id, "positive", reason=f"r{i}") for i in range(3)])
    stats = consume(rt, cfg)  # nak'ed with nak_delay_s (0.2 s), redelivered within the same run
    assert (stats.retried, stats.stored, stats.dead_lettered) == (3, 3, 0)
    assert calls[0] == 3
    assert sorted(f.reason for f in logger.list_feedback(rt, "alice", post_id).items) == ["r0", "r1", "r2"]
    assert logger.health(rt).broker_lag == 0


@pytest.mark.parametrize("trial", range(2))
def test_a_consumer_killed_mid_stream_loses_nothing_and_stores_nothing_twice(rt, cfg, trial):
    """kill -9 of a real `nightowl consume` process while it works through a stream (the
    benchmark, benchmarks.ingest_broker, runs 20 such trials); a second consumer gets what the
    first never acked: every message stored, each once."""
    import os
    import signal
    import subprocess
    import sys

    from sqlmodel import Session, col, select

    from nightowl.memory.models import Feedback

    post_id = logger.log_post(rt, "alice", "to be judged").post_id
    keys = [f"k{trial}-{i}" for i in range(5000)]
    publish(cfg, *(feedback_msg(post_id, "positive", idempotency_key=k) for k in keys))
    env = {**os.environ, "NIGHTOWL_HOME": str(rt.settings.home), "NIGHTOWL_RATIONALE_PROVIDER": "none",
           "NIGHTOWL_BROKER": cfg.model_dump_json()}
    command = [sys.executable, "-c", "from nightowl.cli import app; app()", "consume"]

    def stored() -> list[str]:
        with Session(rt.engine) as s:
            return list(s.exec(select(Feedback.idempotency_key).where(col(Feedback.idempotency_key).in_(keys))).all())

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(stored()) < 300 * (trial + 1) and time.monotonic() < deadline:  # some of the stream in
            time.sleep(0.05)
        n_at_kill = len(stored())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert 0 < n_at_kill < len(keys), "the consumer was to be killed mid-stream"
    time.sleep(cfg.ack_wait_s + 0.3)  # what it had not acked is redelivered
    subprocess.run(command + ["--until-idle"], env=env, check=True, stdout=subprocess.DEVNULL, timeout=180)
    rows = stored()
    assert set(rows) == set(keys)  # nothing lost
    assert len(rows) == len(keys)  # nothing twice
