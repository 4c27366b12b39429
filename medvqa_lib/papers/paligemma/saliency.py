"""Attention saliency for transformer VLMs: raw attention and attention rollout.

All functions take attention probabilities of one example, one tensor per layer of shape
``heads x T x T`` (row = query, column = key), and token index lists; nothing here knows
about a particular model. Maps over image patches are reshaped to the model's own
``grid x grid`` patch layout by :func:`to_grid`.

Attention rollout (Abnar & Zuidema, 2020; the variant with head fusion and discarding of
Gildenblat's ViT explainability notes): per layer, fuse the heads (mean/max/min), optionally
zero the weakest ``discard_ratio`` share of the fused entries (the diagonal is kept), add
the identity for the residual path, renormalise each row to sum to one, and multiply the
layers: ``R = Â_L · … · Â_1``. Row ``i`` of ``R`` says how much each input token flows into
position ``i`` at the top of the stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medvqa_lib.errors import unknown_name

__all__ = ["HEAD_FUSIONS", "fuse_heads", "rollout", "raw_attention_map", "patch_to_tokens", "to_grid"]

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attention: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """``heads x T x T`` → ``T x T`` by the mean, max or min over heads."""
    if fusion not in HEAD_FUSIONS:
        raise unknown_name("head fusion", fusion, HEAD_FUSIONS)
    a = attention.float()
    if a.dim() == 2:
        return a
    return {"mean": lambda: a.mean(0), "max": lambda: a.amax(0), "min": lambda: a.amin(0)}[fusion]()


def _discard(a: torch.Tensor, ratio: float) -> torch.Tensor:
    if ratio <= 0:
        return a
    if not 0 <= ratio < 1:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    flat = a.flatten().clone()
    k = int(flat.numel() * ratio)
    if k:
        drop = flat.topk(k, largest=False).indices
        diag = torch.arange(a.shape[0]) * (a.shape[0] + 1)
        drop = drop[~torch.isin(drop, diag)]
        flat[drop] = 0.0
    return flat.view_as(a)


def rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean",
            discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout over the layers (first to last); returns ``T x T``."""
    if not attentions:
        raise ValueError("rollout needs at least one layer of attention")
    size = attentions[0].shape[-1]
    eye = torch.eye(size)
    result = eye.clone()
    for layer in attentions:
        a = _discard(fuse_heads(layer.detach().cpu(), head_fusion), discard_ratio)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def raw_attention_map(attention: torch.Tensor, head: int, queries: Sequence[int],
                      keys: Sequence[int]) -> torch.Tensor:
    """One head's attention from ``queries`` (e.g. response tokens) to ``keys`` (e.g. image
    patches), averaged over the queries: a vector with one value per key."""
    a = attention.detach().cpu().float()
    a = a[head] if a.dim() == 3 else a
    return a[list(queries)][:, list(keys)].mean(0)


def patch_to_tokens(attention: torch.Tensor, head: int, patch: int, tokens: Sequence[int],
                    k: int = 7) -> tuple[torch.Tensor, list[int]]:
    """How much each of ``tokens`` (e.g. response tokens) attends to one image ``patch``
    position, and the positions in ``tokens`` of the ``k`` highest.

    In a decoder (PaliGemma's prefix-LM included) an image patch cannot attend to tokens that
    come after it, so the patch → response relation is read from the patch's column: the
    attention the response tokens pay to it."""
    a = attention.detach().cpu().float()
    a = a[head] if a.dim() == 3 else a
    row = a[list(tokens), patch]
    top = row.topk(min(k, row.numel())).indices.tolist()
    return row, top


def to_grid(values: torch.Tensor, grid: int) -> torch.Tensor:
    """A vector of ``grid**2`` patch values as a ``grid x grid`` map (row-major patches)."""
    if values.numel() != grid * grid:
        raise ValueError(f"{values.numel()} patch values do not fill a {grid}x{grid} grid")
    return values.reshape(grid, grid)
