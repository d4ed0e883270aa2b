"""Per-user adapters over the base model: building trainable copies and running them on examples.

The night side (continual/) works with `nightowl.memory.examples.Example` rows; this kit turns them into
model inputs (cached image features, stored rationales) and gives it LoRA-wrapped copies of the
base model to train, so continual/ never touches the model's internals.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from nightowl.adapters.checkpoint import user_lora_config
from nightowl.adapters.fusion import masked_mean
from nightowl.adapters.inputs import ModelInput
from nightowl.adapters.predictor import Predictor
from nightowl.adapters.train import scores
from nightowl.memory.examples import Example
from nightowl.memory.images import ImageStore


class EncoderStates:
    """The frozen text encoder's output per post, computed once and reused.

    A per-user adapter that leaves the encoder alone (LoRA on the fusion layers, the head trained
    whole) sees the same encoder states in every epoch, every replayed batch and every score of
    a night; computing them once instead of in each forward (and never backpropagating through
    the encoder) is what makes a user-night take seconds instead of most of a minute on a CPU.
    Keyed by the tokens the encoder reads, so global replay examples share it.
    """

    def __init__(self, encoder: torch.nn.Module):
        self.encoder = encoder
        self._states: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._states)

    @staticmethod
    def _keys(batch: dict, lengths: list[int]) -> list[tuple]:
        # The tokens themselves: one post reads differently in a batch where others have a
        # second segment (it gets an empty one), so its text alone does not name its states.
        types = batch.get("token_type_ids")
        return [tuple(batch["input_ids"][j, :n].tolist()) + (tuple(types[j, :n].tolist()) if types is not None else ())
                for j, n in enumerate(lengths)]

    @torch.no_grad()
    def for_batch(self, items: list[ModelInput], batch: dict) -> torch.Tensor:
        """[B, L, d] states for a batch made by the predictor's batcher (zeros on padding)."""
        mask = batch["attention_mask"]
        lengths = mask.sum(1).tolist()
        keys = self._keys(batch, lengths)
        missing = [j for j, key in enumerate(keys) if key not in self._states]
        if missing:
            rows = torch.tensor(missing, device=mask.device)
            width = int(max(lengths[j] for j in missing))
            kwargs = {"input_ids": batch["input_ids"][rows, :width], "attention_mask": mask[rows, :width]}
            if batch.get("token_type_ids") is not None:
                kwargs["token_type_ids"] = batch["token_type_ids"][rows, :width]
            states = self.encoder(**kwargs).last_hidden_state  # a frozen copy in eval mode: no dropout
            for k, j in enumerate(missing):
                self._states[keys[j]] = states[k, : lengths[j]].clone()
        out = torch.zeros(*mask.shape, self.encoder.config.hidden_size, device=mask.device)
        for j, key in enumerate(keys):
            out[j, : lengths[j]] = self._states[key]
        return out


def adapts_encoder(model: torch.nn.Module) -> bool:
    """Whether a (peft-wrapped) classifier carries LoRA inside its text encoder."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    encoder = getattr(inner, "encoder", None)
    return encoder is not None and any(isinstance(m, LoraLayer) for m in encoder.modules())


class PersonalKit:
    def __init__(self, predictor: Predictor, images: ImageStore):
        self.predictor = predictor
        self.images = images
        self.labels = predictor.labels
        self.device = predictor.device
        self.encoder_id = predictor.encoder_id
        self._states: EncoderStates | None = None

    @cached_property
    def _frozen_encoder(self) -> torch.nn.Module:
        """The base's text encoder on the training device, frozen: copied once, shared by every night."""
        return copy.deepcopy(self.predictor.pristine.encoder).to(self.device).eval().requires_grad_(False)

    @contextmanager
    def frozen_encoder_states(self) -> Iterator[EncoderStates]:
        """Within this block (one user's night), models whose encoder is not adapted reuse each
        post's encoder states; the states are dropped at the end (memory stays one user's)."""
        self._states = EncoderStates(self._frozen_encoder)
        try:
            yield self._states
        finally:
            self._states = None

    def __deepcopy__(self, memo):  # avalanche's LwF copies the model that holds us: share, don't copy
        return self

    def inputs(self, examples: list[Example]) -> list[ModelInput]:
        items = []
        for e in examples:
            feats = None
            if e.image_sha256:
                enc = self.predictor.image_encoder
                feats = self.images.features(e.image_sha256, enc.encoder_id, enc.encode)
            items.append(ModelInput(e.text, e.aspect, e.context, feats, e.rationale))
        return items

    def embed(self, examples: list[Example]) -> np.ndarray:
        """The replay memory's vectors: the base encoder's mean-pooled states (the predictor's
        `embed_inputs`), taken from the night's states when it has them."""
        items = self.inputs(list(examples))
        if self._states is None:
            return self.predictor.embed_inputs(items)
        out = []
        for start in range(0, len(items), 64):
            chunk = items[start : start + 64]
            batch = self.predictor.batcher(chunk)
            out.append(masked_mean(self._states.for_batch(chunk, batch), batch["attention_mask"].bool()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.predictor.config.hidden), np.float32)

    def trainable(self, adapter_dir: Path | None) -> PeftModel:
        """A LoRA-wrapped copy of the base: the user's current adapter if any, else a fresh one."""
        base = copy.deepcopy(self.predictor.pristine)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        else:
            model = get_peft_model(base, user_lora_config(self.predictor.config))
        return model.to(self.device)

    def logits(self, model: torch.nn.Module, examples: list[Example], train: bool = False) -> torch.Tensor:
        items = self.inputs(examples)
        batch = self.predictor.batcher(items, train=train)
        if self._states is not None and not adapts_encoder(model):
            batch["post_states"] = self._states.for_batch(items, batch)
        return model(**batch)

    @torch.inference_mode()
    def predictions(self, model: torch.nn.Module, examples: list[Example], offset: list[float] | None = None) -> list[int]:
        """The label index a model gives each example (`offset`: a logit offset added first, one
        not yet folded into the model's head)."""
        was = model.training
        model.eval()
        pred: list[int] = []
        for start in range(0, len(examples), 64):
            logits = self.logits(model, examples[start : start + 64])
            if offset:
                logits = logits + torch.tensor(offset, dtype=logits.dtype, device=logits.device)
            pred += logits.argmax(-1).cpu().tolist()
        model.train(was)
        return pred

    def shrink_path(self, model: torch.nn.Module) -> "ShrinkPath":
        """The user's trained adapter `model` and every point between it and the base (ShrinkPath)."""
        return ShrinkPath(model, self.predictor.pristine.head)

    @property
    def base_error(self) -> float | None:
        """The base model's error rate on its selection data at the epoch training kept (recorded
        by training); None for a base trained without a selection split."""
        training = self.predictor.config.training or {}
        epochs, kept = training.get("epochs") or [], training.get("selected_epoch")
        entry = epochs[kept - 1] if kept and 0 < kept <= len(epochs) else None
        accuracy = entry.get("select_accuracy") if entry else None
        return None if accuracy is None else 1.0 - accuracy / 100

    # -- the user's label prior (label-shift correction) ----------------------------------------
    @property
    def base_prior(self) -> list[float] | None:
        """How often each label occurred in the base model's training data (recorded by training)."""
        prior = (self.predictor.config.training or {}).get("label_prior")
        return list(prior) if prior and len(prior) == len(self.labels) else None

    def prior_adjustment(self, labels: list[str], strength: float) -> list[float] | None:
        """log(user prior / base prior) per label: users differ most in how often they use each
        label (MultiPICo's annotators call 3% to 68% of posts ironic). The user's prior is the
        frequency of each label among `labels` (what the user says their posts are), smoothed
        towards the base prior by `strength` pseudo-counts, so a few labels move it a little and
        many move it far. Added to the logits, it is the Bayes correction for a shift in label
        prior (Saerens et al., 2002)."""
        base = self.base_prior
        if base is None or not labels:
            return None
        counts = [labels.count(label) for label in self.labels]
        n = sum(counts)
        base = [max(p, 1e-3) for p in base]
        return [math.log((c + strength * p) / (n + strength) / p) for c, p in zip(counts, base)]

    def decision_offset(self, examples: list[Example], start: list[float] | None, metric: str, penalty: float,
                        logits: torch.Tensor | None = None) -> list[float]:
        """The user's decision offset: per-label logit offsets, searched from `start` (the prior),
        under which the base model's answers score best by `metric` on the user's `examples`
        (their labels and the answers they let stand). The prior is the Bayes correction for
        accuracy; macro-F1 pays for answering a user's rarer label more often than that, and
        MultiPICo's annotators differ most in how often they see irony (on feedback alone, days
        1-4 -> day 5, benchmarks.personal_parts: +4.3 macro-F1 against the prior's +2.4). Scored by the base, not by
        tonight's candidate: the candidate has fitted these labels, the base never saw them.
        `logits`: the base's logits for `examples`, when already computed."""
        start = list(start) if start else [0.0] * len(self.labels)
        if not examples:
            return start
        gold = [self.labels.index(e.label) for e in examples]
        logits = self.base_logits(examples) if logits is None else logits
        return search_decision_offset(logits, gold, start, metric, penalty)

    @torch.inference_mode()
    def base_logits(self, examples: list[Example]) -> torch.Tensor:
        """The base model's logits (no adapter, no offset) for `examples`, on the CPU."""
        model = self.predictor.pristine
        was = model.training
        model.eval()
        try:
            chunks = [self.logits(model, examples[i : i + 64]).float().cpu() for i in range(0, len(examples), 64)]
        finally:
            model.train(was)
        return torch.cat(chunks)

    @staticmethod
    def shift_head_bias(model: torch.nn.Module, delta: list[float] | None, sign: float = 1.0) -> None:
        """Fold a logit offset into the user's own copy of the head (peft `modules_to_save`), so
        the saved adapter carries it and plain peft serves the same answers."""
        if not delta:
            return
        head = user_head(model)
        with torch.no_grad():
            head.bias.add_(sign * torch.tensor(delta, dtype=head.bias.dtype, device=head.bias.device))


def user_head(model: torch.nn.Module) -> torch.nn.Module:
    """The user's own copy of the head inside a peft-wrapped classifier (`modules_to_save`)."""
    heads = [m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper) and name.endswith("head")]
    if len(heads) != 1:
        raise RuntimeError("expected one trainable head copy in the user's adapter (modules_to_save=['head'])")
    return heads[0].modules_to_save[heads[0].active_adapters[0]]


class ShrinkPath:
    """A trained user adapter shrunk towards the base model by a factor: `set(s)` makes the
    adapter's change to the base s times what training made it. LoRA's update is B @ A with the
    base at B = 0, so every LoRA B is scaled by s; the head copy moves to base head + s x (trained
    head - base head). s = 1 is the adapter as trained, s = 0 the base itself (its LoRA A left
    as trained: with B = 0 it changes nothing). The weights stay in the PEFT layout: plain peft
    serves a shrunk adapter as it is saved. Only the weights training left are kept here, so
    `set` can go back and forth along the path."""

    def __init__(self, model: torch.nn.Module, base_head: torch.nn.Module):
        self.model = model
        self.lora_b = {n: p for n, p in model.named_parameters() if ".lora_B." in n or ".lora_embedding_B." in n}
        self.trained_b = {n: p.detach().clone() for n, p in self.lora_b.items()}
        self.head = user_head(model)
        self.trained_head = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        self.base_head = {k: v.detach().clone().to(self.trained_head[k].device) for k, v in base_head.state_dict().items()}

    @torch.no_grad()
    def set(self, scale: float) -> None:
        for name, param in self.lora_b.items():
            param.copy_(scale * self.trained_b[name])
        for key, tensor in self.head.state_dict().items():
            base = self.base_head[key]
            tensor.copy_(base + scale * (self.trained_head[key] - base))


# Offsets tried around the start, nearest first: among equally good offsets the search keeps the
# one closest to the prior.
DECISION_STEPS = sorted((round(0.1 * k, 1) for k in range(-40, 41)), key=abs)


def search_decision_offset(logits: torch.Tensor, gold: list[int], start: list[float], metric: str, penalty: float) -> list[float]:
    """Coordinate search for the offsets that maximise n * metric(argmax(logits + offset)) -
    penalty * sum|offset - start| on `gold`: the penalty is in examples' worth of the metric per
    logit unit, so a user with a few labels moves little and one with many moves where they
    point. Label 0's offset stays at `start` (only differences between labels matter); each other
    label's is tried at start + DECISION_STEPS, in two sweeps when there are more than two."""
    n_labels = logits.shape[1]
    values = logits.double().numpy()
    center = np.array(start, dtype=float)
    offset = center.copy()

    def objective(trial: np.ndarray) -> float:
        pred = (values + trial).argmax(1).tolist()
        return len(gold) * scores(gold, pred, n_labels)[metric] - penalty * float(np.abs(trial - center).sum())

    for _ in range(1 if n_labels == 2 else 2):
        for k in range(1, n_labels):
            best, best_value = offset, objective(offset)
            for step in DECISION_STEPS:
                trial = offset.copy()
                trial[k] = center[k] + step
                value = objective(trial)
                if value > best_value + 1e-9:
                    best, best_value = trial, value
            offset = best
    return offset.tolist()
