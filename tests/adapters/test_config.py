"""Settings dataclasses refuse bad values with a message naming the field; saved configs still load."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nightowl.adapters.checkpoint import SHIPPED_BASE
from nightowl.adapters.config import FusionConfig
from nightowl.adapters.train import TrainRecipe


def test_every_field_is_documented():
    for cls in (FusionConfig, TrainRecipe):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_shipped_config_loads_and_saves_unchanged(tmp_path):
    config = FusionConfig.load(SHIPPED_BASE)
    config.save(tmp_path)
    assert json.loads((tmp_path / "nightowl_config.json").read_text()) == json.loads(
        (SHIPPED_BASE / "nightowl_config.json").read_text()
    )
    TrainRecipe(**config.training["recipe"])  # the recorded recipe is a valid one


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads": 5}, "FusionConfig.heads must divide hidden (384), got 5"),
        ({"labels": ["only"]}, "FusionConfig.labels must have at least 2 entries"),
        ({"labels": ["a", "a"]}, "FusionConfig.labels must have no duplicates"),
        ({"dropout": 1.5}, "FusionConfig.dropout must be a number in [0.0, 1.0], got 1.5"),
        ({"hidden": 0}, "FusionConfig.hidden must be an integer >= 1, got 0"),
        ({"pseudo_rationale_tokens": "4"}, "FusionConfig.pseudo_rationale_tokens must be an integer >= 1"),
        ({"target_pooling": "false"}, "FusionConfig.target_pooling must be true or false"),
        ({"lora_alpha": 0}, "FusionConfig.lora_alpha must be a number > 0"),
        ({"lora_targets": []}, "FusionConfig.lora_targets must have at least 1 entries"),
    ],
)
def test_fusion_config_rejects(kwargs, message):
    with pytest.raises(ValueError) as err:
        FusionConfig(**{"labels": ["neg", "pos"], **kwargs})
    assert message in str(err.value)


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr_fusion": -1e-3}, "lr_fusion"),
        ({"warmup_fraction": 2}, "warmup_fraction"),
        ({"label_smoothing": float("nan")}, "label_smoothing"),
        ({"encoder_lora_targets": []}, "encoder_lora_targets"),
        ({"seed": -1}, "seed"),
    ],
)
def test_train_recipe_rejects(kwargs, field_name):
    with pytest.raises(ValueError, match=rf"^TrainRecipe\.{field_name} must "):
        TrainRecipe(**kwargs)
