"""Labelled datasets on disk: TomBERT-format TSV (Twitter-2015/2017), rationale JSONL, image features."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nightowl.io import atomic_write

TOMBERT_COLUMNS = 5  # index, label, image_id, tweet, aspect
TOMBERT_LABELS = ["negative", "neutral", "positive"]  # 0, 1, 2


class DatasetError(ValueError):
    pass


@dataclass
class Row:
    text: str
    aspect: str | None
    label: int
    image_id: str | None = None
    context: str | None = None
    rationale: str | None = None


def read_tombert_tsv(path: Path, n_labels: int = 3) -> list[Row]:
    """`index, label, image_id, tweet, aspect` with one header row; `$T$` marks the aspect."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        # The header row's wording varies between releases (Twitter-2015's test.tsv names only 4
        # columns); the rows are what must have the five columns.
        if next(reader, None) is None:
            raise DatasetError(f"{path}: empty file (expected a header row, then index, label, image_id, tweet, aspect)")
        for n, r in enumerate(reader, 2):
            if not r:
                continue
            if len(r) < TOMBERT_COLUMNS:
                raise DatasetError(f"{path}:{n}: expected {TOMBERT_COLUMNS} tab-separated columns, got {len(r)}")
            if not r[1].strip().isdigit() or not 0 <= int(r[1]) < n_labels:
                raise DatasetError(f"{path}:{n}: label {r[1]!r} is not an integer in [0, {n_labels})")
            rows.append(Row(text=r[3], aspect=r[4] or None, label=int(r[1]), image_id=r[2] or None))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def attach_rationales(rows: list[Row], path: Path) -> int:
    """Join rationales on (image_id, aspect); returns how many rows got one."""
    table = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                table[(r["image_id"], r["aspect"])] = r["rationale"]
    hits = 0
    for row in rows:
        text = table.get((row.image_id, row.aspect))
        if text:
            row.rationale = text
            hits += 1
    return hits


def image_features(rows: list[Row], images_dir: Path | None, encoder, cache_file: Path | None = None) -> dict[str, torch.Tensor]:
    """Features for every image the rows use, computed once and cached in one safetensors file."""
    ids = sorted({r.image_id for r in rows if r.image_id})
    cache: dict[str, torch.Tensor] = {}
    if cache_file is not None and cache_file.exists():
        stored = load_file(str(cache_file))
        if stored.get("__encoder__") is not None:
            cache = {k: v for k, v in stored.items() if k != "__encoder__"}
    if images_dir is None:
        return {}
    todo = [i for i in ids if i not in cache and (images_dir / i).exists()]
    for start in range(0, len(todo), 32):
        chunk = todo[start : start + 32]
        images = [Image.open(images_dir / i).convert("RGB") for i in chunk]
        for i, feats in zip(chunk, encoder.encode_batch(images)):
            cache[i] = feats.to(torch.float16)
    if todo and cache_file is not None:
        stored = {**cache, "__encoder__": torch.zeros(1)}
        atomic_write(cache_file, lambda tmp: save_file(stored, str(tmp), metadata={"encoder_id": encoder.encoder_id}))
    return cache
