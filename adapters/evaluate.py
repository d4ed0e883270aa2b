"""Score a saved model on any TomBERT-format TSV (with its image folder, if any)."""

from __future__ import annotations

from pathlib import Path

from nightowl.adapters.checkpoint import load_base_model
from nightowl.adapters.data import image_features, read_tombert_tsv
from nightowl.adapters.encoders import ImageEncoder, load_tokenizer, pick_device
from nightowl.adapters.inputs import Batcher, ModelInput
from nightowl.adapters.train import evaluate_items


def evaluate_model(model_dir: Path, tsv_path: Path, images_dir: Path | None = None, settings=None) -> dict:
    """Accuracy, macro-F1 (percent: this is `nightowl evaluate`'s report) and the confusion matrix;
    never gives the model a rationale."""
    model = load_base_model(model_dir)
    device = pick_device(settings)
    model.to(device)
    config = model.config
    rows = read_tombert_tsv(tsv_path, n_labels=len(config.labels))
    feats = image_features(rows, images_dir, ImageEncoder(config.image_model, device)) if images_dir else {}
    items = [ModelInput(r.text, r.aspect, None, feats[r.image_id].float() if r.image_id in feats else None) for r in rows]
    result = evaluate_items(model, Batcher(load_tokenizer(config.text_model), config, device), items, [r.label for r in rows])
    missing = sum(1 for r in rows if images_dir and r.image_id and r.image_id not in feats)
    percent = {"accuracy": 100 * result["accuracy"], "macro_f1": 100 * result["macro_f1"]}
    return {"model": str(model_dir), "data": str(tsv_path), "labels": config.labels, "images_missing": missing,
            **result, **percent}
