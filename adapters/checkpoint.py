"""Building, saving and loading the base model.

A base model folder holds only what training changed over the pretrained encoder, so it ships
small: `nightowl_config.json`, `encoder_lora/` (the encoder's LoRA, PEFT layout, merged at
load) and `fusion.safetensors` (image projection, cross-attention, rationale predictor, gate,
head; stored in fp16). The encoder itself comes from `config.text_model` (the packaged MiniLM
by default), so a folder trained over another encoder names it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from nightowl.adapters.config import FusionConfig
from nightowl.adapters.encoders import load_text_encoder
from nightowl.adapters.fusion import RationaleFusedClassifier
from nightowl.io import atomic_folder

SHIPPED_BASE = Path(__file__).parent / "base_model"
ENCODER_LORA = "encoder_lora"
FUSION_FILE = "fusion.safetensors"


def build_model(config: FusionConfig) -> RationaleFusedClassifier:
    """A fresh model: the pretrained encoder, untrained fusion and head."""
    encoder = load_text_encoder(config.text_model)
    config.hidden = int(encoder.config.hidden_size)
    config.validate()  # `heads` must divide the encoder's width, known only now
    return RationaleFusedClassifier(config, encoder)


# Every linear layer of each transformer block (BERT-style names; the pooler is unused).
ENCODER_LINEAR_LAYERS = r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def with_encoder_lora(model: RationaleFusedClassifier, r: int = 16, alpha: int | None = None,
                      targets: list[str] | str = ENCODER_LINEAR_LAYERS) -> RationaleFusedClassifier:
    """Base training: LoRA on the encoder (so the shipped delta is small); the fusion layers and
    head stay fully trainable."""
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=0.05, target_modules=targets)
    model.encoder = get_peft_model(model.encoder, cfg)
    return model


def fusion_state(model: RationaleFusedClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items() if not k.startswith("encoder.")}


def save_base(model: RationaleFusedClassifier, folder: Path) -> None:
    """Write a base model folder atomically (temp folder, fsync, rename); an older one is replaced."""

    def fill(tmp: Path) -> None:
        model.config.save(tmp)
        if isinstance(model.encoder, PeftModel):
            model.encoder.save_pretrained(tmp / ENCODER_LORA)
        save_file(fusion_state(model), str(tmp / FUSION_FILE))

    atomic_folder(Path(folder), fill, replace=True)


def load_base_model(model_dir: Path | str | None = None, settings=None) -> RationaleFusedClassifier:
    """The trained base model, encoder LoRA merged, in eval mode on the CPU.

    This is the model a user adapter applies to: `PeftModel.from_pretrained(load_base_model(d), adapter_dir)`.
    `settings` may override the text encoder (a user with hub access naming another one must
    have trained the base model on it).
    """
    folder = Path(model_dir) if model_dir else SHIPPED_BASE
    if not (folder / "nightowl_config.json").exists():
        raise FileNotFoundError(f"{folder} is not a nightowl base model folder (no nightowl_config.json)")
    config = FusionConfig.load(folder)
    if settings is not None and getattr(settings, "text_model", "packaged") not in ("packaged", config.text_model):
        raise ValueError(
            f"base model {folder} was trained over text encoder {config.text_model!r}, "
            f"settings name {settings.text_model!r}: train a base model on that encoder first"
        )
    model = build_model(config)
    if (folder / ENCODER_LORA).exists():
        model.encoder = PeftModel.from_pretrained(model.encoder, folder / ENCODER_LORA).merge_and_unload()
    state = {k: v.float() for k, v in load_file(str(folder / FUSION_FILE)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise ValueError(f"{folder}: fusion weights don't fit the model (missing {missing}, unexpected {unexpected})")
    return model.eval()


def user_lora_config(config: FusionConfig) -> LoraConfig:
    """The per-user adapter: LoRA on `config.lora_targets` (the fusion layers by default), the head trained whole."""
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets,
        modules_to_save=config.lora_modules_to_save,
    )
