"""From posts to model tensors: tokenisation, image features, rationales, and training-time dropout."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.config import FusionConfig

ASPECT_MARK = "$T$"  # TomBERT format: where the aspect term stands in the tweet


@dataclass
class ModelInput:
    text: str
    aspect: str | None = None
    context: str | None = None  # the post this one replies to
    image_features: torch.Tensor | None = None  # [regions, image_dim], from the frozen image encoder
    rationale: str | None = None


def post_text(text: str, aspect: str | None) -> str:
    return text.replace(ASPECT_MARK, aspect) if aspect else text.replace(ASPECT_MARK, "it")


def second_segment(item: ModelInput) -> str | None:
    """The pair the encoder reads with the post: the aspect (what the sentiment is about), else
    the post it replies to (irony lives in that relation)."""
    if item.aspect:
        return item.aspect
    return item.context or None


class Batcher:
    def __init__(self, tokenizer, config: FusionConfig, device: torch.device | str = "cpu"):
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)

    def __call__(self, items: list[ModelInput], train: bool = False, generator: torch.Generator | None = None) -> dict:
        cfg = self.config
        firsts = [post_text(i.text, i.aspect) for i in items]
        seconds = [second_segment(i) for i in items]
        if any(s is not None for s in seconds):
            enc = self.tokenizer(
                firsts, [s or "" for s in seconds], truncation="longest_first", max_length=cfg.max_post_tokens,
                padding=True, return_tensors="pt",
            )
        else:
            enc = self.tokenizer(firsts, truncation=True, max_length=cfg.max_post_tokens, padding=True, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

        n = len(items)
        has_image = torch.tensor([i.image_features is not None for i in items], dtype=torch.bool)
        if has_image.any():
            regions = max(i.image_features.shape[0] for i in items if i.image_features is not None)
            feats = torch.zeros(n, regions, cfg.image_dim)
            for j, i in enumerate(items):
                if i.image_features is not None:
                    feats[j, : i.image_features.shape[0]] = i.image_features
            if train and cfg.image_dropout > 0:
                has_image &= torch.rand(n, generator=generator) >= cfg.image_dropout
            batch["image_features"] = feats.to(self.device)
            batch["has_image"] = has_image.to(self.device)

        has_rat = torch.tensor([bool(i.rationale) for i in items], dtype=torch.bool)
        if has_rat.any():
            rat = self.tokenizer(
                [i.rationale or "" for i in items], truncation=True, max_length=cfg.max_rationale_tokens,
                padding=True, return_tensors="pt",
            )
            use = has_rat.clone()
            if train and cfg.rationale_dropout > 0:
                use &= torch.rand(n, generator=generator) >= cfg.rationale_dropout
            batch.update(
                rationale_ids=rat["input_ids"].to(self.device),
                rationale_mask=rat["attention_mask"].to(self.device),
                has_rationale=has_rat.to(self.device),
                use_rationale=use.to(self.device),
            )
        return batch
