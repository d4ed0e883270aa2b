"""The broker twin of benchmarks/ingest.py: `nightowl consume` from NATS JetStream.

On the embedded default store (SQLite WAL, synchronous=FULL) in a temporary home, against the NATS
server at --url (`nats-server -js -a 127.0.0.1 -p 4222`), with a stream of its own:
- durable throughput: --events feedback messages published first, then consumed to the end
  (each acked only after its commit): events/s from the first fetch to the last commit;
- end-to-end latency: messages published at --rate/s while the consumer runs, publish -> acked
  per message (the ack is sent only after the commit holding the row), p50/p99;
- kill -9 trials: `nightowl consume` as a process, killed at a random moment under load, restarted
  until the stream is drained; counts acknowledged events lost (none may be) and stored twice.

Writes benchmarks/results/ingest_broker.json.

    python -m benchmarks.ingest_broker [--events 20000] [--rate 500] [--trials 20]

The consumer runs with the product's defaults (broker.batch_size, the CLI's --concurrency) unless
--batch / --concurrency say otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
import nats.js.errors
from nightowl.memory.models import Feedback
from sqlalchemy import func
from sqlmodel import Session, select

from nightowl.day import broker, consumer, logger
from nightowl.io import atomic_write_text
from nightowl.runtime import Runtime
from nightowl.settings import BrokerSettings, Settings

RESULTS = Path(__file__).parent / "results" / "ingest_broker.json"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def fb(post_id: int, i: int) -> bytes:
    return json.dumps({"kind": "feedback", "user_id": "bench", "body": {"post_id": post_id, "label": "positive",
                                                                      "reason": f"r{i}"}}).encode()


async def publish_all(cfg: BrokerSettings, payloads: list[tuple[bytes, str]]) -> None:
    nc = await nats.connect(cfg.url)
    js = nc.jetstream()
    await broker.ensure(js, cfg)
    subject = cfg.subjects[0].replace(">", "bench")
    for start in range(0, len(payloads), 500):
        futs = [await js.publish_async(subject, d, headers={"Nats-Msg-Id": k}) for d, k in payloads[start:start + 500]]
        await asyncio.gather(*futs)
    await nc.close()


def new_cfg(url: str, batch: int) -> BrokerSettings:
    tag = uuid.uuid4().hex[:8]
    return BrokerSettings(url=url, stream=f"BENCH_{tag}", subjects=[f"bench{tag}.in.>"], durable=f"b{tag}",
                          dlq_subject=f"bench{tag}.dlq", batch_size=batch, ack_wait_s=5.0)


async def drop(cfg: BrokerSettings) -> None:
    nc = await nats.connect(cfg.url)
    for name in (cfg.stream, broker.dlq_stream(cfg)):
        try:
            await nc.jetstream().delete_stream(name)
        except nats.js.errors.NotFoundError:
            pass
    await nc.close()


def count_feedback(rt: Runtime) -> tuple[int, int]:
    """(rows, distinct keys) of the bench user's feedback."""
    with Session(rt.engine) as s:
        rows = s.exec(select(func.count()).select_from(Feedback).where(Feedback.user_id == "bench")).one()
        keys = s.exec(select(func.count(func.distinct(Feedback.idempotency_key))).where(Feedback.user_id == "bench")).one()
    return rows, keys


def throughput(rt: Runtime, post_id: int, url: str, events: int, batch: int, concurrency: int) -> dict:
    cfg = new_cfg(url, batch)
    asyncio.run(publish_all(cfg, [(fb(post_id, i), f"tp-{cfg.stream}-{i}") for i in range(events)]))
    before = count_feedback(rt)[0]
    started = time.perf_counter()
    stats = asyncio.run(consumer.Consumer(rt, cfg, concurrency=concurrency).run(until_idle=True, fetch_timeout_s=0.5))
    elapsed = time.perf_counter() - started - 0.5  # less the final empty fetch's wait
    stored = count_feedback(rt)[0] - before
    asyncio.run(drop(cfg))
    return {"events": events, "stored": stored, "seconds": round(elapsed, 2), "events_per_s": round(stored / elapsed),
            "batch_size": batch, "concurrency": concurrency, **stats.as_dict()}


def ack_stream_seq(subject: str) -> int:
    """The stream sequence in a JetStream ack subject: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...,
    or with the domain and account hash after ACK (11+ tokens)."""
    tokens = subject.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def latency(rt: Runtime, post_id: int, url: str, n: int, rate: float, batch: int, concurrency: int) -> dict:
    """Publish -> acked, per message: the consumer acks only after the commit holding the row, so
    this is publish -> committed plus the ack's trip. Acks are watched on core NATS (the ack subject
    names the stream sequence the publish was answered with): nothing in the consumer is patched."""
    cfg = new_cfg(url, batch)
    published: dict[int, float] = {}
    acked: dict[int, float] = {}

    async def go():
        nc = await nats.connect(url)
        js = nc.jetstream()
        await broker.ensure(js, cfg)

        async def on_ack(msg):
            acked.setdefault(ack_stream_seq(msg.subject), time.perf_counter())

        await nc.subscribe(f"$JS.ACK.{cfg.stream}.>", cb=on_ack)
        await nc.flush()
        c = consumer.Consumer(rt, cfg, concurrency=concurrency)
        task = asyncio.create_task(c.run(fetch_timeout_s=0.05))
        subject = cfg.subjects[0].replace(">", "bench")
        t0 = time.perf_counter()
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            sent = time.perf_counter()
            ack = await js.publish(subject, fb(post_id, i), headers={"Nats-Msg-Id": f"lat-{cfg.stream}-{i}"})
            published[ack.seq] = sent
        deadline = time.perf_counter() + 30
        while len(acked) < n and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        c.stop()
        await task
        await nc.close()

    asyncio.run(go())
    asyncio.run(drop(cfg))
    ms = [(acked[seq] - published[seq]) * 1000 for seq in published if seq in acked]
    return {"n": n, "rate_per_s": rate, "acked": len(ms), "measured": "publish -> acked (the ack follows the commit)",
            "p50_ms": round(statistics.median(ms), 2), "p99_ms": round(percentile(ms, 99), 2), "max_ms": round(max(ms), 2)}


def kill_trials(rt: Runtime, home: Path, post_id: int, url: str, trials: int, per_trial: int) -> dict:
    env = {**os.environ, "NIGHTOWL_HOME": str(home), "NIGHTOWL_RATIONALE_PROVIDER": "none"}
    lost = twice = killed_mid_run = 0
    for t in range(trials):
        cfg = new_cfg(url, BrokerSettings().batch_size).model_copy(update={"ack_wait_s": 1.0})
        keys = [f"kill-{cfg.stream}-{i}" for i in range(per_trial)]
        asyncio.run(publish_all(cfg, [(fb(post_id, i), k) for i, k in enumerate(keys)]))
        env["NIGHTOWL_BROKER"] = cfg.model_dump_json()
        p = subprocess.Popen([sys.executable, "-c", "from nightowl.cli import app; app()", "consume"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.uniform(2.0, 4.0))  # start-up (imports) plus some of the stream
        if p.poll() is None:
            killed_mid_run += 1
        p.send_signal(signal.SIGKILL)
        p.wait()
        time.sleep(cfg.ack_wait_s + 0.2)  # what it had not acked comes back
        subprocess.run([sys.executable, "-c", "from nightowl.cli import app; app()", "consume", "--until-idle"],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with Session(rt.engine) as s:
            rows = s.exec(select(Feedback.idempotency_key).where(Feedback.idempotency_key.in_(keys))).all()
        lost += len(set(keys) - set(rows))
        twice += len(rows) - len(set(rows))
        asyncio.run(drop(cfg))
    return {"trials": trials, "events_per_trial": per_trial, "killed_mid_run": killed_mid_run,
            "lost": lost, "stored_twice": twice}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="nats://127.0.0.1:4222")
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=BrokerSettings().batch_size)
    ap.add_argument("--concurrency", type=int, default=consumer.DEFAULT_CONCURRENCY)
    ap.add_argument("--latency-n", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--per-trial", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="nightowl-bench-broker-") as tmp:
        home = Path(tmp)
        rt = Runtime(Settings(home=home, rationale_provider="none", admin_token="bench"))
        logger.create_user(rt, "bench")
        post_id = logger.log_post(rt, "bench", "a post to label").post_id
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "store": "sqlite (WAL, synchronous=FULL)",
            "group_commit": getattr(rt.settings, "ingest_group_commit", None),
            "throughput": throughput(rt, post_id, args.url, args.events, args.batch, args.concurrency),
            "latency": latency(rt, post_id, args.url, args.latency_n, args.rate, args.batch, args.concurrency),
        }
        print(json.dumps(result, indent=2), flush=True)
        if args.trials:
            result["kill9"] = kill_trials(rt, home, post_id, args.url, args.trials, args.per_trial)
        rt.close()
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
