"""From posts to model tensors: tokenisation, image features, rationales, and training-time dropout."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import torch

from nightowl.adapters.config import FusionConfig

ASPECT_MARK = "$T$"  # TomBERT format: where the aspect term stands in the tweet


@dataclass
class ModelInput:
    text: str
    aspect: str | None = None
    context: str | None = None  # the post this one replies to
    image_features: torch.Tensor | None = None  # [regions, image_dim], from the frozen image encoder
    rationale: str | None = None


def post_text_and_spans(text: str, aspect: str | None) -> tuple[str, list[tuple[int, int]]]:
    """The post with `$T$` replaced by the aspect, and the character spans where the aspect
    stands in it (every `$T$`; without one, the aspect's own mentions, case-insensitive)."""
    fill = aspect or "it"
    pieces = text.split(ASPECT_MARK)
    out, spans, pos = [], [], 0
    for n, piece in enumerate(pieces):
        if n:
            spans.append((pos, pos + len(fill)))
            out.append(fill)
            pos += len(fill)
        out.append(piece)
        pos += len(piece)
    joined = "".join(out)
    if not aspect:
        return joined, []
    if not spans:  # whole mentions only: "Jets" is not in "Jetson" (and no case-folding of the text, which can shift offsets)
        pattern = r"(?<!\w)" + re.escape(aspect) + r"(?!\w)"
        spans = [m.span() for m in re.finditer(pattern, joined, re.IGNORECASE)]
    return joined, spans


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
        # A fast tokenizer is not re-entrant: calls with other truncation settings from another
        # thread (a night running inside the server) fail with "Already borrowed".
        self._tokenizer_lock = threading.Lock()

    def __call__(self, items: list[ModelInput], train: bool = False, generator: torch.Generator | None = None) -> dict:
        cfg = self.config
        firsts, spans = zip(*(post_text_and_spans(i.text, i.aspect) for i in items))
        seconds = [second_segment(i) for i in items]
        pair = [s or "" for s in seconds] if any(s is not None for s in seconds) else None
        with self._tokenizer_lock:
            enc = self.tokenizer(
                list(firsts), pair, truncation="longest_first" if pair else True, max_length=cfg.max_post_tokens,
                padding=True, return_tensors="pt", return_offsets_mapping=True,
            )
        batch = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch["target_mask"] = self._target_mask(enc, spans, [bool(i.aspect) for i in items]).to(self.device)

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
            with self._tokenizer_lock:
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

    @staticmethod
    def _target_mask(enc, spans, has_aspect: list[bool]) -> torch.Tensor:
        """Which tokens are the aspect: its mentions in the post, else (an aspect the post never
        names) the aspect segment itself. Rows without an aspect get none: the model then reads
        the sequence token ([CLS]) instead."""
        offsets = enc["offset_mapping"]
        mask = torch.zeros(offsets.shape[:2], dtype=torch.bool)
        for row, (row_spans, aspect) in enumerate(zip(spans, has_aspect)):
            if not aspect:
                continue
            seq = enc.sequence_ids(row)
            for t, (s, e) in enumerate(offsets[row].tolist()):
                if seq[t] == 0 and e > s and any(s < b and e > a for a, b in row_spans):
                    mask[row, t] = True
            if not mask[row].any():
                mask[row] = torch.tensor([x == 1 for x in seq])
        return mask
