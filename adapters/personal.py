"""Per-user adapters over the base model: building trainable copies and running them on examples.

The night side (continual/) works with `memory.replay.Example` rows; this kit turns them into
model inputs (cached image features, stored rationales) and gives it LoRA-wrapped copies of the
base model to train, so continual/ never touches the model's internals.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model

from adapters.checkpoint import user_lora_config
from adapters.inputs import ModelInput
from adapters.predictor import Predictor
from memory.images import ImageStore
from memory.replay import Example


class PersonalKit:
    def __init__(self, predictor: Predictor, images: ImageStore):
        self.predictor = predictor
        self.images = images
        self.labels = predictor.labels
        self.device = predictor.device
        self.encoder_id = predictor.encoder_id

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
        return self.predictor.embed_inputs(self.inputs(list(examples)))

    def trainable(self, adapter_dir: Path | None) -> PeftModel:
        """A LoRA-wrapped copy of the base: the user's current adapter if any, else a fresh one."""
        base = copy.deepcopy(self.predictor.pristine)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        else:
            model = get_peft_model(base, user_lora_config(self.predictor.config))
        return model.to(self.device)

    def logits(self, model: torch.nn.Module, examples: list[Example], train: bool = False) -> torch.Tensor:
        return model(**self.predictor.batcher(self.inputs(examples), train=train))

    @torch.inference_mode()
    def accuracy(self, model: torch.nn.Module, examples: list[Example]) -> float:
        if not examples:
            return float("nan")
        was = model.training
        model.eval()
        correct = 0
        for start in range(0, len(examples), 64):
            chunk = examples[start : start + 64]
            pred = self.logits(model, chunk).argmax(-1).cpu().tolist()
            correct += sum(self.labels[p] == e.label for p, e in zip(pred, chunk))
        model.train(was)
        return correct / len(examples)
