"""`nightowl consume`: posts and feedback from NATS JetStream, stored through the same logger calls
as the HTTP API (same validation, same idempotency keys, same errors).

A message is the HTTP API's request body in an envelope (one typed model for both)::

    {"kind": "post",     "user_id": "alice", "body": <PostJSON, as POST /v1/users/{id}/posts takes>}
    {"kind": "feedback", "user_id": "alice", "body": <FeedbackIn, as POST .../feedback takes>}

published on any subject the stream captures (default ``nightowl.ingest.>``). Unknown fields are
refused, as over HTTP.

Delivery is at-least-once and stored exactly once:
- a durable pull consumer with explicit acks: a message is acked only after the commit holding it;
  a consumer killed before the ack gets it again after ``ack_wait_s``;
- a fetched batch's feedback is checked here and committed together (one transaction, one flush,
  each message still answered on its own); posts, answered by the model first, go one by one;
- the idempotency key is the body's ``idempotency_key``, else the message id (``Nats-Msg-Id``
  header), else the stream incarnation and sequence: a redelivered message finds its stored row;
- poison (not JSON, unknown field, unknown user or post, bad label, oversized, a key reused for
  other content) is published to ``dlq_subject`` (kept in the stream ``<stream>_DLQ``) with its
  reason and the original subject, headers and payload, then terminated: never redelivered;
- a transient failure (database busy or unreachable, disk full) is nak'ed with ``nak_delay_s``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError

from nightowl.day import broker, logger
from nightowl.errors import (
    InsufficientStorage,
    InvalidInput,
    NightowlError,
    Unavailable,
    as_domain_error,
)
from nightowl.runtime import Runtime
from nightowl.schemas import FeedbackIn, FeedbackOut, PostJSON, PostLogged, RequestModel
from nightowl.settings import BrokerSettings

log = logging.getLogger(__name__)

# Posts stored at once (each is answered by the model first); `nightowl consume --concurrency`.
DEFAULT_CONCURRENCY = 8
# An unexpected error (a bug, not a domain error) is retried this many deliveries, then dead-lettered.
MAX_UNEXPECTED_DELIVERIES = 5


class PostMessage(RequestModel):
    kind: Literal["post"]
    user_id: str
    body: PostJSON


class FeedbackMessage(RequestModel):
    kind: Literal["feedback"]
    user_id: str
    body: FeedbackIn


BrokerMessage = Annotated[PostMessage | FeedbackMessage, Field(discriminator="kind")]
_MESSAGE = TypeAdapter(BrokerMessage)


def parse_message(data: bytes) -> PostMessage | FeedbackMessage:
    """The typed message in ``data``; InvalidInput naming what is wrong (not JSON, a field...)."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"message is not JSON: {exc}") from None
    try:
        return _MESSAGE.validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"message does not match the schema: {problems}") from None


def store_message(rt: Runtime, data: bytes, default_key: str) -> PostLogged | FeedbackOut:
    """Validate and store one message through the logger; ``default_key`` when it names no key."""
    msg = parse_message(data)
    if isinstance(msg, PostMessage):
        return store_post(rt, msg, default_key)
    return logger.log_feedback(rt, msg.user_id, msg.body.post_id, msg.body.label, msg.body.reason,
                               msg.body.idempotency_key or default_key)


def store_post(rt: Runtime, msg: PostMessage, default_key: str) -> PostLogged:
    body = msg.body
    limits = rt.settings.limits
    for name, value, limit in (("aspect", body.aspect, limits.max_aspect_chars), ("context", body.context, limits.max_text_chars)):
        if value is not None and len(value) > limit:  # as the HTTP route checks, before the logger strips it
            raise InvalidInput(f"{name} is {len(value)} characters; the limit is {limit}")
    image = logger.decode_base64_image(body.image_base64) if body.image_base64 else None
    return logger.log_post(rt, msg.user_id, body.text, body.aspect, image, body.idempotency_key or default_key, body.context)


def feedback_write(rt: Runtime, msg: FeedbackMessage, default_key: str) -> logger.FeedbackWrite:
    """The checked write of a feedback message (InvalidInput before anything is queued)."""
    body = msg.body
    return logger.checked_feedback(rt, msg.user_id, body.post_id, body.label, body.reason,
                                   body.idempotency_key or default_key)


@dataclass
class Stats:
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    retried: int = 0
    reasons: list[str] = field(default_factory=list)  # the last dead-letter reasons (at most 20)

    def as_dict(self) -> dict:
        return {"stored": self.stored, "duplicates": self.duplicates, "dead_lettered": self.dead_lettered,
                "retried": self.retried}


class Consumer:
    """The durable pull consumer. ``run()`` until ``stop()`` (or, with ``until_idle``, until a fetch
    finds nothing). Each fetched batch's feedback is committed together; its posts are stored on
    ``concurrency`` threads."""

    def __init__(self, rt: Runtime, cfg: BrokerSettings | None = None, concurrency: int = DEFAULT_CONCURRENCY):
        self.rt = rt
        self.cfg = cfg or rt.settings.broker
        if self.cfg.url is None:
            raise InvalidInput("no broker configured: set broker.url (NIGHTOWL_BROKER__URL=nats://127.0.0.1:4222)")
        self.concurrency = concurrency
        self.stats = Stats()
        self._stop = asyncio.Event()
        self._incarnation = ""

    def stop(self) -> None:
        self._stop.set()

    async def run(self, until_idle: bool = False, fetch_timeout_s: float = 1.0) -> Stats:
        nc = await broker.connect(self.cfg)
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="nightowl-consume")
        try:
            js = nc.jetstream()
            info = await broker.ensure(js, self.cfg)
            # Names this incarnation of the stream: a recreated stream restarts its sequence at 1.
            self._incarnation = f"{self.cfg.stream}.{int(info.created.timestamp())}" if info.created else self.cfg.stream
            self._js = js
            sub = await js.pull_subscribe_bind(durable=self.cfg.durable, stream=self.cfg.stream)
            while not self._stop.is_set():
                try:
                    msgs = await sub.fetch(self.cfg.batch_size, timeout=fetch_timeout_s)
                # nats-py raises its own TimeoutError, or a bare asyncio one when the fetch's
                # deadline runs out between its steps (seen under load): both are "nothing yet".
                except TimeoutError:
                    if until_idle:
                        break
                    continue
                await self._store_batch(msgs, pool)
            await nc.flush()
        finally:
            pool.shutdown(wait=True)
            await nc.close()
        return self.stats

    def _default_key(self, msg) -> str:
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        return msg_id if msg_id else f"{self._incarnation}.{msg.metadata.sequence.stream}"

    async def _store_batch(self, msgs: list, pool: ThreadPoolExecutor) -> None:
        """A fetched batch. With group commit, its feedback is checked here and queued all at once,
        so the lot shares one transaction and one flush (the disk allows a few hundred flushes a
        second; a group of 256 rows costs about what one row does). Posts (each answered by the
        model first), and everything without group commit, are stored one by one on the pool."""
        grouped, alone = [], []
        for m in msgs:
            if not self.rt.settings.ingest_group_commit:
                alone.append(m)
                continue
            try:
                parsed = parse_message(m.data)
                if isinstance(parsed, FeedbackMessage):
                    grouped.append((m, feedback_write(self.rt, parsed, self._default_key(m))))
                else:
                    alone.append(m)
            except Exception as exc:  # noqa: BLE001 - sorted in _failed (poison: dead-lettered)
                await self._failed(m, exc)
        await asyncio.gather(self._store_grouped(grouped, pool), *(self._handle(m, pool) for m in alone))

    async def _store_grouped(self, items: list, pool: ThreadPoolExecutor) -> None:
        if not items:
            return
        queued = logger.queue_feedback(self.rt, [write for _, write in items])
        await self._while_in_progress(asyncio.wrap_future(queued), [m for m, _ in items])
        try:
            outcomes = queued.result()
        except Exception as exc:  # noqa: BLE001 - the group's commit failed: every message meets it
            outcomes = [(False, exc)] * len(items)
        for (m, _), (ok, value) in zip(items, outcomes):
            if ok:
                await self._acked(m, value)
            else:
                await self._failed(m, value)

    async def _handle(self, msg, pool: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(pool, store_message, self.rt, msg.data, self._default_key(msg))
        await self._while_in_progress(fut, [msg])
        try:
            out = fut.result()
        except Exception as exc:  # noqa: BLE001 - sorted in _failed: transient, poison, or a bug
            await self._failed(msg, exc)
            return
        await self._acked(msg, out)

    async def _while_in_progress(self, fut: asyncio.Future, msgs: list) -> None:
        """Wait for `fut`; meanwhile a slow store (a large image, a busy database) tells the server
        the messages are still being worked on, so they are not redelivered under us."""
        heartbeat = max(0.5, self.cfg.ack_wait_s / 3)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=heartbeat)
            if done:
                return
            for m in msgs:
                await m.in_progress()

    async def _acked(self, msg, out: PostLogged | FeedbackOut) -> None:
        # The logger returned: its commit is done. Only now the ack (lost or never sent: redelivery,
        # and the idempotency key finds the stored row).
        await msg.ack()
        if getattr(out, "duplicate", False):
            self.stats.duplicates += 1
        else:
            self.stats.stored += 1

    async def _failed(self, msg, exc: Exception) -> None:
        mapped = as_domain_error(exc)
        if isinstance(mapped, (Unavailable, InsufficientStorage)):
            self.stats.retried += 1
            log.warning("message %s: %s; redelivered in %.1f s", msg.metadata.sequence.stream, mapped.message,
                        self.cfg.nak_delay_s)
            await msg.nak(delay=self.cfg.nak_delay_s)
            return
        if isinstance(mapped, NightowlError):
            reason = f"{type(mapped).__name__}: {mapped.message}"
        elif msg.metadata.num_delivered < MAX_UNEXPECTED_DELIVERIES:
            self.stats.retried += 1
            log.exception("message %s: unexpected error; retried", msg.metadata.sequence.stream, exc_info=exc)
            await msg.nak(delay=self.cfg.nak_delay_s)
            return
        else:
            reason = f"internal error after {msg.metadata.num_delivered} deliveries: {type(exc).__name__}: {exc}"
        await self._dead_letter(msg, reason)

    async def _dead_letter(self, msg, reason: str) -> None:
        meta = msg.metadata
        letter = {
            "reason": reason,
            "subject": msg.subject,
            "stream": meta.stream,
            "stream_seq": meta.sequence.stream,
            "num_delivered": meta.num_delivered,
            "headers": dict(msg.headers or {}),
            "payload_base64": base64.b64encode(msg.data).decode(),
            "dead_lettered_at": time.time(),
        }
        try:  # stored in the DLQ stream (deduplicated on redelivery) before the original is dropped
            await self._js.publish(
                self.cfg.dlq_subject,
                json.dumps(letter).encode(),
                stream=broker.dlq_stream(self.cfg),
                headers={"Nats-Msg-Id": f"dlq.{self._incarnation}.{meta.sequence.stream}", "Nightowl-Reason": " ".join(reason.split())[:200]},
            )
        except Exception as exc:  # noqa: BLE001 - whatever kept it from the DLQ: keep it in the stream
            log.warning("message %s: dead-letter publish failed (%s); redelivered", meta.sequence.stream, exc)
            self.stats.retried += 1
            await msg.nak(delay=self.cfg.nak_delay_s)
            return
        await msg.term()
        self.stats.dead_lettered += 1
        self.stats.reasons = (self.stats.reasons + [reason])[-20:]
        log.warning("message %s dead-lettered: %s", meta.sequence.stream, reason)
