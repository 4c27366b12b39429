"""Attention saliency (Section 6): raw attention (Eq. 2), attention rollout, and both for a
PaliGemma answer (:func:`saliency_for`).

The generic functions take attention probabilities of one example, one tensor per layer of
shape ``heads x T x T`` (row = query, column = key), and token index lists; they know
nothing about a particular model. Maps over image patches are reshaped to the model's own
``grid x grid`` patch layout by :func:`to_grid`.

Raw attention, Eq. 2 of the paper: ``A = softmax(Q K^T / sqrt(d_k))`` with the queries of the
selected response tokens and the keys of the image patches (Figure 10), or the other way
round, a patch and the response tokens (Figure 11): :func:`raw_attention_map`,
:func:`patch_to_tokens`.

Attention rollout (Abnar & Zuidema, 2020; the variant with head fusion and discarding of
Gildenblat's ViT explainability notes): per layer, fuse the heads (mean/max/min), optionally
zero the weakest ``discard_ratio`` share of the fused entries (the diagonal is kept), add
the identity for the residual path, renormalise each row to sum to one, and multiply the
layers: ``R = Â_L · … · Â_1``. Row ``i`` of ``R`` says how much each input token flows into
position ``i`` at the top of the stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medvqa_lib.errors import unknown_name
from medvqa_lib.papers.paligemma.model import PaliGemmaVQA

__all__ = ["HEAD_FUSIONS", "fuse_heads", "rollout", "raw_attention_map", "patch_to_tokens", "to_grid",
           "Saliency", "saliency_for"]

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
    """Eq. 2 of the paper, read from the model: one head's attention probabilities
    ``softmax(Q K^T / sqrt(d_k))`` from ``queries`` (e.g. the response tokens) to ``keys``
    (e.g. the image patches), averaged over the queries: a vector with one value per key."""
    a = attention.detach().cpu().float()
    a = a[head] if a.dim() == 3 else a
    return a[list(queries)][:, list(keys)].mean(0)


def patch_to_tokens(attention: torch.Tensor, head: int, patch: int, tokens: Sequence[int],
                    k: int = 7) -> tuple[torch.Tensor, list[int]]:
    """Eq. 2 the other way round (Figure 11): how much each of ``tokens`` (e.g. response
    tokens) attends to one image ``patch`` position, and the positions in ``tokens`` of the
    ``k`` highest.

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


# ----------------------------------------------------------------------------- PaliGemma


@dataclass
class Saliency:
    """Saliency of one (image, question): maps over the model's patch grid and response tokens."""

    answer: str
    tokens: list[str]
    raw_map: torch.Tensor
    rollout_map: torch.Tensor
    patch: int
    patch_weights: torch.Tensor
    top_tokens: list[int]
    layer: int
    head: int


@torch.no_grad()
def saliency_for(vqa: PaliGemmaVQA, image: Any, question: str, *, layer: int = -2, head: int = 0,
                 head_fusion: str = "mean", discard_ratio: float = 0.9, top_k: int = 7,
                 max_new_tokens: int = 10) -> Saliency:
    """Answer ``question`` about ``image`` greedily, then read the language model's attention:
    one head of ``layer`` from the response tokens to the image patches (Figure 10), the
    response tokens most attending to the brightest patch (Figure 11), and attention rollout
    over all layers (Figure 14), all on the model's own patch grid."""
    vqa.eval()
    image = image.convert("RGB")
    answer = vqa.answer([image], [question], max_new_tokens=max_new_tokens)[0]
    tok = vqa.processor.tokenizer
    inputs = vqa.encode([image], [question])
    prompt_len = inputs["input_ids"].shape[1]
    answer_ids = tok(answer, add_special_tokens=False, return_tensors="pt")["input_ids"].to(inputs["input_ids"].device)
    if answer_ids.shape[1] == 0:
        answer_ids = torch.tensor([[tok.eos_token_id]], device=answer_ids.device)
    ids = torch.cat([inputs["input_ids"], answer_ids], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(answer_ids)], 1)
    types = torch.cat([torch.zeros_like(inputs["input_ids"]), torch.ones_like(answer_ids)], 1)
    out = vqa.model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                    pixel_values=inputs["pixel_values"], output_attentions=True)
    layers = [a[0] for a in out.attentions]
    image_pos = (ids[0] == vqa.processor.image_token_id).nonzero().flatten().tolist()
    response = list(range(prompt_len, ids.shape[1]))
    grid = vqa.grid
    n_layers = len(layers)
    layer_i = layer % n_layers
    head_i = head % layers[layer_i].shape[0]
    raw = raw_attention_map(layers[layer_i], head_i, response, image_pos)
    patch = image_pos[int(raw.argmax())]
    weights, top = patch_to_tokens(layers[layer_i], head_i, patch, response, k=top_k)
    roll = rollout(layers, head_fusion, discard_ratio)
    roll_map = roll[response][:, image_pos].mean(0)
    return Saliency(answer=answer, tokens=tok.convert_ids_to_tokens(answer_ids[0].tolist()),
                    raw_map=to_grid(raw, grid), rollout_map=to_grid(roll_map, grid),
                    patch=image_pos.index(patch), patch_weights=weights, top_tokens=top,
                    layer=layer_i, head=head_i)
