"""Replay-memory benchmark: FAISS add and search time at 10k, 100k and 1M vectors; bytes per example.

Uses nightowl's own `VectorIndex` (IndexIDMap2 over a flat inner-product index, saved as one
safetensors file) with vectors of the base model's width (384), on the GPU where faiss-gpu
sees one.

    python -m benchmarks.faiss_memory [--sizes 10000 100000 1000000] [--queries 100] [--k 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from nightowl.io import atomic_write_text
from nightowl.memory.vector_index import VectorIndex, gpu_available

RESULTS = Path(__file__).parent / "results" / "faiss_memory.json"


def bench(n: int, dim: int, n_queries: int, k: int, rng: np.random.Generator) -> dict:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64) + 1
    labels = rng.integers(0, 3, n)
    index = VectorIndex(dim, {"encoder_id": "bench"})
    t = time.perf_counter()
    for start in range(0, n, 10_000):  # the nightly sync adds in batches
        index.add(ids[start : start + 10_000], vectors[start : start + 10_000], labels[start : start + 10_000])
    add_s = time.perf_counter() - t

    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    index.search(queries[:2], k)  # warm-up
    per_query = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None, :], k)
        per_query.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    index.search(queries, k)
    batch_ms = (time.perf_counter() - t) * 1000

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        t = time.perf_counter()
        index.save(path)
        save_s = time.perf_counter() - t
        size = path.stat().st_size
        t = time.perf_counter()
        VectorIndex.load(path)
        load_s = time.perf_counter() - t
    return {
        "vectors": n,
        "dim": dim,
        "add_s": round(add_s, 3),
        "add_per_vector_us": round(add_s / n * 1e6, 3),
        "search_1_query_p50_ms": round(statistics.median(per_query), 3),
        "search_1_query_p99_ms": round(sorted(per_query)[int(0.99 * (len(per_query) - 1))], 3),
        f"search_{n_queries}_queries_batch_ms": round(batch_ms, 2),
        "save_s": round(save_s, 3),
        "load_s": round(load_s, 3),
        "file_bytes": size,
        "bytes_per_example": round(size / n, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        row = bench(n, args.dim, args.queries, args.k, rng)
        print(json.dumps(row))
        rows.append(row)
    result = {
        "benchmark": "faiss_memory",
        "command": "python -m benchmarks.faiss_memory --sizes " + " ".join(map(str, args.sizes)),
        "index": "IndexIDMap2(IndexFlatIP), exact cosine search, float32",
        "faiss_gpu": gpu_available(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
        "notes": "bytes_per_example includes ids and labels; a flat index stores 4*dim bytes per vector plus its id.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
