"""CMDPI's three Transformer modules (Sec. 3.1, Fig. 2): the image encoder, the text encoder
(Eq. 1) and the reconstruction network RecNet (Eq. 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medvqa_lib.nn import (
    Packing,
    TextTransformer,
    TransformerLayer,
    init_bert_weights,
    padding_mask,
)

__all__ = ["ImageEncoder", "RecNet", "TextEncoder"]


class ImageEncoder(nn.Module):
    """ViT + linear map to d: (B, 1+n, d) with the head token first. ``keep`` (B, n_keep)
    encodes only these patches (MAE-style masking, Eq. 2)."""

    def __init__(self, vit: nn.Module, width: int, dim: int) -> None:
        super().__init__()
        self.vit = vit
        self.proj = nn.Linear(width, dim)

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        v = self.vit
        p = v.num_prefix_tokens
        x = v._pos_embed(v.patch_embed(images))
        if keep is not None:
            patches = x[:, p:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :p], patches], 1)
        x = v.norm(v.blocks(v.norm_pre(v.patch_drop(x))))
        if p > 1:  # register tokens are not features
            x = torch.cat([x[:, :1], x[:, p:]], 1)
        return self.proj(x)


class TextEncoder(nn.Module):
    """BERT-style stack + linear map to d: (B, L, d), [CLS] first (zeros-mapped at padding)."""

    def __init__(self, bert: TextTransformer, dim: int) -> None:
        super().__init__()
        self.bert = bert
        self.proj = nn.Linear(bert.dim, dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, first_only: bool = False) -> Tensor:
        return self.proj(self.bert(input_ids, attention_mask, first_only=first_only))


class RecNet(nn.Module):
    """Eq. 3: ``v_0 = [h, H_I, H_T] + pos``; post-LN self-attention/GELU-FFN layers.

    Padding text positions are masked out as keys (and skipped, see
    :class:`~medvqa_lib.nn.Packing`); their outputs are zeros.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, n_image: int,
                 max_text_len: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_image = n_image
        self.pos = nn.Parameter(torch.zeros(1, 1 + n_image + max_text_len, dim))
        self.layers = nn.ModuleList(
            TransformerLayer(dim, heads, mlp_dim, cross_attention=False, causal=False, dropout=dropout,
                             layer_norm_eps=1e-6)
            for _ in range(depth))
        self.apply(init_bert_weights)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, head: Tensor, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """``head`` (B, d), ``image_tokens`` (B, N, d), ``text_tokens`` (B, M, d), ``text_mask``
        (B, M) 0/1 -> ``H_o`` (B, 1+N+M, d)."""
        b, n, m = head.shape[0], image_tokens.shape[1], text_tokens.shape[1]
        length = 1 + n + m
        if length > self.pos.shape[1]:
            raise ValueError(f"RecNet has {self.pos.shape[1]} positions, the input needs {length}: "
                             "raise max_text_len or truncate the text")
        x = torch.cat([head[:, None].to(image_tokens.dtype), image_tokens, text_tokens], 1)
        x = x + self.pos[:, :length]
        mask = torch.cat([text_mask.new_ones(b, 1 + n), text_mask], 1)
        packing = Packing(mask, b, length)
        attn = padding_mask(mask, x.dtype)
        x = packing.pack(x)
        for layer in self.layers:
            x = layer(x, attn, packing=packing)
        return packing.pad(x)
