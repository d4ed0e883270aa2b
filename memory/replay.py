"""FAISS replay memory: every user's labelled examples, plus a global memory of base training data.

Vectors come from the *frozen base model* (never from a user's adapter), so they stay valid
while adapters change. A user's memory is a cache of the database: it is rebuilt or topped up
from the store (the examples `memory.night_queries.user_examples` reads) whenever it is missing
or stale, and saved atomically (`nightowl.io`).

Replay for a night = the nearest older examples of each new one (what the update is most
likely to disturb) + a random share of the user's older examples + a few global examples.

Eviction (per-user capacity): drop the most *redundant* example first, i.e. the one whose
nearest same-label neighbour is most similar to it, oldest first on ties. FIFO would forget the
oldest lessons, which is exactly what replay is for; random eviction loses rare views as often
as common ones. Dropping near-duplicates keeps the widest coverage of what the user taught.
The database keeps every feedback row; eviction only limits what replay can draw on.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nightowl.io import atomic_write_bytes
from nightowl.memory.examples import Example
from nightowl.memory.vector_index import VectorIndex

EmbedFn = Callable[[Sequence[Example]], np.ndarray]


@dataclass
class ReplaySelection:
    neighbour_ids: list[int]
    random_ids: list[int]
    global_examples: list[Example]

    @property
    def user_ids(self) -> list[int]:
        return self.neighbour_ids + self.random_ids


class ReplayMemory:
    def __init__(self, root: Path, embed: EmbedFn, encoder_id: str, labels: Sequence[str], capacity: int = 2000):
        self.root = root
        self.embed = embed
        self.encoder_id = encoder_id
        self.labels = list(labels)
        self.capacity = capacity

    # -- files: a user id never becomes a path component, only its digest does --------------
    def user_path(self, user_id: str) -> Path:
        return self.root / "users" / f"{hashlib.sha256(user_id.encode()).hexdigest()}.safetensors"

    @property
    def global_index_path(self) -> Path:
        return self.root / "global.safetensors"

    @property
    def global_examples_path(self) -> Path:
        return self.root / "global.jsonl"

    def _label_ids(self, examples: Sequence[Example]) -> np.ndarray:
        return np.array([self.labels.index(e.label) for e in examples], dtype=np.int64)

    # -- per-user memory -------------------------------------------------------------------
    def load_user(self, user_id: str) -> VectorIndex | None:
        path = self.user_path(user_id)
        if not path.exists():
            return None
        index = VectorIndex.load(path)
        if index.meta.get("encoder_id") != self.encoder_id or index.meta.get("user_id") != user_id:
            return None  # built by another base model (or a hash collision): rebuild
        return index

    def sync_user(self, user_id: str, examples: Sequence[Example]) -> VectorIndex:
        """Bring the user's memory in line with the store: drop rows that are gone or superseded,
        embed and add the ones that are missing, evict over capacity, save if anything changed."""
        index = self.load_user(user_id)
        changed = index is None
        if index is None:
            index = VectorIndex(0, {"encoder_id": self.encoder_id, "user_id": user_id, "evicted": "[]"})
        evicted = set(json.loads(index.meta.get("evicted", "[]")))
        wanted = {e.id: e for e in examples}
        gone = [i for i in index.ids.tolist() if i not in wanted]
        if gone:
            index.remove(gone)
            changed = True
        present = set(index.ids.tolist())
        missing = [e for e in examples if e.id not in present and e.id not in evicted]
        if missing:
            vectors = self.embed(missing)
            if index.dim == 0:
                index = VectorIndex(vectors.shape[1], index.meta)
            index.add(np.array([e.id for e in missing]), vectors, self._label_ids(missing))
            changed = True
        evicted &= set(wanted)  # forget evictions of rows that no longer exist
        newly_evicted = self._evict(index)
        if newly_evicted:
            evicted |= set(newly_evicted)
            changed = True
        index.meta["evicted"] = json.dumps(sorted(evicted))
        if changed and index.dim:
            index.save(self.user_path(user_id))
        return index

    def _evict(self, index: VectorIndex) -> list[int]:
        excess = len(index) - self.capacity
        if excess <= 0:
            return []
        ids = index.ids
        vecs = index.vectors(ids)
        labels = np.array([index.labels[i] for i in ids.tolist()])
        sims = vecs @ vecs.T
        np.fill_diagonal(sims, -np.inf)
        sims[labels[:, None] != labels[None, :]] = -np.inf
        redundancy = sims.max(axis=1)
        # Most redundant first; among equals, the oldest (smallest feedback id) first.
        order = np.lexsort((ids, -redundancy))
        victims: list[int] = []
        alive = np.ones(len(ids), dtype=bool)
        for j in order:
            if len(victims) == excess:
                break
            victims.append(int(ids[j]))
            alive[j] = False
            # Its neighbours are now less redundant: keep the rule greedy but honest.
            sims[:, j] = -np.inf
            redundancy = np.where(alive, sims.max(axis=1), redundancy)
        index.remove(victims)
        return victims

    def delete_user(self, user_id: str) -> None:
        self.user_path(user_id).unlink(missing_ok=True)

    # -- global memory ---------------------------------------------------------------------
    def build_global(self, examples: Sequence[Example]) -> None:
        examples = [Example(**{**asdict(e), "id": -(i + 1)}) for i, e in enumerate(examples)]
        index = VectorIndex(0, {"encoder_id": self.encoder_id})
        if examples:
            vectors = self.embed(examples)
            index = VectorIndex(vectors.shape[1], index.meta)
            index.add(np.array([e.id for e in examples]), vectors, self._label_ids(examples))
            index.save(self.global_index_path)
        lines = "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples)
        atomic_write_bytes(self.global_examples_path, lines.encode("utf-8"))

    def load_global(self) -> tuple[VectorIndex | None, list[Example]]:
        if not (self.global_index_path.exists() and self.global_examples_path.exists()):
            return None, []
        index = VectorIndex.load(self.global_index_path)
        if index.meta.get("encoder_id") != self.encoder_id:
            return None, []
        lines = self.global_examples_path.read_text(encoding="utf-8").splitlines()
        return index, [Example(**json.loads(line)) for line in lines if line.strip()]

    # -- replay selection ------------------------------------------------------------------
    def select_replay(
        self,
        index: VectorIndex,
        new_ids: Sequence[int],
        *,
        neighbours_per_new: int = 2,
        random_ratio: float = 0.5,
        n_global: int = 8,
        rng: np.random.Generator,
        exclude: Sequence[int] = (),
    ) -> ReplaySelection:
        """Replay for `new_ids` (tonight's training examples). `exclude`: ids replay must not
        draw on either (the gate's held-back slice, which must stay unseen)."""
        new_set = set(new_ids) | set(exclude)
        older = [i for i in index.ids.tolist() if i not in new_set]
        new_present = [i for i in new_ids if i in index.labels]
        neighbours: list[int] = []
        if older and new_present and neighbours_per_new > 0:
            queries = index.vectors(new_present)
            # Search past the new rows themselves, then keep the older ones.
            _, found = index.search(queries, neighbours_per_new + len(new_set))
            seen: set[int] = set()
            for row in found:
                kept = [int(i) for i in row if i >= 0 and int(i) not in new_set][:neighbours_per_new]
                for i in kept:
                    if i not in seen:
                        seen.add(i)
                        neighbours.append(i)
        chosen = set(neighbours)
        rest = [i for i in older if i not in chosen]
        n_random = min(len(rest), math.ceil(random_ratio * len(new_ids)))
        randoms = sorted(rng.choice(rest, size=n_random, replace=False).tolist()) if n_random else []

        global_examples: list[Example] = []
        gindex, gexamples = self.load_global()
        if gindex is not None and gexamples and n_global > 0:
            picks = rng.choice(len(gexamples), size=min(n_global, len(gexamples)), replace=False)
            global_examples = [gexamples[int(i)] for i in sorted(picks)]
        return ReplaySelection(neighbours, randoms, global_examples)
