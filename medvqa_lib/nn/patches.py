"""Patches of an image: one :func:`patchify`, one MAE-style :func:`random_patch_mask`.

M2I2's masked image modelling and CMDPI's image reconstruction both cut the image into the
ViT's patches and hide a random subset of them; both use these functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def masked_count(num_patches: int, ratio: float) -> int:
    """Patches masked per image: ``round(ratio * num_patches)``, at least 1 and at most
    ``num_patches - 1`` when ``ratio > 0`` (0 when ``ratio == 0``)."""
    if ratio <= 0:
        return 0
    return min(max(round(ratio * num_patches), 1), num_patches - 1)


def random_patch_mask(batch: int, num_patches: int, ratio: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """MAE-style per-image random masking of exactly :func:`masked_count` patches.

    As MAE's ``random_masking``: each patch draws uniform noise, and the ``N - n_masked``
    patches with the lowest noise stay visible. Returns ``keep`` (B, N - n_masked): the visible
    patch indices in increasing order, and ``mask`` (B, N) bool, True at the masked patches
    (the complement of ``keep``).
    """
    n_mask = masked_count(num_patches, ratio)
    order = torch.rand(batch, num_patches, generator=generator, device=device).argsort(1)
    keep = order[:, : num_patches - n_mask].sort(1).values
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device).scatter(1, keep, False)
    return keep, mask


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order (as the ViT's patch
    embedding), pixels of a patch ordered (row, column, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify` for square images."""
    b, n, _ = patches.shape
    g, p = math.isqrt(n), patch_size
    x = patches.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch normalised pixels: ``(x - mean) / sqrt(var + eps)`` over each patch's values
    (unbiased variance, as MAE's ``norm_pix_loss``)."""
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine positions (grid*grid, dim): half of the channels encode the row,
    half the column, each as sines and cosines of geometrically spaced frequencies."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], 1)

    return torch.cat([encode(rows), encode(cols)], 1).float()
