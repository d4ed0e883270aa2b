"""NATS JetStream plumbing shared by the consumer (nightowl.day.consumer) and health: connect, create
the stream, its dead-letter stream and the durable pull consumer when missing, and read the lag.

`nats` is imported only here and only when a broker is configured (``settings.broker.url``): with
none, nothing connects and nothing is imported.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from nightowl.settings import BrokerSettings

log = logging.getLogger(__name__)


def dlq_stream(cfg: BrokerSettings) -> str:
    return f"{cfg.stream}_DLQ"


async def connect(cfg: BrokerSettings, timeout_s: float = 2.0, reconnect: bool = True):
    """A NATS connection to ``cfg.url``. The first connect fails fast (two tries) when the server is
    unreachable; with ``reconnect`` the connection then reconnects for ever (the consumer's case)."""
    import nats

    async def _quiet(exc):  # one line per failed (re)connect, no traceback
        log.warning("broker %s: %s", cfg.url, exc)

    opts = {"connect_timeout": timeout_s, "error_cb": _quiet, "reconnect_time_wait": 0.1}
    # nats-py's first connect retries for ever when reconnects are unbounded: probe with bounded ones.
    probe = await nats.connect(cfg.url, allow_reconnect=False, max_reconnect_attempts=1, **opts)
    if not reconnect:
        return probe
    await probe.close()
    return await nats.connect(cfg.url, allow_reconnect=True, max_reconnect_attempts=-1,
                              **{**opts, "reconnect_time_wait": 1.0})


async def ensure(js, cfg: BrokerSettings):
    """Create the stream, the dead-letter stream and the durable consumer when missing; answer the
    stream's info (its creation time names this incarnation of the stream)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(cfg.stream)
    except NotFoundError:
        info = await js.add_stream(name=cfg.stream, subjects=list(cfg.subjects))
    try:
        await js.stream_info(dlq_stream(cfg))
    except NotFoundError:
        await js.add_stream(name=dlq_stream(cfg), subjects=[cfg.dlq_subject])
    await js.add_consumer(
        cfg.stream,
        ConsumerConfig(
            durable_name=cfg.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=cfg.ack_wait_s,
            max_deliver=-1,  # transient failures are retried for ever; poison is terminated, not retried
            max_ack_pending=max(1000, 4 * cfg.batch_size),
        ),
    )
    return info


async def lag(js, cfg: BrokerSettings) -> int:
    """Messages the durable consumer has not stored yet: not delivered + delivered but unacked.
    Before the consumer exists (never started), everything in the stream is pending."""
    from nats.js.errors import NotFoundError

    try:
        info = await js.consumer_info(cfg.stream, cfg.durable)
    except NotFoundError:
        try:
            return (await js.stream_info(cfg.stream)).state.messages
        except NotFoundError:
            return 0
    return (info.num_pending or 0) + (info.num_ack_pending or 0)


async def _lag_once(cfg: BrokerSettings) -> int:
    nc = await connect(cfg, timeout_s=cfg.lag_timeout_s, reconnect=False)
    try:
        return await lag(nc.jetstream(timeout=cfg.lag_timeout_s), cfg)
    finally:
        await nc.close()


def lag_now(cfg: BrokerSettings) -> int | None:
    """The consumer's lag for health, within ``cfg.lag_timeout_s``; None with no broker configured or
    when it didn't answer in time (logged). Callable from sync code, in or outside an event loop."""
    if cfg.url is None:
        return None
    result: list[int | None] = [None]

    def run() -> None:
        try:
            result[0] = asyncio.run(asyncio.wait_for(_lag_once(cfg), cfg.lag_timeout_s))
        except Exception as exc:  # noqa: BLE001 - unreachable, timed out, refused: health says null
            log.warning("broker lag unavailable (%s): %s", cfg.url, type(exc).__name__)

    # A thread of its own: the caller may be inside an event loop (asyncio.run refuses to nest).
    t = threading.Thread(target=run, name="nightowl-broker-lag", daemon=True)
    t.start()
    t.join(cfg.lag_timeout_s + 0.5)
    return result[0]
