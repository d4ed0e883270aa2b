"""The rationale-fused classifier (LRSA-style, with MulCoT-RD-style rationale distillation).

- A pretrained text encoder reads the post paired with its aspect (or the post it replies to).
- The same encoder reads the rationale (an LLM's short analysis of the post).
- Dual cross-attention: post tokens attend to rationale tokens, rationale tokens attend to post
  tokens; the post also attends to image regions (frozen CNN grid, projected to text width).
- A gated fusion of the four views feeds the classification head.
- Rationales exist for training data only (and arrive late, if ever, when serving), so a small
  head learns to predict the rationale's encoding from the post and image; its prediction
  (a few pseudo-rationale tokens) stands in whenever the real one is missing. Training drops
  rationales and images at random so the model serves well without either.

Every fusion layer is a plain nn.Linear, so peft's LoRA can target them by name (per-user
adapters do; see `nightowl.adapters.config.FusionConfig.lora_targets`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nightowl.adapters.config import FusionConfig


class CrossAttention(nn.Module):
    """Multi-head attention of a query sequence over a key/value sequence, with a residual."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(ctx)), split(self.v_proj(ctx))
        # Rows whose context is entirely masked (no image, say) attend to nothing: zero output.
        any_ctx = ctx_mask.any(dim=1)
        safe_mask = ctx_mask.clone()
        safe_mask[~any_ctx, 0] = True
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=safe_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        out = self.o_proj(attn.transpose(1, 2).reshape(b, n, d)) * any_ctx[:, None, None]
        return self.norm(x + out)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class RationaleFusedClassifier(nn.Module):
    def __init__(self, config: FusionConfig, encoder: nn.Module):
        super().__init__()
        self.config = config
        d = config.hidden
        self.encoder = encoder
        self.image_proj = nn.Linear(config.image_dim, d)
        self.image_norm = nn.LayerNorm(d)
        self.post_to_rationale = CrossAttention(d, config.heads, config.attn_dropout)
        self.rationale_to_post = CrossAttention(d, config.heads, config.attn_dropout)
        self.post_to_image = CrossAttention(d, config.heads, config.attn_dropout)
        # MulCoT-RD's lesson: learn to produce the rationale's content from the post (+ image).
        self.rationale_predictor = nn.Sequential(
            nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, config.pseudo_rationale_tokens * d)
        )
        self.gate = nn.Linear(4 * d, 3 * d)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * d if config.target_pooling else d, len(config.labels))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.encoder(**kwargs).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,  # [B, R, image_dim]
        has_image: torch.Tensor | None = None,  # [B] bool
        rationale_ids: torch.Tensor | None = None,  # [B, Lr]
        rationale_mask: torch.Tensor | None = None,
        has_rationale: torch.Tensor | None = None,  # [B] bool: a real rationale is given
        use_rationale: torch.Tensor | None = None,  # [B] bool: ...and not dropped (training)
        target_mask: torch.Tensor | None = None,  # [B, L] bool: the aspect's tokens
        return_aux: bool = False,
        post_states: torch.Tensor | None = None,  # [B, L, d]: the encoder's output, when already known
    ):
        # A frozen encoder gives the same states every epoch: a night computes them once
        # (adapters.personal.EncoderStates) and passes them in.
        post = self.encode(input_ids, attention_mask, token_type_ids) if post_states is None else post_states
        post_mask = attention_mask.bool()
        b, d = post.shape[0], post.shape[-1]
        post_pooled = masked_mean(post, post_mask)

        if image_features is not None and has_image is not None and has_image.any():
            regions = self.image_norm(self.image_proj(image_features.to(post.dtype)))
            region_mask = has_image[:, None].expand(-1, regions.shape[1])
        else:
            regions = post.new_zeros(b, 1, d)
            region_mask = torch.zeros(b, 1, dtype=torch.bool, device=post.device)
        image_pooled = masked_mean(regions, region_mask)

        # Pseudo-rationale tokens predicted from post + image: used wherever no rationale is given.
        k = self.config.pseudo_rationale_tokens
        predicted = self.rationale_predictor(torch.cat([post_pooled, image_pooled], -1)).view(b, k, d)
        rat_tokens, rat_mask = predicted, torch.ones(b, k, dtype=torch.bool, device=post.device)
        true_pooled = None
        if rationale_ids is not None and has_rationale is not None and has_rationale.any():
            # Encode only the rows that have a rationale (rationales are long, and in a training
            # batch most rows have none), and without gradient: the encoder learns from the
            # post; the cross-attention learns to read what the encoder makes of a rationale.
            # That keeps a rationale-trained epoch near the cost of a plain one.
            rows = has_rationale.nonzero().squeeze(1)
            width_r = int(rationale_mask[rows].sum(1).max())
            real = post.new_zeros(b, width_r, d)
            with torch.no_grad():
                real[rows] = self.encode(rationale_ids[rows, :width_r], rationale_mask[rows, :width_r])
            real_mask = rationale_mask[:, :width_r].bool() & has_rationale[:, None]
            true_pooled = masked_mean(real, real_mask)
            width = max(real.shape[1], k)
            rat_tokens = _pad_to(predicted, width)
            rat_mask = _pad_to(rat_mask, width)
            use = has_rationale if use_rationale is None else (use_rationale & has_rationale)
            rat_tokens = torch.where(use[:, None, None], _pad_to(real, width), rat_tokens)
            rat_mask = torch.where(use[:, None], _pad_to(real_mask, width), rat_mask)

        a = masked_mean(self.post_to_rationale(post, rat_tokens, rat_mask), post_mask)
        r = masked_mean(self.rationale_to_post(rat_tokens, post, post_mask), rat_mask)
        if region_mask.any():
            v = masked_mean(self.post_to_image(post, regions, region_mask), post_mask)
        else:  # no image in the batch: the attention's output is zero, leaving its residual norm(post)
            v = masked_mean(self.post_to_image.norm(post), post_mask)
        # Gates per view and channel; a view that is absent (no image) contributes nothing.
        g = torch.sigmoid(self.gate(torch.cat([post_pooled, a, r, v], -1))).view(b, 3, d)
        has_img = region_mask.any(1).to(g.dtype)
        g = g * torch.stack([torch.ones_like(has_img), torch.ones_like(has_img), has_img], 1)[..., None]
        fused = (post_pooled + g[:, 0] * a + g[:, 1] * r + g[:, 2] * v) / (1 + g.sum(1))
        if self.config.target_pooling:
            fused = torch.cat([fused, self._target(post, post_mask, target_mask)], -1)
        logits = self.head(self.dropout(fused))
        if not return_aux:
            return logits
        aux = {"predicted_rationale": predicted.mean(1), "true_rationale": true_pooled, "pooled": post_pooled}
        return logits, aux


    @staticmethod
    def _target(post: torch.Tensor, post_mask: torch.Tensor, target_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over the aspect's tokens; the sequence token where a row has none."""
        cls = post[:, 0]
        if target_mask is None:
            return cls
        mask = target_mask.bool() & post_mask
        return torch.where(mask.any(1, keepdim=True), masked_mean(post, mask), cls)


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]]
    return F.pad(t, pad)


def distillation_loss(aux: dict, has_rationale: torch.Tensor) -> torch.Tensor:
    """Cosine distance between the predicted and the real rationale encoding, where one exists."""
    true = aux["true_rationale"]
    if true is None or not has_rationale.any():
        return aux["predicted_rationale"].sum() * 0.0
    pred = aux["predicted_rationale"][has_rationale]
    return (1 - F.cosine_similarity(pred, true[has_rationale].detach(), dim=-1)).mean()
