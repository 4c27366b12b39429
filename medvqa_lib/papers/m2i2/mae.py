"""M2I2's image decoder for masked image modelling (Sec. 2.1, 2.2.1): MAE's light transformer.

The image encoder sees only the visible patches; :class:`MAEDecoder` puts a learned mask token
at every masked position, adds fixed 2-D sin-cos positions and regresses every patch's pixels.
The loss (Eq. 1, :func:`~medvqa_lib.papers.m2i2.losses.mim_loss`) scores the masked ones.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from medvqa_lib.nn import sincos_pos_embed

__all__ = ["MAEDecoder", "MIMOutput"]


class MAEDecoder(nn.Module):
    """MAE's image decoder: project the encoded visible patches (and [CLS]) to ``width``, put a
    learned mask token at every masked position, add fixed sin-cos positions, run pre-LN ViT
    blocks and regress each patch's ``patch_size**2 * 3`` pixel values."""

    def __init__(self, enc_dim: int, width: int, depth: int, heads: int, patch_size: int,
                 channels: int = 3, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(enc_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias=True,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6))
                                    for _ in range(depth))
        for blk in self.blocks:  # fused SDPA regardless of TIMM_FUSED_ATTN
            blk.attn.fused_attn = True
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch_size * patch_size * channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: Tensor, keep: Tensor, num_patches: int) -> Tensor:
        """``latent`` (B, 1+K, D): encoder output of [CLS] + the visible patches ``keep``
        (B, K). Returns the predicted pixels of all ``num_patches`` patches (B, N, p*p*C)."""
        x = self.embed(latent)
        b, _, width = x.shape
        full = self.mask_token.to(x.dtype).expand(b, num_patches, width).scatter(
            1, keep[..., None].expand(-1, -1, width), x[:, 1:])
        pos = sincos_pos_embed(width, math.isqrt(num_patches)).to(x)
        x = torch.cat([x[:, :1], full + pos], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]


class MIMOutput(NamedTuple):
    """One masked-image pass: the MIM loss, the predicted patches (B, N, p*p*C), the mask
    (B, N, True = masked and reconstructed), the visible indices (B, K) and the encoder output
    of [CLS] + visible patches (B, 1+K, D)."""

    loss: Tensor
    pred: Tensor
    mask: Tensor
    keep: Tensor
    latent: Tensor
