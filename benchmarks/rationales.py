"""The local generator's rationales for a stream's feedback posts, written once and kept.

In the product the rationale worker writes one rationale per post in the background, by day, with
the `local` provider (SmolLM2 unless `generator_model` names another, greedy: the same post always gets the same
rationale). At ~3-4 s a post on this CPU, generating inside every benchmark run would cost hours
per run, so the benchmark's users' feedback posts are written once here, by that same provider,
in parallel processes, into a JSONL that `RationaleCache.import_jsonl` reads. A run with
rationales then serves them to the product's own worker through a `cache` provider.

Test posts get none: the product answers a post before its rationale exists, so a user's served
answers (and the test scores) never see one; rationales reach a user's model only through the
nights' training. The file is named by the generator and the posts, and a half-written one is
resumed (`.partial`, one line per finished post).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from benchmarks.stream import Stream
from nightowl.io import atomic_write_text
from nightowl.rationales import LocalGenerator, ProviderUnavailable, file_sha256
from nightowl.settings import Settings

Item = tuple[str, "str | None", "str | None"]  # text, aspect, image path

_generator: LocalGenerator | None = None


def feedback_items(stream: Stream, users: list[str]) -> list[Item]:
    """The distinct posts (text, aspect, image) of the users' feedback days, in stream order."""
    wanted = set(users)
    rows = (r for r in stream.rows if r.split == "feedback" and r.day and r.user_id in wanted)
    return list(dict.fromkeys((r.text, r.aspect, r.image) for r in rows))


def rationales_file(stream: Stream, users: list[str], work: Path, settings: Settings, jobs: int = 1) -> Path:
    """A JSONL of the local generator's rationale for every feedback post of ``users``; written
    once (resumed if interrupted) and reused by every run of the same posts and generator."""
    items = feedback_items(stream, users)
    name = LocalGenerator.from_settings(settings).name
    key = hashlib.sha256(json.dumps([name, items]).encode()).hexdigest()[:12]
    out = work / f"rationales-{key}.jsonl"
    if out.exists():
        return out
    partial = out.with_suffix(".jsonl.partial")
    done = _finished(partial)
    todo = [it for it in items if (it[0], it[1], it[2]) not in done]
    work.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    with open(partial, "a", encoding="utf-8") as f, \
            tqdm(total=len(items), initial=len(items) - len(todo), desc=f"rationales ({name})", unit="post", mininterval=10) as bar, \
            ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_start,
                                initargs=(settings.generator_model, settings.models_cache_dir, settings.device, threads)) as pool:
        for item, rationale in zip(todo, pool.map(_write, todo, chunksize=4)):
            f.write(json.dumps(_line(item, rationale), ensure_ascii=False) + "\n")
            f.flush()
            bar.update()
    # The finished file holds only posts with a rationale (a post the provider gave none to is
    # trained without one, as in the product): exactly what `RationaleCache.import_jsonl` reads.
    kept = [x for x in partial.read_text("utf-8").splitlines() if json.loads(x)["rationale"]]
    atomic_write_text(out, "".join(x + "\n" for x in kept))
    partial.unlink()
    return out


def _line(item: Item, rationale: str | None) -> dict:
    text, aspect, image = item
    line = {"text": text, "aspect": aspect, "image": image, "rationale": rationale}
    if image:
        line["image_sha256"] = file_sha256(Path(image))
    return line


def _finished(partial: Path) -> set[tuple]:
    """Posts already written by an interrupted run; a torn last line is dropped (written again)."""
    if not partial.exists():
        return set()
    rows = []
    for raw in partial.read_text("utf-8").splitlines():
        try:
            rows.append(json.loads(raw))
        except ValueError:
            continue
    atomic_write_text(partial, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {(r["text"], r["aspect"], r["image"]) for r in rows}


def _start(model: str, models_cache_dir: Path, device: str, threads: int) -> None:
    import torch

    global _generator
    torch.set_num_threads(threads)
    _generator = LocalGenerator(model, models_cache_dir=models_cache_dir, device=device)


def _write(item: Item) -> str | None:
    """One post's rationale, as the product's worker would get it; None when the provider gives
    none (then the post is trained without one, as in the product)."""
    text, aspect, image = item
    try:
        return _generator.generate(text, aspect, Path(image) if image else None)  # type: ignore[union-attr]
    except ProviderUnavailable:
        return None
