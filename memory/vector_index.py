"""One FAISS index with its labels, persisted as a single safetensors file (atomic, no pickle).

Vectors are L2-normalised and searched by inner product (cosine similarity). FAISS ids are the
caller's row ids (feedback ids for a user's memory, example numbers for the global memory).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nightowl.io import atomic_write


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES = None


def searchable(index: faiss.Index) -> faiss.Index:
    """The index to search: a GPU copy where faiss-gpu sees a GPU (large memories), else itself."""
    global _GPU_RESOURCES
    if index.ntotal < 50_000 or not gpu_available():
        return index  # a flat CPU search over a small memory beats the copy to the GPU
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    faiss.normalize_L2(vectors)
    return vectors


class VectorIndex:
    def __init__(self, dim: int, meta: dict[str, str] | None = None):
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.labels: dict[int, int] = {}
        self.meta: dict[str, str] = dict(meta or {})

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray, labels: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"expected vectors of shape ({len(ids)}, {self.dim}), got {vectors.shape}")
        self.remove(ids)  # re-adding an id replaces it
        self.index.add_with_ids(normalise(vectors), ids)
        self.labels.update(zip(ids.tolist(), np.asarray(labels, dtype=np.int64).tolist()))

    def remove(self, ids) -> None:
        ids = np.asarray(list(ids), dtype=np.int64)
        present = ids[np.isin(ids, self.ids)] if len(ids) else ids
        if len(present):
            self.index.remove_ids(present)
            for i in present.tolist():
                self.labels.pop(i, None)

    def vectors(self, ids) -> np.ndarray:
        ids = np.asarray(list(ids), dtype=np.int64)
        return np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim), np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (n_queries, k); missing neighbours have id -1."""
        k = max(1, min(k, len(self)))
        if len(self) == 0:
            n = len(queries)
            return np.full((n, 1), -np.inf, np.float32), np.full((n, 1), -1, np.int64)
        return searchable(self.index).search(normalise(queries), k)

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        ids = self.ids
        tensors = {
            "faiss_index": torch.from_numpy(faiss.serialize_index(self.index).copy()),
            "ids": torch.from_numpy(ids),
            "labels": torch.tensor([self.labels[i] for i in ids.tolist()], dtype=torch.int64),
        }
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={**self.meta, "dim": str(self.dim)}))

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            blob = f.get_tensor("faiss_index").numpy()
            ids = f.get_tensor("ids").numpy()
            labels = f.get_tensor("labels").numpy()
        dim = int(meta.pop("dim"))
        self = cls(dim, meta)
        self.index = faiss.deserialize_index(blob)
        if self.index.ntotal != len(ids) or self.index.d != dim:
            raise ValueError(f"{path} is inconsistent")
        self.labels = dict(zip(ids.tolist(), labels.tolist()))
        return self
