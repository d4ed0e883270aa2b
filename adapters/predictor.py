"""Inference: the base model loaded once, a user's adapter on top when they have one."""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from nightowl.adapters.checkpoint import SHIPPED_BASE, load_base_model, user_lora_config
from nightowl.adapters.encoders import ImageEncoder, load_tokenizer, pick_device
from nightowl.adapters.inputs import Batcher, ModelInput
from nightowl.adapters.serving import AdapterCache, AdapterUnavailable

__all__ = ["AdapterRef", "ModelPrediction", "Predictor", "load_base_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """Which adapter serves a user: its version number and its PEFT folder."""

    version: int
    folder: Path


@dataclass
class ModelPrediction:
    """What the model answers for one input (label, probabilities, the adapter version that
    answered: None = the base). Not to be confused with `nightowl.memory.models.Prediction`, the
    stored row of what was served for a post."""

    label: str
    probabilities: dict[str, float]
    adapter_version: int | None


def model_digest(model_dir: Path) -> str:
    """sha256 over a saved model's config and weights files (names and contents)."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors"):
            h.update(path.relative_to(model_dir).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


class Predictor:
    def __init__(self, settings, model_dir: Path | None = None):
        self.settings = settings
        self.model_dir = Path(model_dir or settings.base_model_dir or SHIPPED_BASE)
        self.device = pick_device(settings)
        model = load_base_model(self.model_dir, settings)
        self.config = model.config
        if list(settings.labels) != list(self.config.labels):
            raise ValueError(
                f"the base model at {self.model_dir} predicts {self.config.labels}, but settings.labels is "
                f"{list(settings.labels)}: set NIGHTOWL_BASE_MODEL_DIR to a model trained on those labels"
            )
        # Serving mutates its model (peft injects adapters into it); training starts from copies
        # of this untouched one.
        self.pristine = model
        self.model = copy.deepcopy(model).to(self.device).eval()
        self.tokenizer = load_tokenizer(self.config.text_model)
        self.batcher = Batcher(self.tokenizer, self.config, self.device)
        self.adapters = AdapterCache(self.model, user_lora_config(self.config), settings.adapter_cache_size)
        self._image_lock = threading.Lock()
        self._image_encoder: ImageEncoder | None = None
        self._broken_logged: set[str] = set()

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    @property
    def image_encoder(self) -> ImageEncoder:
        # Loaded on the first image: text-only deployments never pay for it.
        if self._image_encoder is None:
            with self._image_lock:
                if self._image_encoder is None:
                    self._image_encoder = ImageEncoder(self.config.image_model, self.device)
        return self._image_encoder

    @cached_property
    def encoder_id(self) -> str:
        """Names this base model's weights: vectors it produced are only comparable with its own."""
        return f"fused-{model_digest(self.model_dir)[:16]}"

    # -- prediction ---------------------------------------------------------------------------
    def _to_prediction(self, probs: torch.Tensor, adapter: AdapterRef | None) -> ModelPrediction:
        values = [round(float(p), 6) for p in probs]
        best = int(torch.argmax(probs))
        return ModelPrediction(self.labels[best], dict(zip(self.labels, values)), adapter.version if adapter else None)

    @torch.inference_mode()
    def predict_inputs(self, items: list[ModelInput], adapter: AdapterRef | None = None, batch_size: int = 64) -> list[ModelPrediction]:
        out: list[ModelPrediction] = []
        for start in range(0, len(items), batch_size):
            batch = self.batcher(items[start : start + batch_size])
            try:
                with self.adapters.model_for(adapter.folder if adapter else None) as model:
                    probs = model(**batch).float().softmax(-1).cpu()
            except AdapterUnavailable:
                # A broken adapter must not take the user's posts down: the base answers, and
                # the answer says so (adapter_version null).
                folder = str(adapter.folder) if adapter else ""
                if folder not in self._broken_logged:  # once per adapter, not once per request
                    self._broken_logged.add(folder)
                    log.exception("user adapter v%s unavailable; serving the base model", adapter.version if adapter else None)
                adapter = None
                with self.adapters.model_for(None) as model:
                    probs = model(**batch).float().softmax(-1).cpu()
            out.extend(self._to_prediction(p, adapter) for p in probs)
        return out

    def predict(
        self,
        text: str,
        aspect: str | None,
        image_features: torch.Tensor | None,
        rationale: str | None = None,
        user_id: str | None = None,  # kept for logging/tracing; the adapter names the model
        context: str | None = None,
        adapter: AdapterRef | None = None,
    ) -> ModelPrediction:
        item = ModelInput(text=text, aspect=aspect, context=context, image_features=image_features, rationale=rationale)
        return self.predict_inputs([item], adapter)[0]

    @torch.inference_mode()
    def probabilities_with(self, model: torch.nn.Module, text: str, aspect: str | None, image_features, context=None) -> dict[str, float]:
        """Probabilities from any model over this base (e.g. one loaded with plain peft)."""
        model.to(self.device).eval()
        probs = model(**self.batcher([ModelInput(text, aspect, context, image_features)])).float().softmax(-1)[0].cpu()
        return dict(zip(self.labels, (float(p) for p in probs)))

    @torch.inference_mode()
    def embed_inputs(self, items: list[ModelInput], batch_size: int = 64) -> np.ndarray:
        """The frozen base model's pooled post representation (for the replay memory)."""
        model = self.pristine
        out = []
        for start in range(0, len(items), batch_size):
            batch = {k: v.cpu() for k, v in self.batcher(items[start : start + batch_size]).items()}
            _, aux = model(**batch, return_aux=True)
            out.append(aux["pooled"].float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.hidden), np.float32)
