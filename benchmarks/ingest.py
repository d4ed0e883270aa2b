"""Day-side benchmark: durable feedback-ingest throughput and post latency of a real server.

Starts `nightowl serve` on the embedded default (SQLite WAL, synchronous=FULL, packaged model)
in a temporary home, drives it over HTTP from concurrent keep-alive connections on the same
machine (asyncio, raw HTTP/1.1: a cheap client, so that the figure is the server's), and writes
`benchmarks/results/ingest.json`. Feedback ingest runs twice, with group commit (the default)
and with one commit per request (`NIGHTOWL_INGEST_GROUP_COMMIT=false`), each with 1, 8, 32 and
128 concurrent clients, all in one run so the rows compare as ratios.

    python -m benchmarks.ingest [--feedback 4000] [--clients 1 8 32 128] [--posts 200] [--workers 1 2] \
        [--postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test] [--kill9-trials 20]

Each row runs with 1 and 2 server processes (`serve --workers N`; `--workers`). With
`--postgres-url` (a database it may fill: each row gets a fresh one made beside it) it adds the
same rows on PostgreSQL. With `--kill9-trials N`
it kills the server (`kill -9`, all of its `max(--workers)` processes) N times under load from 8 clients, restarts it,
resends every request that got no answer and counts acknowledged events lost and events stored
twice.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

from nightowl.devserver import ServerProcess
from nightowl.io import atomic_write_text

ADMIN = "bench-admin-token"
RESULTS = Path(__file__).parent / "results" / "ingest.json"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarize(ms: list[float]) -> dict:
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def feedback_throughput(url: str, users: dict, total: int, clients: int, run: str) -> dict:
    """`clients` concurrent keep-alive connections, each sending its share of new feedback one
    request after another. The load generator is asyncio over raw HTTP/1.1: httpx in threads
    spent as much CPU a request as the server did (py-spy, /proc counters), on the same two
    cores, and the figure was partly the client's."""
    per_client = total // clients
    host, port = url.removeprefix("http://").split(":")
    user_list = list(users.items())

    async def client(idx: int) -> tuple[list[float], list[int]]:
        user, (headers, post_id) = user_list[idx % len(user_list)]
        reader, writer = await asyncio.open_connection(host, int(port))
        ms, errors = [], []
        try:
            for i in range(per_client):
                body = json.dumps(
                    {"post_id": post_id, "label": "positive", "idempotency_key": f"{run}-c{idx}-{i}"}
                ).encode()
                t = time.perf_counter()
                writer.write(_request("POST", f"/v1/users/{user}/feedback", headers, body))
                status = await _response_status(reader)
                ms.append((time.perf_counter() - t) * 1000)
                if status != 201:  # a new key must be stored (201), not found as a duplicate
                    errors.append(status)
        finally:
            writer.close()
        return ms, errors

    async def all_clients() -> list:
        return await asyncio.gather(*(client(i) for i in range(clients)))

    t0 = time.perf_counter()
    results = asyncio.run(all_clients())
    elapsed = time.perf_counter() - t0
    latencies = [m for ms, _ in results for m in ms]
    errors = [e for _, errs in results for e in errs]
    return {
        "events": per_client * clients,
        "clients": clients,
        "seconds": round(elapsed, 2),
        "events_per_s": round(per_client * clients / elapsed, 1),
        "errors": len(errors),
        "error_statuses": sorted(set(errors)),
        "latency": summarize(latencies),
    }


def _request(method: str, path: str, headers: dict, body: bytes) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"{method} {path} HTTP/1.1\r\nHost: bench\r\n{head}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


async def _response_status(reader: asyncio.StreamReader) -> int:
    """Read one whole response off a keep-alive connection; its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next((int(v) for k, _, v in (line.partition(b":") for line in lines[1:]) if k.lower() == b"content-length"), 0)
    await reader.readexactly(length)
    return int(lines[0].split(b" ", 2)[1])


def post_latency(url: str, user: str, headers: dict, n: int, image: bytes | None) -> dict:
    ms = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        for i in range(n):
            t = time.perf_counter()
            if image is None:
                r = c.post(f"/v1/users/{user}/posts", json={"text": f"post {i}: $T$ was great", "aspect": "the game"})
            else:
                # A distinct image each time, so every request pays decode + encoder.
                r = c.post(
                    f"/v1/users/{user}/posts",
                    data={"text": f"post {i}: $T$ was great", "aspect": "the game"},
                    files={"image": ("i.jpg", _vary(image, i), "image/jpeg")},
                )
            ms.append((time.perf_counter() - t) * 1000)
            r.raise_for_status()
    return summarize(ms[2:] if n > 4 else ms)  # the first two warm up caches


def _vary(jpeg: bytes, i: int) -> bytes:
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    img.putpixel((0, 0), (i % 256, (i // 256) % 256, 7))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def sample_image() -> bytes:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "twitter2015" / "images"
    candidates = sorted(shared.glob("*.jpg"))[:1] if shared.is_dir() else []
    if candidates:
        return candidates[0].read_bytes()
    buf = io.BytesIO()
    Image.effect_noise((224, 224), 60).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def make_users(url: str) -> dict:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    users = {}
    for k in range(4):
        user = f"bench{k}"
        token = httpx.post(f"{url}/v1/users", json={"user_id": user}, headers=admin).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        post_id = httpx.post(
            f"{url}/v1/users/{user}/posts", json={"text": "warm-up"}, headers=headers, timeout=60
        ).json()["post_id"]
        users[user] = (headers, post_id)
    return users


@contextmanager
def store_env(store: str, postgres_url: str | None, env: dict):
    """The server's environment for a row on `store`: the embedded SQLite file in the server's
    home, or a fresh database on the PostgreSQL server of `postgres_url`."""
    if store == "sqlite":
        yield dict(env)
        return
    with fresh_database(postgres_url) as url:
        yield {**env, "NIGHTOWL_DATABASE_URL": url}


@contextmanager
def fresh_database(admin_url: str):
    """A new, empty database on the server of `admin_url`, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, make_url, text

    name = f"nightowl_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def kill9_trials(tmp: Path, env: dict, trials: int, clients: int = 8, seed: int = 0, workers: int = 1) -> dict:
    """Kill the server (`workers` processes on one SQLite file) under load, restart it, resend what
    got no answer: count acknowledged events that were lost and events stored twice."""
    import random

    from sqlalchemy import text

    from nightowl.memory.db import make_engine  # the store's own engine (SQLite WAL), read after the trial

    rng = random.Random(seed)
    lost = twice = acked_total = 0
    for trial in range(trials):
        home = tmp / f"kill9-{trial}"
        server = ServerProcess(home, env=env, workers=workers).start()
        users = make_users(server.url)
        acked: set[str] = set()
        unanswered: list[tuple[str, dict, dict]] = []
        lock, stop = threading.Lock(), threading.Event()

        def client(idx: int) -> None:
            user, (headers, post_id) = list(users.items())[idx % len(users)]
            with httpx.Client(base_url=server.url, headers=headers, timeout=10) as c:
                for i in range(100_000):
                    body = {"post_id": post_id, "label": "positive", "idempotency_key": f"t{trial}-c{idx}-{i}"}
                    try:
                        r = c.post(f"/v1/users/{user}/feedback", json=body)
                    except httpx.HTTPError:
                        with lock:
                            unanswered.append((user, headers, body))
                        return  # the server died under us: this one was never acknowledged
                    with lock:
                        if r.status_code == 201:
                            acked.add(body["idempotency_key"])
                    if stop.is_set():
                        return

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.5, 2.0))  # mid-load, at a different point each trial
        server.kill9()
        stop.set()
        for t in threads:
            t.join(15)
        server = ServerProcess(home, env=env, port=server.port, workers=workers).start()
        with httpx.Client(base_url=server.url, timeout=30) as c:  # the clients' retries
            for user, headers, body in unanswered:
                c.post(f"/v1/users/{user}/feedback", json=body, headers=headers).raise_for_status()
        server.stop()
        engine = make_engine(f"sqlite:///{home / 'nightowl.db'}")
        with engine.connect() as conn:
            stored = [k for (k,) in conn.execute(text("SELECT idempotency_key FROM feedback WHERE idempotency_key LIKE :p"),
                                                   {"p": f"t{trial}-%"})]
        engine.dispose()
        lost += len(acked - set(stored))
        twice += len(stored) - len(set(stored))
        acked_total += len(acked)
        print(f"kill -9 trial {trial + 1}/{trials}: {len(acked)} acknowledged, {len(unanswered)} resent, "
              f"lost {len(acked - set(stored))}, stored twice {len(stored) - len(set(stored))}", flush=True)
    return {"trials": trials, "clients": clients, "workers": workers, "acknowledged": acked_total, "lost": lost,
            "stored_twice": twice}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feedback", type=int, default=4000, help="events per row")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--posts", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--postgres-url", default=None, help="add rows on this PostgreSQL server")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server processes (serve --workers) of each store's rows")
    ap.add_argument("--kill9-trials", type=int, default=0, help="kill -9 the server under load this many times")
    args = ap.parse_args()

    rows = []
    text_posts = image_posts = None
    with tempfile.TemporaryDirectory(prefix="nightowl-bench-") as tmp:
        env = {"NIGHTOWL_ADMIN_TOKEN": ADMIN, "NIGHTOWL_RATIONALE_PROVIDER": "none"}
        stores = ["sqlite"] + (["postgresql"] if args.postgres_url else [])
        for store, workers, mode in ((st, w, m) for st in stores for w in args.workers for m in ("per_request", "group")):
            with store_env(store, args.postgres_url, env) as st_env:
                st_env["NIGHTOWL_INGEST_GROUP_COMMIT"] = "true" if mode == "group" else "false"
                with ServerProcess(Path(tmp) / f"home-{store}-{workers}-{mode}", env=st_env, workers=workers) as server:
                    users = make_users(server.url)
                    for clients in args.clients:
                        row = feedback_throughput(server.url, users, max(args.feedback, clients), clients=clients,
                                                  run=f"{store}{workers}-{mode}-{clients}")
                        rows.append({"commit": mode, "store": store, "workers": workers, **row})
                        print(f"{store} {workers} worker(s) {mode:12s} {clients:4d} clients: "
                              f"{row['events_per_s']:8.1f} events/s, p50 {row['latency']['p50_ms']} ms, "
                              f"p99 {row['latency']['p99_ms']} ms, {row['errors']} errors", flush=True)
                    if (store, workers, mode) == ("sqlite", 1, "group"):  # the default server's post latency
                        user, (headers, _) = next(iter(users.items()))
                        text_posts = post_latency(server.url, user, headers, args.posts, image=None)
                        image_posts = post_latency(server.url, user, headers, max(20, args.posts // 4), image=sample_image())
        # the most workers measured: with several, a killed one may hold SQLite's write queue
        kill9 = kill9_trials(Path(tmp), env, args.kill9_trials, workers=max(args.workers)) if args.kill9_trials else None

    def row(mode: str, clients: int, store: str = "sqlite", workers: int = 1) -> dict | None:
        return next((r for r in rows if (r["commit"], r["clients"], r["store"], r["workers"]) == (mode, clients, store, workers)), None)

    for r in rows:  # each group-commit row against per-request commit on the same store, workers and clients
        base = row("per_request", r["clients"], r["store"], r["workers"])
        if r["commit"] == "group" and base:
            r["x_per_request"] = round(r["events_per_s"] / base["events_per_s"], 2)
    default = [r for r in rows if r["commit"] == "group" and r["store"] == "sqlite"]
    result = {
        "benchmark": "ingest",
        "command": "python -m benchmarks.ingest " + f"--feedback {args.feedback} "
        f"--clients {' '.join(map(str, args.clients))} --posts {args.posts}"
        + f" --workers {' '.join(map(str, args.workers))}"
        + (f" --postgres-url {args.postgres_url}" if args.postgres_url else "")
        + (f" --kill9-trials {args.kill9_trials}" if args.kill9_trials else ""),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "store": "SQLite WAL, synchronous=FULL (each acknowledged event fsync'd before the answer)",
        "training_paused": "run with no other load on the machine",
        "feedback_ingest": rows,
        # the product's default (settings.ingest_group_commit = true)
        "feedback_ingest_1_client": row("group", 1) or default[0],
        "feedback_ingest_concurrent": row("group", 32) or default[-1],
        "load_generator": "asyncio, raw HTTP/1.1 keep-alive connections (one per client), in this process",
        "post_latency_text": text_posts,
        "post_latency_with_image": image_posts,
        "kill9": kill9,
        "notes": "Clients and server share this machine's cores; latencies are client-measured round trips.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
