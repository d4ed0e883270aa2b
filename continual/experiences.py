"""Glue between nightowl's examples and avalanche-lib.

Avalanche wants datasets of (x, y, task) tensors. Our inputs are posts (text, aspect, cached
image features, rationale), so x is an index into an `ExampleTable` and `IndexedModel` turns a
batch of indices into model inputs. That keeps avalanche's strategies and plugins (replay
loaders, EWC, LwF, metrics) working unchanged on a multimodal model.

Replay: nightowl's FAISS memory chooses tonight's replay (memory.replay); avalanche's
ReplayPlugin mixes it into every training mini-batch (`FaissReplayPlugin`).
"""

from __future__ import annotations

import copy

import torch
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset,
)
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.storage_policy import ExemplarsBuffer

from nightowl.memory.examples import Example


class ExampleTable:
    """Examples by position; avalanche datasets carry positions only."""

    def __init__(self) -> None:
        self.rows: list[Example] = []

    def __getitem__(self, i: int) -> Example:
        return self.rows[i]

    def dataset(self, examples: list[Example], labels: list[str]):
        start = len(self.rows)
        self.rows.extend(examples)
        x = torch.arange(start, start + len(examples), dtype=torch.long)
        y = torch.tensor([labels.index(e.label) for e in examples], dtype=torch.long)
        return _make_taskaware_tensor_classification_dataset(x, y, task_labels=0, targets=y)

    def __deepcopy__(self, memo):  # the table is shared, read-only data
        return self


class IndexedModel(torch.nn.Module):
    """Wraps the (peft) classifier: forward(indices) -> logits (+ a fixed logit offset: the
    user's prior correction, so training learns only what the prior doesn't explain)."""

    def __init__(self, inner: torch.nn.Module, table: ExampleTable, kit, logit_offset: list[float] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.table = table
        self.kit = kit
        self.register_buffer("logit_offset", torch.tensor(logit_offset or [0.0] * len(kit.labels)), persistent=False)

    def frozen_copy(self) -> "IndexedModel":
        """A fixed copy of the classifier as it is now (LwF's teacher); table and kit are shared."""
        inner = copy.deepcopy(self.inner).eval().requires_grad_(False)
        return IndexedModel(inner, self.table, self.kit, self.logit_offset.tolist()).eval()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        examples = [self.table[i] for i in idx.tolist()]
        logits = self.kit.logits(self.inner, examples, train=self.training)
        return logits + self.logit_offset.to(logits.device, logits.dtype)


class FaissReplayBuffer(ExemplarsBuffer):
    """Avalanche's replay buffer, filled by nightowl's FAISS selection instead of its own policy.

    The memory itself lives in FAISS and the database (it outlives the process); this buffer is
    tonight's selection, mixed into every training mini-batch by avalanche's ReplayPlugin.
    """

    def __init__(self, dataset) -> None:
        super().__init__(max_size=max(1, len(dataset)))
        self.buffer = dataset

    def post_adapt(self, agent_state, exp) -> None:
        pass  # the next night re-selects from the FAISS memory

    def resize(self, strategy, new_size: int) -> None:
        self.max_size = new_size


class FaissReplayPlugin(ReplayPlugin):
    """Avalanche's ReplayPlugin over tonight's FAISS selection: each training mini-batch of new
    examples comes with as many drawn from the replay (avalanche's ReplayDataLoader).

    ReplayPlugin (avalanche 0.6) ends an experience with the buffer's `update(strategy)`, which
    0.6 deprecates and 0.7 removes ("switch to pre_adapt and post_adapt"), and which warns every
    night. This plugin makes the call `update` forwards to, `post_adapt(strategy, experience)`,
    itself: the same behaviour, no deprecated call, and nothing that breaks when `update` goes.
    """

    def __init__(self, replay_dataset, batch_size: int) -> None:
        buffer = FaissReplayBuffer(replay_dataset)
        super().__init__(mem_size=buffer.max_size, batch_size=batch_size, batch_size_mem=batch_size, storage_policy=buffer)

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.storage_policy.post_adapt(strategy, strategy.experience)
