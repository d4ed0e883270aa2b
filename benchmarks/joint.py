"""The upper reference of the personalization benchmark: one model for all annotators at once.

An annotator embedding (one learned vector per user, plus one for "no annotator" = the base
data) is added to every token embedding of the shared encoder, like a segment embedding, so
all transformer layers can condition on who is judging. It is trained on all users' feedback
together (every day at once), starting from the same base model. It sees more data than any
single-user adapter ever could, which is why it is the reference, not a product path: adding a
user means retraining everyone's model. Its loss is class-balanced: the benchmark's headline is
macro-F1, and with plain cross-entropy a model over all annotators leans to the majority class
("not ironic"), trading macro-F1 for accuracy.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nightowl.adapters.checkpoint import load_base_model, with_encoder_lora
from nightowl.adapters.encoders import load_tokenizer, pick_device
from nightowl.adapters.inputs import Batcher, ModelInput


class AnnotatorConditioned(nn.Module):
    def __init__(self, base: nn.Module, n_users: int):
        super().__init__()
        self.base = base
        self.users = nn.Embedding(n_users + 1, base.config.hidden)  # index 0: no annotator
        nn.init.normal_(self.users.weight, std=0.02)
        self._active: torch.Tensor | None = None
        embeddings = self._embedding_module()
        embeddings.register_forward_hook(self._add_user)

    def _embedding_module(self) -> nn.Module:
        for name, module in self.base.encoder.named_modules():
            if name.endswith("embeddings") and hasattr(module, "word_embeddings"):
                return module
        raise ValueError("the text encoder has no BERT-style embeddings module to condition")

    def _add_user(self, module, args, output):
        if self._active is None or output.shape[0] != self._active.shape[0]:
            return output
        return output + self.users(self._active)[:, None, :]

    @contextmanager
    def as_users(self, user_index: torch.Tensor):
        self._active = user_index
        try:
            yield
        finally:
            self._active = None

    def forward(self, user_index: torch.Tensor, **batch):
        with self.as_users(user_index):
            return self.base(**batch)


def train_joint(
    base_dir: Path,
    examples: list[tuple[ModelInput, int, int]],  # (input, label index, user index: 0 = none)
    n_users: int,
    epochs: int = 2,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[AnnotatorConditioned, Batcher, dict]:
    device = pick_device()
    random.seed(seed)
    torch.manual_seed(seed)
    base = with_encoder_lora(load_base_model(base_dir))  # a fresh LoRA over the merged base
    model = AnnotatorConditioned(base, n_users).to(device)
    batcher = Batcher(load_tokenizer(base.config.text_model), base.config, device)
    enc = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("base.encoder.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("base.encoder.")]
    opt = torch.optim.AdamW([{"params": enc, "lr": 3e-4}, {"params": rest, "lr": 1e-3}], weight_decay=0.01)
    report = {"epochs": [], "n_train": len(examples), "n_users": n_users}
    # inverse-frequency class weights (as sklearn's "balanced"): the loss of a balanced error
    counts = torch.bincount(torch.tensor([e[1] for e in examples]), minlength=len(base.config.labels)).float()
    weight = (counts.sum() / (len(counts) * counts.clamp(min=1))).to(device)
    report["class_weights"] = [round(float(w), 3) for w in weight]
    order = list(range(len(examples)))
    for epoch in range(epochs):
        model.train()
        random.shuffle(order)
        t0, total = time.perf_counter(), 0.0
        # A bar with the time left (about 6 min an epoch on one core of the 2-core CPU).
        for start in tqdm(range(0, len(order), batch_size), desc=f"joint epoch {epoch + 1}/{epochs}",
                          unit="batch", leave=False, mininterval=2):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            batch = batcher([c[0] for c in chunk], train=True)
            logits = model(torch.tensor([c[2] for c in chunk], device=device), **batch)
            loss = F.cross_entropy(logits, torch.tensor([c[1] for c in chunk], device=device), weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(chunk)
        report["epochs"].append({"epoch": epoch + 1, "seconds": round(time.perf_counter() - t0, 1), "train_loss": total / len(examples)})
        tqdm.write(f"joint epoch {report['epochs'][-1]}")
    model.eval()
    return model, batcher, report


@torch.inference_mode()
def predict_joint(model: AnnotatorConditioned, batcher: Batcher, items: list[ModelInput], user_index: int) -> list[int]:
    out: list[int] = []
    for start in range(0, len(items), 64):
        batch = batcher(items[start : start + 64])
        idx = torch.full((len(items[start : start + 64]),), user_index, dtype=torch.long, device=batch["input_ids"].device)
        out.extend(model(idx, **batch).argmax(-1).tolist())
    return out
