"""What concurrent hostile requests cost a real server in memory (issue 12, case 4).

    python -m benchmarks.request_memory [--posts 40] [--megapixels 40] [--bodies 50] [--body-mb 13]

One `nightowl serve` on a fresh home (the product's defaults, SQLite, the real model). Each row
sends its requests all at once and samples the server process's resident memory every 5 ms from
/proc/<pid>/statm (short spikes between samples can be missed):
- `png_posts`: `--posts` distinct `--megapixels` PNGs (compress to little: the cheap attack), multipart;
- `jpeg_posts`: the same as JPEGs (decoded reduced, so they are accepted);
- `unauthenticated_bodies`: `--bodies` POSTs of `--body-mb` MB with no token, just under the post
  route's body limit (a 10 MB image in base64: 13.6 MB), so only the token check stops them.
Targets: peak under baseline + 1 GB for 40 concurrent 40 MP posts; under + 50 MB for 50
unauthenticated bodies of that size. Writes benchmarks/results/request_memory.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from nightowl.devserver import ServerProcess
from nightowl.io import atomic_write_text

RESULTS = Path(__file__).parent / "results" / "request_memory.json"
ADMIN = "bench-admin-token-0123456789abcdef"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def make_image(seed: int, megapixels: float, fmt: str) -> bytes:
    width = int((megapixels * 1_000_000 * 4 / 3) ** 0.5)
    img = Image.new("L", (width, int(width * 3 / 4)), seed % 256)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def measure(pid: int, send, payloads: list, threads: int) -> dict:
    """Send every payload at once; the server's baseline and peak memory, and the status codes."""
    baseline = peak = rss_bytes(pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        codes = list(pool.map(send, payloads))
    elapsed = time.perf_counter() - started
    time.sleep(0.2)
    done.set()
    sampler.join()
    statuses: dict[str, int] = {}
    for c in codes:
        statuses[str(c)] = statuses.get(str(c), 0) + 1
    return {
        "requests": len(payloads),
        "statuses": statuses,
        "baseline_rss_mb": round(baseline / 2**20),
        "peak_rss_mb": round(peak / 2**20),
        "added_mb": round((peak - baseline) / 2**20),
        "seconds": round(elapsed, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posts", type=int, default=40)
    ap.add_argument("--megapixels", type=float, default=40.0)
    ap.add_argument("--bodies", type=int, default=50)
    ap.add_argument("--body-mb", type=float, default=13.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="nightowl-memory-") as tmp:
        env = {"NIGHTOWL_ADMIN_TOKEN": ADMIN, "NIGHTOWL_RATIONALE_PROVIDER": "none"}
        with ServerProcess(Path(tmp) / "home", env=env) as server:
            pid = server.proc.pid
            token = httpx.post(f"{server.url}/v1/users", json={"user_id": "bench"},
                               headers={"Authorization": f"Bearer {ADMIN}"}).json()["token"]
            auth = {"Authorization": f"Bearer {token}"}
            client = httpx.Client(base_url=server.url, timeout=300)

            def post_image(data: bytes) -> int:
                files = {"image": ("big", data, "application/octet-stream")}
                return client.post("/v1/users/bench/posts", data={"text": "a large picture"}, files=files,
                                   headers=auth).status_code

            def post_unauthenticated(body: bytes) -> int:
                return client.post("/v1/users/bench/posts", content=body,
                                   headers={"Content-Type": "application/json"}).status_code

            post_image(make_image(0, 0.1, "JPEG"))  # model and image encoder loaded, caches warm
            rows = {}
            for fmt in ("PNG", "JPEG"):
                uploads = [make_image(i + 1, args.megapixels, fmt) for i in range(args.posts)]
                rows[f"{fmt.lower()}_posts"] = {
                    "megapixels": args.megapixels, "upload_bytes_each": len(uploads[0]),
                    **measure(pid, post_image, uploads, args.posts),
                }
                print(fmt, json.dumps(rows[f"{fmt.lower()}_posts"]))
            body = b'{"text": "' + b"x" * int(args.body_mb * 2**20) + b'"}'
            rows["unauthenticated_bodies"] = {
                "body_mb": args.body_mb, **measure(pid, post_unauthenticated, [body] * args.bodies, args.bodies),
            }
            print("unauthenticated", json.dumps(rows["unauthenticated_bodies"]))
            client.close()

    result = {
        "benchmark": "request_memory",
        "command": f"python -m benchmarks.request_memory --posts {args.posts} --megapixels {args.megapixels} "
                   f"--bodies {args.bodies} --body-mb {args.body_mb}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
        "notes": "Server RSS from /proc/<pid>/statm every 5 ms; clients run on the same machine.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
