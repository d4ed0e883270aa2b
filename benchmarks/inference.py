"""User-specific inference latency: warm adapter, adapter load, and 1,000 users through a cache of 64.

    python -m benchmarks.inference [--users 1000] [--cache 64] [--requests 400]

One real adapter is trained by a real night (one user, 32 feedback), then copied into the
registry for every benchmark user as its own version folder (so every user has a distinct
adapter file to load, as in production). Latency is the model path that serves a post:
adapter lookup in the LRU cache (loading it from disk on a miss), then the forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.nightly_cost import sample_texts, seed_user
from nightowl.adapters import registry
from nightowl.adapters.predictor import AdapterRef, Predictor
from nightowl.auth import hash_token
from nightowl.continual.night import run_night
from nightowl.io import atomic_write_text
from nightowl.memory.db import session_scope
from nightowl.memory.models import AdapterStatus, AdapterVersion, User
from nightowl.runtime import Runtime
from nightowl.settings import Settings

RESULTS = Path(__file__).parent / "results" / "inference.json"


def pct(ms: list[float]) -> dict:
    s = sorted(ms)
    return {
        "n": len(s),
        "p50_ms": round(statistics.median(s), 2),
        "p99_ms": round(s[min(len(s) - 1, int(0.99 * (len(s) - 1)))], 2),
        "mean_ms": round(statistics.fmean(s), 2),
    }


def timed(predictor: Predictor, row: tuple[str, str, str], ref: AdapterRef | None) -> float:
    text, aspect, _ = row
    t = time.perf_counter()
    predictor.predict(text, aspect, None, adapter=ref)
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--cache", type=int, default=64)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    texts = sample_texts(200)

    with tempfile.TemporaryDirectory(prefix="nightowl-inf-") as tmp:
        settings = Settings(home=Path(tmp) / "home", rationale_provider="none", adapter_cache_size=args.cache)
        rt = Runtime(settings)
        seed_user(rt, "seed", texts[:32], night=1)
        summary = run_night(rt)
        assert summary.results and summary.results[0].adapter_version, summary.counts()
        with session_scope(rt.engine) as s:
            # Its files are what every benchmark user gets, promoted by the gate or not: the
            # figures are about serving an adapter, not about whether this one was better.
            seed_row = registry.get(s, "seed", summary.results[0].adapter_version)
        source = settings.adapters_dir / seed_row.path

        refs: list[AdapterRef] = []
        users = [f"user{k:05d}" for k in range(args.users)]
        with session_scope(rt.engine) as s:
            for user in users:
                s.add(User(id=user, token_hash=hash_token(f"bench-{user}")))
        with session_scope(rt.engine) as s:
            for user in users:
                rel = registry.write_version_files(
                    settings.adapters_dir, user, 1, lambda d: [shutil.copy(f, d / f.name) for f in source.iterdir()]
                )
                s.add(AdapterVersion(user_id=user, version=1, path=rel, status=AdapterStatus.active))
                refs.append(AdapterRef(1, settings.adapters_dir / rel))

        p = rt.predictor
        rng = np.random.default_rng(0)
        # base (no adapter)
        base = [timed(p, texts[i % len(texts)], None) for i in range(args.requests)]
        # warm adapter: the same user again and again
        timed(p, texts[0], refs[0])
        warm = [timed(p, texts[i % len(texts)], refs[0]) for i in range(args.requests)]
        # adapter load: every request names an adapter not in the cache
        loads_before = p.adapters.loads
        cold = [timed(p, texts[i % len(texts)], refs[args.cache + 1 + i]) for i in range(min(100, args.users - args.cache - 1))]
        assert p.adapters.loads - loads_before == len(cold)
        # 1,000 users cycling (uniformly at random) through a cache of 64
        loads_before = p.adapters.loads
        order = rng.integers(0, args.users, size=args.requests)
        cycling = [timed(p, texts[i % len(texts)], refs[int(u)]) for i, u in enumerate(order)]
        hit_rate = 1 - (p.adapters.loads - loads_before) / len(order)
        adapter_bytes = sum(f.stat().st_size for f in source.iterdir())

    result = {
        "benchmark": "inference",
        "command": f"python -m benchmarks.inference --users {args.users} --cache {args.cache} --requests {args.requests}",
        "device": str(p.device),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "text_only": True,
        "base_model": pct(base),
        "warm_adapter": pct(warm),
        "adapter_load": pct(cold),
        "users_cycling": {"users": args.users, "cache": args.cache, "hit_rate": round(hit_rate, 3), **pct(cycling)},
        "adapter_bytes": adapter_bytes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
