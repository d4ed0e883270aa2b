"""The rationale-fused model with the packaged MiniLM and EfficientNet-Lite0."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from PIL import Image

from nightowl.adapters.checkpoint import (
    SHIPPED_BASE,
    build_model,
    load_base_model,
    user_lora_config,
    with_encoder_lora,
)
from nightowl.adapters.config import FusionConfig
from nightowl.adapters.data import TOMBERT_LABELS, read_tombert_tsv
from nightowl.adapters.encoders import ImageEncoder, load_tokenizer
from nightowl.adapters.evaluate import evaluate_model
from nightowl.adapters.inputs import Batcher, ModelInput
from nightowl.adapters.predictor import Predictor
from nightowl.adapters.train import TrainRecipe, train_base_model
from tests.conftest import FIXTURES, make_settings

TSV = FIXTURES / "twitter_small.tsv"
IMAGES = FIXTURES / "images"


@pytest.fixture(scope="module")
def image_encoder():
    return ImageEncoder()


@pytest.fixture(scope="module")
def base(predictor):
    return predictor.pristine


def _items(image_encoder, with_rationale=False):
    rows = read_tombert_tsv(TSV)
    out = []
    for r in rows:
        path = IMAGES / r.image_id
        feats = image_encoder.encode(Image.open(path)) if path.exists() else None
        rationale = f"The text mentions {r.aspect} in a matter-of-fact way." if with_rationale else None
        out.append((ModelInput(r.text, r.aspect, None, feats, rationale), r.label))
    return out


def test_image_encoder_gives_region_grid(image_encoder):
    feats = image_encoder.encode(Image.open(next(IMAGES.iterdir())))
    assert feats.shape == (49, 1280) and feats.dtype == torch.float32
    # The packaged weights really are ImageNet-trained: a real photo gets a confident class.
    probs = image_encoder.classify(Image.open(next(IMAGES.iterdir())))
    assert probs.max() > 0.05


def test_forward_with_and_without_rationale_and_image(base, image_encoder, predictor):
    items = [i for i, _ in _items(image_encoder, with_rationale=True)][:4]
    items[1] = ModelInput(items[1].text, items[1].aspect)  # nothing but text
    batch = predictor.batcher(items)
    with torch.inference_mode():
        logits, aux = base(**batch, return_aux=True)
        assert logits.shape == (4, 3) and torch.isfinite(logits).all()
        # The rationale changes the answer's inputs; without one the predicted stand-in is used.
        bare = base(**predictor.batcher([ModelInput(i.text, i.aspect, None, i.image_features) for i in items]))
    assert not torch.allclose(logits, bare)
    assert aux["true_rationale"].shape == (4, 384)


def test_training_dropout_drops_rationales_and_images(predictor, image_encoder):
    items = [i for i, _ in _items(image_encoder, with_rationale=True)]
    gen = torch.Generator().manual_seed(0)
    batch = predictor.batcher(items, train=True, generator=gen)
    assert batch["has_rationale"].all() and not batch["use_rationale"].all()
    assert batch["has_image"].sum() < sum(i.image_features is not None for i in items)


def test_user_adapter_roundtrip_with_plain_peft(base, predictor, tmp_path):
    import copy

    model = get_peft_model(copy.deepcopy(base), user_lora_config(base.config))
    with torch.no_grad():  # make the adapter non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"] or files == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 3_000_000, f"a user adapter should be small, got {size} bytes"
    reloaded = PeftModel.from_pretrained(load_base_model(predictor.model_dir), tmp_path / "adapter").eval()
    model.eval()
    batch = predictor.batcher([ModelInput("$T$ is the best", "Pizza"), ModelInput("meh", None)])
    with torch.inference_mode():
        assert torch.allclose(model(**batch), reloaded(**batch), atol=1e-5)
        assert not torch.allclose(base(**batch), reloaded(**batch), atol=1e-4)


def test_training_learns_and_saves_small(tmp_path, image_encoder):
    items = _items(image_encoder, with_rationale=True)
    config = FusionConfig(labels=TOMBERT_LABELS)
    model, report = train_base_model(items, items, config, tmp_path / "bm", TrainRecipe(epochs=3, batch_size=4, lr_fusion=3e-3))
    losses = [e["train_loss"] for e in report["epochs"]]
    assert losses[-1] < losses[0]
    saved = tmp_path / "bm"
    assert {p.name for p in saved.iterdir()} == {"nightowl_config.json", "encoder_lora", "fusion.safetensors"}
    assert sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) < 20_000_000
    training = json.loads((saved / "nightowl_config.json").read_text())["training"]
    assert training["recipe"]["epochs"] == 3
    prior = training["label_prior"]  # what per-user prior corrections are measured against
    assert len(prior) == 3 and abs(sum(prior) - 1) < 1e-4
    reloaded = load_base_model(saved)
    batcher = Batcher(load_tokenizer("packaged"), config)
    with torch.inference_mode():
        b = batcher([i for i, _ in items[:3]])
        assert torch.allclose(model(**b), reloaded(**b), atol=2e-2)  # fusion weights stored in fp16

    result = evaluate_model(saved, TSV, IMAGES)
    assert result["n"] == len(items) and 0 <= result["accuracy"] <= 100 and len(result["confusion"]) == 3


def test_predictor_serves_shipped_base(tmp_path, predictor):
    assert predictor.model_dir == SHIPPED_BASE
    p = predictor.predict("$T$ is everything #MCM", "Chuck Bass", None)
    assert p.label in TOMBERT_LABELS and abs(sum(p.probabilities.values()) - 1) < 1e-4
    assert p.adapter_version is None
    with pytest.raises(ValueError, match="labels"):
        Predictor(make_settings(tmp_path, labels=["not_ironic", "ironic"]))


def test_fresh_model_builds_from_packaged_encoder():
    model = with_encoder_lora(build_model(FusionConfig(labels=["a", "b"])))
    assert model.head.out_features == 2 and model.config.hidden == 384
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable < total / 3  # the encoder itself stays frozen: only its LoRA trains


def test_aspect_tokens_are_marked_and_read(predictor, base):
    tok = predictor.tokenizer
    items = [
        ModelInput("$T$ was great but $T$ was awful", "the movie"),  # both mentions
        ModelInput("the movie was great", "The Movie"),  # no $T$: its mentions, any case
        ModelInput("loved it", "pizza"),  # never named: the aspect segment
        ModelInput("no aspect here", None, "a post it replies to"),  # none: the model reads [CLS]
    ]
    batch = predictor.batcher(items)
    marked = [tok.convert_ids_to_tokens(ids[m]) for ids, m in zip(batch["input_ids"], batch["target_mask"])]
    assert marked[0] == ["the", "movie", "the", "movie"]
    assert marked[1] == ["the", "movie"]
    assert marked[2] == ["pizza"] and batch["token_type_ids"][2][batch["target_mask"][2]].tolist() == [1]
    assert marked[3] == []
    # Two aspects of one post: the head sees different aspect tokens, so the answers can differ.
    pair = predictor.batcher([ModelInput("$T$ beat the Jets tonight", "Patriots"), ModelInput("Patriots beat $T$ tonight", "the Jets")])
    with torch.inference_mode():
        a, b = base(**pair)
        unpooled = base(**{**pair, "target_mask": torch.zeros_like(pair["target_mask"])})
    assert not torch.allclose(a, b, atol=1e-4)
    # ... and the aspect's own tokens are what the head reads (not just the aspect segment).
    assert not torch.allclose(a, unpooled[0], atol=1e-4) and not torch.allclose(b, unpooled[1], atol=1e-4)
    # Whole mentions only.
    jets = predictor.batcher([ModelInput("Jetson fans love the Jets", "jets")])
    assert tok.convert_ids_to_tokens(jets["input_ids"][0][jets["target_mask"][0]]) == ["jets"]
